"""The compiled diffusion step (compile_step): one graph without breaks, the same answers as eager, refused up front
where it cannot run; the sampling loop and the prefix path without host reads beyond the documented ones."""

import pytest
import torch

from conftest import build_tiny_model, image_batch, prompt_ids
from lavida_shirg import generation_lavida_shirg as generation
from lavida_shirg.generation_lavida_shirg import compiled_step, denoise_step, run_sampler
from lavida_shirg.masked_diffusion import commit_most_confident, step_noise


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=3)


def inputs(model, sizes=((40, 70), (64, 30)), text_lengths=(6, 12), seed=5):
    """Two left-padded prompts with one image each (the padding makes the attention bias a real mask)."""
    pixel_values, image_sizes, counts = image_batch(model.config, list(sizes), seed=seed)
    input_ids, attention_mask = prompt_ids(model.config, counts, list(text_lengths), seed=seed)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_sizes=image_sizes)


def step_arguments(model, sampling):
    """The arguments of one denoise_step of a real generate() call (captured from run_sampler)."""
    captured = {}

    def capture(answer_logits, batch, vocab_size, sampler, mask_token_id, device, warpers=(), generator=None,
                keep_history=False, step=denoise_step, draft_ids=None):
        captured.update(answer_logits=answer_logits, sampler=sampler, warpers=warpers)
        return run_sampler(answer_logits, batch, vocab_size, sampler, mask_token_id, device, warpers, generator,
                           keep_history, step, draft_ids)

    settings = dict(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, remasking="random") if sampling else {}
    original, generation.run_sampler = generation.run_sampler, capture
    try:
        model.generate(**inputs(model), max_new_tokens=8, steps=4, **settings)
    finally:
        generation.run_sampler = original
    answer_logits, sampler = captured["answer_logits"], captured["sampler"]
    canvas = torch.full((2, 8), model.config.mask_token_id)
    canvas[:, :2] = 7  # two committed positions
    noise = step_noise((2, 8, model.config.text_config.vocab_size), sampler["temperature"], sampler["remasking"], "cpu",
                       torch.Generator().manual_seed(0))
    return (answer_logits, canvas, torch.ones(8, dtype=torch.bool), torch.tensor(3), model.config.mask_token_id,
            sampler["temperature"], sampler["remasking"], captured["warpers"], *noise)


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "top-k-top-p-random-remasking"])
def test_the_step_is_one_graph_without_breaks(model, sampling):
    arguments = step_arguments(model, sampling)
    explanation = torch._dynamo.explain(denoise_step)(*arguments)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    out = denoise_step(*arguments)
    assert ((out != model.config.mask_token_id).sum(dim=1) == 2 + 3).all()  # 3 new commits per sample


def test_the_sampling_loop_reads_nothing_back(model):
    arguments = step_arguments(model, sampling=False)
    sampler = dict(gen_length=8, block_length=4, steps=4, temperature=0.0, remasking="low_confidence",
                   schedule="shift", schedule_shift=3.0)
    explanation = torch._dynamo.explain(run_sampler)(arguments[0], 2, model.config.text_config.vocab_size, sampler,
                                                     model.config.mask_token_id, "cpu")
    # one break: the schedule's float32 arithmetic read back as Python ints (a CPU tensor), before the loop
    assert [frame.name for reason in explanation.break_reasons for frame in reason.user_stack[-1:]] == [
        "transfer_counts"]


def test_the_prefix_path_reads_the_layout_once(model):
    """Pooled images: the only host read of diffusion_generate is embed_inputs' layout read (12 graph breaks
    before issue 13: attention-bias checks and per-function reads of the image sizes)."""
    explanation = torch._dynamo.explain(model.diffusion_generate)(**inputs(model), gen_length=8, steps=4)
    reads = {(frame.name, ".tolist()" in frame.line) for reason in explanation.break_reasons
             for frame in reason.user_stack[-1:]}
    assert reads == {("embed_inputs", True)}
    assert explanation.graph_break_count <= 3


def test_compiled_generation_equals_eager(model):
    batch = inputs(model)
    greedy = dict(gen_length=8, block_length=4, steps=4, schedule="shift")
    eager = model.diffusion_generate(**batch, **greedy)
    assert torch.equal(model.diffusion_generate(**batch, **greedy, compile_step=True), eager)
    other = inputs(model, text_lengths=(9, 4), seed=7)  # another prefix length: no recompilation
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = model.diffusion_generate(**other, **greedy, compile_step=True)
    assert torch.equal(compiled, model.diffusion_generate(**other, **greedy))

    sampled = dict(max_new_tokens=8, steps=4, do_sample=True, temperature=0.7, remasking="random",
                   return_dict_in_generate=True, output_history=True)
    eager = model.generate(**batch, **sampled, generator=torch.Generator().manual_seed(2))
    compiled = model.generate(**batch, **sampled, compile_step=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(compiled.sequences, eager.sequences)
    assert all(torch.equal(a, b) for a, b in zip(compiled.history, eager.history)) and len(compiled.history) == 4


def test_commit_takes_a_tensor_count_and_breaks_ties_towards_the_lower_index():
    canvas = torch.full((1, 5), 9)
    predictions = torch.arange(5)[None]
    confidence = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1]], dtype=torch.float64)
    eligible = torch.tensor([[True, True, True, True, False]])
    for count in (2, torch.tensor(2)):
        assert commit_most_confident(canvas, predictions, confidence, eligible, count).tolist() == [[0, 1, 9, 9, 9]]


@pytest.mark.parametrize("call, message", [
    (dict(use_prefix_cache=False), "compile_step compiles the answer step against the cached prefix: it needs "
                                   "use_prefix_cache=True"),
    (dict(compile_step="yes"), "compile_step must be true or false"),
])
def test_bad_compile_settings_are_refused_before_any_work(model, call, message, monkeypatch):
    runs = []
    monkeypatch.setattr(model.model, "forward", lambda *args, **kwargs: runs.append(kwargs))
    with pytest.raises(ValueError, match=message):
        model.diffusion_generate(**inputs(model), gen_length=8, steps=4, **{"compile_step": True, **call})
    assert runs == [], "no forward before the settings are refused"
    with pytest.raises(ValueError, match=message.split(":")[0]):
        model.generate(**inputs(model), max_new_tokens=8, **{"compile_step": True, **call})


def test_devices_and_dtypes_the_compiled_step_cannot_use_are_named(monkeypatch):
    with pytest.raises(ValueError, match=r"compile_step runs on the devices \('cpu', 'cuda'\), not 'meta'"):
        compiled_step(torch.device("meta"), torch.float32)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Old GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.raises(ValueError, match=r"this GPU \(Old GPU\) has no bfloat16"):
        compiled_step(torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"kv_cache_dtype='float8_e4m3fn' needs a GPU of compute capability >= "
                                         r"8.9, this one has 8.0"):
        compiled_step(torch.device("cuda"), torch.float16, "float8_e4m3fn")

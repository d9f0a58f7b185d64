"""generate() on transformers' conventions: LavidaShirgGenerationConfig, the output dataclass, step history,
sampling controls, and equality with diffusion_generate."""

import json

import numpy as np
import pytest
import torch
from conftest import build_tiny_model, image_batch, prompt_ids
from transformers import GenerationConfig

from lavida_shirg.generation_lavida_shirg import LavidaShirgGenerationConfig, MaskedDiffusionGenerateOutput
from lavida_shirg.masked_diffusion import transfer_counts
from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=3)


@pytest.fixture(scope="module")
def inputs(model):
    sizes = [(40, 70), (64, 30)]
    pixel_values, image_sizes, counts = image_batch(model.config, sizes, seed=2)
    input_ids, attention_mask = prompt_ids(model.config, counts, [6, 11], seed=2)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_sizes=image_sizes)


@pytest.mark.parametrize("settings", [
    dict(max_new_tokens=8),
    dict(max_new_tokens=12, block_length=4, steps=6, schedule="shift"),
    dict(max_new_tokens=8, steps=4, remasking="random", use_prefix_cache=False, prefix_lm_mask=True),
])
def test_generate_equals_diffusion_generate(model, inputs, settings):
    lavida_names = {"max_new_tokens": "gen_length"}
    answers = model.diffusion_generate(**inputs, **{lavida_names.get(k, k): v for k, v in settings.items()},
                                       generator=torch.Generator().manual_seed(0))
    sequences = model.generate(**inputs, **settings, generator=torch.Generator().manual_seed(0))
    prompt_length = inputs["input_ids"].shape[1]
    assert sequences.shape == (2, prompt_length + settings["max_new_tokens"])
    assert torch.equal(sequences[:, :prompt_length], inputs["input_ids"])
    assert torch.equal(sequences[:, prompt_length:], answers)


def test_sampling_equals_diffusion_generate_at_the_same_temperature(model, inputs):
    seeded = dict(generator=torch.Generator().manual_seed(5))
    answers = model.diffusion_generate(**inputs, gen_length=8, temperature=0.7, **seeded)
    sequences = model.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=0.7,
                               generator=torch.Generator().manual_seed(5))
    assert torch.equal(sequences[:, -8:], answers)
    greedy = model.generate(**inputs, max_new_tokens=8)
    assert not torch.equal(sequences, greedy)


def test_history_holds_the_canvas_after_every_step(model, inputs):
    output = model.generate(**inputs, max_new_tokens=12, block_length=4, steps=6, schedule="shift",
                            return_dict_in_generate=True, output_history=True)
    assert isinstance(output, MaskedDiffusionGenerateOutput)
    history = torch.stack(output.history)  # (steps, B, G)
    assert history.shape == (6, 2, 12)
    assert torch.equal(history[-1], output.sequences[:, -12:])
    mask_id = model.config.mask_token_id
    decoded = (history != mask_id).sum(dim=-1)  # (steps, B)
    per_block = transfer_counts(4, 2, "shift")
    expected = torch.tensor(per_block * 3).cumsum(0)
    assert torch.equal(decoded, expected[:, None].expand(6, 2))
    # committed tokens never change afterwards
    for before, after in zip(history[:-1], history[1:]):
        kept = before != mask_id
        assert torch.equal(after[kept], before[kept])
    plain = model.generate(**inputs, max_new_tokens=12, block_length=4, steps=6, schedule="shift",
                           return_dict_in_generate=True)
    assert plain.history is None and torch.equal(plain.sequences, output.sequences)


def test_num_return_sequences(model, inputs):
    prompt_length = inputs["input_ids"].shape[1]
    # greedy answers would be identical copies: refused, as transformers refuses it for greedy decoding
    with pytest.raises(ValueError, match="num_return_sequences=3 without do_sample=True gives identical answers"):
        model.generate(**inputs, max_new_tokens=8, num_return_sequences=3)
    sampled = model.generate(**inputs, max_new_tokens=8, num_return_sequences=3, do_sample=True, temperature=2.0,
                             generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled[:3, :prompt_length], inputs["input_ids"][[0, 0, 0]])
    assert len({tuple(row.tolist()) for row in sampled[:3, prompt_length:]}) > 1
    assert sampled.shape == (6, prompt_length + 8)


@pytest.mark.parametrize("generator, shown", [(0, "0"), (np.random.default_rng(0), "Generator\\(PCG64\\)")])
def test_a_generator_that_is_not_one_on_the_models_device_is_named(model, inputs, generator, shown):
    with pytest.raises(ValueError, match=rf"generator must be a torch.Generator on the model's device \(cpu\), got "
                                         rf".*{shown}"):
        model.generate(**inputs, max_new_tokens=8, do_sample=True, generator=generator)


def test_compile_step_without_a_cxx_compiler_is_refused_up_front(model, inputs):
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("no-such-compiler++",)}):  # restored on exit (monkeypatch deletes it)
        with pytest.raises(ValueError, match="compile_step on CPU needs a C\\+\\+ compiler"):
            model.generate(**inputs, max_new_tokens=8, compile_step=True)
    assert torch._inductor.config.cpp.cxx != ("no-such-compiler++",)


def test_top_k_and_top_p_filter_the_sampled_tokens(model, inputs):
    """With top_k=1 (or a tiny top_p) one token survives per position: any seed gives the same answer."""
    def sample(seed, **filters):
        return model.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=5.0,
                              generator=torch.Generator().manual_seed(seed), **filters)

    assert not torch.equal(sample(0), sample(1))
    assert torch.equal(sample(0, top_k=1), sample(1, top_k=1))
    assert torch.equal(sample(0, top_p=1e-6), sample(1, top_p=1e-6))
    assert torch.equal(sample(0, top_k=1), sample(7, top_p=1e-6))


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_beams=4), "num_beams=4 is not supported by the masked-diffusion sampler: beam search"),
    (dict(max_length=40), "max_length=40 is not supported .* max_new_tokens"),
    (dict(stop_strings=["."]), "stop_strings"),
    (dict(max_new_tokens=12, block_length=5), "block_length must divide max_new_tokens=12, got 5"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(temperature=0.5), "temperature=0.5 has no effect with do_sample=False"),
    (dict(top_k=5), "top_k / top_p filter sampled tokens in LLaDA.s sampler"),
    (dict(steps=4, steps_per_block=2), "pass steps .* or steps_per_block .*, not both"),
    (dict(output_history=True), "output_history .* return_dict_in_generate=True"),
    (dict(num_return_sequences=0), "num_return_sequences must be a positive integer"),
    (dict(colour="red"), r"unknown generation settings \['colour'\]"),
])
def test_bad_generate_arguments(model, inputs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate(**inputs, **kwargs)


def test_plain_generation_config_and_standard_names(model, inputs):
    expected = model.generate(**inputs, max_new_tokens=8, use_prefix_cache=False)
    plain = GenerationConfig(max_new_tokens=8, use_cache=False)
    assert torch.equal(model.generate(**inputs, generation_config=plain), expected)
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, use_cache=False), expected)
    with pytest.raises(ValueError, match="num_beams=2"):
        model.generate(**inputs, generation_config=GenerationConfig(num_beams=2))
    ours = LavidaShirgGenerationConfig(max_new_tokens=8, steps_per_block=4)
    assert torch.equal(model.generate(**inputs, generation_config=ours), model.generate(**inputs, max_new_tokens=8,
                                                                                          steps=4))


def test_generation_config_saves_and_loads_with_the_model(tmp_path):
    model = build_tiny_model(seed=1)
    model.generation_config = LavidaShirgGenerationConfig(max_new_tokens=16, block_length=8, schedule="shift")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert (saved["max_new_tokens"], saved["block_length"], saved["schedule"], saved["schedule_shift"]) == (
        16, 8, "shift", 3.0)
    loaded = LavidaShirgForMaskedDiffusion.from_pretrained(tmp_path)
    assert isinstance(loaded.generation_config, LavidaShirgGenerationConfig)
    assert loaded.generation_config.to_dict() == model.generation_config.to_dict()
    assert "sampler_defaults" not in json.loads((tmp_path / "config.json").read_text())


def test_forward_return_dict_hidden_states_and_logits_with_the_loss(model, inputs):
    with torch.no_grad():
        plain = model(**inputs)
        with_states = model(**inputs, output_hidden_states=True)
        as_tuple = model(**inputs, return_dict=False)
    layers = model.config.text_config.num_hidden_layers
    assert plain.hidden_states is None and len(with_states.hidden_states) == layers + 1
    batch, length = inputs["input_ids"].shape
    assert all(state.shape == (batch, length, model.config.text_config.hidden_size)
               for state in with_states.hidden_states)
    torch.testing.assert_close(model.lm_head(with_states.hidden_states[-1]), plain.logits)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], plain.logits)
    base = model.model(**inputs, output_hidden_states=True)
    torch.testing.assert_close(base.last_hidden_state, with_states.hidden_states[-1])

    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]
    seeded = dict(generator=torch.Generator().manual_seed(0))
    loss_only = model(**inputs, labels=labels, **seeded)
    with_logits = model(**inputs, labels=labels, output_logits=True, generator=torch.Generator().manual_seed(0))
    assert loss_only.logits is None and torch.isfinite(loss_only.loss)
    torch.testing.assert_close(with_logits.loss, loss_only.loss)
    assert with_logits.logits.shape == (2 * batch, length, model.config.text_config.vocab_size)
    masks = with_logits.diffusion_masks  # (2B, T): each target masked in exactly one copy
    assert torch.equal(masks[:batch] | masks[batch:], labels != -100) and not (masks[:batch] & masks[batch:]).any()
    targets = labels.repeat(2, 1)[masks]
    recomputed = torch.nn.functional.cross_entropy(with_logits.logits[masks].float(), targets, reduction="sum")
    torch.testing.assert_close(recomputed / (labels != -100).sum(), with_logits.loss)


def test_causal_labels_are_refused_with_what_diffusion_labels_are(model, inputs):
    with pytest.raises(ValueError, match=r"labels mark \d+ image positions .* diffusion labels hold the answer's"):
        model(**inputs, labels=inputs["input_ids"])
    with pytest.raises(ValueError, match=r"labels must have the inputs' shape"):
        model(**inputs, labels=inputs["input_ids"][:, :-1])
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        model(**inputs, colour="red")


def test_old_flat_weights_still_load(tmp_path):
    """Folders written before the composite structure (base parts at the top level) load unchanged."""
    from safetensors.torch import load_file, save_file

    model = build_tiny_model(seed=6)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    flat = {name.removeprefix("model."): tensor for name, tensor in state.items()}
    assert "vision_tower.embeddings.patch_embedding.weight" in flat and "lm_head.weight" in flat
    save_file(flat, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = LavidaShirgForMaskedDiffusion.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

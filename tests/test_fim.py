"""Text infilling (LaViDa's FIM): drafts in generate() against a restatement of LaViDa's llada/generate.py with
`draft_tokens` (ids and per-step history), the processor's drafts and decoding, the FIM tokens of the config and
the tiny tokenizer, FIM training data by LaViDa's rule and the training forward's treatment of the FIM marker."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model, image_batch, lavida_shift_counts, prompt_ids

from lavida_shirg import ShirgConfig
from lavida_shirg.image_layout import anyres_grid
from lavida_shirg.masked_diffusion import masked_transfer_counts
from lavida_shirg.prefix_cache import PrefixCache


@pytest.fixture(scope="module")
def model():
    """The tiny model whose mask token has logit 0 everywhere, so that, as a trained LLaDA, it never predicts the
    mask as a token (LaViDa's sampler would then run out of its precomputed transfer counts)."""
    model = build_tiny_model(seed=11)
    with torch.no_grad():
        model.lm_head.weight[model.config.mask_token_id] = 0
    return model


def one_prompt(model, size=(40, 70), length=6, seed=3):
    pixel_values, image_sizes, counts = image_batch(model.config, [size], seed=seed)
    input_ids, padding = prompt_ids(model.config, counts, [length], seed=seed)
    return dict(input_ids=input_ids, attention_mask=padding, pixel_values=pixel_values, image_sizes=image_sizes)


# ---- LaViDa's sampler with draft_tokens, restated (one prompt, as predict_fim.py runs it) ----------------------


def lavida_uniform_counts(mask_num, steps):
    """get_num_transfer_tokens: mask_num // steps per step, the remainder one each over the first steps."""
    counts = torch.full((steps,), mask_num // steps, dtype=torch.int64)
    counts[: mask_num % steps] += 1
    return counts


def lavida_fim_generate(model, embeds, gen_length, block_length, steps, draft, schedule=None, shift=3.0,
                        prefix_lm=True, temperature=0.0, generator=None):
    """LaViDa's generate(draft_tokens=...) for one prompt (B = 1), restated: the draft written on the canvas; per
    block the transfer counts of its masked positions (uniform, or shift over min(steps, masked) steps); a step
    whose block has no mask left is skipped (`continue`: no forward, no history); x0 = argmax(exp(l) / (-log u)^T)
    (u drawn from `generator`, (1, G, V) float64, at T > 0); confidence softmax(l)[x0], -inf beyond the block and
    at fixed positions; topk per row. `steps` is per block (LaViDa's steps // num_blocks)."""
    mask_id = model.config.mask_token_id
    embed = model.get_input_embeddings()
    prompt = 0 if prefix_lm else embeds.shape[1]
    x = torch.full((1, prompt + gen_length), mask_id)
    x[:, :prompt] = 0
    x[:, prompt : prompt + draft.shape[1]] = draft
    if prefix_lm:
        cache = PrefixCache()
        model(inputs_embeds=embeds, use_cache=True, past_key_values=cache)
    history = []
    for num_block in range(gen_length // block_length):
        start, stop = prompt + num_block * block_length, prompt + (num_block + 1) * block_length
        mask_num = int((x[:, start:stop] == mask_id).sum())
        num_transfer = (lavida_uniform_counts(mask_num, steps) if schedule is None
                        else lavida_shift_counts(mask_num, steps, shift))
        for i in range(steps):
            mask_index = x == mask_id
            if mask_index[:, start:stop].sum() == 0:
                continue
            current = embed(x)
            if prefix_lm:
                logits = model(inputs_embeds=current, past_key_values=cache).logits
            else:
                current[:, : embeds.shape[1]] = embeds
                logits = model(inputs_embeds=current).logits
            if temperature > 0:
                noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
                x0 = torch.argmax(logits.to(torch.float64).exp() / (-torch.log(noise)) ** temperature, dim=-1)
            else:
                x0 = torch.argmax(logits, dim=-1)
            p = F.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            x0_p[:, stop:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            _, select = torch.topk(confidence[0], k=int(num_transfer[i]))
            x[0, select] = x0[0, select]
            history.append(x[:, prompt:].clone())
    return x[:, prompt:], history


def draft_of(model, pattern, seed=0):
    """A (1, D) draft: 'm' a mask, 'f' the FIM marker, 't' a random text token."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    ids = {"m": config.mask_token_id, "f": config.fim_token_id}
    return torch.tensor([[ids.get(c) or int(torch.randint(10, 190, (1,), generator=generator)) for c in pattern]])


CASES = {
    # gen_length, block_length, steps (total), schedule, shift, draft pattern
    "uniform-two-blocks": (16, 8, 8, "uniform", 3.0, "ttmmmmfmmtmmmf"),
    "shift-third-two-blocks": (16, 8, 8, "shift", 1 / 3, "ttmmmmfmmtmmmf"),
    "shift-lavida-a": (16, 8, 16, "shift", 3.0, "tmmmmmmfmmmmtf"),
    "a-block-fully-fixed": (12, 4, 12, "uniform", 3.0, "ttftmmtf"),
    "shift-fixed-block-short-draft": (12, 4, 9, "shift", 1 / 3, "tftttm"),
    "more-steps-than-masks": (8, 8, 8, "uniform", 3.0, "tmtmtf"),
    "shift-more-steps-than-masks": (8, 8, 8, "shift", 1 / 3, "tmtmtf"),
}


@pytest.mark.parametrize("use_cache", [True, False], ids=["prefix-cache", "no-cache"])
@pytest.mark.parametrize("case", list(CASES))
def test_drafted_generation_equals_lavidas_draft_tokens_path(model, case, use_cache):
    gen_length, block_length, steps, schedule, shift, pattern = CASES[case]
    inputs = one_prompt(model)
    draft = draft_of(model, pattern)
    out = model.generate(**inputs, draft_ids=draft, max_new_tokens=gen_length, block_length=block_length, steps=steps,
                         schedule=schedule, schedule_shift=shift, use_cache=use_cache, return_dict_in_generate=True,
                         output_history=True)
    with torch.no_grad():
        embeds = model.model.inputs_and_mask(**inputs)[0]
        expected, history = lavida_fim_generate(
            model, embeds, gen_length, block_length, steps // (gen_length // block_length), draft,
            None if schedule == "uniform" else "shift", shift, prefix_lm=use_cache)
    assert len(out.history) == len(history)
    for step, (ours, theirs) in enumerate(zip(out.history, history)):
        assert torch.equal(ours, theirs), f"step {step}: {ours.tolist()} != {theirs.tolist()}"
    answer = out.sequences[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(answer, expected)
    fixed = draft != model.config.mask_token_id
    assert torch.equal(answer[:, : draft.shape[1]][fixed], draft[fixed]), "the draft's ids stay where they were"
    masked_steps = sum(min(steps // (gen_length // block_length), int(n)) for n in
                       (F.pad(draft, (0, gen_length - draft.shape[1]), value=model.config.mask_token_id)
                        == model.config.mask_token_id).view(-1, block_length).sum(1))
    if schedule == "shift" or "more-steps" in case or "fixed" in case:
        assert len(history) == masked_steps, "skipped steps leave no history entry"


def test_sampled_drafted_generation_draws_like_lavida(model):
    """At temperature > 0 the skipped steps draw no noise: the seeded draws line up with the restatement's."""
    inputs = one_prompt(model)
    draft = draft_of(model, "ttftmmtf")
    out = model.generate(**inputs, draft_ids=draft, max_new_tokens=12, block_length=4, steps=12, do_sample=True,
                         temperature=0.8, return_dict_in_generate=True, output_history=True,
                         generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        embeds = model.model.inputs_and_mask(**inputs)[0]
        expected, history = lavida_fim_generate(model, embeds, 12, 4, 4, draft, temperature=0.8,
                                                generator=torch.Generator().manual_seed(4))
    assert len(out.history) == len(history) == 2 + 4
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(out.history, history))
    assert torch.equal(out.sequences[:, -12:], expected)


def test_per_block_counts_follow_the_masked_positions():
    assert masked_transfer_counts(8, 4, "uniform") == [2, 2, 2, 2]
    assert masked_transfer_counts(3, 4, "uniform") == [1, 1, 1, 0]
    assert masked_transfer_counts(3, 4, "shift", 1 / 3) == [1, 1, 1, 0]
    assert masked_transfer_counts(0, 4, "shift") == masked_transfer_counts(0, 4, "uniform") == [0, 0, 0, 0]
    for masked in range(0, 20):
        for steps in (1, 3, 8):
            for shift in (1 / 3, 3.0):
                assert masked_transfer_counts(masked, steps, "shift", shift) == (
                    lavida_shift_counts(masked, steps, shift) + [0] * (steps - min(steps, masked)))
            assert masked_transfer_counts(masked, steps, "uniform") == lavida_uniform_counts(masked, steps).tolist()


def test_a_batch_of_different_drafts_equals_one_by_one(model):
    pixel_values, image_sizes, counts = image_batch(model.config, [(40, 70), (20, 20)], seed=6)
    input_ids, padding = prompt_ids(model.config, counts, [6, 10], seed=6)
    mask = model.config.mask_token_id
    drafts = [draft_of(model, "ttmmmmfmmt", seed=1), draft_of(model, "tmmf", seed=2)]
    batch_draft = torch.full((2, 10), mask)
    batch_draft[0], batch_draft[1, :4] = drafts[0][0], drafts[1][0]
    settings = dict(gen_length=16, block_length=8, steps=8, schedule="shift", schedule_shift=1 / 3)
    batched = model.diffusion_generate(input_ids, padding, pixel_values, image_sizes, draft_ids=batch_draft, **settings)
    grids = [anyres_grid(size, model.config.image_grid_pinpoints, 32) for size in image_sizes.tolist()]
    views = [1 + rows * cols for rows, cols in grids]
    starts = [0, views[0]]
    for i in range(2):
        keep = padding[i].bool()
        single = model.diffusion_generate(input_ids[i : i + 1, keep], None,
                                          pixel_values[starts[i] : starts[i] + views[i]], image_sizes[i : i + 1],
                                          draft_ids=drafts[i], **settings)
        assert torch.equal(single[0], batched[i]), f"sample {i}"
    assert not torch.equal(batched[0, :4], batched[1, :4])


def test_without_a_draft_nothing_changes(model):
    """An all-mask draft is the no-draft path (same ids, same history)."""
    inputs = one_prompt(model)
    settings = dict(max_new_tokens=8, block_length=4, steps=4, schedule="shift", return_dict_in_generate=True,
                    output_history=True)
    plain = model.generate(**inputs, **settings)
    masks = model.generate(**inputs, draft_ids=torch.full((1, 8), model.config.mask_token_id), **settings)
    assert torch.equal(plain.sequences, masks.sequences) and len(plain.history) == len(masks.history) == 4


@pytest.mark.parametrize("draft,message", [
    (torch.zeros(1, 9, dtype=torch.long), "more than the answer's max_new_tokens"),
    (torch.zeros(2, 4, dtype=torch.long), "2 rows for 1 prompts"),
    (torch.zeros(4, dtype=torch.long), "draft_ids must be a"),
    (torch.zeros(1, 4), "draft_ids must be a"),
    (torch.full((1, 4), 512), r"draft_ids must be token ids of the LM vocabulary \[0, 512\)"),
])
def test_bad_draft_ids_are_named(model, draft, message):
    with pytest.raises(ValueError, match=message):
        model.generate(**one_prompt(model), draft_ids=draft, max_new_tokens=8)


def test_dream_refuses_drafts():
    dream = build_tiny_model(seed=1, preset="tiny-dream")
    with pytest.raises(ValueError, match="LaViDa has no FIM for Dream"):
        dream.generate(**one_prompt(dream), draft_ids=torch.zeros(1, 4, dtype=torch.long), max_new_tokens=8)


# ---- FIM training data and the training forward ----------------------------------------------------------------

FIM, FILL = "<|reserved_token_1|>", "<|reserved_token_2|>"


def lavida_infill_answer(content):
    """LaViDa's train.py (IS_INFILLE_MODEL) + infill_utils.insert_infill_substrings, restated on the global numpy
    RNG: 80% of the answers of more than 3 words, N = min(max(5, int(0.1 n)), 10), n ~ randint(1, N + 1) sorted
    distinct boundaries of range(1, len(words)), k ~ randint(0, K + 1) fillers then the marker, joined by spaces."""
    n_words = len(content.split())
    if not (n_words > 3 and np.random.rand() < 0.8):
        return content
    N = min(max(5, int(n_words * 0.1)), 10)
    words = content.split()
    n = np.random.randint(1, N + 1)
    if len(words) < 2 or n == 0:
        return content
    insert_positions = sorted(np.random.choice(range(1, len(words)), size=min(n, len(words) - 1), replace=False))
    result = []
    for i, word in enumerate(words):
        result.append(word)
        if i + 1 in insert_positions:
            k = np.random.randint(0, 5 + 1)
            result.append("".join([FILL] * k + [FIM]) if k > 0 else FIM)
    return " ".join(result)


ANSWERS = ["Yes", "a red box", "The quick brown fox jumps", "one two three four",
           "A long answer\nwith   several lines and many words " * 8, " ".join(map(str, range(150)))]


def test_fim_answers_equal_lavidas_rule_under_the_same_draws():
    from shirg_tools.training_data import insert_infill_markers

    changed = 0
    for seed in range(40):
        for answer in ANSWERS:
            np.random.seed(seed)
            expected = lavida_infill_answer(answer)
            ours = insert_infill_markers(answer, np.random.RandomState(seed), FIM, FILL)
            assert ours == expected, (seed, answer)
            changed += ours != answer
    assert changed > 40


def test_fim_answers_follow_the_rule():
    """Distribution over seeds of a 30-word answer: changed 80% of the time; 1..5 markers at distinct word
    boundaries; 0..5 fillers before each, uniform; the words unchanged and in order; short answers never change."""
    from shirg_tools.training_data import insert_infill_markers

    words = [f"w{i}" for i in range(30)]
    answer = " ".join(words)
    markers, fills, changed = [], [], 0
    for seed in range(2000):
        out = insert_infill_markers(answer, np.random.RandomState(seed), FIM, FILL)
        pieces = out.split(" ")
        assert [p for p in pieces if FIM not in p] == words
        inserted = [p for p in pieces if FIM in p]
        assert all(p == FILL * p.count(FILL) + FIM for p in inserted)
        assert pieces[0] == words[0] and FIM not in pieces[-1] or not inserted
        changed += bool(inserted)
        if inserted:
            markers.append(len(inserted))
            fills += [p.count(FILL) for p in inserted]
        assert insert_infill_markers("a b c", np.random.RandomState(seed), FIM, FILL) == "a b c"
    assert abs(changed / 2000 - 0.8) < 0.03
    assert set(markers) == {1, 2, 3, 4, 5} and max(np.bincount(markers)[1:]) / min(np.bincount(markers)[1:]) < 1.3
    assert set(fills) == set(range(6))
    assert np.allclose(np.bincount(fills) / len(fills), 1 / 6, atol=0.02)
    # N grows with the answer: 150 words give up to 10 markers
    long = [insert_infill_markers(ANSWERS[-1], np.random.RandomState(s), FIM, FILL).count(FIM) for s in range(300)]
    assert max(long) == 10


def tiny_processor(model=None):
    from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
    from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer

    return LavidaShirgProcessor.from_config(ShirgConfig.from_preset("tiny") if model is None else model.config,
                                            build_tiny_tokenizer())


def test_fim_answers_encode_their_markers_as_lavida_tokenizes_them():
    processor = tiny_processor()
    answer = f"the red {FILL}{FILL}{FIM} box is <|eot_id|> here {FIM} now"
    ids = processor.encode_answer(answer, fim_tokens=True)
    lavida = processor.tokenizer(answer.replace("<|eot_id|>", ""), add_special_tokens=False)["input_ids"]
    assert ids.count(192) == 2 and ids.count(193) == 2 and ids[-1] == processor.eot_token_id
    # LaViDa tokenizes the whole string, special tokens parsed; a literal <|eot_id|> in the answer stays text here
    plain = processor.encode_answer(answer.replace("<|eot_id|>", ""), fim_tokens=True)
    assert plain[:-1] == lavida
    assert 5 not in ids[:-1], "other special-token strings stay text"
    assert 192 not in processor.encode_answer(answer), "without fim_tokens the markers are text"


def test_fim_training_source_and_batches(tmp_path):
    """train.py --fim: FimAnswers over the source (seeded by seed and index), answers encoded with the marker ids,
    labels holding them; the trainer's item count leaves the markers out; one training step runs."""
    import datasets
    from PIL import Image

    import train

    rows = 4
    images = [Image.new("RGB", (64, 64), (i * 40, 0, 0)) for i in range(rows)]
    answers = [[" ".join(f"word{j}" for j in range(12 + i))] for i in range(rows)]
    datasets.Dataset.from_dict({"image": images, "question": ["Describe it."] * rows, "answers": answers}
                               ).save_to_disk(str(tmp_path / "vqa"))
    common = ["--data_format", "vqa", "--data_path", str(tmp_path / "vqa"), "--per_device_train_batch_size", "2",
              "--use_cpu", "--dataloader_num_workers", "0", "--save_steps", "1000", "--max_steps", "1",
              "--budgets", "pooled", "--seed", "3"]
    run = train.build_run([*common, "--output_dir", str(tmp_path / "out"), "--fim"])
    dataset = run.trainer.train_dataset
    with_markers = [dataset[i]["answer"].count(192) for i in range(rows)]
    assert sum(with_markers) > 0
    again = train.build_run([*common, "--output_dir", str(tmp_path / "out2"), "--fim"]).trainer.train_dataset
    assert [again[i]["answer"] for i in range(rows)] == [dataset[i]["answer"] for i in range(rows)]
    labels = torch.tensor([[-100, 7, 192, 193, 192, 8], [-100, -100, 9, 192, 10, 11]])
    assert int(run.trainer._get_num_items_in_batch([{"labels": labels}], "cpu")) == 6
    run.release()
    summary = train.main([*common, "--output_dir", str(tmp_path / "trained"), "--fim"])
    assert summary["steps"] == 1 and np.isfinite(summary["last_logged_loss"])


def test_fim_needs_fim_tokens(tmp_path):
    import train

    overrides = '{"fim_token_id": null, "fill_token_id": null}'
    with pytest.raises(ValueError, match="--fim needs a model whose config has fim_token_id"):
        train.build_run(["--use_cpu", "--output_dir", str(tmp_path / "out"), "--fim", "--config_overrides",
                         overrides])


def test_the_fim_marker_is_never_masked_nor_predicted_and_fillers_are_targets(model):
    """forward(labels=...) with FIM markers in the labels: the loss equals an independent computation in which the
    masks are drawn over the targets without the markers (same draws), the markers keep their embedding in both
    copies, are never predicted and do not count in the denominator."""
    config = model.config
    pixel_values, image_sizes, counts = image_batch(config, [(40, 70), (64, 30)], seed=2)
    input_ids, padding = prompt_ids(config, counts, [6, 9], seed=2, pad_left=False)
    fim, fill = config.fim_token_id, config.fill_token_id
    answer = torch.tensor([[21, fill, fill, fim, 23, fim, config.eot_token_id, 0],
                           [31, fim, 32, fill, fim, config.eot_token_id, 0, 0]])
    input_ids = torch.cat((input_ids, answer), 1)
    padding = torch.cat((padding, torch.ones_like(answer)), 1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -answer.shape[1]:] = answer
    batch = dict(input_ids=input_ids, attention_mask=padding, pixel_values=pixel_values, image_sizes=image_sizes)
    out = model(**batch, labels=labels, output_logits=True, generator=torch.Generator().manual_seed(5))
    markers = labels == fim
    assert not out.diffusion_masks[markers.repeat(2, 1)].any(), "a marker is masked in neither copy"
    from lavida_shirg.masked_diffusion import sample_complementary_masks

    targets = (labels != -100) & ~markers
    masked, complement, _ = sample_complementary_masks(targets, config.min_mask_probability,
                                                       torch.Generator().manual_seed(5))
    assert torch.equal(out.diffusion_masks, torch.cat((masked, complement)))
    total = 0.0
    with torch.no_grad():
        for copy in (masked, complement):
            logits = model(**dict(batch, input_ids=input_ids.masked_fill(copy, config.mask_token_id))).logits
            total = total + F.cross_entropy(logits[copy], labels[copy], reduction="sum")
    torch.testing.assert_close(out.loss, total / targets.sum(), atol=1e-5, rtol=1e-5)
    assert (masked | complement)[labels == fill].all(), "fillers are targets"


# ---- config and processor --------------------------------------------------------------------------------------


def test_fim_token_ids_of_the_presets_and_their_checks():
    assert (ShirgConfig.from_preset("lavida-llada").fim_token_id, ShirgConfig.from_preset("lavida-llada").fill_token_id
            ) == (126085, 126086)
    assert (ShirgConfig.from_preset("tiny").fim_token_id, ShirgConfig.from_preset("reader").fill_token_id) == (192, 193)
    assert ShirgConfig.from_preset("tiny-dream").fim_token_id is None
    assert ShirgConfig.from_preset("lavida-dream").fim_token_id is None and ShirgConfig().fim_token_id is None
    for overrides, message in [
        (dict(fill_token_id=None), "set together"),
        (dict(fim_token_id=600), r"fim_token_id must be a token of the LM vocabulary \[0, 512\)"),
        (dict(fill_token_id=2), "fill_token_id must be a token of the LM vocabulary"),
        (dict(fim_token_id=193), "must differ"),
        (dict(fim_token_id="192"), "fim_token_id must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            ShirgConfig.from_preset("tiny", **overrides)


def test_drafts_become_right_padded_draft_ids():
    from PIL import Image

    processor = tiny_processor()
    tokenizer = processor.tokenizer
    image = Image.new("RGB", (40, 30))
    prompt = processor.build_prompt("Describe it.")
    text = "Sure<|mdm_mask|><|mdm_mask|><|reserved_token_1|>\n<|eot_id|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[-5:] == [2, 2, 192, 204, 5]
    single = processor(images=[image, image], text=[prompt, prompt], draft=text)["draft_ids"]
    assert single.tolist() == [ids, ids] and single.dtype == torch.int64
    both = processor(images=[image, image], text=[prompt, prompt], draft=[text, "a b"])["draft_ids"]
    short = tokenizer("a b", add_special_tokens=False)["input_ids"]
    assert both.tolist() == [ids, short + [2] * (len(ids) - len(short))]
    for as_ids in ([7, 2, 192], np.array([[7, 2, 192]]), torch.tensor([7, 2, 192]), [[7, 2, 192]]):
        assert processor(images=image, text=prompt, draft=as_ids)["draft_ids"].tolist() == [[7, 2, 192]]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi?"}]}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", processor_kwargs={"draft": text})
    assert chat["draft_ids"].tolist() == [ids]


@pytest.mark.parametrize("call,message", [
    (dict(draft=["a", "b", "c"]), "`draft` must be a string, a list of non-negative token ids, or one of these per "
                                  r"prompt \(2 prompts\)"),
    (dict(draft=[1.5, 2]), "`draft` must be"),
    (dict(draft=[-1, 2]), "`draft` must be"),
    (dict(draft=""), "`draft` is empty"),
    (dict(draft="<image>"), "`draft` holds the image token"),
    (dict(draft="x", answers=["a", "b"]), "a training call"),
])
def test_bad_drafts_are_named(call, message):
    from PIL import Image

    processor = tiny_processor()
    image = Image.new("RGB", (40, 30))
    prompt = processor.build_prompt("Describe it.")
    with pytest.raises(ValueError, match=message):
        processor(images=[image, image], text=[prompt, prompt], **call)


def test_a_processor_without_the_mask_id_refuses_drafts():
    from PIL import Image

    processor = tiny_processor()
    processor.mask_token_id = None
    with pytest.raises(ValueError, match="`draft` needs the model's mask_token_id"):
        processor(images=Image.new("RGB", (40, 30)), text=processor.build_prompt("Hi?"), draft="x")


def test_decoding_drops_the_fim_tokens_with_the_special_tokens():
    processor = tiny_processor()
    ids = processor.tokenizer("A red<|reserved_token_2|><|reserved_token_2|><|reserved_token_1|>\nBlue"
                              "<|reserved_token_1|><|eot_id|><|endoftext|>", add_special_tokens=False)["input_ids"]
    batch = torch.tensor([ids, ids])
    assert processor.batch_decode(batch, skip_special_tokens=True) == ["A red\nBlue"] * 2
    assert processor.post_process_image_text_to_text(batch) == ["A red\nBlue"] * 2
    assert processor.decode(ids, skip_special_tokens=True) == "A red\nBlue"
    assert processor.decode_answers(batch) == ["A red\nBlue"] * 2
    shown = processor.batch_decode(batch)[0]  # LaViDa's predict_fim.py prints them
    assert shown.startswith("A red<|reserved_token_2|><|reserved_token_2|><|reserved_token_1|>\nBlue")
    # dropped by id (whether or not a tokenizer marks them special)
    assert processor.without_fim_tokens(torch.tensor([[7, 192, 193, 5], [193, 8, 9, 192]])) == [[7, 5], [8, 9]]
    assert processor.without_fim_tokens(np.array([192, 7])) == [7]
    assert processor.decode(192, skip_special_tokens=True) == "" and processor.decode(torch.tensor(56)) == "S"


# ---- the pipeline in a fresh process ---------------------------------------------------------------------------

PIPELINE = """
import json, sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
folder, draft, out_path = sys.argv[1:]
image = Image.new("RGB", (40, 30), (200, 10, 10))
messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
reader = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
calls = []
generate = reader.model.generate
def recording_generate(**kwargs):
    calls.append(kwargs["draft_ids"].tolist())
    return generate(**kwargs)
reader.model.generate = recording_generate
settings = dict(max_new_tokens=16, generate_kwargs={"block_length": 8, "steps": 16, "schedule": "shift",
                                                    "schedule_shift": 1 / 3})
filled = reader(text=messages, draft=draft, return_full_text=False, **settings)[0]["generated_text"]
prompt = reader.processor.build_prompt("Colour?")
plain_prompt = reader(image, text=prompt, draft=draft, return_full_text=False, **settings)[0]["generated_text"]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt", processor_kwargs={"draft": draft})
sequences = model.generate(**inputs, max_new_tokens=16, **settings["generate_kwargs"])
answer = sequences[:, inputs["input_ids"].shape[1]:]
json.dump({"filled": filled, "plain_prompt": plain_prompt, "calls": calls, "draft_ids": inputs["draft_ids"].tolist(),
           "answer": answer.tolist(), "decoded": processor.batch_decode(answer, skip_special_tokens=True)[0],
           "shown": processor.batch_decode(answer)[0]}, open(out_path, "w"))
"""


def test_the_pipeline_fills_a_draft_in_a_fresh_process(model, tmp_path):
    """pipeline("image-text-to-text")(..., draft=...) in a fresh process: the draft reaches generate as draft_ids,
    the answer keeps every fixed id of the draft at its position, and the text is the direct generate's answer
    decoded without special tokens (no FIM marker or filler)."""
    import json
    import os
    import subprocess
    import sys

    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tiny_processor(model).save_pretrained(folder)
    draft = ("Sure<|mdm_mask|><|mdm_mask|><|mdm_mask|><|reserved_token_1|> red<|mdm_mask|><|mdm_mask|>"
             "<|reserved_token_1|>")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", PIPELINE, str(folder), draft, str(tmp_path / "out.json")], check=True,
                   env=environment, cwd=tmp_path)
    result = json.loads((tmp_path / "out.json").read_text())
    draft_ids = tiny_processor().tokenizer(draft, add_special_tokens=False)["input_ids"]
    assert result["calls"] == [[draft_ids], [draft_ids]] and result["draft_ids"] == [draft_ids]
    answer = result["answer"][0]
    assert all(answer[i] == token for i, token in enumerate(draft_ids) if token != model.config.mask_token_id)
    assert 2 not in answer[: len(draft_ids)], "every masked position of the draft is filled"
    assert result["filled"] == result["plain_prompt"] == result["decoded"]
    assert result["filled"].startswith("Sure") and " red" in result["filled"] and "reserved" not in result["filled"]
    assert result["shown"].count("<|reserved_token_1|>") == 2


def test_compiled_steps_with_per_row_drafts_equal_eager(model):
    """compile_step: the per-row counts (B,) enter the one compiled graph; the same answers as eager."""
    pixel_values, image_sizes, counts = image_batch(model.config, [(40, 70), (20, 20)], seed=6)
    input_ids, padding = prompt_ids(model.config, counts, [6, 10], seed=6)
    draft = torch.cat((draft_of(model, "ttmmmmfmmt", seed=1), F.pad(draft_of(model, "tmmf", seed=2), (0, 6), value=2)))
    settings = dict(draft_ids=draft, max_new_tokens=16, block_length=8, steps=8, schedule="shift",
                    return_dict_in_generate=True, output_history=True)
    inputs = dict(input_ids=input_ids, attention_mask=padding, pixel_values=pixel_values, image_sizes=image_sizes)
    eager = model.generate(**inputs, **settings)
    compiled = model.generate(**inputs, **settings, compile_step=True)
    assert torch.equal(eager.sequences, compiled.sequences) and len(eager.history) == len(compiled.history)

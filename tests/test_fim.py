"""Text infilling (LaViDa's FIM): drafts in generate() against a restatement of LaViDa's llada/generate.py with
`draft_tokens` (ids and per-step history), the processor's drafts and decoding, the FIM tokens of the config and
the tiny tokenizer, FIM training data by LaViDa's rule and the training forward's treatment of the FIM marker."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model, image_batch, prompt_ids

from lavida_shirg import ShirgConfig
from lavida_shirg.configuration_lavida_shirg import PRESETS
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


def lavida_shift_counts(mask_num, steps, shift):
    """get_num_transfer_tokens_sch(schedule="shift"): min(steps, mask_num) steps; int64(sigma(t) mask_num) on a
    float32 linspace, differences clamped at 1, the excess taken back cyclically from entries above 1, flipped."""
    steps = int(min(steps, mask_num))
    t = torch.linspace(0, 1, steps + 1)
    sigma = shift * t / (1 + (shift - 1) * t)
    cumulative = (sigma * torch.tensor([mask_num])).to(torch.int64)
    counts = torch.clamp(cumulative[1:] - cumulative[:-1], 1, None)
    delta, j = int(counts.sum()) - mask_num, 0
    while delta > 0:
        j = j % len(counts)
        if counts[j] == 1:
            j += 1
            continue
        delta -= 1
        counts[j] -= 1
        j += 1
    return counts.flip(-1)


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
                    lavida_shift_counts(masked, steps, shift).tolist() + [0] * (steps - min(steps, masked)))
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
    views = [1 + r * c for r, c in (anyres_grid(s, model.config.image_grid_pinpoints, 32) for s in image_sizes.tolist())]
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
    dream = build_tiny_model(seed=1, text_config=dict(PRESETS["tiny-dream"]["text_config"]))
    with pytest.raises(ValueError, match="LaViDa has no FIM for Dream"):
        dream.generate(**one_prompt(dream), draft_ids=torch.zeros(1, 4, dtype=torch.long), max_new_tokens=8)

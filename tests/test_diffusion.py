"""Masked-diffusion loss and sampler: masks, loss value, schedules, cache equivalence, batching."""

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model, image_batch, lavida_shift_counts, prompt_ids

from lavida_shirg.generation_lavida_shirg import LavidaShirgGenerationConfig

from lavida_shirg.masked_diffusion import (
    commit_most_confident,
    sample_complementary_masks,
    sample_tokens,
    step_noise,
    transfer_counts,
)


def test_complementary_masks_cover_every_target_exactly_once():
    generator = torch.Generator().manual_seed(0)
    targets = torch.rand(64, 40, generator=generator) < 0.3
    targets[0] = False  # a sample without targets
    targets[1] = False
    targets[1, 5] = True  # a single target
    targets[2] = True  # targets only: the position of the smallest u is a target
    masked, complement, p = sample_complementary_masks(targets, 1e-3, generator)
    assert torch.equal(masked | complement, targets)
    assert not (masked & complement).any()
    assert not (masked & ~targets).any() and not (complement & ~targets).any()
    assert masked[2].any(), "the smallest u of the sequence is always under the cutoff"
    assert ((p >= 1e-3) & (p <= 1)).all()


def test_mask_rate_follows_p():
    """Over many positions the masked fraction of a sample equals its p (law of large numbers)."""
    generator = torch.Generator().manual_seed(1)
    targets = torch.ones(16, 20000, dtype=torch.bool)
    masked, _, p = sample_complementary_masks(targets, 1e-3, generator)
    torch.testing.assert_close(masked.float().mean(1), p, atol=0.02, rtol=0)


def loss_batch(model):
    config = model.config
    pixel_values, image_sizes, counts = image_batch(config, [(40, 70), (64, 30)], seed=2)
    input_ids, padding = prompt_ids(config, counts, [6, 9], seed=2, pad_left=False)
    answer = torch.tensor([[21, 22, 23, config.eot_token_id, config.eos_token_id],
                           [31, 32, config.eot_token_id, config.eos_token_id, config.eos_token_id]])
    input_ids = torch.cat((input_ids, answer), dim=1)
    padding = torch.cat((padding, torch.ones_like(answer)), dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -answer.shape[1]:] = answer
    return dict(input_ids=input_ids, attention_mask=padding, pixel_values=pixel_values, image_sizes=image_sizes,
                labels=labels)


@pytest.mark.parametrize("weighting", ["mean", "inverse_probability"])
def test_diffusion_loss_equals_independent_computation(weighting):
    model = build_tiny_model(seed=3, loss_weighting=weighting)
    batch = loss_batch(model)
    loss = model(**batch, generator=torch.Generator().manual_seed(7)).loss
    targets = batch["labels"] != -100
    masked, complement, p = sample_complementary_masks(targets, 1e-3, torch.Generator().manual_seed(7))
    mask_id = model.config.mask_token_id
    total = 0.0
    for copy, probability in ((masked, p), (complement, 1 - p)):
        # the masked positions get the mask token; with no image tokens masked, this is an ordinary forward
        noisy = batch["input_ids"].masked_fill(copy, mask_id)
        logits = model(input_ids=noisy, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                       image_sizes=batch["image_sizes"]).logits
        ce = F.cross_entropy(logits[copy], batch["labels"][copy], reduction="none")
        if weighting == "inverse_probability":
            ce = ce / probability.clamp_min(1e-3)[:, None].expand_as(copy)[copy]
        total = total + ce.sum()
    torch.testing.assert_close(loss, total / targets.sum(), atol=1e-5, rtol=1e-5)


def test_loss_uses_num_items_in_batch_as_denominator(tiny_model):
    batch = loss_batch(tiny_model)
    mean = tiny_model(**batch, generator=torch.Generator().manual_seed(1)).loss
    summed = tiny_model(**batch, num_items_in_batch=torch.tensor(1), generator=torch.Generator().manual_seed(1)).loss
    torch.testing.assert_close(summed, mean * (batch["labels"] != -100).sum())


def test_prompt_positions_never_receive_gradient_as_targets(tiny_model):
    """Changing the label ids at ignored positions (-100) changes nothing; the prompt is never a target."""
    batch = loss_batch(tiny_model)
    loss = tiny_model(**batch, generator=torch.Generator().manual_seed(2)).loss
    # same mask draw, different ignored content: the loss only depends on targets
    labels = batch["labels"].clone()
    batch_other = dict(batch, input_ids=batch["input_ids"].masked_fill((labels == -100) & (batch["input_ids"] < 500), 9))
    loss_other = tiny_model(**batch_other, generator=torch.Generator().manual_seed(2)).loss
    assert not torch.isclose(loss, loss_other), "prompt content conditions the prediction"
    no_targets = dict(batch, labels=torch.full_like(labels, -100))
    assert tiny_model(**no_targets).loss == 0


def test_prefix_lm_training_hides_answer_from_prompt():
    """With prefix_lm_training, the prompt's hidden states do not depend on the answer tokens."""
    model = build_tiny_model(seed=4, prefix_lm_training=True)
    batch = loss_batch(model)
    targets = batch["labels"] != -100
    prefix_lengths = targets.int().argmax(1)
    embeds, _, _ = model.model.embed_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_sizes"])
    hidden = model.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                         prefix_lengths=prefix_lengths).last_hidden_state
    other = embeds.clone()
    other[targets] = torch.randn_like(other[targets])
    hidden_other = model.model(inputs_embeds=other, attention_mask=batch["attention_mask"],
                               prefix_lengths=prefix_lengths).last_hidden_state
    prompt = ~targets
    torch.testing.assert_close(hidden[prompt], hidden_other[prompt])
    assert (hidden[targets] - hidden_other[targets]).abs().amax() > 1e-3


# ---- schedules -----------------------------------------------------------------------------------------------


def test_uniform_schedule_front_loads_the_remainder():
    assert transfer_counts(10, 4) == [3, 3, 2, 2]
    assert transfer_counts(8, 8) == [1] * 8


def test_shift_schedule_hand_computed():
    # a = 1/3, L = 8, S = 4: f(t) = [0, .1, .25, .5, 1] -> floor(8 f) = [0, 0, 2, 4, 8] -> deltas [0, 2, 2, 4]
    # -> at least 1: [1, 2, 2, 4] (sum 9) -> take one from the first > 1: [1, 1, 2, 4] -> reversed [4, 2, 1, 1]
    assert transfer_counts(8, 4, "shift", 1 / 3) == [4, 2, 1, 1]
    # a = 3 (LaViDa's): f(t) = [0, .5, .75, .9, 1] -> floor(8 f) = [0, 4, 6, 7, 8] -> [4, 2, 1, 1] -> reversed
    assert transfer_counts(8, 4, "shift") == [1, 1, 2, 4]
    # a = 1 is the linear schedule: floor(L i / S) differences, reversed
    assert transfer_counts(10, 4, "shift", 1.0) == [3, 2, 3, 2]


@pytest.mark.parametrize("length,steps", [(8, 4), (64, 32), (32, 16), (16, 16), (32, 8), (7, 3), (128, 64), (5, 1),
                                          (16, 5), (64, 64)])
def test_shift_schedule_equals_lavida(length, steps):
    counts = transfer_counts(length, steps, "shift")
    assert counts == lavida_shift_counts(length, steps)
    assert sum(counts) == length and min(counts) >= 1


def test_shift_schedule_at_lavida_settings():
    assert transfer_counts(8, 4, "shift") == [1, 1, 2, 4]
    counts = transfer_counts(64, 32, "shift")  # LaViDa's predict.py: 64 tokens, 32 steps
    assert counts[:8] == [1] * 8 and counts[-1] > counts[0]
    assert LavidaShirgGenerationConfig().schedule_shift == 3


@pytest.mark.parametrize("schedule", ["uniform", "shift"])
@pytest.mark.parametrize("length,steps", [(32, 16), (16, 16), (64, 8), (7, 3), (128, 64), (5, 1)])
def test_schedules_sum_to_block_length(schedule, length, steps):
    for shift in (1 / 3, 3.0):
        counts = transfer_counts(length, steps, schedule, shift)
        assert len(counts) == steps and sum(counts) == length and min(counts) >= 1


# ---- sampler rules ---------------------------------------------------------------------------------------------


def test_commit_writes_the_most_confident_eligible_positions():
    canvas = torch.full((2, 5), 9)
    predictions = torch.arange(10).view(2, 5)
    confidence = torch.tensor([[0.1, 0.9, 0.8, 0.7, 0.2], [0.5, 0.4, 0.3, 0.2, 0.99]])
    eligible = torch.tensor([[True, False, True, True, True], [True, True, True, True, False]])
    out = commit_most_confident(canvas, predictions, confidence, eligible, 2)
    assert out.tolist() == [[9, 9, 2, 3, 9], [5, 6, 9, 9, 9]]


def test_gumbel_sampling_is_seeded_and_tempered():
    logits = torch.randn(2, 3, 50)
    assert torch.equal(sample_tokens(logits, 0.0), logits.argmax(-1))
    def noise(shape, seed):
        return step_noise(shape, 1.0, "low_confidence", "cpu", torch.Generator().manual_seed(seed))[0]

    a = sample_tokens(logits, 1.0, noise(logits.shape, 0))
    b = sample_tokens(logits, 1.0, noise(logits.shape, 0))
    assert torch.equal(a, b)
    # with a huge temperature the draw is nearly uniform: over many draws more than one token appears
    draws = sample_tokens(logits[:1].expand(200, 3, 50), 100.0, noise((200, 3, 50), 1))
    assert draws[:, 0].unique().numel() > 10


def generation_inputs(model, sizes=((40, 70), (64, 30), (20, 20)), text_lengths=(6, 12, 3), seed=5):
    pixel_values, image_sizes, counts = image_batch(model.config, list(sizes), seed=seed)
    input_ids, padding = prompt_ids(model.config, counts, list(text_lengths), seed=seed)
    return input_ids, padding, pixel_values, image_sizes, counts


SAMPLER_SETTINGS = [
    dict(gen_length=8, steps=8),
    dict(gen_length=12, block_length=4, steps=6, schedule="shift", schedule_shift=1 / 3),
]


@pytest.mark.parametrize("settings", SAMPLER_SETTINGS)
def test_prefix_cache_equals_no_cache_with_prefix_mask(tiny_model, settings):
    input_ids, padding, pixel_values, image_sizes, _ = generation_inputs(tiny_model)
    cached = tiny_model.diffusion_generate(input_ids, padding, pixel_values, image_sizes, **settings)
    uncached = tiny_model.diffusion_generate(input_ids, padding, pixel_values, image_sizes, use_prefix_cache=False,
                                             prefix_lm_mask=True, **settings)
    assert cached.shape == (3, settings["gen_length"])
    assert torch.equal(cached, uncached)
    assert (cached != tiny_model.config.mask_token_id).all(), "every position is decoded"
    assert cached.unique().numel() > 1


def test_full_bidirectional_mode_lets_the_prefix_see_the_answer(tiny_model):
    """LaViDa's no-cache mode (prefix attends to the answer) is a different computation from Prefix-DLM."""
    input_ids, padding, pixel_values, image_sizes, _ = generation_inputs(tiny_model)
    model = tiny_model
    embeds, _, _ = model.model.embed_inputs(input_ids, padding, pixel_values, image_sizes)
    answer = model.language_model.embed_tokens(torch.randint(0, 500, (3, 6)))
    mask = torch.cat((padding, torch.ones(3, 6, dtype=padding.dtype)), 1)
    full = model.model(inputs_embeds=torch.cat((embeds, answer), 1), attention_mask=mask).last_hidden_state
    prefix_only = model.model(inputs_embeds=torch.cat((embeds, answer), 1), attention_mask=mask,
                              prefix_lengths=torch.full((3,), input_ids.shape[1])).last_hidden_state
    assert (full[:, -6:] - prefix_only[:, -6:]).abs().amax() > 1e-4


@pytest.mark.parametrize("settings", SAMPLER_SETTINGS)
def test_batched_generation_equals_one_by_one(tiny_model, settings):
    input_ids, padding, pixel_values, image_sizes, _ = generation_inputs(tiny_model)
    batched = tiny_model.diffusion_generate(input_ids, padding, pixel_values, image_sizes, **settings)
    views = [1 + r * c for r, c in ((2, 1), (1, 2), (2, 1))]  # not needed by the model: recomputed below
    from lavida_shirg.image_layout import anyres_grid

    config = tiny_model.config
    views = [1 + r * c for r, c in (anyres_grid(s, config.image_grid_pinpoints, 32) for s in image_sizes.tolist())]
    starts = [0, views[0], views[0] + views[1]]
    for i in range(3):
        keep = padding[i].bool()
        single = tiny_model.diffusion_generate(
            input_ids[i : i + 1, keep], None, pixel_values[starts[i] : starts[i] + views[i]], image_sizes[i : i + 1],
            **settings,
        )
        assert torch.equal(single[0], batched[i]), f"sample {i}"


def test_temperature_zero_is_deterministic_and_temperature_is_seeded(tiny_model):
    input_ids, padding, pixel_values, image_sizes, _ = generation_inputs(tiny_model)
    a = tiny_model.diffusion_generate(input_ids, padding, pixel_values, image_sizes, gen_length=8, steps=4)
    b = tiny_model.diffusion_generate(input_ids, padding, pixel_values, image_sizes, gen_length=8, steps=4)
    assert torch.equal(a, b)
    hot = [tiny_model.diffusion_generate(input_ids, padding, pixel_values, image_sizes, gen_length=8, steps=4,
                                         temperature=1.0, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(hot[0], hot[1])
    assert not torch.equal(hot[0], hot[2])
    random = tiny_model.diffusion_generate(input_ids, padding, pixel_values, image_sizes, gen_length=8, steps=4,
                                           remasking="random", generator=torch.Generator().manual_seed(0))
    assert (random != tiny_model.config.mask_token_id).all()


def test_one_step_per_token_commits_the_argmax_of_the_most_confident(tiny_model):
    """First step of the sampler by hand: the position with the highest max-probability gets its argmax."""
    input_ids, padding, pixel_values, image_sizes, _ = generation_inputs(tiny_model)
    model = tiny_model
    mask_id = model.config.mask_token_id
    embeds, _, _ = model.model.embed_inputs(input_ids, padding, pixel_values, image_sizes)
    canvas = torch.full((3, 4), mask_id)
    mask = torch.cat((padding, torch.ones(3, 4, dtype=padding.dtype)), 1)
    hidden = model.model(inputs_embeds=torch.cat((embeds, model.language_model.embed_tokens(canvas)), 1),
                         attention_mask=mask, prefix_lengths=torch.full((3,), input_ids.shape[1])).last_hidden_state
    probabilities = model.lm_head(hidden[:, -4:]).double().softmax(-1)
    best_position = probabilities.amax(-1).argmax(-1)  # (B,)
    best_token = probabilities.argmax(-1).gather(1, best_position[:, None])[:, 0]
    # gen_length 4 in 4 steps: after step 1 exactly one token per sample, at best_position
    full = model.diffusion_generate(input_ids, padding, pixel_values, image_sizes, gen_length=4, steps=4)
    assert torch.equal(full.gather(1, best_position[:, None])[:, 0], best_token)


def test_sampler_bad_arguments(tiny_model):
    input_ids, padding, pixel_values, image_sizes, _ = generation_inputs(tiny_model)
    args = (input_ids, padding, pixel_values, image_sizes)
    with pytest.raises(ValueError, match="block_length"):
        tiny_model.diffusion_generate(*args, gen_length=8, block_length=3)
    with pytest.raises(ValueError, match="steps"):
        tiny_model.diffusion_generate(*args, gen_length=8, block_length=4, steps=3)
    with pytest.raises(ValueError, match="steps per block"):
        tiny_model.diffusion_generate(*args, gen_length=8, steps=16)
    with pytest.raises(ValueError, match="remasking"):
        tiny_model.diffusion_generate(*args, gen_length=4, steps=4, remasking="entropy")
    with pytest.raises(ValueError, match="temperature"):
        tiny_model.diffusion_generate(*args, gen_length=4, steps=4, temperature=-1)


BAD_SAMPLER_VALUES = [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "0.5"),
    ("gen_length", 4.0), ("gen_length", "16"), ("gen_length", True), ("gen_length", -3),
    ("block_length", 4.0), ("block_length", "4"), ("steps", 4.0), ("steps", "16"), ("steps", 0),
    ("schedule", "cosine"), ("remasking", "entropy"), ("schedule_shift", float("nan")), ("schedule_shift", 0),
]


@pytest.mark.parametrize("name,value", BAD_SAMPLER_VALUES)
def test_sampler_values_are_checked_in_calls_and_generation_configs(tiny_model, name, value):
    """Each bad value is named, whether passed to diffusion_generate or to a generation config (max_new_tokens
    is generate()'s name of gen_length; a temperature needs do_sample=True there)."""
    input_ids, padding, pixel_values, image_sizes, _ = generation_inputs(tiny_model)
    call = dict(gen_length=8, block_length=8, steps=8)
    with pytest.raises(ValueError, match=name):
        tiny_model.diffusion_generate(input_ids, padding, pixel_values, image_sizes, **{**call, name: value})
    field = "max_new_tokens" if name == "gen_length" else name
    sampling = dict(do_sample=True) if name == "temperature" else {}
    with pytest.raises(ValueError, match=field):
        LavidaShirgGenerationConfig(**{field: value}, **sampling)
    with pytest.raises(ValueError, match=field):
        tiny_model.generate(input_ids, padding, pixel_values, image_sizes, **{field: value}, **sampling)


def test_sampler_accepts_numpy_and_torch_integers(tiny_model):
    import numpy as np

    input_ids, padding, pixel_values, image_sizes, _ = generation_inputs(tiny_model)
    plain = tiny_model.diffusion_generate(input_ids, padding, pixel_values, image_sizes, gen_length=4, steps=4)
    numpy_ints = tiny_model.diffusion_generate(input_ids, padding, pixel_values, image_sizes,
                                               gen_length=np.int64(4), steps=np.int32(4))
    assert torch.equal(plain, numpy_ints)


def test_sampler_defaults_come_from_the_generation_config():
    model = build_tiny_model(seed=9)
    model.generation_config = LavidaShirgGenerationConfig(max_new_tokens=6, steps=3, schedule="shift")
    input_ids, padding, pixel_values, image_sizes, _ = generation_inputs(model)
    default = model.diffusion_generate(input_ids, padding, pixel_values, image_sizes)
    explicit = model.diffusion_generate(input_ids, padding, pixel_values, image_sizes, gen_length=6, steps=3,
                                        schedule="shift", schedule_shift=3)
    assert default.shape == (3, 6) and torch.equal(default, explicit)
    other_shift = model.diffusion_generate(input_ids, padding, pixel_values, image_sizes, schedule_shift=1 / 3)
    assert not torch.equal(default, other_shift), "the shift changes the commit order"

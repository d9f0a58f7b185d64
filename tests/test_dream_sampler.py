"""Dream's sampler in generate() against a restatement of LaViDa's dream/generation_utils.py `_sample`, step by step
(ids and per-step history), with and without the prefix cache; its schedule, settings and defaults."""

import pytest
import torch
from conftest import build_tiny_model, image_batch, lavida_shift_counts, prompt_ids

from lavida_shirg.dream_sampler import transfer_schedule
from lavida_shirg.generation_lavida_shirg import LavidaShirgGenerationConfig
from lavida_shirg.prefix_cache import PrefixCache


@pytest.fixture(scope="module")
def dream():
    return build_tiny_model(seed=1, preset="tiny-dream")


@pytest.fixture(scope="module")
def inputs(dream):
    pixel_values, image_sizes, counts = image_batch(dream.config, [(40, 70)])
    input_ids, padding = prompt_ids(dream.config, counts, [6])
    return dict(input_ids=input_ids, attention_mask=padding, pixel_values=pixel_values, image_sizes=image_sizes)


def dream_filter_and_pick(logits, temperature, top_p, top_k, token_u):
    """Dream's sample_tokens up to the confidence: l / T, its top-p, its top-k, softmax; x0 = argmax (T = 0) or a
    categorical draw (the Gumbel-max trick on the uniform draws `token_u`). Returns (probs, x0, p(x0))."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        ordered, order = torch.sort(logits, descending=True)
        remove = torch.cumsum(torch.softmax(ordered, dim=-1), dim=-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter_(-1, order, remove), torch.finfo(logits.dtype).min)
    if top_k is not None:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k)[0][..., -1, None], torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = (torch.log_softmax(logits.double(), dim=-1) - torch.log(-torch.log(token_u))).argmax(dim=-1)
        return probs, x0, torch.gather(probs, -1, x0[:, None]).squeeze(-1)
    confidence, x0 = probs.max(dim=-1)
    return probs, x0, confidence


def reference_dream_sample(model, embeds, gen_length, steps, alg, temperature=0.0, top_p=None, top_k=50,
                           alg_temp=None, eps=1e-3, prefix_lm=True, generator=None, step_ratio=None, schedule=None,
                           shift=3.0):
    """LaViDa's Dream `_sample` for one prompt (B = 1), restated: the whole sequence x (or, with prefix_lm, the
    answer after a prefill whose last-position argmax is the first answer token), logits shifted right by one,
    the masked positions flattened, float32 timesteps, int(n (1 - s / t)) transfers by topk (or by draws without
    replacement with alg_temp), origin's Bernoulli transfers. LaViDa's options: step_ratio resets the step count to
    int(gen_length * step_ratio) after the timesteps are built; schedule "shift" takes the counts from its shift
    schedule over the masked canvas. Random draws come from `generator` in the sampler's order (sampling (1, G, V),
    then positions (1, G)), read at the masked positions."""
    mask_id, prompt = model.config.mask_token_id, embeds.shape[1]
    vocab = model.config.text_config.vocab_size
    embed = model.get_input_embeddings()
    x = torch.full((1, prompt + gen_length), mask_id)
    x[:, :prompt] = 0
    if prefix_lm:
        cache = PrefixCache()
        prefill = model(inputs_embeds=embeds, use_cache=True, past_key_values=cache)
        x = x[:, prompt:]
        x[:, :1] = prefill.logits[:, -1:].argmax(dim=-1)
    timesteps = torch.linspace(1, eps, steps + 1)
    if step_ratio is not None:
        steps = int(gen_length * step_ratio)
    schedule_counts = None if schedule is None else lavida_shift_counts(int((x == mask_id).sum()), steps, shift)
    history = []
    for i in range(steps):
        mask_index = x == mask_id
        answer_mask = mask_index[:, -gen_length:]
        token_u = torch.rand((1, gen_length, vocab), dtype=torch.float64, generator=generator) if temperature else None
        position_u = None
        if alg == "origin" or alg_temp:
            position_u = torch.rand((1, gen_length), dtype=torch.float64, generator=generator)
        current = embed(x)
        if prefix_lm:
            logits = model(inputs_embeds=current, past_key_values=cache).logits
        else:
            current[:, :prompt] = embeds
            logits = model(inputs_embeds=current).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        token_draws = None if token_u is None else token_u[answer_mask]
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index]) + mask_id
            transfer = position_u[answer_mask] < p_transfer
            _, picked, _ = dream_filter_and_pick(mask_logits[transfer], temperature, top_p, top_k,
                                                 None if token_draws is None else token_draws[transfer])
            x0[transfer] = picked
            x[mask_index] = x0.clone()
        else:
            probs, x0, confidence = dream_filter_and_pick(mask_logits, temperature, top_p, top_k, token_draws)
            if alg == "topk_margin":
                ordered, _ = torch.sort(probs, dim=-1, descending=True)
                confidence = ordered[:, 0] - ordered[:, 1]
            elif alg == "entropy":
                confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
            num_mask_token = mask_index.sum()
            if schedule_counts is not None:
                number = int(schedule_counts[i])
            else:
                number = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
            if number > 0:
                if alg_temp is None or alg_temp == 0:
                    _, transfer_index = torch.topk(confidence, number)
                else:  # multinomial without replacement from softmax(confidence / alg_temp), by Gumbel-top-k
                    keys = torch.log_softmax(confidence.double() / alg_temp, dim=-1) - torch.log(
                        -torch.log(position_u[answer_mask]))
                    _, transfer_index = torch.topk(keys, number)
                x0_ = torch.zeros_like(x0) + mask_id
                x0_[transfer_index] = x0[transfer_index].clone()
                x[mask_index] = x0_
        history.append(x[:, -gen_length:].clone())
    return x[:, -gen_length:], history


CASES = [
    *[dict(alg=alg) for alg in ("origin", "maskgit_plus", "topk_margin", "entropy")],
    dict(alg="topk_margin", steps=4),
    dict(alg="entropy", top_k=None),
    dict(alg="maskgit_plus", top_k=None, top_p=0.5),
    dict(alg="topk_margin", alg_temp=0.5),
    dict(alg="maskgit_plus", do_sample=True, temperature=0.8, top_p=0.9),
    dict(alg="origin", do_sample=True, temperature=1.3),
    dict(alg="entropy", do_sample=True, temperature=0.7, alg_temp=0.2),
    # LaViDa's step_ratio and shift schedule (its COCO runs: step_ratio=0.5, schedule=shift, shift 0.33)
    dict(alg="topk_margin", step_ratio=0.5, schedule="shift", schedule_shift=0.33),
    dict(alg="entropy", step_ratio=0.5),
    dict(alg="origin", step_ratio=0.75),
    dict(alg="maskgit_plus", steps=6, schedule="shift"),
    dict(alg="entropy", do_sample=True, temperature=0.9, step_ratio=0.375, schedule="shift", schedule_shift=3.0),
]


@pytest.mark.parametrize("use_cache", [True, False], ids=["prefix-cache", "no-cache"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items()))
def test_generate_equals_the_restated_dream_sampler(dream, inputs, case, use_cache):
    gen_length, steps = 8, case.get("steps", 8)
    settings = {"top_k": 50, **case}
    run_steps = int(gen_length * case["step_ratio"]) if "step_ratio" in case else steps
    out = dream.generate(**inputs, max_new_tokens=gen_length, use_cache=use_cache, return_dict_in_generate=True,
                         output_history=True, generator=torch.Generator().manual_seed(5), **settings)
    with torch.no_grad():
        embeds = dream.model.inputs_and_mask(**inputs)[0]
        expected, history = reference_dream_sample(
            dream, embeds, gen_length, steps, case["alg"], case.get("temperature", 0.0), case.get("top_p"),
            settings["top_k"], case.get("alg_temp"), prefix_lm=use_cache, generator=torch.Generator().manual_seed(5),
            step_ratio=case.get("step_ratio"), schedule=case.get("schedule"), shift=case.get("schedule_shift", 3.0))
    assert len(out.history) == run_steps == len(history)
    for step, (ours, theirs) in enumerate(zip(out.history, history)):
        assert torch.equal(ours, theirs), f"step {step}: {ours.tolist()} != {theirs.tolist()}"
    assert torch.equal(out.sequences[:, -gen_length:], expected)
    assert (expected != dream.config.mask_token_id).all()


def test_the_first_answer_token_is_the_prefill_argmax_whatever_the_algorithm(dream, inputs):
    with torch.no_grad():
        embeds, mask, _ = dream.model.inputs_and_mask(**inputs)
        first = dream(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].argmax(-1)
    for settings in (dict(alg="origin"), dict(alg="entropy", do_sample=True, temperature=2.0, top_k=3)):
        out = dream.generate(**inputs, max_new_tokens=6, return_dict_in_generate=True, output_history=True,
                             generator=torch.Generator().manual_seed(0), **settings)
        assert all(torch.equal(canvas[:, 0], first) for canvas in out.history)


def test_transfer_schedule_as_dream_counts_it():
    counts, probabilities = transfer_schedule(7, 8)
    assert sum(counts) == 7 and counts[-1] >= 1 and counts[0] == 0  # steps = tokens: early steps commit nothing
    t = torch.linspace(1, 1e-3, 9)
    left = 7
    for step, count in enumerate(counts[:-1]):
        assert count == int(torch.tensor(left) * (1 - t[step + 1] / t[step]))
        left -= count
    assert probabilities.dtype == torch.float32 and probabilities[-1] == 1
    # t = [1, 0.75025, 0.5005, 0.25075, 0.001]: int(16 * 0.24975) = 3, int(13 * 0.3329) = 4, int(9 * 0.499) = 4, rest 5
    assert transfer_schedule(16, 4)[0] == [3, 4, 4, 5]


def test_step_ratio_keeps_the_timesteps_of_steps_and_shift_takes_lavidas_counts():
    """LaViDa's step_ratio runs fewer steps on the timesteps of `steps` (its early steps commit little, the last one
    the rest); its shift schedule spreads the masked positions by transfer counts instead."""
    t = torch.linspace(1, 1e-3, 9)
    counts, probabilities = transfer_schedule(7, 8, run_steps=4)
    assert counts == [0, 0, 1, 6] and transfer_schedule(7, 4)[0] == [1, 1, 2, 3]
    torch.testing.assert_close(probabilities, torch.cat((1 - t[1:4] / t[:3], torch.ones(1))))
    for masked, steps, run, shift in [(7, 8, 4, 0.33), (15, 16, 8, 0.33), (7, 8, 7, 3.0), (31, 32, 16, 3.0)]:
        counts = transfer_schedule(masked, steps, run_steps=run, schedule="shift", shift=shift)[0]
        assert counts == lavida_shift_counts(masked, run, shift)
        assert sum(counts) == masked and min(counts) >= 1
    assert transfer_schedule(7, 8, run_steps=4, schedule="shift", shift=0.33)[0] == [4, 1, 1, 1]  # a < 1: many first


def test_batched_left_padded_prompts_equal_one_by_one(dream):
    pixel_values, image_sizes, counts = image_batch(dream.config, [(40, 70), (20, 50)])
    input_ids, padding = prompt_ids(dream.config, counts, [4, 9])
    batched = dream.generate(input_ids=input_ids, attention_mask=padding, pixel_values=pixel_values,
                             image_sizes=image_sizes, max_new_tokens=8)
    rows = []
    for i, ((grid_rows, grid_cols), _, start) in enumerate(dream.model.views_of_images(pixel_values, image_sizes)):
        keep = padding[i].bool()
        views = pixel_values[start : start + 1 + grid_rows * grid_cols]  # the image's global view and crops
        rows.append(dream.generate(input_ids=input_ids[i : i + 1, keep], pixel_values=views,
                                   image_sizes=image_sizes[i : i + 1], max_new_tokens=8)[:, -8:])
    assert torch.equal(batched[:, -8:], torch.cat(rows))


def test_dream_generation_defaults_and_round_trip(dream, tmp_path):
    config = dream.generation_config
    assert (config.alg, config.top_k, config.alg_temp, config.eps) == ("topk_margin", 50, None, 1e-3)
    llada = build_tiny_model(seed=0).generation_config
    assert (llada.alg, llada.top_k) == (None, None)
    config.save_pretrained(tmp_path)
    again = LavidaShirgGenerationConfig.from_pretrained(tmp_path)
    assert (again.alg, again.top_k, again.eps) == ("topk_margin", 50, 1e-3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(alg="greedy"), "alg must be one of"),
    (dict(alg_temp=-1.0), "alg_temp must be a finite number >= 0"),
    (dict(eps=0.0), "eps must be in \\(0, 1\\)"),
    (dict(block_length=4), "settings of LLaDA's sampler"),
    (dict(alg=None, top_k=None), "a Dream backbone samples with Dream's algorithms"),
    (dict(step_ratio=2.0), r"step_ratio=2.0 runs int\(max_new_tokens x step_ratio\) = 8 steps: it must be between 1 "
                           r"and steps \(4\)"),
    (dict(step_ratio=0.1), "= 0 steps"),
    (dict(step_ratio=True), "step_ratio must be a finite number > 0"),
    (dict(schedule="shift"), "4 steps exceed the 3 masked answer positions"),
    (dict(schedule="shift", alg="origin", steps=2), "alg='origin' commits each masked position"),
    (dict(schedule="cosine"), "schedule must be one of"),
])
def test_bad_dream_settings_are_named(dream, inputs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        dream.generate(**inputs, max_new_tokens=4, **kwargs)


def test_llada_refuses_dream_algorithms(inputs):
    with pytest.raises(ValueError, match="is Dream's sampler"):
        build_tiny_model(seed=0).generate(**inputs, max_new_tokens=4, alg="entropy")
    with pytest.raises(ValueError, match=r"step_ratio=0.5 is a setting of Dream's sampler"):
        build_tiny_model(seed=0).generate(**inputs, max_new_tokens=4, step_ratio=0.5)


def test_diffusion_generate_equals_generate_on_dream(dream, inputs):
    for steps in (None, 4):
        answer = dream.diffusion_generate(**inputs, gen_length=8, steps=steps)
        assert torch.equal(answer, dream.generate(**inputs, max_new_tokens=8, steps=steps)[:, -8:])
    with pytest.raises(ValueError, match="decodes the answer in one block"):
        dream.diffusion_generate(**inputs, gen_length=8, block_length=4)
    shifted = dream.diffusion_generate(**inputs, gen_length=8, steps=4, schedule="shift", schedule_shift=0.5)
    assert torch.equal(shifted, dream.generate(**inputs, max_new_tokens=8, steps=4, schedule="shift",
                                               schedule_shift=0.5)[:, -8:])
    with pytest.raises(ValueError, match="8 steps exceed the 7 masked answer positions"):
        dream.diffusion_generate(**inputs, gen_length=8, schedule="shift")

"""Masked-diffusion pieces of LaViDa/LLaDA: the training forward process and the sampler's per-step rules.

Pure tensor functions, batched over samples; the model composes them in `forward(labels=...)` and
`diffusion_generate`.
"""

import math
import numbers

import torch
import torch.nn.functional as F

REMASKING_STRATEGIES = ("low_confidence", "random")
SCHEDULES = ("uniform", "shift")
LAVIDA_SCHEDULE_SHIFT = 3.0  # LaViDa's generate: logit_normal_schedule(schedule_kwargs.get("shift", 3), t)


def sample_complementary_masks(target_mask, min_mask_probability, generator=None):
    """Mask each target token with probability p = (1 - eps) t + eps, t ~ U(0, 1) per sample, and its complement.

    masked = target & (u <= max(p, min_j u_j)) with u ~ U(0, 1) at every one of the T positions (prompt, image and
    targets alike) and the minimum over all T of them, as LaViDa's forward_process draws t (B,) then u (B, T): the
    one position always masked is the sequence's, so a sample whose smallest u falls outside its targets can have
    no masked target in this copy (all of them are then masked in the complement). complement = target & ~masked:
    every target is masked in exactly one copy.

    target_mask: (B, T) bool. Returns masked (B, T), complement (B, T) and p (B,).
    """
    batch, length = target_mask.shape
    t = torch.rand(batch, device=target_mask.device, generator=generator)
    p = (1.0 - min_mask_probability) * t + min_mask_probability  # (B,)
    u = torch.rand(batch, length, device=target_mask.device, generator=generator)  # (B, T)
    cutoff = torch.maximum(p, u.amin(dim=1))[:, None]  # (B, 1)
    masked = target_mask & (u <= cutoff)
    return masked, target_mask & ~masked, p


def transfer_counts(block_length, steps, schedule="uniform", shift=LAVIDA_SCHEDULE_SHIFT):
    """Number of tokens committed at each of `steps` steps of a block of `block_length` masked tokens.

    uniform: floor(L / S) per step, the remainder L mod S spread one each over the first steps (LLaDA).
    shift:   c_i = floor(L f(i / S)) with f(t) = a t / (1 + (a - 1) t) (LaViDa's timestep shift, a = `shift`);
             per-step counts c_{i+1} - c_i raised to at least 1, the excess taken back one token at a time from the
             first steps that hold more than one, then the order reversed. With LaViDa's a = 3 the first steps commit
             the fewest tokens (8 tokens in 4 steps: [1, 1, 2, 4]).
    Returns a list of S Python ints that sums to L. Arguments as resolve_sampler_arguments validated them.
    """
    if schedule == "uniform":
        base, remainder = divmod(block_length, steps)
        return [base + (i < remainder) for i in range(steps)]
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float32)
    cumulative = (shift * t / (1 + (shift - 1) * t) * block_length).to(torch.int64).tolist()
    counts = [max(b - a, 1) for a, b in zip(cumulative[:-1], cumulative[1:])]
    excess, j = sum(counts) - block_length, 0
    while excess > 0:
        if counts[j % steps] > 1:
            counts[j % steps] -= 1
            excess -= 1
        j += 1
    return counts[::-1]


def masked_transfer_counts(masked, steps, schedule="uniform", shift=LAVIDA_SCHEDULE_SHIFT):
    """Tokens committed at each of `steps` steps of a block that holds `masked` masked positions (a draft fixes the
    others), as LaViDa counts them: uniform spreads m over all the steps (zeros after the first m when m < steps);
    shift spreads it over min(steps, m) steps, then zeros. Returns `steps` Python ints summing to m."""
    used = steps if schedule == "uniform" else min(steps, masked)
    return (transfer_counts(masked, used, schedule, shift) if used else []) + [0] * (steps - used)


def sample_tokens(logits, temperature, noise=None):
    """x0 = argmax(log softmax(l) + T g), g = -log(-log u), u ~ U(0, 1), computed in float64 (T = 0: plain argmax).

    Equivalent to LLaDA's argmax(exp(l) / (-log u)^T); the log form avoids overflowing exp.
    logits: (B, G, V); noise: u (B, G, V) float64 from `step_noise` (required when T > 0). Returns (B, G) int64.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    return (logits.to(torch.float64) - temperature * torch.log(-torch.log(noise))).argmax(dim=-1)


def token_confidence(logits, tokens, remasking, noise=None):
    """Confidence used to choose which predictions to commit.

    low_confidence: softmax(l)[x0] in float64 (LLaDA); random: u ~ U(0, 1), the (B, G) float64 `noise` from
    `step_noise`. logits: (B, G, V), tokens: (B, G). Returns (B, G) float64.
    """
    if remasking == "random":
        return noise
    probabilities = F.softmax(logits.to(torch.float64), dim=-1)
    return probabilities.gather(-1, tokens[..., None]).squeeze(-1)


def step_noise(shape, temperature, remasking, device, generator=None):
    """The uniform draws of one sampler step, in the order the step uses them: u (B, G, V) float64 of the Gumbel
    noise (None at temperature 0), then u (B, G) float64 of random remasking (None for low_confidence).
    shape: (B, G, V). Drawn outside the step so that a compiled step and the eager one read the same numbers."""
    gumbel = None if temperature == 0 else torch.rand(shape, dtype=torch.float64, device=device, generator=generator)
    remask = None if remasking != "random" else torch.rand(shape[:2], dtype=torch.float64, device=device,
                                                           generator=generator)
    return gumbel, remask


def commit_most_confident(canvas, predictions, confidence, eligible, count):
    """Write the `count` most confident eligible predictions into the canvas; committed tokens are never remasked.

    rank(b, g) = position of g in row b sorted by confidence, descending (ties: the lower index first; ineligible
    positions last); commit where rank < count. `count` is an int, a 0-d tensor or a (B,) tensor of per-row counts
    (the same rule in one static-shape graph for every count, no host read).
    canvas, predictions: (B, G) int64; confidence: (B, G); eligible: (B, G) bool (masked and inside the current block,
    at least `count` per row). Returns the new canvas (B, G).
    """
    if isinstance(count, torch.Tensor) and count.dim() == 1:
        count = count[:, None]  # (B, 1)
    confidence = confidence.masked_fill(~eligible, float("-inf"))
    order = confidence.argsort(dim=-1, descending=True, stable=True)  # (B, G)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # (B, G)
    return torch.where(rank < count, predictions, canvas)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def resolve_sampler_arguments(given: dict, defaults: dict, names: dict | None = None) -> dict:
    """The sampler settings of one call: each argument of `given` left None takes `defaults`; block_length and
    steps still None take gen_length. Validated: a ValueError names the argument (as `names` maps it, e.g.
    gen_length -> max_new_tokens for generate()) and its allowed values.

    Keys: gen_length, block_length, steps (true integers: gen_length = n_blocks * block_length, steps a positive
    multiple of n_blocks with at most block_length steps per block), temperature (finite, >= 0), remasking
    (REMASKING_STRATEGIES), schedule (SCHEDULES), schedule_shift (finite, > 0).
    """
    names = {name: (names or {}).get(name, name) for name in defaults}
    settings = {name: defaults.get(name) if given.get(name) is None else given[name] for name in defaults}
    gen_length = settings["gen_length"]
    if not _is_int(gen_length) or gen_length <= 0:
        raise ValueError(f"{names['gen_length']} must be a positive integer, got {gen_length!r}")
    for name in ("block_length", "steps"):
        if settings[name] is None:
            settings[name] = gen_length
        elif not _is_int(settings[name]) or settings[name] <= 0:
            raise ValueError(f"{names[name]} must be a positive integer (or None: {names['gen_length']}), "
                             f"got {settings[name]!r}")
    block_length, steps = settings["block_length"], settings["steps"]
    if gen_length % block_length:
        raise ValueError(f"{names['block_length']} must divide {names['gen_length']}={gen_length}, got {block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"{names['steps']} must be a positive multiple of the number of blocks ({num_blocks}), "
                         f"got {steps}")
    if steps // num_blocks > block_length:
        raise ValueError(f"steps per block ({steps // num_blocks}) cannot exceed {names['block_length']} "
                         f"({block_length})")
    if not _is_finite_number(settings["temperature"]) or settings["temperature"] < 0:
        raise ValueError(f"{names['temperature']} must be a finite number >= 0, got {settings['temperature']!r}")
    if settings["remasking"] not in REMASKING_STRATEGIES:
        raise ValueError(f"{names['remasking']} must be one of {REMASKING_STRATEGIES}, got {settings['remasking']!r}")
    if settings["schedule"] not in SCHEDULES:
        raise ValueError(f"{names['schedule']} must be one of {SCHEDULES}, got {settings['schedule']!r}")
    if not _is_finite_number(settings["schedule_shift"]) or settings["schedule_shift"] <= 0:
        raise ValueError(f"{names['schedule_shift']} must be a finite number > 0 (LaViDa: {LAVIDA_SCHEDULE_SHIFT}), "
                         f"got {settings['schedule_shift']!r}")
    return settings

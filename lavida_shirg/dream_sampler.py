"""Dream's masked-diffusion sampler (LaViDa's dream/generation_utils.py `_sample`), batched and without host reads.

Per step s = 0 .. S-1 with timesteps t = linspace(1, eps, S + 1) in float32:
    logits are read shifted by one position (token j from position j - 1's logits; position 0 keeps its own);
    p = softmax(filter(l / T)) with Dream's top-p then top-k filters (applied even at T = 0: they change the
    confidences); x0 = argmax p (T = 0) or a draw from p;
    alg "origin": every masked position takes x0 with probability 1 - t_{s+1} / t_s (1 at the last step);
    alg "maskgit_plus" / "topk_margin" / "entropy": confidence p(x0) / p_top1 - p_top2 / sum p log(p + 1e-10), and
    the c_s = int(n_s (1 - t_{s+1} / t_s)) most confident masked positions take x0 (the last step: all n_s left);
    with alg_temp > 0 they are drawn without replacement with probabilities softmax(confidence / alg_temp).
LaViDa's options: `step_ratio` runs S = int(G step_ratio) of the S timesteps' steps (the timesteps stay those of
`steps`; the last step run commits what is left); `schedule="shift"` takes the counts c_s from LaViDa's shift
schedule over the masked positions (`transfer_counts`, as its get_num_transfer_tokens_sch) instead of the timesteps.
With the prefix cache (Dream's prefix_lm) the first answer token is the argmax at the last prompt position, fixed
before the first step. Dream ranks over the whole batch at once; here every row is ranked on its own (the same for
one prompt, as LaViDa's evaluation runs). Random draws: Gumbel-max for sampling and for alg_temp (the same
distributions as Dream's multinomial draws, from `generator`).
"""

import torch
import torch.nn.functional as F

from .masked_diffusion import commit_most_confident, sample_tokens, transfer_counts

DREAM_ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")
DREAM_EPS = 1e-3  # Dream's last timestep
# Dream's generation config inherits top_k=50 from the model config under the transformers LaViDa pins (4.50.3)
DREAM_TOP_K = 50
# the generation settings of a Dream backbone that differ from LLaDA's (LaViDa's lmms-eval runs alg=topk_margin)
DREAM_GENERATION_DEFAULTS = dict(alg="topk_margin", top_k=DREAM_TOP_K)
ENTROPY_EPS = 1e-10


def shift_logits(logits):
    """Dream's shift: position j takes position j - 1's logits, position 0 keeps its own. (B, G, V) -> (B, G, V)."""
    return torch.cat((logits[:, :1], logits[:, :-1]), dim=1)


def transfer_schedule(num_masked, steps, eps=DREAM_EPS, run_steps=None, schedule="uniform", shift=None):
    """(counts, probabilities) of the steps Dream's sampler runs over an answer with `num_masked` masked positions.

    Timesteps t = linspace(1, eps, steps + 1) in float32; the sampler runs S = run_steps (LaViDa's step_ratio, at most
    `steps`) or `steps` of them. schedule "uniform" (Dream's own): counts[s] = int(n_s * (1 - t_{s+1} / t_s)) in
    float32 as Dream computes it, n_{s+1} = n_s - counts[s], the last step run all n_s left; "shift": LaViDa's shift
    schedule over the masked positions, transfer_counts(num_masked, S, "shift", shift) (S <= num_masked). Counts are
    Python ints; probabilities (S,) float32: 1 - t_{s+1} / t_s, 1 at the last step run (alg origin).
    """
    t = torch.linspace(1, eps, steps + 1)  # (steps + 1,) float32
    run_steps = steps if run_steps is None else run_steps
    ratio = (1 - t[1:] / t[:-1])[:run_steps]  # (S,)
    if schedule == "shift":
        counts = transfer_counts(num_masked, run_steps, "shift", shift)
    else:
        counts, left = [], num_masked
        for step in range(run_steps):
            count = left if step == run_steps - 1 else int(torch.tensor(left) * ratio[step])
            counts.append(count)
            left -= count
    return counts, torch.cat((ratio[:-1], torch.ones(1)))


def run_steps(sampler) -> int:
    """The steps Dream's sampler runs: int(gen_length * step_ratio) with LaViDa's step_ratio, else `steps`."""
    if sampler["step_ratio"] is None:
        return sampler["steps"]
    return int(sampler["gen_length"] * sampler["step_ratio"])


def check_dream_steps(sampler, num_masked, names=None):
    """ValueError naming the setting unless step_ratio (None, or a number > 0 running between 1 and `steps` steps:
    LaViDa indexes its timesteps with them) and schedule (Dream's "uniform", or "shift" with an alg other than origin,
    which never reads the counts, and at most one step per masked position: the shift schedule commits at least one
    token per step) fit an answer of `num_masked` masked positions. `names` maps gen_length / steps to the caller's
    argument names."""
    names = {name: (names or {}).get(name, name) for name in ("gen_length", "steps")}
    ratio = sampler["step_ratio"]
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < float("inf"):
            raise ValueError(f"step_ratio must be a finite number > 0 (or None), got {ratio!r}")
        run = run_steps(sampler)
        if not 1 <= run <= sampler["steps"]:
            raise ValueError(f"step_ratio={ratio!r} runs int({names['gen_length']} x step_ratio) = {run} steps: it "
                             f"must be between 1 and {names['steps']} ({sampler['steps']}), the timesteps LaViDa "
                             "builds")
    if sampler["schedule"] == "shift":
        if sampler["alg"] == "origin":
            raise ValueError("schedule='shift' sets how many tokens each step commits; alg='origin' commits each "
                             "masked position with probability 1 - t_{s+1} / t_s and never reads it: pass another "
                             "alg or schedule='uniform'")
        if run_steps(sampler) > num_masked:
            raise ValueError(f"schedule='shift' commits at least one token per step: {run_steps(sampler)} steps "
                             f"exceed the {num_masked} masked answer positions (with the prefix cache the prefill "
                             f"fixes the first answer token): run fewer steps ({names['steps']} or step_ratio)")


def filter_logits(logits, temperature, top_p=None, top_k=None):
    """Dream's filters on (..., V) logits: l / T (T > 0); top-p: in descending order, drop the tokens after the first
    whose cumulative probability exceeds top_p; top-k: drop the tokens below the k-th largest. Dropped tokens get the
    dtype's minimum (probability 0)."""
    if temperature > 0:
        logits = logits / temperature
    lowest = torch.finfo(logits.dtype).min
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        beyond = ordered.softmax(dim=-1).cumsum(dim=-1) > top_p
        beyond = torch.cat((torch.zeros_like(beyond[..., :1]), beyond[..., :-1]), dim=-1)  # keep the crossing token
        logits = logits.masked_fill(torch.zeros_like(beyond).scatter(-1, order, beyond), lowest)
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, lowest)
    return logits


def dream_confidence(probabilities, tokens, alg):
    """Confidence of each prediction (B, G): p(x0) (origin, maskgit_plus), p_top1 - p_top2 (topk_margin) or the
    negative entropy sum_v p log(p + 1e-10) (entropy). probabilities: (B, G, V); tokens: (B, G)."""
    if alg == "topk_margin":
        top = probabilities.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    if alg == "entropy":
        return (probabilities * torch.log(probabilities + ENTROPY_EPS)).sum(dim=-1)
    return probabilities.gather(-1, tokens[..., None]).squeeze(-1)


def dream_step_noise(shape, temperature, alg, alg_temp, device, generator=None):
    """The uniform draws of one step, in the order it uses them: (B, G, V) float64 for sampling (None at T = 0), then
    (B, G) float64 for origin's transfers or alg_temp's draw (None otherwise). shape: (B, G, V)."""
    tokens = None if temperature == 0 else torch.rand(shape, dtype=torch.float64, device=device, generator=generator)
    positions = None
    if alg == "origin" or alg_temp:
        positions = torch.rand(shape[:2], dtype=torch.float64, device=device, generator=generator)
    return tokens, positions


def dream_denoise_step(answer_logits, canvas, count, probability, mask_token_id, temperature, top_p, top_k, alg,
                       alg_temp, token_noise=None, position_noise=None):
    """One step of Dream's sampler on the answer canvas (B, G): l = answer_logits(canvas) (B, G, V), already shifted;
    see the module docstring for the rule. count: 0-d tensor c_s; probability: 0-d tensor (origin's transfer
    probability). Static shapes, no host reads (compiles as one graph)."""
    logits = filter_logits(answer_logits(canvas).float(), temperature, top_p, top_k)
    probabilities = F.softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1) if temperature == 0 else sample_tokens(logits, 1.0, noise=token_noise)
    eligible = canvas == mask_token_id
    if alg == "origin":
        return torch.where(eligible & (position_noise < probability), tokens, canvas)
    confidence = dream_confidence(probabilities, tokens, alg).double()
    if alg_temp:  # Gumbel-top-k: c draws without replacement, probabilities softmax(confidence / alg_temp)
        confidence = confidence / alg_temp - torch.log(-torch.log(position_noise))
    return commit_most_confident(canvas, tokens, confidence, eligible, count)


def run_dream_sampler(answer_logits, first_token, batch, vocab_size, sampler, mask_token_id, device, generator=None,
                      keep_history=False, step=dream_denoise_step):
    """Dream's sampler over an answer of sampler["gen_length"] positions, all masked but the first when `first_token`
    (B,) is given (the prefix-LM prefill). sampler: steps, step_ratio, schedule, schedule_shift, temperature, top_p,
    top_k, alg, alg_temp, eps (as check_dream_steps accepts them). Returns
    the canvas (B, G) and, with `keep_history`, the canvas after every step (else None)."""
    gen_length = sampler["gen_length"]
    canvas = torch.full((batch, gen_length), mask_token_id, dtype=torch.long, device=device)
    if first_token is not None:
        canvas[:, 0] = first_token
    num_masked = gen_length - (first_token is not None)
    counts, probabilities = transfer_schedule(num_masked, sampler["steps"], sampler["eps"], run_steps(sampler),
                                              sampler["schedule"], sampler["schedule_shift"])
    counts = torch.tensor(counts).to(device, non_blocking=True).unbind()  # 0-d tensors: the loop reads nothing back
    probabilities = probabilities.to(device, non_blocking=True).unbind()
    history = []
    for count, probability in zip(counts, probabilities):
        noise = dream_step_noise((batch, gen_length, vocab_size), sampler["temperature"], sampler["alg"],
                                 sampler["alg_temp"], device, generator)
        canvas = step(answer_logits, canvas, count, probability, mask_token_id, sampler["temperature"],
                      sampler["top_p"], sampler["top_k"], sampler["alg"], sampler["alg_temp"], *noise)
        history.append(canvas)
    return canvas, tuple(history) if keep_history else None

"""Timing of a sampler call (`generate_answer_ids`) split into prefill and diffusion steps, peak memory, and
prefix-cache bytes.

One call is measured as: start (after a device synchronisation) -> the prefix cache is built (image encoding,
token selection and the prefill, the base model's first forward (use_cache=True), seen by a forward hook;
synchronised) -> the answer is sampled (synchronised). prefill = cache built - start, per step = (end - cache
built) / steps, total = end - start. On CUDA every boundary calls `torch.cuda.synchronize()`, and the peak is
`torch.cuda.max_memory_allocated` after a reset; on CPU there is no allocator peak (None). The prefix cache's bytes are read from its tensors (`PrefixCache.nbytes()`: stored tensors
and scales on every device), and the bytes the same tensors take in the compute dtype give the saving of
`kv_cache_dtype`.
"""

import dataclasses
import statistics
import time

import torch

from shirg_tools.inference import generate_answer_ids


@dataclasses.dataclass
class GenerationTiming:
    """One measured call: seconds of prefill, per diffusion step and in total; KV-cache bytes as stored and in the
    compute dtype; the device's peak allocated bytes (None on CPU)."""

    prefill_s: float
    step_s: float
    total_s: float
    kv_bytes: int
    kv_bytes_compute_dtype: int
    peak_bytes: int | None


def synchronize(device: torch.device):
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, call: dict, steps: int):
    """Run `generate_answer_ids(model, call)` (inputs and sampler arguments) with the prefix cache and measure it
    (see the module docstring); `steps`: the diffusion steps the call runs. Returns (answer ids, GenerationTiming)."""
    device = model.device
    marks = {}

    def prefix_cache_built(module, args, kwargs, output):
        if "cache" not in marks:  # the prefill: the first forward of the base model, which fills the cache
            synchronize(device)
            marks["prefill_end"] = time.perf_counter()
            marks["cache"] = output.past_key_values

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    hook = model.model.register_forward_hook(prefix_cache_built, with_kwargs=True)
    try:
        answers = generate_answer_ids(model, {**call, "use_prefix_cache": True})
    finally:
        hook.remove()
    synchronize(device)
    end = time.perf_counter()
    cache = marks.pop("cache")
    compute_bytes = torch.empty((), dtype=cache.compute_dtype).element_size()
    uncompressed = sum(stored.numel() * compute_bytes for pair in cache.layers for stored, _ in pair)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    timing = GenerationTiming(marks["prefill_end"] - start, (end - marks["prefill_end"]) / steps, end - start,
                              cache.nbytes(), uncompressed, peak)
    return answers, timing


def median(values):
    """The median of the non-None values, or None when there are none."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None

"""The sampler's prefix KV cache, optionally stored in a smaller dtype.

The prefix (image + prompt) keys/values are computed once and read at every diffusion step, so their storage is
the memory that grows with the number of image tokens. Storage options:
    bfloat16 / float16: a plain cast (a saving when the model runs in float32);
    float8_e4m3fn: x_q = x / s with one scale per (sample, head), s = max |x| / 448 over the prefix positions and
                   head dimensions (448 = the largest finite e4m3 value); read back as x_q * s.
Each layer's keys/values are restored to the compute dtype when that layer reads them (one layer at a time).
"""

import torch

STORAGE_DTYPES = ("bfloat16", "float16", "float8_e4m3fn")
FLOAT8_MAX = 448.0


class PrefixCache:
    """Per-layer (key, value) of the prefix, each (B, Hkv, P, d), stored in `storage` (None: as computed).

    Made empty and filled once by the model's forward with `use_cache=True` (the prefill); later forwards given it
    as `past_key_values` attend to it and never extend it (Prefix-DLM: the answer's keys are recomputed each step).
    transformers' Cache classes append the queries' keys at every call, which this read-only prefix must not do.
    """

    def __init__(self, storage=None):
        if storage is not None and storage not in STORAGE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be None or one of {STORAGE_DTYPES}, got {storage!r}")
        self.storage = storage
        self.layers = []

    def store(self, key_values) -> "PrefixCache":
        """Keep the prefill's per-layer (key, value) pairs (in the storage dtype)."""
        self.compute_dtype = key_values[0][0].dtype
        self.layers = [tuple(self._store(tensor) for tensor in pair) for pair in key_values]
        return self

    def get_seq_length(self) -> int:
        """Cached prefix positions P (0 while empty), as transformers' Cache.get_seq_length."""
        return self.layers[0][0][0].shape[2] if self.layers else 0

    def _store(self, tensor):
        """(stored tensor, per-(sample, head) scale or None)."""
        if self.storage is None:
            return tensor, None
        dtype = getattr(torch, self.storage)
        if self.storage != "float8_e4m3fn":
            return tensor.to(dtype), None
        scale = tensor.float().abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-12) / FLOAT8_MAX  # (B, Hkv, 1, 1)
        return (tensor.float() / scale).to(dtype), scale

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, layer):
        """Layer `layer`'s (key, value) in the compute dtype."""
        return tuple(
            (stored.float() * scale if scale is not None else stored).to(self.compute_dtype)
            for stored, scale in self.layers[layer]
        )

    def nbytes(self) -> int:
        """Bytes held by the cache (stored tensors and scales), summed over every layer and device."""
        return sum(
            stored.numel() * stored.element_size() + (0 if scale is None else scale.numel() * scale.element_size())
            for pair in self.layers
            for stored, scale in pair
        )

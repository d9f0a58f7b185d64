"""Generation of LaViDa-SHIRG: LaViDa's masked-diffusion sampler behind transformers' `generate()` conventions.

`LavidaShirgGenerationConfig` holds the sampler settings (written as generation_config.json); the model's
`generate(**inputs, generation_config=None, **kwargs)` runs the sampler and returns prompt + answer ids (or a
`MaskedDiffusionGenerateOutput` with the canvas after every step); `diffusion_generate` is the same sampler with
LaViDa's argument names, returning the answer ids only.
"""

import functools
import numbers
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.utils import GENERATION_CONFIG_NAME, cached_file
from transformers.generation.logits_process import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper
from transformers.modeling_outputs import ModelOutput

from .configuration_lavida_shirg import DreamTextConfig
from .modeling_llada import check_sequence_length, positions_from_mask
from .prefix_cache import PrefixCache

from .dream_sampler import (
    DREAM_ALGORITHMS,
    DREAM_EPS,
    DREAM_GENERATION_DEFAULTS,
    check_dream_steps,
    dream_denoise_step,
    run_dream_sampler,
    shift_logits,
)
from .masked_diffusion import (
    LAVIDA_SCHEDULE_SHIFT,
    commit_most_confident,
    masked_transfer_counts,
    resolve_sampler_arguments,
    sample_tokens,
    step_noise,
    token_confidence,
)

# what each field of the generation config means for the masked-diffusion sampler, and its default
SAMPLER_FIELDS = {
    "max_new_tokens": 32,  # answer length (LaViDa's gen_length)
    "block_length": None,  # semi-autoregressive blocks (None: one block of max_new_tokens)
    "steps": None,  # total denoising steps, split evenly over the blocks (None: max_new_tokens)
    "steps_per_block": None,  # LaViDa's step_per_block: an alternative to `steps`
    "do_sample": False,  # False: each step takes the argmax; True: Gumbel-max sampling at `temperature`
    "temperature": None,  # with do_sample (None: 1.0)
    "top_k": None,  # with do_sample: keep the k most probable tokens (TopKLogitsWarper)
    "top_p": None,  # with do_sample: nucleus filtering (TopPLogitsWarper)
    "remasking": "low_confidence",  # which predictions a step commits: "low_confidence" or "random"
    "schedule": "uniform",  # tokens committed per step: "uniform" or LaViDa's "shift"
    "schedule_shift": LAVIDA_SCHEDULE_SHIFT,  # a of the shift schedule
    "alg": None,  # Dream's sampler (DREAM_ALGORITHMS; a Dream backbone's default: "topk_margin"); None: LLaDA's
    "alg_temp": None,  # Dream: > 0 draws the committed positions with probabilities softmax(confidence / alg_temp)
    "eps": DREAM_EPS,  # Dream: the last of the timesteps linspace(1, eps, steps + 1)
    "step_ratio": None,  # Dream (LaViDa's step_ratio): run int(max_new_tokens x step_ratio) of the `steps` timesteps
    "use_prefix_cache": True,  # run image + prompt once, then each step only the answer (Prefix-DLM)
    "prefix_lm_mask": False,  # without the cache: hide the answer from the prefix (else LaViDa's bidirectional mode)
    "kv_cache_dtype": None,  # store the prefix cache in "bfloat16", "float16" or "float8_e4m3fn"
    "compile_step": False,  # run each step as one torch.compile graph (CUDA graphs on CUDA; see compiled_step)
    "num_return_sequences": 1,  # answers per prompt
    "return_dict_in_generate": False,  # True: a MaskedDiffusionGenerateOutput
    "output_history": False,  # with return_dict_in_generate: the answer canvas after every step
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
METADATA_FIELDS = ("_commit_hash", "_from_model_config", "transformers_version")
# standard generate() settings that have no meaning for a masked-diffusion sampler, with the reason
UNSUPPORTED = {
    "num_beams": "beam search is not defined for masked diffusion (every step predicts all masked positions)",
    "num_beam_groups": "beam search is not defined for masked diffusion",
    "penalty_alpha": "contrastive search is autoregressive",
    "max_length": "the answer length is max_new_tokens (the prompt length does not count)",
    "min_new_tokens": "every answer has exactly max_new_tokens positions (LaViDa pads the answer with EOS)",
    "stop_strings": "the answer canvas is decoded all at once: there is no early stop",
    "repetition_penalty": "penalties over earlier tokens are autoregressive",
    "no_repeat_ngram_size": "n-gram blocking is autoregressive",
    "assistant_model": "assisted decoding is autoregressive",
    "streamer": "the answer is decoded all at once (output_history gives the canvas after every step)",
    "logits_processor": "pass top_k / top_p (applied to each step's logits)",
}
UNSUPPORTED_VALUE_ALLOWED = {"num_beams": 1, "num_beam_groups": 1, "repetition_penalty": 1.0}
# every generate() keyword that names a generation setting (ours, the unsupported standard ones, transformers' alias)
GENERATION_ARGUMENTS = (*SAMPLER_FIELDS, *UNSUPPORTED, "use_cache")
DREAM_TEXT_MODEL_TYPE = DreamTextConfig.model_type
# sampler argument names of diffusion_generate / resolve_sampler_arguments -> generation config names
GENERATION_NAMES = {"gen_length": "max_new_tokens"}


class LavidaShirgGenerationConfig(GenerationConfig):
    """Settings of LaViDa's masked-diffusion sampler on transformers' GenerationConfig conventions (`SAMPLER_FIELDS`).

    Only the fields that mean something for masked diffusion exist; autoregressive-only settings (beams,
    penalties, `max_length`, stop strings, streamers) raise a ValueError saying why (`UNSUPPORTED`).
    """

    def __init__(self, **kwargs):
        # GenerationConfig.__init__ is not called: most of its fields (beams, caches, penalties) mean nothing here
        for name, default in SAMPLER_FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        for name in METADATA_FIELDS:
            setattr(self, name, kwargs.pop(name, None))
        check_supported(kwargs)
        if kwargs:
            raise ValueError(f"unknown generation settings {sorted(kwargs)}; known: {sorted(SAMPLER_FIELDS)}")
        self.validate()

    def validate(self, strict=False, **unused):
        """Raise a ValueError naming the field for any setting the sampler cannot honour."""
        self.sampler_arguments()
        for name in ("do_sample", "use_prefix_cache", "prefix_lm_mask", "return_dict_in_generate", "output_history",
                     "compile_step"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not _is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be a positive integer, got {self.num_return_sequences!r}")
        if self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError(f"num_return_sequences={self.num_return_sequences} without do_sample=True gives identical "
                             "answers: pass do_sample=True (with a temperature) to draw different ones")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer (or None), got {self.top_k!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (or None), got {self.top_p!r}")
        if not self.do_sample and self.alg is None and (self.top_k is not None or self.top_p is not None):
            raise ValueError("top_k / top_p filter sampled tokens in LLaDA's sampler (alg=None): pass do_sample=True "
                             "with them")
        if self.kv_cache_dtype is not None and not self.use_prefix_cache:
            raise ValueError("kv_cache_dtype stores the prefix cache: it needs use_prefix_cache=True")
        if self.compile_step and not self.use_prefix_cache:
            raise ValueError(COMPILE_NEEDS_CACHE)
        if self.output_history and not self.return_dict_in_generate:
            raise ValueError("output_history is returned in the output dataclass: pass return_dict_in_generate=True")

    def update(self, defaults_only=False, allow_custom_entries=False, **kwargs):
        """GenerationConfig.update for this config's fields; returns the kwargs it did not use.

        `defaults_only` updates fill in transformers' global (autoregressive) defaults, such as temperature=1.0 and
        top_k=50 that mean sampling here: they leave these settings alone; other fields are never added."""
        if defaults_only:
            return kwargs
        used = {key: value for key, value in kwargs.items() if key in SAMPLER_FIELDS}
        for key, value in used.items():
            setattr(self, key, value)
        self.validate()
        return {key: value for key, value in kwargs.items() if key not in used}

    def sampler_defaults(self, gen_length=None, block_length=None) -> dict:
        """Defaults for diffusion_generate's arguments (LaViDa's names), unresolved: block_length / steps stay None
        unless set here; steps_per_block becomes steps for the call's `gen_length` and `block_length`."""
        settings = self.sampler_arguments()
        length = gen_length or settings["gen_length"]
        per_block = self.steps_from_per_block(length, block_length or self.block_length)
        return {**settings, "block_length": self.block_length, "steps": self.steps if per_block is None else per_block}

    def steps_from_per_block(self, gen_length, block_length):
        """steps = steps_per_block x (gen_length / block_length), or None without steps_per_block (or when the
        lengths are invalid: resolve_sampler_arguments names them)."""
        if self.steps_per_block is None:
            return None
        if not _is_int(self.steps_per_block) or self.steps_per_block <= 0:
            raise ValueError(f"steps_per_block must be a positive integer, got {self.steps_per_block!r}")
        block_length = block_length or gen_length
        if not (_is_int(gen_length) and _is_int(block_length) and 0 < block_length <= gen_length):
            return None
        return self.steps_per_block * (gen_length // block_length)

    def sampler_arguments(self) -> dict:
        """The sampler settings (resolve_sampler_arguments' names): gen_length, block_length, steps, temperature,
        remasking, schedule, schedule_shift; validated, errors naming this config's fields."""
        if self.steps is not None and self.steps_per_block is not None:
            raise ValueError(f"pass steps ({self.steps}) or steps_per_block ({self.steps_per_block}), not both")
        if self.do_sample:
            temperature = 1.0 if self.temperature is None else self.temperature
            if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature <= 0:
                raise ValueError(f"temperature must be > 0 with do_sample=True, got {temperature!r}")
        elif self.temperature not in (None, 0, 0.0):
            raise ValueError(f"temperature={self.temperature!r} has no effect with do_sample=False: pass "
                             "do_sample=True to sample")
        else:
            temperature = 0.0
        per_block = self.steps_from_per_block(self.max_new_tokens, self.block_length)
        given = dict(gen_length=self.max_new_tokens, block_length=self.block_length, temperature=temperature,
                     remasking=self.remasking, schedule=self.schedule, schedule_shift=self.schedule_shift,
                     steps=self.steps if per_block is None else per_block)
        settings = resolve_sampler_arguments(given, {name: None for name in given}, names=GENERATION_NAMES)
        if self.alg is None:
            if self.step_ratio is not None:
                raise ValueError(f"step_ratio={self.step_ratio!r} is a setting of Dream's sampler (alg); LLaDA's takes "
                                 "steps: pass steps=int(max_new_tokens x ratio)")
            return settings
        return {**settings, **self.dream_arguments(settings)}

    def dream_arguments(self, settings) -> dict:
        """Dream's sampler settings (alg, alg_temp, eps, top_k, top_p, step_ratio), validated with the resolved
        `settings` (check_dream_steps: schedule "uniform" is Dream's timesteps, "shift" LaViDa's); its answer is one
        block decoded by its own rule, so LLaDA's block and remasking settings must keep their defaults."""
        if self.alg not in DREAM_ALGORITHMS:
            raise ValueError(f"alg must be one of {DREAM_ALGORITHMS} (or None: LLaDA's sampler), got {self.alg!r}")
        llada_only = {name: getattr(self, name) for name in ("block_length", "steps_per_block", "remasking")
                      if getattr(self, name) != SAMPLER_FIELDS[name]}
        if llada_only:
            raise ValueError(f"{llada_only} are settings of LLaDA's sampler; alg={self.alg!r} (Dream's) decodes the "
                             "whole answer as one block with its own commit rule: leave them at their defaults")
        alg_temp = self.alg_temp
        if alg_temp is not None and (isinstance(alg_temp, bool) or not isinstance(alg_temp, (int, float))
                                     or not 0 <= alg_temp < float("inf")):
            raise ValueError(f"alg_temp must be a finite number >= 0 (or None), got {self.alg_temp!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps!r}")
        dream = dict(alg=self.alg, alg_temp=self.alg_temp, eps=self.eps, top_k=self.top_k, top_p=self.top_p,
                     step_ratio=self.step_ratio)
        check_dream_steps({**settings, **dream}, self.max_new_tokens - self.use_prefix_cache,
                          {"gen_length": "max_new_tokens"})
        return dream

    def to_json_string(self, *args, **kwargs) -> str:
        """Every field, always (use_diff=False): GenerationConfig's diff is taken against its own defaults, which
        differ from ours, so a diff would not reload to the same settings."""
        return super().to_json_string(*args, **{**kwargs, "use_diff": False})

    @classmethod
    def from_model_config(cls, model_config) -> "LavidaShirgGenerationConfig":
        """The default generation config of a model config: the sampler defaults with its special ids."""
        config = model_config if isinstance(model_config, dict) else model_config.to_dict()
        ids = {name: config[name] for name in ("bos_token_id", "eos_token_id", "pad_token_id") if name in config}
        dream = (config.get("text_config") or {}).get("model_type") == DREAM_TEXT_MODEL_TYPE
        return cls(**ids, **(DREAM_GENERATION_DEFAULTS if dream else {}), _from_model_config=True)


@dataclass
class MaskedDiffusionGenerateOutput(ModelOutput):
    """Output of `generate(..., return_dict_in_generate=True)`.

    sequences: (B * num_return_sequences, P + G) prompt + answer ids.
    history: with output_history, the answer canvas (B * num_return_sequences, G) after every step, in order
        (masked positions hold the mask id), as LaViDa's predict.py prints it.
    past_key_values: the prefix cache (a PrefixCache) the sampler read, with use_prefix_cache (its `nbytes()` is
        the memory the image tokens cost).
    """

    sequences: torch.LongTensor | None = None
    history: tuple | None = None
    past_key_values: PrefixCache | None = None


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_supported(settings: dict):
    """Raise a ValueError naming any autoregressive-only generate() setting (beyond its neutral value)."""
    for name, reason in UNSUPPORTED.items():
        if name in settings and settings[name] is not None and settings[name] != UNSUPPORTED_VALUE_ALLOWED.get(name):
            raise ValueError(f"{name}={settings[name]!r} is not supported by the masked-diffusion sampler: {reason}")
        settings.pop(name, None)


def generation_config_of_call(model_config: LavidaShirgGenerationConfig, generation_config=None, **kwargs):
    """The settings of one generate() call: `generation_config` (ours, or a plain GenerationConfig whose non-default
    fields are taken over the model's), else the model's, updated with `kwargs`; transformers' `use_cache` is
    `use_prefix_cache`; validated."""
    if generation_config is None:
        base = model_config.to_dict()
    elif isinstance(generation_config, LavidaShirgGenerationConfig):
        base = generation_config.to_dict()
    elif isinstance(generation_config, GenerationConfig):
        defaults = GenerationConfig().to_dict()
        base = {**model_config.to_dict(), **{key: value for key, value in generation_config.to_dict().items()
                                             if key not in METADATA_FIELDS and value != defaults.get(key)}}
    else:
        raise TypeError(f"generation_config must be a GenerationConfig, got {type(generation_config).__name__}")
    settings = {**base, **kwargs}
    if "use_cache" in settings:
        settings["use_prefix_cache"] = settings.pop("use_cache")
    return LavidaShirgGenerationConfig(**settings)


def logits_warpers(settings: LavidaShirgGenerationConfig) -> LogitsProcessorList:
    """transformers' top-k / top-p warpers of a sampling call (empty without do_sample)."""
    warpers = LogitsProcessorList()
    if settings.do_sample and settings.top_k is not None:
        warpers.append(TopKLogitsWarper(top_k=settings.top_k))
    if settings.do_sample and settings.top_p is not None and settings.top_p < 1:
        warpers.append(TopPLogitsWarper(top_p=settings.top_p))
    return warpers


def denoise_step(answer_logits, canvas, in_block, count, mask_token_id, temperature, remasking, warpers=(),
                 gumbel=None, remask=None):
    """One sampler step: l = answer_logits(canvas) (B, G, V) (the model's forward on the answer canvas), filtered
    by each of `warpers`; x0 = sample_tokens(l) with the Gumbel draws `gumbel`; confidence = token_confidence(l, x0) (the draws `remask` for random remasking);
    then the `count` (0-d tensor) most confident masked positions of the block (`in_block` (G,) bool) take x0.
    No host reads and static shapes: it compiles as one graph (`compiled_step`)."""
    logits = answer_logits(canvas)
    for warper in warpers:  # transformers' TopK / TopP warpers on (B G, V)
        logits = warper(canvas.reshape(-1, 1), logits.flatten(0, 1)).view_as(logits)
    predictions = sample_tokens(logits, temperature, noise=gumbel)
    confidence = token_confidence(logits, predictions, remasking, noise=remask)
    eligible = (canvas == mask_token_id) & in_block
    return commit_most_confident(canvas, predictions, confidence, eligible, count)


COMPILE_DEVICES = ("cpu", "cuda")
COMPILE_NEEDS_CACHE = ("compile_step compiles the answer step against the cached prefix: it needs "
                       "use_prefix_cache=True")


@functools.cache
def _compiled_denoise_step(mode, function=denoise_step):
    return torch.compile(function, fullgraph=True, mode=mode)


def compiled_step(device, dtype, kv_cache_dtype=None, function=denoise_step):
    """`function` (`denoise_step`, or Dream's `dream_denoise_step`) under torch.compile(fullgraph=True): mode
    "reduce-overhead" (CUDA graphs; each output is cloned, since a replay overwrites the graph's outputs) on CUDA,
    the default mode on CPU. Refused up front, with a ValueError naming the setting, where it cannot run: a device
    other than COMPILE_DEVICES, bfloat16 on a GPU without bf16, a float8 prefix cache (kv_cache_dtype) on a GPU
    below compute capability 8.9 (Triton has no float8-e4m3 conversion there)."""
    if device.type not in COMPILE_DEVICES:
        raise ValueError(f"compile_step runs on the devices {COMPILE_DEVICES}, not {device.type!r}: pass "
                         "compile_step=False")
    if device.type == "cpu":
        from torch._inductor import cpp_builder  # imported here: only the compiled step needs inductor
        from torch._inductor.exc import InvalidCxxCompiler

        try:  # inductor compiles the CPU graph with a C++ compiler: a missing one fails here, before any work
            cpp_builder.get_cpp_compiler()
        except InvalidCxxCompiler as error:
            raise ValueError("compile_step on CPU needs a C++ compiler (g++ or clang++, or the one in $CXX): install "
                             "one or pass compile_step=False") from error
        return _compiled_denoise_step(None, function)
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"compile_step: this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16; load the "
                         "model in float16 or float32, or pass compile_step=False")
    capability = torch.cuda.get_device_capability(device)
    if kv_cache_dtype == "float8_e4m3fn" and capability < (8, 9):
        raise ValueError(f"compile_step with kv_cache_dtype='float8_e4m3fn' needs a GPU of compute capability >= 8.9, "
                         f"this one has {capability[0]}.{capability[1]}: pass kv_cache_dtype None, 'bfloat16' or "
                         "'float16', or compile_step=False")
    compiled = _compiled_denoise_step("reduce-overhead", function)

    def replayed(*args, **kwargs):
        return compiled(*args, **kwargs).clone()

    return replayed


def run_sampler(answer_logits, batch, vocab_size, sampler, mask_token_id, device, warpers=(), generator=None,
                keep_history=False, step=denoise_step, draft_ids=None):
    """LLaDA/LaViDa's sampler: the answer canvas starts as masks (with `draft_ids` (B, D), LaViDa's draft on its
    first D positions: every id other than the mask stays fixed); per block, per step, `step` (`denoise_step` or
    its compiled form) predicts every position with `answer_logits`, samples x0 (Gumbel-max at the temperature)
    and commits the most confident predictions of the block, c[b] for row b (`masked_transfer_counts` of the
    row's masked positions in the block). A step where no row has a masked position left in the block is skipped
    (no forward, no history entry), as LaViDa's `continue`. Counts and skips are worked out on the host before the
    loop (one read of the draft), then moved to the device: the loop reads nothing back. The random draws of every
    step come from `generator` (`step_noise`). Returns the canvas (B, G) and, with `keep_history`, the canvas after
    every step (else None)."""
    gen_length, block_length = sampler["gen_length"], sampler["block_length"]
    num_blocks = gen_length // block_length
    steps_per_block = sampler["steps"] // num_blocks
    canvas = torch.full((batch, gen_length), mask_token_id, dtype=torch.long, device=device)
    if draft_ids is None:
        masked = [[block_length] * batch] * num_blocks
    else:
        canvas[:, : draft_ids.shape[1]] = draft_ids
        masked = (canvas == mask_token_id).view(batch, num_blocks, block_length).sum(-1).T.tolist()  # (blocks, B)
    schedules = {m: masked_transfer_counts(m, steps_per_block, sampler["schedule"], sampler["schedule_shift"])
                 for m in {m for row in masked for m in row}}
    table = [[schedules[m] for m in row] for row in masked]  # (blocks, B, steps)
    # a row's counts are zero only after its last commit, so block k runs its first `runs[k]` steps: up to the
    # last one in which some row still has masked positions (sum_{j < i} c_j[b] < m[b])
    runs = [max(sum(map(bool, counts)) for counts in rows) for rows in table]
    counts = torch.tensor(table).transpose(1, 2).to(device, non_blocking=True)  # (blocks, steps, B)
    answer_index = torch.arange(gen_length, device=device)
    shape = (batch, gen_length, vocab_size)
    history = []
    for block, block_start in enumerate(range(0, gen_length, block_length)):
        in_block = (answer_index >= block_start) & (answer_index < block_start + block_length)  # (G,)
        for i in range(runs[block]):
            gumbel, remask = step_noise(shape, sampler["temperature"], sampler["remasking"], device, generator)
            canvas = step(answer_logits, canvas, in_block, counts[block, i], mask_token_id, sampler["temperature"],
                          sampler["remasking"], warpers, gumbel, remask)
            history.append(canvas)
    return canvas, tuple(history) if keep_history else None


def check_draft_ids(draft_ids, input_ids, gen_length, config):
    """A draft must be (B, D) integer ids of the LM vocabulary, one row per prompt, with D <= gen_length (the
    processor right-pads drafts with the mask id); a ValueError names `draft_ids` otherwise."""
    if not isinstance(draft_ids, torch.Tensor) or draft_ids.dim() != 2 or draft_ids.dtype != torch.long:
        raise ValueError(f"draft_ids must be a (batch, draft length) int64 tensor (the processor's `draft_ids`), got "
                         f"{type(draft_ids).__name__}" + (f" {draft_ids.dtype} of shape {tuple(draft_ids.shape)}"
                                                          if isinstance(draft_ids, torch.Tensor) else ""))
    if draft_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(f"draft_ids has {draft_ids.shape[0]} rows for {input_ids.shape[0]} prompts: one draft per "
                         "prompt (pad shorter ones with the mask id)")
    if draft_ids.shape[1] > gen_length:
        raise ValueError(f"draft_ids has {draft_ids.shape[1]} positions, more than the answer's max_new_tokens "
                         f"(gen_length) {gen_length}: raise max_new_tokens or shorten the draft")
    vocab = config.text_config.vocab_size
    if draft_ids.numel() and not 0 <= int(draft_ids.min()) <= int(draft_ids.max()) < vocab:
        raise ValueError(f"draft_ids must be token ids of the LM vocabulary [0, {vocab}), got values in "
                         f"[{int(draft_ids.min())}, {int(draft_ids.max())}]")


PREFIX_SETTINGS = ("use_prefix_cache", "prefix_lm_mask", "kv_cache_dtype", "compile_step")


class LavidaShirgGenerationMixin:
    """generate() / diffusion_generate() of LavidaShirgForMaskedDiffusion: every step is one call of its forward."""

    @classmethod
    def can_generate(cls) -> bool:
        """`generate()` runs the masked-diffusion sampler (transformers' GenerationMixin is autoregressive)."""
        return True

    def adjust_generation_fn(self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path,
                             cache_dir, force_download, proxies, local_files_only, token, revision, subfolder,
                             trust_remote_code, **kwargs):
        """from_pretrained's hook: the folder's generation_config.json read as a LavidaShirgGenerationConfig through
        transformers' loader; a folder without one keeps the defaults derived in __init__ (an unreadable one is an
        error naming the file)."""
        if generation_config is not None:
            self.generation_config = generation_config_of_call(self.generation_config, generation_config)
            return
        location = dict(cache_dir=cache_dir, force_download=force_download, proxies=proxies,
                        local_files_only=local_files_only, token=token, revision=revision, subfolder=subfolder)
        found = cached_file(pretrained_model_name_or_path, GENERATION_CONFIG_NAME,
                            _raise_exceptions_for_missing_entries=False, **location)
        if found is not None:
            self.generation_config = LavidaShirgGenerationConfig.from_pretrained(pretrained_model_name_or_path,
                                                                                 **location)

    def _prepare_generation_config(self, generation_config=None, use_model_defaults=None, **kwargs):
        """transformers' hook, called by pipelines of transformers < 5.24: the call's LavidaShirgGenerationConfig
        (the given one, else the model's, updated with the generation settings in kwargs) and the other kwargs."""
        settings = {key: value for key, value in kwargs.items() if key in GENERATION_ARGUMENTS}
        prepared = generation_config_of_call(self.generation_config, generation_config, **settings)
        return prepared, {key: value for key, value in kwargs.items() if key not in settings}

    def answer_logits(self, prefix_embeds, prefix_mask, gen_length, prefix):
        """(answer_logits, cache, first_token): answer_logits(canvas (B, G)) -> logits (B, G, V), each call one run of
        the model's forward. With the prefix cache (prefix["use_prefix_cache"]) the prefix (B, P, E) runs once here
        (the prefill, stored in prefix["kv_cache_dtype"]) and each call runs the answer against it; without it, each
        call runs prefix + answer, the prefix blind to the answer with prefix["prefix_lm_mask"] (else LaViDa's
        bidirectional mode). A Dream backbone reads token j from position j - 1's logits (`shift_logits`; without
        the cache answer position 0 reads the last prompt position) and its prefill gives the first answer token,
        the argmax at the last prompt position (B,) (Dream's prefix-LM); otherwise first_token is None."""
        batch, prefix_length = prefix_mask.shape
        answer_mask = torch.ones(batch, gen_length, dtype=prefix_mask.dtype, device=prefix_mask.device)
        full_mask = torch.cat((prefix_mask, answer_mask), dim=1)  # (B, P + G)
        embed = self.get_input_embeddings()
        shifted = self.config.text_config.model_type == DREAM_TEXT_MODEL_TYPE
        if prefix["use_prefix_cache"]:
            cache, first_token = PrefixCache(prefix["kv_cache_dtype"]), None  # filled by the prefill
            prefill = dict(inputs_embeds=prefix_embeds, attention_mask=prefix_mask, use_cache=True,
                           past_key_values=cache, return_dict=True)
            if shifted:
                first_token = self(**prefill, logits_to_keep=1).logits[:, -1].argmax(dim=-1)  # (B,)
            else:
                self.model(**prefill)
            positions = positions_from_mask(full_mask)[:, prefix_length:].contiguous()  # (B, G)
            if prefix["compile_step"]:  # one compilation serves every prefix length P
                for pair in cache.layers:
                    for stored, _ in pair:
                        torch._dynamo.maybe_mark_dynamic(stored, 2)  # (B, Hkv, P, d)
                torch._dynamo.maybe_mark_dynamic(full_mask, 1)

            def logits_with_cache(canvas):
                logits = self(inputs_embeds=embed(canvas), attention_mask=full_mask, position_ids=positions,
                              past_key_values=cache, return_dict=True).logits
                return shift_logits(logits) if shifted else logits

            return logits_with_cache, cache, first_token
        prefix_lengths = None
        if prefix["prefix_lm_mask"]:
            prefix_lengths = torch.full((batch,), prefix_length, device=full_mask.device)

        def logits_without_cache(canvas):
            sequence = torch.cat((prefix_embeds, embed(canvas)), dim=1)  # (B, P + G, E)
            return self(inputs_embeds=sequence, attention_mask=full_mask, prefix_lengths=prefix_lengths,
                        logits_to_keep=gen_length + shifted, return_dict=True).logits[:, :gen_length]

        return logits_without_cache, None, None

    def sample_answers(self, inputs, sampler, prefix, sequences_per_prompt=1, warpers=(), generator=None,
                       keep_history=False, draft_ids=None):
        """(answer ids (B * sequences_per_prompt, G), history (see run_sampler), prefix cache or None) of generate
        and diffusion_generate: the step (`denoise_step`, or with prefix["compile_step"] its compiled form, checked
        before any work), the prefix embedded once (images written in, each prompt repeated `sequences_per_prompt`
        times), then
        `run_sampler` with the resolved `sampler` settings. inputs: the model inputs (input_ids, attention_mask,
        images, selection settings); draft_ids: (B, D) LaViDa's FIM draft (see `check_draft_ids`) or None."""
        if generator is not None and (not isinstance(generator, torch.Generator)
                                      or generator.device.type != self.device.type):
            raise ValueError(f"generator must be a torch.Generator on the model's device ({self.device}), got "
                             f"{generator!r}" + (f" on {generator.device}" if isinstance(generator, torch.Generator)
                                                 else ""))
        dream = self.config.text_config.model_type == DREAM_TEXT_MODEL_TYPE
        if dream != ("alg" in sampler):
            raise ValueError("a Dream backbone samples with Dream's algorithms: pass alg (one of "
                             f"{DREAM_ALGORITHMS})" if dream else f"alg={sampler['alg']!r} is Dream's sampler; this "
                             "model's LLaDA backbone samples with remasking / schedule: pass alg=None")
        if draft_ids is not None:
            if dream:
                raise ValueError("draft_ids (text infilling) is LaViDa's FIM on the LLaDA backbone: LaViDa has no FIM "
                                 "for Dream; pass draft_ids=None")
            check_draft_ids(draft_ids, inputs["input_ids"], sampler["gen_length"], self.config)
            draft_ids = draft_ids.repeat_interleave(sequences_per_prompt, dim=0)
        if dream and sampler["block_length"] != sampler["gen_length"]:
            raise ValueError(f"Dream's sampler decodes the answer in one block: block_length "
                             f"({sampler['block_length']}) must be None or the answer length ({sampler['gen_length']})")
        if dream:  # the masked answer positions: all but the first with the prefix cache (Dream's prefix-LM)
            check_dream_steps(sampler, sampler["gen_length"] - prefix["use_prefix_cache"])
        step = dream_denoise_step if dream else denoise_step
        if prefix["compile_step"]:
            if not prefix["use_prefix_cache"]:
                raise ValueError(COMPILE_NEEDS_CACHE)
            step = compiled_step(self.device, self.dtype, prefix["kv_cache_dtype"], step)
        input_ids, gen_length = inputs["input_ids"], sampler["gen_length"]
        check_sequence_length(input_ids.shape[1], gen_length, self.config.text_config.max_position_embeddings)
        prefix_embeds, prefix_mask, _ = self.model.inputs_and_mask(**inputs)  # (B, P, E), (B, P)
        prefix_embeds = prefix_embeds.repeat_interleave(sequences_per_prompt, dim=0)
        prefix_mask = prefix_mask.repeat_interleave(sequences_per_prompt, dim=0)
        answer_logits, cache, first_token = self.answer_logits(prefix_embeds, prefix_mask, gen_length, prefix)
        vocab_size = self.get_output_embeddings().weight.shape[0]
        if dream:
            answers, history = run_dream_sampler(answer_logits, first_token, prefix_mask.shape[0], vocab_size,
                                                 sampler, self.config.mask_token_id, input_ids.device, generator,
                                                 keep_history, step)
        else:
            answers, history = run_sampler(answer_logits, prefix_mask.shape[0], vocab_size, sampler,
                                           self.config.mask_token_id, input_ids.device, warpers, generator,
                                           keep_history, step, draft_ids)
        return answers, history, cache

    @torch.no_grad()
    def generate(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        image_sizes=None,
        hires_pixel_values=None,
        question_mask=None,
        selection=None,
        generation_config=None,
        selection_method=None,
        selection_budget=None,
        selection_options=None,
        generator=None,
        draft_ids=None,
        **kwargs,
    ):
        """Masked-diffusion generation on transformers' conventions: prompt + answer ids (B * n, P + G).

        Settings: `generation_config` (default: the model's `generation_config`, see LavidaShirgGenerationConfig)
        updated with `kwargs` (max_new_tokens, block_length, steps / steps_per_block, do_sample, temperature, top_k,
        top_p, remasking, schedule, schedule_shift, use_prefix_cache (or use_cache), prefix_lm_mask,
        kv_cache_dtype, compile_step, num_return_sequences n, return_dict_in_generate, output_history).
        Autoregressive-only settings (beams, penalties, max_length, stop strings) raise a ValueError. With
        return_dict_in_generate: a MaskedDiffusionGenerateOutput (sequences, the answer canvas after every step with
        output_history, the prefix cache). The inputs are the processor's output, whose `selection` carries its
        SHIRG settings (see `forward`); `generator` seeds sampling; `draft_ids` (B, D), the processor's draft (text
        infilling, LaViDa's FIM): its ids other than the mask are fixed on the first D answer positions.
        """
        if input_ids is None:
            raise ValueError("generate needs input_ids (the processor's output)")
        settings = generation_config_of_call(self.generation_config, generation_config, **kwargs)
        n = settings.num_return_sequences
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                      image_sizes=image_sizes, hires_pixel_values=hires_pixel_values, question_mask=question_mask,
                      selection=selection, selection_method=selection_method, selection_budget=selection_budget,
                      selection_options=selection_options)
        answers, history, cache = self.sample_answers(
            inputs, settings.sampler_arguments(), {name: getattr(settings, name) for name in PREFIX_SETTINGS}, n,
            logits_warpers(settings), generator, settings.output_history, draft_ids,
        )
        sequences = torch.cat((input_ids.repeat_interleave(n, dim=0), answers), dim=1)
        if not settings.return_dict_in_generate:
            return sequences
        return MaskedDiffusionGenerateOutput(sequences=sequences, history=history, past_key_values=cache)

    @torch.no_grad()
    def diffusion_generate(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_sizes=None,
        hires_pixel_values=None,
        question_mask=None,
        selection=None,
        selection_method=None,
        selection_budget=None,
        selection_options=None,
        gen_length=None,
        block_length=None,
        steps=None,
        temperature=None,
        remasking=None,
        schedule=None,
        schedule_shift=None,
        use_prefix_cache=True,
        prefix_lm_mask=False,
        kv_cache_dtype=None,
        generator=None,
        compile_step=None,
        draft_ids=None,
    ):
        """LaViDa's sampler with LaViDa's argument names, returning the answer ids only (B, gen_length).

        The same sampler as `generate` (identical answers for identical settings): the answer canvas starts as mask
        tokens and is decoded block by block (`block_length`, default gen_length); each block takes
        steps / num_blocks steps; each step predicts every masked position and commits the most confident
        predictions of the current block (counts from `schedule`: "uniform" or LaViDa's "shift" with
        `schedule_shift`); temperature > 0 samples by Gumbel-max. With `use_prefix_cache` the prefix runs once and
        each step runs only the answer against its cached keys/values (Prefix-DLM); without it, prefix and answer
        run together with full bidirectional attention, or with the prefix blind to the answer if
        `prefix_lm_mask`. `kv_cache_dtype` stores the cached prefix in a smaller dtype (see prefix_cache).
        `compile_step` (None: the generation config's) runs every step as one compiled graph (`compiled_step`:
        CUDA graphs on CUDA, the same answers as eager; needs the prefix cache).
        Sampler arguments left None take the model's generation_config (max_new_tokens is gen_length; block_length
        and steps left None there: gen_length; steps_per_block: steps = steps_per_block x blocks). Prompts are
        left-padded. `draft_ids` (B, D <= gen_length): LaViDa's `draft_tokens` (text infilling): every id other than
        the mask is fixed on the first D answer positions, and each block commits only its masked positions.
        """
        given = dict(gen_length=gen_length, block_length=block_length, steps=steps, temperature=temperature,
                     remasking=remasking, schedule=schedule, schedule_shift=schedule_shift)
        sampler = resolve_sampler_arguments(given, self.generation_config.sampler_defaults(gen_length, block_length))
        compile_step = self.generation_config.compile_step if compile_step is None else compile_step
        if not isinstance(compile_step, bool):
            raise ValueError(f"compile_step must be true or false (or None: the generation config's), got "
                             f"{compile_step!r}")
        if kv_cache_dtype is not None and not use_prefix_cache:
            raise ValueError("kv_cache_dtype stores the prefix cache: it needs use_prefix_cache=True")
        prefix = dict(use_prefix_cache=use_prefix_cache, prefix_lm_mask=prefix_lm_mask, kv_cache_dtype=kv_cache_dtype,
                      compile_step=compile_step)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                      image_sizes=image_sizes, hires_pixel_values=hires_pixel_values, question_mask=question_mask,
                      selection=selection, selection_method=selection_method, selection_budget=selection_budget,
                      selection_options=selection_options)
        return self.sample_answers(inputs, sampler, prefix, generator=generator, draft_ids=draft_ids)[0]

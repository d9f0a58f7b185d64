"""Latency, memory and KV cache of LaViDa's pooled layout vs full high resolution vs SHIRG and the baselines, on the
real LaViDa-LLaDA architecture with random weights (nothing is downloaded; the model is built on the target device).

    python benchmarks/bench_latency.py                 # CUDA, bf16, real sizes (SigLIP-so400m + LLaDA-8B)
    python benchmarks/bench_latency.py --small         # CPU-sized: real image geometry, small widths and depths
    python benchmarks/bench_latency.py --real-width    # real widths and vocabulary, --layers 2 of each tower, bf16
    python benchmarks/bench_latency.py --compile-step  # each diffusion step one compiled graph (CUDA graphs on CUDA)

One 768x768 image, a 32-token answer in 16 diffusion steps (LaViDa's shift schedule), prefix cache on. Latency
mode (batch 1): prefill ms (vision + selection + prefix LM), ms per diffusion step, total ms, peak GB
(torch.cuda.max_memory_allocated; n/a on CPU) and KV MB (read from the prefix-cache tensors) per variant, and the
prefill / total of each variant as a ratio of the first variant's (the baseline, pooled by default); medians of
--repeats runs after one warm-up, taken round-robin over the variants. Throughput mode: images per second at each
--batch-sizes batch (the same image repeated), which LaViDa's batch-1 evaluation cannot measure, and its ratio to
the baseline's; a batch that does not fit in GPU memory is reported as OOM. Expected: KV MB proportional to the
prefix length; SHIRG-768 total below pooled (768 vs 1008 image tokens).

--real-width runs the real hidden sizes, heads and vocabulary (126464 x 4096 embedding and head) with --layers LM
and SigLIP layers in bf16 (about 3 GB at 2 layers), so that dtype and shape problems of the real sizes show on any
machine. Every mode also prints the analytic memory of the full-size model per variant (`memory_estimate`: weights,
KV per token x prefix tokens, peak activations), computed from the config.
"""

import argparse
import os
import statistics

import numpy as np
import torch
from PIL import Image

from lavida_shirg import ShirgConfig
from lavida_shirg.configuration_lavida_shirg import PRESETS
from lavida_shirg.image_layout import anyres_grid, source_grid
from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion
from lavida_shirg.processing_lavida_shirg import LavidaShirgImageProcessor
from lavida_shirg.shirg_selection import image_token_count
from shirg_tools.timing import timed_generate
from shirg_tools.variants import DEFAULT_VARIANTS, parse_variants

# --small: the real image geometry (384 px views, 14 px patches, 672 px high-resolution view = 2304 tokens, pooled
# 14 x 14) with narrow, shallow towers, so that it runs on a CPU in a minute or two
SMALL_VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=384,
                    patch_size=14, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                    vision_use_head=False)
SMALL_TEXT = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=4096)
REAL_SELECTION = dict(pooled_view_size=14, hires_image_size=672, selection_budget=768, budget_choices=[512, 768, 1024],
                      x_scaffold_size=8, visionzip_contextual_tokens=16)
PROMPT_TOKENS, QUESTION_TOKENS = 40, 16  # template + system prompt before the image, question after it
FLOAT64_BYTES = 8  # the sampler's confidences: softmax of the step's logits in float64


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="small widths/depths (CPU), real image geometry")
    size.add_argument("--real-width", action="store_true",
                      help="real widths and vocabulary with --layers layers per tower, bf16 (a CPU smoke of the "
                           "real sizes)")
    parser.add_argument("--layers", type=int, default=2, help="LM and SigLIP layers of --real-width (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="default: bfloat16 on CUDA and with --real-width, float32 otherwise on CPU")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated; the first is the baseline")
    parser.add_argument("--image-size", type=int, default=768)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, help="timed runs per variant (default 3; --real-width: 1)")
    parser.add_argument("--batch-sizes", default=None,
                        help="throughput batches (default 1,8,32; --small: 1,8; --real-width: 2)")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--kv-cache-dtype", choices=("bfloat16", "float16", "float8_e4m3fn"))
    parser.add_argument("--compile-step", action="store_true",
                        help="run every diffusion step as one compiled graph (compile_step: CUDA graphs on CUDA); "
                             "the warm-up runs compile")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); 1 gives steadier CPU "
                        "timings on a machine shared with other work")
    args = parser.parse_args(argv)
    if not 1 <= args.layers <= PRESETS["lavida-llada"]["vision_config"]["num_hidden_layers"]:
        parser.error(f"--layers must be in [1, {PRESETS['lavida-llada']['vision_config']['num_hidden_layers']}] "
                     f"(the real SigLIP depth), got {args.layers}")
    if args.repeats is None:
        args.repeats = 1 if args.real_width else 3
    if args.batch_sizes is None:
        args.batch_sizes = "2" if args.real_width else ("1,8" if args.small else "1,8,32")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.real_width or args.device.startswith("cuda") else "float32"
    return args


def real_config(layers=None, **overrides) -> ShirgConfig:
    """The lavida-llada preset; with `layers`, `layers` LM and SigLIP layers (real widths, heads and vocabulary)."""
    if layers is None:
        return ShirgConfig.from_preset("lavida-llada", **overrides)
    preset = PRESETS["lavida-llada"]
    return ShirgConfig.from_preset(
        "lavida-llada", vision_config={**preset["vision_config"], "num_hidden_layers": layers},
        text_config={**preset["text_config"], "num_hidden_layers": layers}, **overrides,
    )


def small_config(**overrides) -> ShirgConfig:
    """--small: narrow, shallow towers with the real image geometry."""
    return ShirgConfig.from_preset("tiny", vision_config=SMALL_VISION, text_config=SMALL_TEXT,
                                   **{**REAL_SELECTION, **overrides})


def model_config(args) -> ShirgConfig:
    if args.small:
        return small_config()
    return real_config(args.layers if args.real_width else None)


def full_size_config(args) -> ShirgConfig:
    """The config whose memory `memory_estimate` reports: the real model (the small one with --small)."""
    return small_config() if args.small else real_config()


def build_model(config: ShirgConfig, device: str, dtype: torch.dtype):
    """The architecture of `config` with random weights, built directly on `device` in `dtype`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = LavidaShirgForMaskedDiffusion(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_inputs(model, variant, image: Image.Image, batch: int) -> dict:
    """Model inputs of `batch` copies of one sample: [bos, prompt tokens, image tokens, question tokens], the image
    preprocessed as the processor does (anyres views, and the high-resolution view for a selection method)."""
    config = model.config
    processor = LavidaShirgImageProcessor(config.vision_config.image_size, config.image_grid_pinpoints)
    settings = model.selection_settings(variant.method, variant.budget, variant.options)
    single_view = variant.method != "pooled" and settings["hires_source"] == "single-view"
    pixels = processor.preprocess([image] * batch, hires_size=settings["hires_image_size"] if single_view else None)
    count = model.image_token_count((image.height, image.width), variant.method, variant.budget, variant.options)
    generator = torch.Generator().manual_seed(0)
    vocab = config.text_config.vocab_size
    prompt = torch.randint(10, vocab, (PROMPT_TOKENS,), generator=generator)
    question = torch.randint(10, vocab, (QUESTION_TOKENS,), generator=generator)
    ids = torch.cat([torch.tensor([config.bos_token_id]), prompt, torch.full((count,), config.image_token_id), question])
    question_mask = torch.zeros_like(ids, dtype=torch.bool)
    question_mask[-QUESTION_TOKENS:] = True
    inputs = dict(input_ids=ids.repeat(batch, 1), attention_mask=torch.ones(batch, ids.numel(), dtype=torch.long),
                  question_mask=question_mask.repeat(batch, 1), **dict(pixels), **variant.call_settings())
    return {key: value.to(model.device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}


def random_image(size: int) -> Image.Image:
    """A seeded random RGB image of size x size pixels."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8))


def generation_call(args) -> dict:
    return dict(gen_length=args.gen_length, block_length=args.gen_length, steps=args.steps, schedule="shift",
                kv_cache_dtype=args.kv_cache_dtype, compile_step=args.compile_step)


def summarize(runs) -> dict:
    """Medians of the GenerationTiming fields of `runs` (ms, MB); peak = the largest (GB, None on CPU)."""
    peaks = [run.peak_bytes for run in runs if run.peak_bytes is not None]
    return {
        "prefill_ms": statistics.median(run.prefill_s for run in runs) * 1000,
        "step_ms": statistics.median(run.step_s for run in runs) * 1000,
        "total_ms": statistics.median(run.total_s for run in runs) * 1000,
        "peak_gb": max(peaks) / 2**30 if peaks else None,
        "kv_mb": statistics.median(run.kv_bytes for run in runs) / 2**20,
    }


def measure_interleaved(model, inputs: dict, args) -> dict:
    """Per variant label, `summarize` of --repeats runs after one warm-up each; the runs go round-robin over the
    variants so that a slow phase of the machine hits every variant alike."""
    call = generation_call(args)
    for variant_inputs in inputs.values():
        timed_generate(model, {**variant_inputs, **call}, args.steps)
    runs = {label: [] for label in inputs}
    for _ in range(args.repeats):
        for label, variant_inputs in inputs.items():
            runs[label].append(timed_generate(model, {**variant_inputs, **call}, args.steps)[1])
    return {label: summarize(label_runs) for label, label_runs in runs.items()}


def measure(model, inputs: dict, args) -> dict:
    """`summarize` of --repeats runs of one input after one warm-up."""
    call = generation_call(args)
    timed_generate(model, {**inputs, **call}, args.steps)
    return summarize([timed_generate(model, {**inputs, **call}, args.steps)[1] for _ in range(args.repeats)])


def latency(model, variants, args) -> dict:
    """Per variant label: `summarize` at batch 1 (see `measure_interleaved`) and its image tokens."""
    image = random_image(args.image_size)
    results = measure_interleaved(model, {v.label: make_inputs(model, v, image, 1) for v in variants}, args)
    size = (args.image_size, args.image_size)
    for variant in variants:
        results[variant.label]["image_tokens"] = model.image_token_count(size, variant.method, variant.budget,
                                                                         variant.options)
    return results


def throughput(model, variants, batch_sizes, args) -> dict:
    """Per variant label, per batch size: images per second = batch / median total time (None: out of memory)."""
    image = random_image(args.image_size)
    results = {}
    for variant in variants:
        results[variant.label] = {}
        for batch in batch_sizes:
            try:
                result = measure(model, make_inputs(model, variant, image, batch), args)
                results[variant.label][batch] = batch * 1000 / result["total_ms"]
            except torch.cuda.OutOfMemoryError:  # reported in the table; the next batch size is tried
                torch.cuda.empty_cache()
                results[variant.label][batch] = None
    return results


# ---- analytic memory ---------------------------------------------------------------------------------------------


def parameter_count(config: ShirgConfig) -> int:
    """Parameters of the model of `config`, counted on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        return sum(parameter.numel() for parameter in LavidaShirgForMaskedDiffusion(config).parameters())


def step_parameter_count(text_config) -> int:
    """Parameters one diffusion step reads: every LM layer, the final norm and the head (the input embedding reads
    only the G answer rows). Per layer: E (H + 2 Hkv) d (q, k, v) + H d E (o) + 3 E I (SwiGLU) + 2 E (norms)."""
    e, i, d = text_config.hidden_size, text_config.intermediate_size, text_config.head_dim
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    layer = e * (heads + 2 * kv_heads) * d + heads * d * e + 3 * e * i + 2 * e
    return text_config.num_hidden_layers * layer + e + text_config.vocab_size * e


def kv_bytes_per_token(text_config, dtype: torch.dtype, kv_cache_dtype=None) -> int:
    """Prefix-cache bytes of one token of one sample: 2 (key, value) x layers x Hkv x d x bytes of the stored dtype
    (float8 adds one float32 scale per (sample, head, layer), not per token)."""
    stored = dtype if kv_cache_dtype is None else getattr(torch, kv_cache_dtype)
    return (2 * text_config.num_hidden_layers * text_config.num_key_value_heads * text_config.head_dim
            * torch.empty((), dtype=stored).element_size())


def vision_tokens(config: ShirgConfig, settings: dict, image_size) -> int:
    """SigLIP tokens one image runs through the tower: its anyres views (pooled, anyres-views), else the
    high-resolution view, plus the global view again for the shirg-x global-view scaffold."""
    per_view = config.patches_per_side ** 2
    if settings["selection_method"] == "pooled" or settings["hires_source"] == "anyres-views":
        rows, cols = anyres_grid(image_size, config.image_grid_pinpoints, config.vision_config.image_size)
        tokens = (1 + rows * cols) * per_view
    else:
        views, rows, cols = source_grid(image_size, settings)
        tokens = views * rows * cols
    if settings["selection_method"] == "shirg-x" and settings["x_scaffold"] == "global-view":
        tokens += per_view
    return tokens


def activation_bytes(config: ShirgConfig, settings: dict, image_size, batch: int, prefix_tokens: int,
                     gen_length: int, dtype: torch.dtype) -> dict:
    """Estimated peak activation bytes of each inference phase of one batch (b = bytes of the compute dtype):
    vision: T_v b max(6 D, 2 D + 2 I_v, D + 3 E) (a SigLIP layer's attention or MLP working set, or the projector),
        T_v = batch x `vision_tokens`;
    prefill: B P b (E + max(4 E + (H + 2 Hkv) d, 2 E + 3 I)) (the prefix embeddings, plus one LM layer's attention
        or SwiGLU working set; flash / memory-efficient attention, no P x P scores);
    step: B G V (b + 2 x 8) (the logits, and their float64 copy and softmax for the confidences).
    The phases run one after the other: the peak is the largest."""
    vision, text = config.vision_config, config.text_config
    b = torch.empty((), dtype=dtype).element_size()
    e, width = text.hidden_size, vision.hidden_size
    qkv = (text.num_attention_heads + 2 * text.num_key_value_heads) * text.head_dim
    tokens = batch * vision_tokens(config, settings, image_size)
    return {
        "vision": tokens * b * max(6 * width, 2 * width + 2 * vision.intermediate_size, width + 3 * e),
        "prefill": batch * prefix_tokens * b * (e + max(4 * e + qkv, 2 * e + 3 * text.intermediate_size)),
        "step": batch * gen_length * text.vocab_size * (b + 2 * FLOAT64_BYTES),
    }


def memory_estimate(config: ShirgConfig, variants, image_size, batch_sizes, gen_length: int, dtype: torch.dtype,
                    kv_cache_dtype=None) -> dict:
    """Analytic memory of the model of `config` per variant label: weights bytes (every parameter in `dtype`),
    bytes read per diffusion step (`step_parameter_count`), KV bytes per token, prefix tokens (bos + prompt +
    image + question), and per batch size: KV bytes (= per token x prefix tokens x batch), peak activation bytes
    (the largest phase of `activation_bytes`) and total = weights + KV + activations."""
    b = torch.empty((), dtype=dtype).element_size()
    weights = parameter_count(config) * b
    per_token = kv_bytes_per_token(config.text_config, dtype, kv_cache_dtype)
    estimates = {}
    for variant in variants:
        settings = config.selection_settings(variant.method, variant.budget, variant.options)
        tokens = image_token_count(image_size, settings)
        prefix = 1 + PROMPT_TOKENS + tokens + QUESTION_TOKENS
        per_batch = {}
        for batch in batch_sizes:
            kv = per_token * prefix * batch
            peak = max(activation_bytes(config, settings, image_size, batch, prefix, gen_length, dtype).values())
            per_batch[batch] = {"kv_bytes": kv, "activation_bytes": peak, "total_bytes": weights + kv + peak}
        estimates[variant.label] = {"weights_bytes": weights,
                                    "step_weights_bytes": step_parameter_count(config.text_config) * b,
                                    "kv_bytes_per_token": per_token, "prefix_tokens": prefix, "batches": per_batch}
    return estimates


# ---- report ------------------------------------------------------------------------------------------------------


def device_label(device: str) -> str:
    if device.startswith("cuda"):
        return f"CUDA {torch.cuda.get_device_name(torch.device(device))}"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def latency_table(results: dict, unit: str) -> list:
    """Markdown lines of `latency`'s results, with prefill and total as ratios of the first (baseline) variant."""
    base = next(iter(results.values()))
    lines = [f"| variant | image tokens | prefill ms{unit} | ms/step{unit} | total ms{unit} | prefill / base | "
             f"total / base | peak GB | KV MB |", "| --- |" + " --- |" * 8]
    for label, result in results.items():
        peak = "n/a" if result.get("peak_gb") is None else f"{result['peak_gb']:.2f}"
        lines.append(f"| {label} | {result['image_tokens']} | {result['prefill_ms']:.1f} | {result['step_ms']:.2f} | "
                     f"{result['total_ms']:.1f} | {result['prefill_ms'] / base['prefill_ms']:.2f}x | "
                     f"{result['total_ms'] / base['total_ms']:.2f}x | {peak} | {result['kv_mb']:.1f} |")
    return lines


def throughput_table(results: dict, unit: str) -> list:
    """Markdown lines of `throughput`'s results: images per second and the ratio to the first (baseline) variant."""
    base = next(iter(results.values()))
    batches = list(base)
    lines = ["| variant | " + " | ".join(f"batch {b} img/s{unit} | / base" for b in batches) + " |",
             "| --- |" + " --- | --- |" * len(batches)]
    for label, rates in results.items():
        cells = []
        for batch in batches:
            rate = rates[batch]
            if rate is None:
                cells.append("OOM | -")
            else:
                ratio = "-" if base[batch] is None else f"{rate / base[batch]:.2f}x"
                cells.append(f"{rate:.2f} | {ratio}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def memory_table(estimates: dict) -> list:
    """Markdown lines of `memory_estimate`, in GiB (MiB when every total is below 1 GiB)."""
    first = next(iter(estimates.values()))
    batches = list(first["batches"])
    largest = max(estimate["batches"][b]["total_bytes"] for estimate in estimates.values() for b in batches)
    unit, scale = ("GiB", 2**30) if largest >= 2**30 else ("MiB", 2**20)
    lines = ["| variant | prefix tokens | " + " | ".join(f"KV {unit} b{b} | activations {unit} b{b} | total {unit} b{b}"
                                                       for b in batches) + " |",
             "| --- | --- |" + " --- | --- | --- |" * len(batches)]
    for label, estimate in estimates.items():
        cells = [" | ".join(f"{estimate['batches'][b][key] / scale:.2f}"
                            for key in ("kv_bytes", "activation_bytes", "total_bytes")) for b in batches]
        lines.append(f"| {label} | {estimate['prefix_tokens']} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    variants = parse_variants(args.variants)
    config = model_config(args)
    for variant in variants:
        config.selection_settings(variant.method, variant.budget, variant.options)  # refuse bad variants up front
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    full = full_size_config(args)
    estimates = memory_estimate(full, variants, (args.image_size, args.image_size), sorted({1, *batch_sizes}),
                                args.gen_length, dtype, args.kv_cache_dtype)
    first = next(iter(estimates.values()))
    text = full.text_config
    print(f"# analytic memory of the full-size model ({text.num_hidden_layers} LM layers x {text.hidden_size}, "
          f"vocabulary {text.vocab_size}, {full.vision_config.num_hidden_layers} SigLIP layers), "
          f"{str(dtype).replace('torch.', '')}")
    print(f"weights {first['weights_bytes'] / 2**30:.2f} GiB (read per diffusion step: "
          f"{first['step_weights_bytes'] / 2**30:.2f} GiB); KV {first['kv_bytes_per_token'] / 2**20:.3f} MiB per "
          "prefix token; activations = the largest phase (vision, prefill, step) of `activation_bytes`\n")
    print("\n".join(memory_table(estimates)) + "\n", flush=True)

    model = build_model(config, args.device, dtype)
    unit = " (CPU)" if not args.device.startswith("cuda") else ""
    text = model.config.text_config
    name = "small" if args.small else ("real-width" if args.real_width else "LaViDa-LLaDA")
    print(f"# bench_latency: {name} architecture, random weights, {device_label(args.device)}, "
          f"{str(dtype).replace('torch.', '')}")
    print(f"LM {text.num_hidden_layers} layers x {text.hidden_size} (vocabulary {text.vocab_size}), SigLIP "
          f"{model.config.vision_config.num_hidden_layers} layers x {model.config.vision_config.hidden_size}; one "
          f"{args.image_size}x{args.image_size} image; {args.gen_length}-token answer, {args.steps} steps, prefix "
          f"cache on{', KV cache in ' + args.kv_cache_dtype if args.kv_cache_dtype else ''}"
          f"{', compiled step' if args.compile_step else ''}; medians of "
          f"{args.repeats} runs; baseline {variants[0].label}\n")
    print("\n".join(latency_table(latency(model, variants, args), unit)), flush=True)
    if args.no_throughput:
        return
    print(f"\nThroughput{unit}: images per second (batch / median total time)\n")
    print("\n".join(throughput_table(throughput(model, variants, batch_sizes, args), unit)), flush=True)


if __name__ == "__main__":
    main()

"""Latency, memory and KV cache of LaViDa's pooled layout vs full high resolution vs SHIRG-Fixed, on the real
LaViDa-LLaDA architecture with random weights (nothing is downloaded; the model is built on the target device).

    python benchmarks/bench_latency.py                 # CUDA, bf16, real sizes (SigLIP-so400m + LLaDA-8B)
    python benchmarks/bench_latency.py --small         # CPU-sized: real image geometry, small widths and depths

One 768x768 image, a 32-token answer in 16 diffusion steps (LaViDa's shift schedule), prefix cache on. Latency
mode (batch 1): prefill ms (vision + selection + prefix LM), ms per diffusion step, total ms, peak GB
(torch.cuda.max_memory_allocated; n/a on CPU) and KV MB (read from the prefix-cache tensors) per variant; medians
of --repeats runs after one warm-up, taken round-robin over the variants. Throughput mode: images per second at batch 1, 8 and 32 (the same image
repeated), which LaViDa's batch-1 evaluation cannot measure; a batch that does not fit in GPU memory is reported
as OOM. Expected: KV MB proportional to the prefix length; SHIRG-768 total below pooled (768 vs 1008 image tokens).
"""

import argparse
import os
import statistics
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lavida_shirg import ShirgConfig  # noqa: E402
from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion  # noqa: E402
from lavida_shirg.processing_lavida_shirg import LavidaShirgImageProcessor  # noqa: E402
from shirg_tools.timing import timed_generate  # noqa: E402
from shirg_tools.variants import parse_variants  # noqa: E402

VARIANTS = "pooled,full,shirg-fixed@1024,shirg-fixed@768,shirg-fixed@512"
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small widths/depths (CPU), real image geometry")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--image-size", type=int, default=768)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default=None, help="throughput batches (default 1,8,32; --small: 1,8)")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--kv-cache-dtype", choices=("bfloat16", "float16", "float8_e4m3fn"))
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); 1 gives steadier CPU "
                        "timings on a machine shared with other work")
    return parser.parse_args(argv)


def build_model(small: bool, device: str, dtype: torch.dtype):
    """The real (or --small) architecture with random weights, built directly on `device` in `dtype`."""
    if small:
        config = ShirgConfig.from_preset("tiny", vision_config=SMALL_VISION, text_config=SMALL_TEXT, **REAL_SELECTION)
    else:
        config = ShirgConfig.from_preset("lavida-llada")
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


def generation_call(args) -> dict:
    return dict(gen_length=args.gen_length, block_length=args.gen_length, schedule="shift",
                kv_cache_dtype=args.kv_cache_dtype)


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
        timed_generate(model, variant_inputs, args.steps, **call)
    runs = {label: [] for label in inputs}
    for _ in range(args.repeats):
        for label, variant_inputs in inputs.items():
            runs[label].append(timed_generate(model, variant_inputs, args.steps, **call)[1])
    return {label: summarize(label_runs) for label, label_runs in runs.items()}


def measure(model, inputs: dict, args) -> dict:
    """`summarize` of --repeats runs of one input after one warm-up."""
    call = generation_call(args)
    timed_generate(model, inputs, args.steps, **call)
    return summarize([timed_generate(model, inputs, args.steps, **call)[1] for _ in range(args.repeats)])


def device_label(device: str) -> str:
    if device.startswith("cuda"):
        return f"CUDA {torch.cuda.get_device_name(torch.device(device))}"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    variants = parse_variants(args.variants)
    model = build_model(args.small, args.device, dtype)
    for variant in variants:
        model.selection_settings(variant.method, variant.budget, variant.options)  # refuse bad variants up front
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.image_size, args.image_size, 3), np.uint8))
    unit = " (CPU)" if not args.device.startswith("cuda") else ""
    text = model.config.text_config
    print(f"# bench_latency: {'small' if args.small else 'LaViDa-LLaDA'} architecture, random weights, "
          f"{device_label(args.device)}, {str(dtype).replace('torch.', '')}")
    print(f"LM {text.num_hidden_layers} layers x {text.hidden_size}; one {args.image_size}x{args.image_size} image; "
          f"{args.gen_length}-token answer, {args.steps} steps, prefix cache on"
          f"{', KV cache in ' + args.kv_cache_dtype if args.kv_cache_dtype else ''}; medians of {args.repeats} runs\n")
    print(f"| variant | image tokens | prefill ms{unit} | ms/step{unit} | total ms{unit} | peak GB | KV MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    size = (args.image_size, args.image_size)
    results = measure_interleaved(model, {v.label: make_inputs(model, v, image, 1) for v in variants}, args)
    for variant in variants:
        result = results[variant.label]
        peak = "n/a" if result["peak_gb"] is None else f"{result['peak_gb']:.2f}"
        tokens = model.image_token_count(size, variant.method, variant.budget, variant.options)
        print(f"| {variant.label} | {tokens} | {result['prefill_ms']:.1f} | {result['step_ms']:.2f} | "
              f"{result['total_ms']:.1f} | {peak} | {result['kv_mb']:.1f} |", flush=True)
    if args.no_throughput:
        return
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,8" if args.small else "1,8,32")).split(",")]
    print(f"\nThroughput{unit}: images per second (batch / median total time)\n")
    print("| variant | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |")
    print("| --- |" + " --- |" * len(batch_sizes))
    for variant in variants:
        cells = []
        for batch in batch_sizes:
            try:
                result = measure(model, make_inputs(model, variant, image, batch), args)
                cells.append(f"{batch * 1000 / result['total_ms']:.2f}")
            except torch.cuda.OutOfMemoryError:  # reported in the table; the next batch size is tried
                torch.cuda.empty_cache()
                cells.append("OOM")
        print(f"| {variant.label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

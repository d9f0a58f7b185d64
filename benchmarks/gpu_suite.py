"""Everything a lent GPU should measure, in one command: one JSON and one markdown report.

    python benchmarks/gpu_suite.py --output runs/gpu_suite            # one H100/H200: real sizes, bf16, < 10 min
    python benchmarks/gpu_suite.py --small --output /tmp/gpu_suite    # CPU rehearsal at the tiny preset's sizes

Sections, in order (each written to <output>/gpu_suite.json and gpu_suite.md as soon as it ends, so a run cut
short keeps what it measured; a section that fails records its error and the next one runs):
    environment  device, versions, the device-to-device copy bandwidth (bytes read + written per second)
    memory       bench_latency.memory_estimate of the suite's model per variant
    latency      bench_latency.latency at batch 1, every variant (medians; ratios to pooled), with the eager and the
                 compiled diffusion step (compile_step: CUDA graphs on CUDA; its warm-up runs compile)
    selection    bench_selection.measure_selection: the vision tower, the projector and every selection method
    sampler      bench_sampler.compare_modes: prefix cache vs no cache on a text prefix
    training     a LoRA training smoke of the suite's model through train.py under `accelerate launch` with
                 configs/accelerate/single_gpu.yaml (bf16), --train-steps optimizer steps
    throughput   bench_latency.throughput: images per second at each batch size, every variant, eager and compiled
                 (stops at --time-budget-s, the runs left are listed as not run)
    targets      issue 13's targets, each value against its limit: ms per step at batch 1 over the weight-read floor
                 (bytes one step reads: the LM weights and the prefix KV, over the copy bandwidth), SHIRG total
                 latency over pooled, selection ms of shirg-fixed / v2 / x at batch 1, and SHIRG images per second
                 over pooled at the largest batch (latency and throughput of the compiled step).
    backbones    bench_backbones.measure: LLaDA and Dream (the lavida-llada and lavida-dream presets, full size) on a
                 text prefix of the sampler's length: ms per diffusion step (decoder and head + commit), prefill, and
                 one answer choice's log_likelihood at mc_num 16; Dream's as ratios to LLaDA's. The two models are
                 built for this section and freed after it.
Real size: the lavida-llada preset with random weights in bf16 on CUDA, 768x768 images, 32-token answers in 16
steps, batches 1 / 8 / 32. --small: the tiny preset on CPU, the same variants with budgets scaled to its 256
high-resolution tokens, a few steps. The tokenizer is the tiny one at both sizes (nothing is downloaded): the model's
special-token ids are set to its ids.
"""

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import transformers

import bench_backbones
import bench_latency
import bench_sampler
import bench_selection
from lavida_shirg import ShirgConfig
from lavida_shirg.configuration_lavida_shirg import PRESETS, SPECIAL_TOKEN_FIELDS
from lavida_shirg.image_layout import fewest_source_tokens
from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from lavida_shirg.tiny_tokenizer import IMAGE_TOKEN, build_tiny_tokenizer
from shirg_tools.variants import DEFAULT_VARIANTS, default_variants, parse_variants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATE_CONFIG = os.path.join(ROOT, "configs", "accelerate", "single_gpu.yaml")
SECTIONS = ("environment", "memory", "latency", "selection", "sampler", "training", "throughput", "targets",
            "backbones")
REFERENCE_VARIANT = "shirg-fixed@768"  # the SHIRG variant the targets compare with pooled (scaled with --small)
BASELINE_VARIANT = "pooled"
MODES = {"eager": [], "compiled": ["--compile-step"]}  # bench_latency's arguments of each step mode
# issue 13's targets: name -> (limit, "max" (value <= limit) or "min" (value >= limit), what the value is)
TARGETS = {
    "step_over_floor": (1.3, "max", "ms per step at batch 1 / weight-read floor ms"),
    "shirg_total_over_pooled": (1.0, "max", "SHIRG total latency / pooled (batch 1)"),
    "selection_shirg_fixed_ms": (0.5, "max", "shirg-fixed selection ms at batch 1"),
    "selection_shirg_v2_ms": (1.0, "max", "shirg-v2 selection ms at batch 1"),
    "selection_shirg_x_ms": (1.0, "max", "shirg-x selection ms at batch 1"),
    "shirg_throughput_over_pooled": (1.15, "min", "SHIRG images/s / pooled at the largest batch"),
}


@dataclasses.dataclass(frozen=True)
class SuiteSize:
    """The sizes of one suite run."""

    name: str
    image_size: int
    gen_length: int
    steps: int
    batch_sizes: tuple
    latency_repeats: int
    throughput_repeats: int
    selection_batches: tuple
    selection_repeats: int
    sampler_prefix: int
    sampler_repeats: int
    train_steps: int
    train_batch: int
    train_canvas: int
    copy_bytes: int
    time_budget_s: float


REAL = SuiteSize("real", image_size=768, gen_length=32, steps=16, batch_sizes=(1, 8, 32), latency_repeats=3,
                 throughput_repeats=2, selection_batches=(1, 8), selection_repeats=10, sampler_prefix=1000,
                 sampler_repeats=3, train_steps=20, train_batch=2, train_canvas=672, copy_bytes=2**32,
                 time_budget_s=450)
SMALL = SuiteSize("small", image_size=768, gen_length=8, steps=4, batch_sizes=(1, 2), latency_repeats=1,
                  throughput_repeats=1, selection_batches=(1, 2), selection_repeats=1, sampler_prefix=100,
                  sampler_repeats=1, train_steps=3, train_batch=2, train_canvas=96, copy_bytes=2**26,
                  time_budget_s=120)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder of gpu_suite.json and gpu_suite.md")
    parser.add_argument("--small", action="store_true", help="CPU rehearsal at the tiny preset's sizes")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {', '.join(SECTIONS)} (in that order)")
    parser.add_argument("--train-steps", type=int, help="training smoke steps (default 20; --small: 3)")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads; default with --small: 1, "
                        "steadier on a machine shared with other work)")
    parser.add_argument("--time-budget-s", type=float,
                        help="throughput stops starting variants once the suite has run this long (default 450; "
                             "--small: 120)")
    args = parser.parse_args(argv)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f"--sections takes names among {', '.join(SECTIONS)}, got {args.sections!r}")
    args.sections = [name for name in SECTIONS if name in sections]
    if not args.small and not torch.cuda.is_available():
        parser.error("the real-size suite needs a CUDA GPU; on a CPU run --small")
    if args.threads is None and args.small:
        args.threads = 1
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    if args.train_steps is not None and args.train_steps < 1:
        parser.error(f"--train-steps must be a positive integer, got {args.train_steps}")
    return args


def tiny_tokenizer_ids() -> dict:
    """The special-token and image-token ids of the tiny tokenizer (the tiny preset records its special ids)."""
    ids = {name: PRESETS["tiny"][name] for name in SPECIAL_TOKEN_FIELDS}
    ids["image_token_id"] = build_tiny_tokenizer().convert_tokens_to_ids(IMAGE_TOKEN)
    return ids


def suite_config(small: bool) -> ShirgConfig:
    """--small: the tiny preset; else the lavida-llada preset with the tiny tokenizer's ids."""
    return ShirgConfig.from_preset("tiny") if small else bench_latency.real_config(**tiny_tokenizer_ids())


def suite_variants(config: ShirgConfig) -> tuple:
    """(variant string, the label of REFERENCE_VARIANT in it): DEFAULT_VARIANTS with budgets scaled to the config's
    high-resolution tokens."""
    tokens = fewest_source_tokens(config.token_layout())
    scaled = default_variants(tokens)
    reference = DEFAULT_VARIANTS.split(",").index(REFERENCE_VARIANT)
    return scaled, scaled.split(",")[reference]


class Suite:
    """The results of one run, written to JSON and markdown after every section."""

    def __init__(self, output: str, time_budget_s: float):
        self.output = output
        self.started = time.perf_counter()
        self.time_budget_s = time_budget_s
        self.results = {}
        self.current = None  # (name, start) of the running section
        os.makedirs(output, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def run(self, name: str, function):
        """Run one section; its result (or its error) and seconds are recorded and both reports rewritten."""
        started = time.perf_counter()
        self.current = (name, started)
        print(f"[gpu_suite] {name} ...", flush=True)
        try:
            result = function()
        except Exception as error:  # recorded in the reports; the next section still runs
            traceback.print_exc()
            result = {"error": f"{type(error).__name__}: {error}"}
        result["elapsed_s"] = time.perf_counter() - started
        self.results[name] = result
        self.write()
        print(f"[gpu_suite] {name} done in {result['elapsed_s']:.1f} s", flush=True)

    def progress(self, result: dict):
        """Record the running section's partial result and rewrite both reports (a run cut short keeps it)."""
        name, started = self.current
        self.results[name] = {**result, "elapsed_s": time.perf_counter() - started, "partial": True}
        self.write()

    def write(self):
        with open(os.path.join(self.output, "gpu_suite.json"), "w") as handle:
            json.dump(self.results, handle, indent=2)
        with open(os.path.join(self.output, "gpu_suite.md"), "w") as handle:
            handle.write(markdown(self.results) + "\n")


# ---- sections ----------------------------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes per second of a device-to-device copy of `nbytes`, counting bytes read and written: 2 n / median s."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * nbytes / bench_selection.timed(lambda: target.copy_(source), device, repeats)


def environment(size: SuiteSize, device: str, dtype: torch.dtype, config: ShirgConfig) -> dict:
    text, vision = config.text_config, config.vision_config
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    return {
        "size": size.name, "device": name, "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "transformers": transformers.__version__, "lm_layers": text.num_hidden_layers, "lm_hidden": text.hidden_size,
        "vocab": text.vocab_size, "vision_layers": vision.num_hidden_layers, "vision_hidden": vision.hidden_size,
        "copy_bytes_per_s": copy_bandwidth(torch.device(device), size.copy_bytes),
    }


def latency_args(size: SuiteSize, variants: str, device: str, dtype: torch.dtype, repeats: int, mode: str):
    """bench_latency's arguments for the suite's sizes and a step mode of MODES."""
    return bench_latency.parse_args([
        "--variants", variants, "--image-size", str(size.image_size), "--gen-length", str(size.gen_length),
        "--steps", str(size.steps), "--repeats", str(repeats), "--device", device,
        "--dtype", str(dtype).replace("torch.", ""), *MODES[mode],
    ])


def selection(config: ShirgConfig, size: SuiteSize, device: str, dtype: torch.dtype) -> dict:
    """bench_selection at the config's sizes on the suite's device (every vision layer), in ms."""
    layers = config.vision_config.num_hidden_layers
    measured = bench_selection.measure_selection(config, torch.device(device), dtype, layers, size.selection_batches,
                                                 size.selection_repeats, config.selection_budget,
                                                 bench_selection.SELECTIONS)
    view = config.hires_image_size // config.vision_config.patch_size
    return {"tokens": view * view, "budget": config.selection_budget, "batches": {
        str(batch): {"tower_ms": result["tower_s"] * 1000, "rows_ms": {name: s * 1000 for name, s in result["rows"]}}
        for batch, result in measured.items()}}


def sampler(model, size: SuiteSize) -> dict:
    """bench_sampler's modes on the suite's model, in ms, with each mode's ratio to the prefix cache."""
    result = bench_sampler.compare_modes(model, size.sampler_prefix, size.gen_length, size.steps, 1,
                                         size.sampler_repeats)
    cached = result["seconds"][bench_sampler.BASELINE]
    modes = {name: {"ms": seconds * 1000, "over_cache": seconds / cached} for name, seconds in result["seconds"].items()}
    return {"prefix_tokens": size.sampler_prefix, "cache_equals_prefix_dlm": result["cache_equals_prefix_dlm"],
            "modes": modes}


def backbones(size: SuiteSize, device: str, dtype: torch.dtype, small: bool) -> dict:
    """bench_backbones.measure on the LLaDA and Dream presets (tiny ones with --small), in ms, Dream's over LLaDA's."""
    presets = {"LLaDA": "tiny" if small else "lavida-llada", "Dream": "tiny-dream" if small else "lavida-dream"}
    models = {name: bench_latency.build_model(ShirgConfig.from_preset(preset), device, dtype)
              for name, preset in presets.items()}
    settings = argparse.Namespace(prefix_length=size.sampler_prefix, gen_length=size.gen_length, steps=size.steps,
                                  choice_length=8, mc_num=16, repeats=size.sampler_repeats)
    try:
        measured = bench_backbones.measure(models, settings)
    finally:
        del models
        if device == "cuda":
            torch.cuda.empty_cache()
    llada = measured["LLaDA"]
    return {"prefix_tokens": size.sampler_prefix, "choice_tokens": settings.choice_length, "mc_num": settings.mc_num,
            **{name: {"step_ms": result["step"] * 1000, "decoder_ms": result["decoder"] * 1000,
                      "prefill_ms": result["prefill"] * 1000, "choice_ms": result["choice"] * 1000,
                      "step_over_llada": result["step"] / llada["step"],
                      "choice_over_llada": result["choice"] / llada["choice"]} for name, result in measured.items()}}


def training(model, size: SuiteSize, steps: int, small: bool, threads=None) -> dict:
    """A LoRA training smoke of the suite's model (saved with the tiny tokenizer's processor) through train.py under
    `accelerate launch --config_file configs/accelerate/single_gpu.yaml`, bf16; its losses and speed."""
    with tempfile.TemporaryDirectory() as folder:
        model_dir, output_dir = os.path.join(folder, "model"), os.path.join(folder, "run")
        model.save_pretrained(model_dir)
        LavidaShirgProcessor.from_config(model.config, build_tiny_tokenizer()).save_pretrained(model_dir)
        arguments = [
            "--model_name_or_path", model_dir, "--dtype", "bfloat16", "--bf16", "--max_steps", str(steps),
            "--per_device_train_batch_size", str(size.train_batch),
            "--synthetic_num_samples", str(steps * size.train_batch), "--synthetic_canvas_size", str(size.train_canvas),
            "--logging_steps", "1", "--save_strategy", "no", "--output_dir", output_dir,
            "--dataloader_num_workers", "0", "--seed", "0", *(["--use_cpu"] if small else []),
        ]
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE_CONFIG,
                   os.path.join(ROOT, "train.py"), *arguments]
        path = os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH"))))  # carried packages stay visible
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path,
                       "HF_MODULES_CACHE": os.path.join(folder, "modules"),
                       **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        completed = subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"train.py exited with {completed.returncode}: {completed.stderr[-3000:]}")
        with open(os.path.join(output_dir, "trainer_state.json")) as handle:
            history = json.load(handle)["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    final = history[-1]
    if len(losses) != steps or not all(math.isfinite(loss) for loss in losses):
        raise AssertionError(f"expected {steps} finite step losses, got {losses}")
    return {"steps": len(losses), "batch": size.train_batch, "first_loss": losses[0], "last_loss": losses[-1],
            "train_runtime_s": final["train_runtime"], "samples_per_s": final["train_samples_per_second"]}


def error_text(error: Exception) -> str:
    traceback.print_exc()
    return f"{type(error).__name__}: {error}"


def latency(model, variants, variant_text: str, size: SuiteSize, device: str, dtype: torch.dtype) -> dict:
    """bench_latency.latency with each step mode of MODES; a mode that fails records its error, the other runs."""
    results = {}
    for mode in MODES:
        try:
            results[mode] = as_json(bench_latency.latency(
                model, variants, latency_args(size, variant_text, device, dtype, size.latency_repeats, mode)))
        except Exception as error:  # recorded in the reports
            results[mode] = {"error": error_text(error)}
    return results


def throughput(model, variants, size: SuiteSize, mode_args: dict, suite: Suite) -> dict:
    """bench_latency.throughput per step mode (`mode_args`: mode -> bench_latency arguments), one variant at a time,
    until the suite's time budget is spent; a (mode, variant) that fails is listed with its error."""
    rates, not_run, failed = {mode: {} for mode in mode_args}, [], []

    def result():
        return {"images_per_s": {mode: {label: {str(b): "OOM" if rate is None else rate for b, rate in batches.items()}
                                        for label, batches in mode_rates.items()}
                                 for mode, mode_rates in rates.items()}, "not_run": list(not_run),
                "failed": list(failed)}

    for variant in variants:
        for mode, args in mode_args.items():
            if suite.elapsed() > suite.time_budget_s:
                not_run.append(f"{mode} {variant.label}")
                continue
            try:
                rates[mode].update(bench_latency.throughput(model, [variant], size.batch_sizes, args))
            except Exception as error:  # recorded in the reports
                failed.append(f"{mode} {variant.label}: {error_text(error)}")
        suite.progress(result())
    return result()


def fastest_mode(section: dict) -> dict:
    """The compiled results of a section by step mode when it holds them (without error), else the eager ones."""
    compiled = section.get("compiled")
    return compiled if compiled and "error" not in compiled else section.get("eager", {})


def target_values(results: dict, reference: str, config: ShirgConfig) -> dict:
    """The values of TARGETS that the recorded sections allow, each {value, limit, met, meaning}."""
    values = {}
    latency_result = fastest_mode(results.get("latency", {}))
    memory = results.get("memory", {}).get("variants", {})
    bandwidth = results.get("environment", {}).get("copy_bytes_per_s")
    if reference in latency_result and reference in memory and bandwidth:
        floor_bytes = memory[reference]["step_weights_bytes"] + memory[reference]["batches"]["1"]["kv_bytes"]
        values["step_over_floor"] = latency_result[reference]["step_ms"] / (floor_bytes / bandwidth * 1000)
    if reference in latency_result and BASELINE_VARIANT in latency_result:
        values["shirg_total_over_pooled"] = (latency_result[reference]["total_ms"]
                                             / latency_result[BASELINE_VARIANT]["total_ms"])
    rows = results.get("selection", {}).get("batches", {}).get("1", {}).get("rows_ms", {})
    for method in ("shirg-fixed", "shirg-v2", "shirg-x"):
        row = f"{method} detail={config.detail_term}"
        if row in rows:
            values[f"selection_{method.replace('-', '_')}_ms"] = rows[row]
    rates = fastest_mode(results.get("throughput", {}).get("images_per_s", {}))
    if reference in rates and BASELINE_VARIANT in rates:
        largest = max(rates[reference], key=int)
        if "OOM" not in (rates[reference][largest], rates[BASELINE_VARIANT].get(largest, "OOM")):
            values["shirg_throughput_over_pooled"] = rates[reference][largest] / rates[BASELINE_VARIANT][largest]
    targets = {}
    for name, value in values.items():
        limit, kind, meaning = TARGETS[name]
        targets[name] = {"value": value, "limit": limit, "met": value <= limit if kind == "max" else value >= limit,
                         "meaning": meaning}
    return {"reference_variant": reference, "targets": targets}


# ---- report ------------------------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    """The report of the recorded sections."""
    lines = ["# gpu_suite"]
    for name, result in results.items():
        lines += ["", f"## {name} ({result['elapsed_s']:.1f} s{', partial' if result.get('partial') else ''})", ""]
        if "error" in result:
            lines.append(f"FAILED: {result['error']}")
        elif name == "environment":
            lines += ["| field | value |", "| --- | --- |"]
            lines += [f"| {key} | {value:.3g} |" if isinstance(value, float) else f"| {key} | {value} |"
                      for key, value in result.items() if key != "elapsed_s"]
        elif name == "memory":
            lines += bench_latency.memory_table(result["variants"])
        elif name == "latency":
            lines += latency_lines(result)
        elif name == "selection":
            lines += selection_lines(result)
        elif name == "sampler":
            lines += [f"prefix {result['prefix_tokens']} tokens; cached answer == uncached prefix-DLM answer: "
                      f"{result['cache_equals_prefix_dlm']}", "", "| mode | ms / answer | / prefix cache |",
                      "| --- | --- | --- |"]
            lines += [f"| {mode} | {row['ms']:.1f} | {row['over_cache']:.2f}x |"
                      for mode, row in result["modes"].items()]
        elif name == "training":
            lines += ["| field | value |", "| --- | --- |"]
            lines += [f"| {key} | {value:.4g} |" for key, value in result.items() if key != "elapsed_s"]
        elif name == "throughput":
            for mode, mode_rates in result["images_per_s"].items():
                rates = {label: {int(b): None if rate == "OOM" else rate for b, rate in batches.items()}
                         for label, batches in mode_rates.items()}
                lines += [f"### {mode}", "", *(bench_latency.throughput_table(rates, "") if rates else []), ""]
            if result["not_run"]:
                lines += ["", f"not run (time budget spent): {', '.join(result['not_run'])}"]
            lines += [f"FAILED: {failure}" for failure in result["failed"]]
        elif name == "targets":
            lines += [f"reference variant: {result['reference_variant']}", "", "| target | value | limit | met |",
                      "| --- | --- | --- | --- |"]
            lines += [f"| {row['meaning']} | {row['value']:.3f} | {'<=' if TARGETS[key][1] == 'max' else '>='} "
                      f"{row['limit']} | {'yes' if row['met'] else 'NO'} |" for key, row in result["targets"].items()]
        elif name == "backbones":
            lines += [f"prefix {result['prefix_tokens']} tokens; one choice of {result['choice_tokens']} tokens at "
                      f"mc_num {result['mc_num']}", "", "| backbone | ms / step | decoder ms | prefill ms | ms / choice "
                      "| step / LLaDA | choice / LLaDA |", "| --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {backbone} | {row['step_ms']:.2f} | {row['decoder_ms']:.2f} | {row['prefill_ms']:.1f} | "
                      f"{row['choice_ms']:.1f} | {row['step_over_llada']:.2f}x | {row['choice_over_llada']:.2f}x |"
                      for backbone, row in result.items() if isinstance(row, dict)]
    return "\n".join(lines)


def latency_lines(result: dict) -> list:
    """The latency table of each step mode, then compiled / eager per variant."""
    lines = []
    for mode in MODES:
        table = [f"FAILED: {result[mode]['error']}"] if "error" in result[mode] else bench_latency.latency_table(
            result[mode], "")
        lines += [f"### {mode}", "", *table, ""]
    if any("error" in result[mode] for mode in MODES):
        return lines
    lines += ["### compiled / eager", "", "| variant | prefill | ms/step | total |", "| --- | --- | --- | --- |"]
    for label, eager in result["eager"].items():
        compiled = result["compiled"][label]
        lines.append(f"| {label} | " + " | ".join(f"{compiled[key] / eager[key]:.2f}x"
                                                for key in ("prefill_ms", "step_ms", "total_ms")) + " |")
    return lines


def selection_lines(result: dict) -> list:
    batches = list(result["batches"])
    lines = [f"N = {result['tokens']} tokens, K = {result['budget']}", "",
             "| row | " + " | ".join(f"B={b} ms | / tower" for b in batches) + " |",
             "| --- |" + " --- | --- |" * len(batches)]
    for row in result["batches"][batches[0]]["rows_ms"]:
        cells = [f"{result['batches'][b]['rows_ms'][row]:.3f} | "
                 f"{result['batches'][b]['rows_ms'][row] / result['batches'][b]['tower_ms']:.2%}" for b in batches]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


# ---- main --------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    """Run the sections; returns the results (also in <output>/gpu_suite.json). Exit status 1 if a section failed."""
    args = parse_args(argv)
    size = SMALL if args.small else REAL
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cpu" if args.small else "cuda"
    dtype = torch.bfloat16
    config = suite_config(args.small)
    variant_text, reference = suite_variants(config)
    variants = parse_variants(variant_text)
    suite = Suite(args.output, args.time_budget_s or size.time_budget_s)
    model = bench_latency.build_model(config, device, dtype)
    image_size = (size.image_size, size.image_size)
    sections = {
        "environment": lambda: environment(size, device, dtype, config),
        "memory": lambda: {"variants": as_json(bench_latency.memory_estimate(
            config, variants, image_size, sorted({1, *size.batch_sizes}), size.gen_length, dtype))},
        "latency": lambda: latency(model, variants, variant_text, size, device, dtype),
        "selection": lambda: selection(config, size, device, dtype),
        "sampler": lambda: sampler(model, size),
        "training": lambda: training(model, size, args.train_steps or size.train_steps, args.small, args.threads),
        "throughput": lambda: throughput(model, variants, size, {
            mode: latency_args(size, variant_text, device, dtype, size.throughput_repeats, mode) for mode in MODES},
            suite),
        "targets": lambda: target_values(suite.results, reference, config),
        "backbones": lambda: backbones(size, device, dtype, args.small),
    }
    for name in args.sections:
        suite.run(name, sections[name])
    print(f"[gpu_suite] {os.path.join(args.output, 'gpu_suite.json')} and gpu_suite.md written "
          f"({suite.elapsed():.0f} s)", flush=True)
    return suite.results


def as_json(value):
    """`value` with every dict key a string (JSON's) and the entries that hold None (a CPU's peak memory) left out,
    recursively."""
    if isinstance(value, dict):
        return {str(key): as_json(item) for key, item in value.items() if item is not None}
    return value


if __name__ == "__main__":
    results = main()
    sys.exit(1 if any("error" in result for result in results.values()) else 0)

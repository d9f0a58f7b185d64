"""Evaluate every token-selection variant of one loaded LaViDa-SHIRG model on OCR benchmarks, side by side.

    python eval.py                                   # offline: tiny preset, random weights, synthetic OCR set
    python eval.py --model ./lavida-shirg-llada --tasks textvqa,docvqa,chartqa \\
        --data textvqa=/data/textvqa --data docvqa=/data/DocVQA --data chartqa=/data/ChartQA --limit 500
    python eval.py --model ./lavida-shirg-llada --tasks textvqa --data textvqa=/data/textvqa \\
        --variants shirg-fixed@768,shirg-fixed@768:relevance_weight=1:detail_weight=0,shirg-fixed@768:relevance_weight=0:detail_weight=1

Writes into --output-dir: predictions/TASK.jsonl (one line per sample and variant: prediction, score, timings,
selection diagnostics, or the sample's error), summary.json and summary.md (task x variant table), run_config.json
and overlays/TASK/SAMPLE/{VARIANT.png, sheet.png} for the first --overlays samples. Rerunning with the same
settings skips the samples already written (errors are retried). The folder follows the rule of every command that
writes one (shirg_tools.output_folder), as a folder that a rerun completes: each file is written aside and renamed
into place, each prediction line appended whole, modes follow the umask, and a run holds the lock of --output-dir
(released when it ends or dies): a second run into the same folder is refused.
Prompts and metrics are lmms-eval's, the harness of LaViDa's numbers (shirg_tools.eval_tasks, shirg_tools.metrics).
Sampling as LaViDa's evaluation of the folder's backbone (shirg_tools.inference.generation_settings): LLaDA:
steps = int(answer tokens x --step-ratio), the "shift" schedule with shift 3; Dream: the folder's Dream sampler
(topk_margin) on timesteps for one step per answer token, --step-ratio as LaViDa's step_ratio, its own timesteps
unless --schedule shift.
Timings: one warm-up batch per task and variant, device synchronisation around timed regions, medians over
samples of the batch time / batch size.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


from lavida_shirg.masked_diffusion import LAVIDA_SCHEDULE_SHIFT, SCHEDULES
from lavida_shirg.shirg_selection import image_token_count
from shirg_tools.diagnostics import variant_diagnostics
from shirg_tools.eval_tasks import (TASKS, TaskError, load_task_dataset, make_sample, parse_task_names,
                                    synthetic_config)
from shirg_tools.inference import (DEFAULT_STEP_RATIO, DTYPES, check_device, check_dream_generation,
                                   check_sampling, check_variant, default_schedule, denoising_steps,
                                   generation_settings, high_resolution_tokens, is_dream, load_pretrained,
                                   model_folder, resolve_dtype)
from shirg_tools.metrics import METRICS, exact_match
from shirg_tools.output_folder import FolderLock, write_atomic
from shirg_tools.overlays import contact_sheet, variant_panel
from shirg_tools.timing import median, timed_generate
from shirg_tools.variants import default_variants, option_names_help, parse_variants

KV_CACHE_DTYPES = ("bfloat16", "float16", "float8_e4m3fn")
# settings that change the numbers: a rerun into the same output folder must use the same ones
RESULT_SETTINGS = ("model", "model_label", "dtype", "device", "kv_cache_dtype", "step_ratio", "schedule",
                   "schedule_shift", "gen_length", "synthetic", "batch_size")
# LM width of the tiny and reader presets: no model this small learned to read on CPU budgets (README "The reading
# demo"), so their accuracy is not evidence
TINY_HIDDEN_SIZE = 128


class EvalError(ValueError):
    """A problem found before any work starts (arguments, model folder, variants, data)."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a lavida_shirg model folder (converted checkpoint, or a train.py output "
                        "folder with its merged/ model); "
                        "default: the tiny preset with random weights (untrained)")
    parser.add_argument("--tasks", default="synthetic-ocr", help=f"comma-separated, of: {', '.join(TASKS)}")
    parser.add_argument("--variants", help="comma-separated METHOD[@BUDGET][:OPTION=VALUE...] (default: pooled, full, "
                        "SHIRG-Fixed 512/768/1024, v2/X/random/VisionZip/DivPrune at 768, budgets scaled to the "
                        "model's high-resolution token count). " + option_names_help())
    parser.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                        help="local copy of a task's data: save_to_disk folder, Hub snapshot folder, parquet folder "
                        "or file (default: the Hub, unless offline)")
    parser.add_argument("--limit", type=int, help="first N samples of every task (synthetic: the set's size)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gen-length", type=int, help="answer tokens for every task (default: the task's, "
                        "as LaViDa: TextVQA/ChartQA 16, DocVQA/InfoVQA 32, synthetic 16)")
    parser.add_argument("--step-ratio", type=float, default=DEFAULT_STEP_RATIO, help="diffusion steps = int(answer "
                        "tokens x this), as LaViDa (1.0: one token per step; LLaDA: at least 1; Dream: LaViDa's "
                        "step_ratio, the timesteps stay those of one step per token)")
    parser.add_argument("--schedule", choices=SCHEDULES, help="tokens per step (default: LaViDa's for the backbone: "
                        "shift for LLaDA, Dream's own timesteps, 'uniform', for Dream)")
    parser.add_argument("--schedule-shift", type=float, default=LAVIDA_SCHEDULE_SHIFT,
                        help=f"shift of the 'shift' schedule (LaViDa: {LAVIDA_SCHEDULE_SHIFT}); passed to every "
                        "call, whatever sampler settings the model folder saved")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, help="store the prefix KV cache in this dtype "
                        "(the table reports the bytes saved)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--output-dir", default="runs/eval")
    parser.add_argument("--overlays", type=int, default=4, help="kept/dropped overlays for the first N samples")
    parser.add_argument("--no-diagnostics", action="store_true", help="skip the selection diagnostics "
                        "(they re-run the vision tower once per batch and variant, outside the timed region)")
    parser.add_argument("--synthetic", action="append", default=[], metavar="FIELD=VALUE",
                        help="setting of the synthetic set: task=ocr|reading (the generator's named settings, default "
                        "ocr) or a SyntheticOCRConfig field, e.g. canvas_size=96/96")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights of the default model")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); 1 gives steadier CPU "
                        "timings on a machine shared with other work")
    return parser.parse_args(argv)


def key_values(items: list, flag: str) -> dict:
    """['a=1', 'b=2'] -> {'a': '1', 'b': '2'}; EvalError naming `flag` for an item without '='."""
    result = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise EvalError(f"{flag} takes KEY=VALUE, got {item!r}")
        result[key.strip()] = value.strip()
    return result


# ---------------------------------------------------------------------------------------------------------------
# model


def load_model(args, device: torch.device, dtype: str):
    """(model, processor, label, is_tiny) in `dtype` on `device`: the --model folder (`shirg_tools.inference`'s
    model_folder / load_pretrained), or the tiny preset with random weights."""
    if args.model is None:
        from lavida_shirg import ShirgConfig
        from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion
        from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
        from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer

        torch.manual_seed(args.seed)
        model = LavidaShirgForMaskedDiffusion(ShirgConfig.from_preset("tiny"))
        processor = LavidaShirgProcessor.from_config(model.config, build_tiny_tokenizer())
        model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
        label = f"tiny preset, random weights (seed {args.seed}), UNTRAINED"
    else:
        folder = model_folder(Path(args.model), "--model")
        model, processor = load_pretrained(folder, dtype, device)
        label = str(folder)
    is_tiny = model.config.text_config.hidden_size <= TINY_HIDDEN_SIZE
    if is_tiny and args.model is not None:
        label += " (tiny/reader-sized LM: did not learn to read on CPU budgets)"
    return model, processor, label, is_tiny


# ---------------------------------------------------------------------------------------------------------------
# files


def write_json(path: Path, value):
    write_atomic(path, (json.dumps(value, indent=2) + "\n").encode())


class PredictionStore:
    """The JSONL of one task: one record per (variant, sample) line, appended with a single write each.

    On opening, a last line without its newline (a write cut by a crash) is truncated away, so every kept line is a
    whole record. The latest record of a (variant, id) wins.
    """

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.records = {}
        if path.exists():
            data = path.read_bytes()
            complete = data[: data.rfind(b"\n") + 1]
            if len(complete) != len(data):
                with open(path, "r+b") as file:
                    file.truncate(len(complete))
            for number, line in enumerate(complete.decode().splitlines(), start=1):
                record = json.loads(line)
                self.records[(record["variant"], record["id"])] = record
        self.handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def done(self, variant: str) -> set:
        """Ids of the samples of `variant` written without error."""
        return {sample for (name, sample), record in self.records.items() if name == variant and not record["error"]}

    def append(self, records: list):
        """Append records (one write per line) and fsync."""
        for record in records:
            data = (json.dumps(record) + "\n").encode()
            written = os.write(self.handle, data)
            if written != len(data):
                raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")
            self.records[(record["variant"], record["id"])] = record
        os.fsync(self.handle)

    def close(self):
        os.close(self.handle)


# ---------------------------------------------------------------------------------------------------------------
# running


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def variant_slug(label: str) -> str:
    """A file name for a variant label."""
    return label.replace(":", "+").replace("/", "_").replace("@", "-")


class Evaluation:
    """All tasks x variants of one model (see the module docstring)."""

    def __init__(self, args):
        self.args = args
        self.task_names = parse_task_names(args.tasks)
        self.data_paths = key_values(args.data, "--data")
        unknown = sorted(set(self.data_paths) - set(self.task_names))
        if unknown:
            raise EvalError(f"--data names task(s) {unknown} that --tasks does not run ({', '.join(self.task_names)})")
        self.synthetic = key_values(args.synthetic, "--synthetic")
        for name, value, low in (("--batch-size", args.batch_size, 1), ("--overlays", args.overlays, 0),
                                 ("--limit", args.limit if args.limit is not None else 1, 1),
                                 ("--gen-length", args.gen_length or 1, 1)):
            if value < low:
                raise EvalError(f"{name} must be >= {low}, got {value}")
        check_sampling(args.step_ratio, args.schedule, args.schedule_shift,
                       {"step_ratio": "--step-ratio", "schedule": "--schedule", "schedule_shift": "--schedule-shift"})
        device = check_device(args.device, "--device")
        self.dtype = resolve_dtype(args.dtype, device, "--dtype")
        self.model, self.processor, self.model_label, self.is_tiny = load_model(args, device, self.dtype)
        self.dream = is_dream(self.model)
        self.schedule = args.schedule or default_schedule(self.dream)
        if self.dream:
            for name in self.task_names:
                try:
                    check_dream_generation(self.model, self.generation_settings(name))
                except ValueError as error:
                    raise EvalError(f"--step-ratio / --schedule / --gen-length on task {name}: {error}") from error
        self.variants = parse_variants(args.variants or default_variants(high_resolution_tokens(self.model)))
        self.selections = {variant.label: check_variant(self.model, self.processor, variant)
                           for variant in self.variants}  # each validated once, here
        self.datasets = {name: load_task_dataset(TASKS[name], self.data_paths.get(name), args.limit, self.synthetic)
                         for name in self.task_names}
        self.output = Path(args.output_dir)
        self.settings = {"model": args.model or "tiny-random", "model_label": self.model_label, "dtype": self.dtype,
                         "device": device.type, "kv_cache_dtype": args.kv_cache_dtype,
                         "step_ratio": args.step_ratio, "schedule": self.schedule,
                         "schedule_shift": args.schedule_shift, "gen_length": args.gen_length,
                         "synthetic": self.synthetic, "batch_size": args.batch_size}

    def claim_output_folder(self) -> FolderLock:
        """Lock the output folder (shirg_tools.output_folder's lock, as every command that writes a folder; freed
        when the run ends or dies), create it and check that it holds no results of other settings (they would
        mix). A ValueError for either."""
        lock = FolderLock(self.output, "--output-dir")
        try:
            self.output.mkdir(parents=True, exist_ok=True)
            self._check_output_folder()
        except BaseException:
            lock.release()
            raise
        return lock

    def _check_output_folder(self):
        """EvalError when the output folder holds results of other settings (they would mix)."""
        saved = self.output / "run_config.json"
        if saved.exists():
            previous = json.loads(saved.read_text())
            differing = [key for key in RESULT_SETTINGS if previous.get(key) != self.settings[key]]
            if differing:
                details = "; ".join(f"{key}: {previous.get(key)!r} then, {self.settings[key]!r} now" for key in differing)
                raise EvalError(f"--output-dir {str(self.output)!r} holds results of other settings ({details}): "
                                "use another --output-dir")

    def generation_settings(self, name: str) -> dict:
        """The sampler arguments of a task (generation_settings for the backbone; every call passes them all)."""
        return generation_settings(self.args.gen_length or TASKS[name].gen_length, self.args.step_ratio,
                                   self.schedule, self.args.schedule_shift, dream=self.dream)

    def run(self):
        write_json(self.output / "run_config.json", self.settings)
        for name in self.task_names:
            self.run_task(name)
            self.write_summary()

    def run_task(self, name: str):
        spec, dataset = TASKS[name], self.datasets[name]
        store = PredictionStore(self.output / "predictions" / f"{name}.jsonl")
        ids = [str(value) for value in dataset[spec.id_column]] if spec.id_column else [str(i) for i in range(len(dataset))]
        try:
            for variant in self.variants:
                done = store.done(variant.label)
                pending = [index for index, sample_id in enumerate(ids) if sample_id not in done]
                self.run_variant(name, variant, pending, store, set(ids[: self.args.overlays]))
        finally:
            store.close()
        self.write_sheets(name, ids[: self.args.overlays])

    def run_variant(self, name, variant, pending, store, overlay_ids):
        from tqdm import tqdm

        spec, dataset = TASKS[name], self.datasets[name]
        generation = self.generation_settings(name)
        warmed_up = False
        progress = tqdm(total=len(pending), desc=f"{name} {variant.label}", unit="sample", disable=None)
        for indices in batches(pending, self.args.batch_size):
            samples = [make_sample(spec, dataset[index], index) for index in indices]
            records = {sample.id: self.base_record(name, variant, sample) for sample in samples}
            ready = [sample for sample in samples if self.check_sample(variant, sample, records[sample.id])]
            inputs, ready = self.model_inputs(name, variant, ready, records)
            if ready:
                call = dict(inputs, **generation, kv_cache_dtype=self.args.kv_cache_dtype)  # inputs carry the selection
                steps = denoising_steps(generation)
                if not warmed_up:
                    timed_generate(self.model, call, steps)
                    warmed_up = True
                answers, timing = timed_generate(self.model, call, steps)
                predictions = self.processor.decode_answers(answers.cpu())
                diagnostics = self.diagnostics(variant, inputs, ready)
                for position, (sample, prediction) in enumerate(zip(ready, predictions)):
                    record = records[sample.id]
                    record.update(
                        prediction=prediction, score=METRICS[spec.metric](prediction, sample.answers),
                        batch_size=len(ready), batch_prefill_ms=timing.prefill_s * 1000,
                        batch_step_ms=timing.step_s * 1000, batch_total_ms=timing.total_s * 1000,
                        batch_kv_bytes=timing.kv_bytes, batch_kv_bytes_compute_dtype=timing.kv_bytes_compute_dtype,
                        batch_peak_bytes=timing.peak_bytes, steps=steps,
                    )
                    sample_diagnostics = diagnostics[position]
                    record["diagnostics"] = {key: value for key, value in sample_diagnostics.items()
                                             if not key.startswith("_")}
                    if sample.id in overlay_ids:
                        self.write_overlay(name, variant, sample, record, sample_diagnostics)
            store.append([records[sample.id] for sample in samples])
            for record in records.values():
                if record["error"]:
                    print(f"[{name} {variant.label}] sample {record['id']}: {record['error']}", file=sys.stderr)
            progress.update(len(samples))
        progress.close()

    def model_inputs(self, name, variant, samples, records):
        """(processor outputs on the model's device, the samples they hold). A batch the processor refuses is
        processed sample by sample to record the refused samples' errors; the others run."""
        spec = TASKS[name]

        def process(group):
            prompts = [self.processor.build_prompt(spec.prompt(sample.question)) for sample in group]
            return self.processor(images=[sample.image for sample in group], text=prompts, **variant.call_settings())

        if not samples:
            return None, []
        try:
            return process(samples).to(self.model.device), samples
        except ValueError:  # find the samples it refuses; each gets its own error below
            kept = []
            for sample in samples:
                try:
                    process([sample])
                    kept.append(sample)
                except ValueError as error:
                    records[sample.id]["error"] = f"ValueError: {error}"
            return (process(kept).to(self.model.device) if kept else None), kept

    def base_record(self, name, variant, sample) -> dict:
        """The fields every record has (an error record has only these)."""
        return {"task": name, "variant": variant.label, "id": sample.id, "question": sample.question,
                "answers": sample.answers, "error": sample.error, "time": time.time()}

    def check_sample(self, variant, sample, record) -> bool:
        """Whether the sample can run under the variant; if not, its record gets the error. Counts its image tokens."""
        if sample.error:
            return False
        # the variant's settings were validated once, at start-up (check_variant): counting trusts them
        record["image_tokens"] = image_token_count((sample.image.height, sample.image.width),
                                                   self.selections[variant.label])
        return True

    def diagnostics(self, variant, inputs, samples) -> list:
        """Selection diagnostics per sample (empty dicts with --no-diagnostics)."""
        if self.args.no_diagnostics:
            return [{} for _ in samples]
        return variant_diagnostics(self.model, inputs, variant, samples)

    # ---- overlays ---------------------------------------------------------------------------------------------

    def overlay_folder(self, name, sample_id) -> Path:
        return self.output / "overlays" / name / variant_slug(str(sample_id))

    def write_overlay(self, name, variant, sample, record, diagnostics):
        """The variant's panel of one sample (PNG, written atomically)."""
        caption = [f"{variant.label}"[:48], f"{record['image_tokens']} image tokens; pred: {record['prediction']!r}"[:48]]
        answer_box = None if sample.answer_box is None else sample.text_boxes[sample.answer_box]
        panel = variant_panel(self.model, sample.image, variant, caption, diagnostics, answer_box)
        folder = self.overlay_folder(name, sample.id)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"{variant_slug(variant.label)}.png", png_bytes(panel))
        header = {"id": sample.id, "question": sample.question, "answers": sample.answers}
        write_json(folder / "sample.json", header)

    def write_sheets(self, name, sample_ids):
        """One side-by-side sheet per overlaid sample, from the variant panels on disk (in --variants order)."""
        from PIL import Image

        for sample_id in sample_ids:
            folder = self.overlay_folder(name, sample_id)
            paths = [folder / f"{variant_slug(variant.label)}.png" for variant in self.variants]
            panels = [Image.open(path).convert("RGB") for path in paths if path.exists()]
            if not panels:
                continue
            info = json.loads((folder / "sample.json").read_text())
            header = [f"{name} sample {info['id']}: {info['question']}"[:120], f"answers: {info['answers'][:5]}"[:120],
                      f"model: {self.model_label}"[:120],
                      "bright = kept full-resolution patches (orange outline), dim = dropped; yellow = coverage "
                      "regions; cyan = scaffold / pooled cells; green = answer box"]
            write_atomic(folder / "sheet.png", png_bytes(contact_sheet(panels, header)))

    # ---- summary ----------------------------------------------------------------------------------------------

    def summarize(self) -> dict:
        """Per task and variant: score, counts, medians of the per-sample timings, peak memory, KV cache and the
        means of the selection diagnostics, from every record on disk for this run's samples."""
        tasks = {}
        for name in self.task_names:
            spec = TASKS[name]
            path = self.output / "predictions" / f"{name}.jsonl"
            if not path.exists():
                continue
            store_records = read_records(path)
            dataset = self.datasets[name]
            ids = set(str(v) for v in dataset[spec.id_column]) if spec.id_column else {str(i) for i in range(len(dataset))}
            rows = {}
            for variant in self.variants:
                records = [r for (v, i), r in store_records.items() if v == variant.label and i in ids]
                rows[variant.label] = summarize_records(records)
            tasks[name] = {
                "metric": spec.metric, "split": spec.split, "source": self.task_source(name),
                "prompt_template": spec.prompt_template(), "generation": self.generation_settings(name),
                "lavida_reference": spec.reference, "variants": rows,
            }
        return {"model": self.model_label, "accuracy_is_evidence": not self.is_tiny, "settings": self.settings,
                "device": describe_device(self.args.device), "tasks": tasks}

    def task_source(self, name: str) -> str:
        """Where a task's samples come from, in words."""
        if name == "synthetic-ocr":
            return f"shirg_tools.synthetic_ocr with {synthetic_config(self.synthetic)}"
        return self.data_paths.get(name) or f"{TASKS[name].hub_path} (Hub)"

    def write_summary(self):
        summary = self.summarize()
        write_json(self.output / "summary.json", summary)
        write_atomic(self.output / "summary.md", markdown_table(summary).encode())


def read_records(path: Path) -> dict:
    """The whole-line records of a predictions JSONL, latest per (variant, id) (a torn last line is ignored)."""
    data = path.read_bytes()
    records = {}
    for line in data[: data.rfind(b"\n") + 1].decode().splitlines():
        record = json.loads(line)
        records[(record["variant"], record["id"])] = record
    return records



def summarize_records(records: list) -> dict:
    """The summary row of one task and variant (see Evaluation.summarize)."""
    good = [r for r in records if not r["error"]]
    per_sample = {key: [r[f"batch_{key}"] / r["batch_size"] for r in good] for key in ("prefill_ms", "total_ms")}
    row = {
        "samples": len(good), "errors": len(records) - len(good),
        "score": 100 * sum(r["score"] for r in good) / len(good) if good else None,
        "exact_match": (100 * sum(exact_match(r["prediction"], r["answers"]) for r in good) / len(good)
                        if good else None),
        "image_tokens": sum(r["image_tokens"] for r in good) / len(good) if good else None,
        "prefill_ms": median(per_sample["prefill_ms"]),
        "step_ms": median([r["batch_step_ms"] / r["batch_size"] for r in good]),
        "total_ms": median(per_sample["total_ms"]),
        "peak_mb": max([r["batch_peak_bytes"] / 2**20 for r in good if r["batch_peak_bytes"] is not None],
                       default=None),
        "kv_mb": median([r["batch_kv_bytes"] / r["batch_size"] / 2**20 for r in good]),
        "kv_mb_saved": median([(r["batch_kv_bytes_compute_dtype"] - r["batch_kv_bytes"]) / r["batch_size"] / 2**20
                               for r in good]),
        "batch_size": median([r["batch_size"] for r in good]),
    }
    for key in ("relevance_lift", "coverage_kept", "score_gini", "answer_recall", "text_auc", "text_recall"):
        values = [r["diagnostics"].get(key) for r in good if r.get("diagnostics")]
        values = [value for value in values if value is not None]
        row[key] = sum(values) / len(values) if values else None
    areas = [r["diagnostics"]["token_area_px2"] for r in good if r.get("diagnostics", {}).get("token_area_px2")]
    if areas and isinstance(areas[0], dict):
        row["token_area_px2"] = {key: sum(a[key] for a in areas) / len(areas) for key in areas[0]}
    else:
        row["token_area_px2"] = sum(areas) / len(areas) if areas else None
    return row


def describe_device(device: str) -> str:
    """The device in words (CPU timings are labelled CPU)."""
    if device.startswith("cuda"):
        return f"CUDA: {torch.cuda.get_device_name(torch.device(device))}"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _number(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(summary: dict) -> str:
    """The task x variant table of a summary, with the labels the numbers need."""
    device = summary["device"]
    unit = " (CPU)" if device.startswith("CPU") else ""
    score_header = "score" if summary["accuracy_is_evidence"] else "score (NOT evidence)"
    lines = ["# SHIRG evaluation", "", f"model: {summary['model']}  ", f"device: {device}  ",
             f"settings: {json.dumps(summary['settings'])}", ""]
    if not summary["accuracy_is_evidence"]:
        lines += ["**The accuracy column comes from a tiny model that cannot read (random or CPU-minutes weights): it "
                  "is not evidence for or against any variant. The answer-region recall and the selection "
                  "diagnostics are.**", ""]
    header = (f"| task | variant | {score_header} | exact match | n | errors | image tokens | prefill ms{unit} | "
              f"ms/step{unit} | "
              f"total ms/sample{unit} | peak MB | KV MB | KV MB saved | relevance lift | coverage | score Gini | "
              "answer recall | text AUC | text recall | px2/token |")
    lines += [header, "|" + " --- |" * (header.count("|") - 1)]
    for name, task in summary["tasks"].items():
        for label, row in task["variants"].items():
            area = row["token_area_px2"]
            area_text = (" / ".join(f"{key} {value:.0f}" for key, value in area.items()) if isinstance(area, dict)
                         else _number(area, 0))
            lines.append(
                f"| {name} | {label} | {_number(row['score'])} | {_number(row['exact_match'])} | {row['samples']} | "
                f"{row['errors']} | "
                f"{_number(row['image_tokens'], 0)} | {_number(row['prefill_ms'])} | {_number(row['step_ms'], 2)} | "
                f"{_number(row['total_ms'])} | {_number(row['peak_mb'], 0)} | {_number(row['kv_mb'], 2)} | "
                f"{_number(row['kv_mb_saved'], 2)} | {_number(row['relevance_lift'], 2)} | "
                f"{_number(row['coverage_kept'], 2)} | {_number(row['score_gini'], 2)} | "
                f"{_number(row['answer_recall'], 2)} | {_number(row['text_auc'], 2)} | "
                f"{_number(row['text_recall'], 2)} | {area_text} |")
    lines += ["", "exact match: % of predictions equal to a reference answer after EvalAI's normalisation (the "
              "score column uses the task's metric). Timings: medians over samples of (batch time / batch size), "
              "after one warm-up batch per task and "
              "variant; peak MB: torch.cuda.max_memory_allocated (n/a on CPU); KV MB: prefix-cache bytes per sample "
              "read from the cache tensors (saved: vs the compute dtype). relevance lift: mean normalised question "
              "relevance of kept tokens / that of a random selection of the same size (1 = random). coverage: "
              "fraction of coverage regions keeping >= 1 token. answer recall: fraction of the answer box's area "
              "under kept full-resolution tokens. text AUC / text recall (synthetic set): with text tokens = tokens "
              "whose cell overlaps a text box, P(a text token's score > a background token's) (ties 1/2) and the "
              "fraction of text tokens kept (benchmarks/bench_selection_quality.py measures them per score term).",
              ""]
    for name, task in summary["tasks"].items():
        lines.append(f"- {name}: metric {task['metric']}, split {task['split']}, source {task['source']}, "
                     f"prompt {json.dumps(task['prompt_template'])}, generation {json.dumps(task['generation'])}, "
                     f"LaViDa-LLaDA reported (pooled): {task['lavida_reference']}")
    return "\n".join(lines) + "\n"


def png_bytes(image) -> bytes:
    """PNG encoding of a PIL image."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        evaluation = Evaluation(args)
        lock = evaluation.claim_output_folder()
    except (EvalError, TaskError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        evaluation.run()
    finally:
        lock.release()
    print((evaluation.output / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""eval.py end to end on the tiny preset and the synthetic OCR set, plus its parts: variant strings, diagnostics,
overlays, resumable and atomic outputs, local datasets, and the errors raised before any work starts."""

import io
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluation
from conftest import save_tiny_dream_folder
from lavida_shirg.configuration_lavida_shirg import SELECTION_PRESETS
from shirg_tools.diagnostics import (answer_recall, coverage_kept, gini, pooled_token_area, relevance_lift,
                                     source_views)
from shirg_tools.inference import diffusion_steps
from shirg_tools.overlays import kept_pixel_mask, render_panel
from shirg_tools.variants import default_variants, parse_variant, parse_variants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = ["--synthetic", "canvas_size=96/96", "--synthetic", "font_size_range=7/9", "--synthetic", "num_texts=3"]
FAST = ["--gen-length", "4", "--batch-size", "2", *SYNTHETIC]


def run_eval(tmp_path, *args):
    """eval.main with the fast settings; returns its exit code."""
    return evaluation.main(["--output-dir", str(tmp_path), *FAST, *args])


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    code = run_eval(out, "--limit", "4", "--variants", "pooled,shirg-fixed@40,random@40", "--overlays", "2")
    assert code == 0
    return out


def lines(path):
    return path.read_text().splitlines()


# ---- end to end --------------------------------------------------------------------------------------------------


def test_offline_run_writes_predictions_summary_and_table(offline_run):
    summary = json.loads((offline_run / "summary.json").read_text())
    assert summary["accuracy_is_evidence"] is False and summary["device"].startswith("CPU")
    task = summary["tasks"]["synthetic-ocr"]
    assert task["prompt_template"] == "<image>\n{question}\nAnswer the question using a single word or phrase."
    assert task["generation"] == {"gen_length": 4, "block_length": 4, "steps": 4, "schedule": "shift",
                                  "schedule_shift": 3.0}
    rows = task["variants"]
    assert list(rows) == ["pooled", "shirg-fixed@40", "random@40"]
    assert [rows[v]["image_tokens"] for v in rows] == [88, 40, 40]  # 96x96 image: 16 global + 8 x (8 + 1) pooled
    for row in rows.values():
        assert row["samples"] == 4 and row["errors"] == 0 and 0 <= row["score"] <= 100
        assert row["prefill_ms"] > 0 and row["step_ms"] > 0 and row["total_ms"] > row["prefill_ms"]
        assert row["peak_mb"] is None and row["kv_mb_saved"] == 0
    # KV bytes follow the prefix length: same prompt, 88 vs 40 image tokens
    assert rows["pooled"]["kv_mb"] > rows["shirg-fixed@40"]["kv_mb"] == rows["random@40"]["kv_mb"]
    assert rows["pooled"]["token_area_px2"] == {"global": 576.0, "crop": 144.0}
    assert rows["shirg-fixed@40"]["token_area_px2"] == 36.0  # a 96 px image over 16 x 16 tokens: 6 x 6 px
    assert rows["shirg-fixed@40"]["coverage_kept"] == 1.0  # 16 regions, 40 tokens: every region kept
    assert 0 <= rows["random@40"]["answer_recall"] <= 1 and rows["random@40"]["score_gini"] > 0
    records = [json.loads(line) for line in lines(offline_run / "predictions" / "synthetic-ocr.jsonl")]
    assert len(records) == 12 and all(r["error"] is None for r in records)
    assert {r["variant"] for r in records} == set(rows)
    for label, row in rows.items():  # exact match: % of the variant's predictions equal to an answer
        mine = [r for r in records if r["variant"] == label]
        equal = sum(r["prediction"].strip().lower() in [a.strip().lower() for a in r["answers"]] for r in mine)
        assert row["exact_match"] == pytest.approx(100 * equal / len(mine))
    table = (offline_run / "summary.md").read_text()
    assert "score (NOT evidence)" in table and "prefill ms (CPU)" in table and "| synthetic-ocr | random@40 |" in table


def test_overlays_show_kept_and_dropped_patches(offline_run):
    folder = offline_run / "overlays" / "synthetic-ocr" / "0"
    assert {p.name for p in folder.iterdir()} == {"pooled.png", "shirg-fixed-40.png", "random-40.png", "sheet.png",
                                                   "sample.json"}
    assert not (offline_run / "overlays" / "synthetic-ocr" / "2").exists(), "--overlays 2: samples 0 and 1 only"
    selected = np.asarray(Image.open(folder / "shirg-fixed-40.png").convert("RGB"))
    pooled = np.asarray(Image.open(folder / "pooled.png").convert("RGB"))
    image_part = selected[: selected.shape[1]]  # the square image above the caption band
    dim = (image_part.max(axis=-1) < 90).mean()  # dimmed (dropped) pixels of a light synthetic page
    outline = (np.abs(image_part.astype(int) - [255, 140, 0]).sum(-1) == 0).mean()
    assert 0.5 < dim < 0.95, "40 of 256 tokens kept: most of the page is dimmed"
    assert outline > 0.01, "kept patches are outlined"
    assert (pooled[: pooled.shape[1]].max(axis=-1) < 90).mean() < 0.2, "pooled drops nothing"
    sheet = Image.open(folder / "sheet.png")
    assert sheet.width >= 3 * Image.open(folder / "pooled.png").width


def test_rerun_skips_written_samples_and_repairs_a_torn_line(offline_run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(offline_run, out)
    predictions = out / "predictions" / "synthetic-ocr.jsonl"
    before = predictions.read_bytes()
    with open(predictions, "ab") as handle:
        handle.write(b'{"task": "synthetic-ocr", "variant": "pooled", "id": "4", "pred')  # a write cut by a kill
    assert run_eval(out, "--limit", "5", "--variants", "pooled,shirg-fixed@40,random@40", "--overlays", "2") == 0
    after = predictions.read_bytes()
    assert after.startswith(before), "the 12 earlier lines are kept as they were"
    new = [json.loads(line) for line in after[len(before):].decode().splitlines()]
    assert sorted((r["variant"], r["id"]) for r in new) == [("pooled", "4"), ("random@40", "4"), ("shirg-fixed@40", "4")]
    summary = json.loads((out / "summary.json").read_text())
    assert all(row["samples"] == 5 for row in summary["tasks"]["synthetic-ocr"]["variants"].values())
    # other settings into the same folder are refused before any work
    assert run_eval(out, "--limit", "5", "--variants", "pooled", "--step-ratio", "0.5") == 2


def test_kv_cache_dtype_reports_the_bytes_saved(tmp_path):
    assert run_eval(tmp_path, "--limit", "2", "--variants", "shirg-fixed@40", "--kv-cache-dtype", "bfloat16",
                    "--overlays", "0", "--no-diagnostics") == 0
    row = json.loads((tmp_path / "summary.json").read_text())["tasks"]["synthetic-ocr"]["variants"]["shirg-fixed@40"]
    assert row["kv_mb"] == pytest.approx(row["kv_mb_saved"]), "bf16 storage of a float32 cache: half the bytes"
    assert not (tmp_path / "overlays").exists()


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    evaluation.write_json(target, {"old": 1})

    def failing_replace(source, destination):
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(evaluation.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        evaluation.write_json(target, {"new": 2})
    assert json.loads(target.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["summary.json"], "no temporary file is left behind"


# ---- local datasets and per-sample errors ------------------------------------------------------------------------


def png(colour, size=(40, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_unreadable_image_is_recorded_and_the_run_goes_on(tmp_path):
    import datasets

    rows = {"question_id": [7, 8, 9], "question": ["What is written?", "Which brand?", "What colour?"],
            "answers": [["stop"] * 10, ["acme"] * 10, ["red"] * 10],
            "image": [{"bytes": png("red"), "path": None}, {"bytes": b"not an image", "path": None},
                      {"bytes": png("blue"), "path": None}]}
    features = datasets.Features({"question_id": datasets.Value("int64"), "question": datasets.Value("string"),
                                  "answers": datasets.Sequence(datasets.Value("string")), "image": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "textvqa"))
    out = tmp_path / "out"
    assert run_eval(out, "--tasks", "textvqa", "--data", f"textvqa={tmp_path / 'textvqa'}", "--variants",
                    "pooled,shirg-fixed@40", "--overlays", "1") == 0
    records = [json.loads(line) for line in lines(out / "predictions" / "textvqa.jsonl")]
    errors = {(r["variant"], r["id"]): r["error"] for r in records if r["error"]}
    assert set(errors) == {("pooled", "8"), ("shirg-fixed@40", "8")}
    assert errors[("pooled", "8")].startswith("UnidentifiedImageError")
    row = json.loads((out / "summary.json").read_text())["tasks"]["textvqa"]["variants"]["pooled"]
    assert (row["samples"], row["errors"]) == (2, 1)
    assert "answer_recall" not in records[0]["diagnostics"], "no answer boxes outside the synthetic set"


def test_docvqa_from_a_hub_style_parquet_folder(tmp_path):
    import datasets

    folder = tmp_path / "DocVQA-snapshot" / "DocVQA"
    folder.mkdir(parents=True)
    rows = {"questionId": [1, 2], "question": ["What is the date?", "Who signed?"], "answers": [["1 May"], ["Bob"]],
            "image": [{"bytes": png("white", (50, 70)), "path": None}, {"bytes": png("gray", (70, 50)), "path": None}]}
    features = datasets.Features({"questionId": datasets.Value("int64"), "question": datasets.Value("string"),
                                  "answers": datasets.Sequence(datasets.Value("string")), "image": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / "validation-00000-of-00001.parquet"))
    out = tmp_path / "out"
    assert run_eval(out, "--tasks", "docvqa", "--data", f"docvqa={tmp_path / 'DocVQA-snapshot'}", "--variants",
                    "pooled", "--overlays", "0") == 0
    task = json.loads((out / "summary.json").read_text())["tasks"]["docvqa"]
    assert task["variants"]["pooled"]["samples"] == 2 and task["metric"] == "anls"
    assert task["generation"]["gen_length"] == 4  # --gen-length overrides DocVQA's 32


@pytest.mark.parametrize("args,message", [
    (["--tasks", "textvqa,ocrbench"], "unknown task(s) ['ocrbench']; tasks: textvqa, docvqa, infovqa, chartqa"),
    (["--variants", "pooled,best@64"], "unknown variant method 'best'"),
    (["--variants", "shirg-fixed@300"], "variant 'shirg-fixed@300': selection_budget must be a positive integer at "
                                        "most the 256 high-resolution tokens"),
    (["--variants", "shirg-v2@64:gamma=1"], "unknown option 'gamma'; options: hires_source, hires_image_size"),
    (["--tasks", "textvqa"], "task textvqa: no --data textvqa=PATH given and the Hub is offline"),
    (["--data", "chartqa=/nowhere"], "--data names task(s) ['chartqa'] that --tasks does not run"),
    (["--step-ratio", "2"], "--step-ratio must be in (0, 1]"),
    (["--schedule-shift", "nan"], "--schedule-shift must be a finite number > 0 (LaViDa: 3.0), got nan"),
    (["--schedule-shift", "0"], "--schedule-shift must be a finite number > 0"),
    (["--device", "gpu"], "--device 'gpu' is not a device: use cpu, cuda or cuda:N"),
    (["--device", "mps"], "--device 'mps' is not supported: use cpu, cuda or cuda:N"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_eval(tmp_path / "out", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, cuda_devices, message", [
    ("cuda", 0, "--device 'cuda': CUDA is not available on this machine"),
    ("cuda:0", 0, "--device 'cuda:0': CUDA is not available on this machine"),
    ("cuda:3", 2, "--device 'cuda:3': this machine has 2 CUDA device(s), cuda:0 to cuda:1"),
])
def test_cuda_device_that_is_not_there(tmp_path, capsys, monkeypatch, device, cuda_devices, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    assert run_eval(tmp_path / "out", "--device", device) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_a_lavida_shirg_model(tmp_path, capsys):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert run_eval(tmp_path / "out", "--model", str(tmp_path / "bert")) == 2
    assert "holds a 'bert' model, not a lavida_shirg one" in capsys.readouterr().err
    assert run_eval(tmp_path / "out", "--model", str(tmp_path)) == 2
    assert "is not a model folder (no config.json)" in capsys.readouterr().err
    (tmp_path / "adapter_config.json").write_text("{}")
    assert run_eval(tmp_path / "out", "--model", str(tmp_path)) == 2
    assert "holds a LoRA adapter only: train with --save_merged_model" in capsys.readouterr().err


def test_missing_columns_are_named(tmp_path, capsys):
    import datasets

    datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]}).save_to_disk(str(tmp_path / "chart"))
    assert run_eval(tmp_path / "out", "--tasks", "chartqa", "--data", f"chartqa={tmp_path / 'chart'}") == 2
    assert "task chartqa: the dataset lacks column(s) ['image']; it has ['question', 'answer']" in capsys.readouterr().err


def test_a_saved_model_folder_loads_through_remote_code(tmp_path):
    from conftest import build_tiny_model

    from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
    from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer

    model = build_tiny_model()
    model.save_pretrained(tmp_path / "train-output" / "merged")  # where train.py --save_merged_model writes it
    LavidaShirgProcessor.from_config(model.config, build_tiny_tokenizer()).save_pretrained(
        tmp_path / "train-output" / "merged")
    assert run_eval(tmp_path / "out", "--model", str(tmp_path / "train-output"), "--limit", "2", "--variants",
                    "shirg-v2@40:v2_summary_token=false", "--overlays", "0") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "tiny/reader-sized LM: did not learn to read" in summary["model"] and not summary["accuracy_is_evidence"]
    assert summary["tasks"]["synthetic-ocr"]["variants"]["shirg-v2@40:v2_summary_token=false"]["image_tokens"] == 40


# ---- sampler settings, output folder lock, file modes --------------------------------------------------------------


@pytest.mark.parametrize("gen_length, step_ratio, steps", [
    (32, 0.3, 9), (16, 1.0, 16), (16, 0.5, 8), (32, 0.99, 31), (64, 0.55, 35), (4, 0.1, 1)])
def test_step_ratio_truncates_like_lavida(gen_length, step_ratio, steps):
    assert diffusion_steps(gen_length, step_ratio) == steps


def test_every_call_gets_lavidas_sampler_settings(tmp_path, monkeypatch):
    from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion

    generate, calls = LavidaShirgForMaskedDiffusion.diffusion_generate, []

    def recorded(self, **kwargs):
        calls.append({name: kwargs.get(name) for name in ("gen_length", "steps", "schedule", "schedule_shift")})
        return generate(self, **kwargs)

    monkeypatch.setattr(LavidaShirgForMaskedDiffusion, "diffusion_generate", recorded)
    assert run_eval(tmp_path, "--limit", "2", "--variants", "pooled", "--overlays", "0", "--no-diagnostics",
                    "--gen-length", "32", "--step-ratio", "0.3") == 0
    assert calls and all(call == {"gen_length": 32, "steps": 9, "schedule": "shift", "schedule_shift": 3.0}
                         for call in calls), calls
    assert {json.loads(line)["steps"] for line in lines(tmp_path / "predictions" / "synthetic-ocr.jsonl")} == {9}
    settings = json.loads((tmp_path / "run_config.json").read_text())
    assert (settings["schedule"], settings["schedule_shift"], settings["step_ratio"]) == ("shift", 3.0, 0.3)
    calls.clear()
    assert run_eval(tmp_path / "other", "--limit", "1", "--variants", "pooled", "--overlays", "0",
                    "--no-diagnostics", "--schedule-shift", "0.5") == 0
    assert {call["schedule_shift"] for call in calls} == {0.5}
    # a rerun with another shift into the same folder would mix results
    assert run_eval(tmp_path, "--limit", "2", "--variants", "pooled", "--gen-length", "32", "--step-ratio", "0.3",
                    "--schedule-shift", "1") == 2


def test_a_dream_folder_runs_lavidas_dream_evaluation(tmp_path, capsys):
    """eval.py on a saved tiny LaViDa-Dream folder: its calls are LaViDa's Dream evaluation (the folder's
    topk_margin sampler with top_k 50, timesteps for one step per token, the prefix cache) on the "dream" chat
    format, batched equal to one by one; LLaDA's shift schedule at one step per token does not fit and is refused."""
    from shirg_tools.eval_tasks import TASKS, make_sample

    folder = tmp_path / "dream"
    save_tiny_dream_folder(folder, seed=1)
    arguments = ["--model", str(folder), "--limit", "3", "--variants", "pooled,shirg-fixed@40", "--overlays", "1"]
    assert run_eval(tmp_path / "out", *arguments) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["tasks"]["synthetic-ocr"]["generation"] == {"max_new_tokens": 4, "steps": 4, "step_ratio": None,
                                                               "schedule": "uniform", "schedule_shift": 3.0}
    assert summary["settings"]["schedule"] == "uniform"
    records = [json.loads(line) for line in lines(tmp_path / "out" / "predictions" / "synthetic-ocr.jsonl")]
    assert len(records) == 6 and all(r["error"] is None and r["steps"] == 4 for r in records)
    rows = summary["tasks"]["synthetic-ocr"]["variants"]
    assert all(row["step_ms"] > 0 and row["kv_mb"] > 0 for row in rows.values())

    run = evaluation.Evaluation(evaluation.parse_args(["--output-dir", str(tmp_path / "unused"), *FAST, *arguments]))
    assert run.processor.chat_format == "dream"
    spec, dataset = TASKS["synthetic-ocr"], run.datasets["synthetic-ocr"]
    for record in records:
        sample = make_sample(spec, dataset[int(record["id"])], int(record["id"]))
        inputs = run.processor(images=[sample.image], text=[run.processor.build_prompt(spec.prompt(sample.question))],
                               **parse_variant(record["variant"]).call_settings())
        answer = run.model.generate(**inputs, max_new_tokens=4, steps=4, alg="topk_margin", top_k=50,
                                    use_cache=True)[:, inputs["input_ids"].shape[1]:]
        assert record["prediction"] == run.processor.decode_answers(answer)[0], record
    assert len({r["prediction"] for r in records}) > 1

    assert run_eval(tmp_path / "shift", *arguments, "--schedule", "shift") == 2
    assert ("--step-ratio / --schedule / --gen-length on task synthetic-ocr: schedule='shift' commits at least one "
            "token per step: 4 steps exceed the 3 masked answer positions") in capsys.readouterr().err


BLOCKED_EVAL = """
import sys
import eval
run = eval.Evaluation.run
def blocked_run(self):
    print("locked", flush=True)
    sys.stdin.readline()
    run(self)
eval.Evaluation.run = blocked_run
sys.exit(eval.main(sys.argv[1:]))
"""


def test_a_folder_in_use_is_refused_and_a_killed_runs_lock_goes_with_it(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--output-dir", str(out), *FAST, "--limit", "3", "--variants", "pooled,random@40", "--overlays", "0",
            "--no-diagnostics"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", BLOCKED_EVAL, *args], cwd=tmp_path, env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert select.select([first.stdout], [], [], 120)[0], "the first run did not start"
        assert first.stdout.readline() == "locked\n"  # it holds the folder and waits in Evaluation.run
        assert evaluation.main(args) == 2
        error = capsys.readouterr().err
        assert error == (f"error: --output-dir {str(out)!r} is being written by another process (pid {first.pid}): "
                         "wait for it to end or choose another --output-dir\n")
        assert not (out / "predictions").exists(), "the refused run wrote nothing"
    finally:
        first.kill()  # SIGKILL: the lock goes with the process
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert evaluation.main(args) == 0
    records = [json.loads(line) for line in lines(out / "predictions" / "synthetic-ocr.jsonl")]
    assert sorted((r["variant"], r["id"]) for r in records) == sorted(
        (variant, str(i)) for variant in ("pooled", "random@40") for i in range(3)), "every row once"
    assert evaluation.main(args) == 0, "the lock is released when a run ends"
    assert len(lines(out / "predictions" / "synthetic-ocr.jsonl")) == 6


def test_an_unwritable_output_dir_is_one_error_line(unwritable, capsys):
    assert evaluation.main(["--output-dir", str(unwritable / "out"), *FAST, "--limit", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot write --output-dir {str(unwritable / 'out')!r}: [Errno ")
    assert not (unwritable / "out").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_outputs_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert run_eval(tmp_path / "out", "--limit", "1", "--variants", "shirg-fixed@40", "--overlays", "1") == 0
    finally:
        os.umask(previous)
    paths = [tmp_path / "out", *(tmp_path / "out").rglob("*")]
    files = {str(path.relative_to(tmp_path / "out")) for path in paths if path.is_file()}
    assert files == {"summary.json", "summary.md", "run_config.json", "predictions/synthetic-ocr.jsonl",
                     "overlays/synthetic-ocr/0/sheet.png", "overlays/synthetic-ocr/0/shirg-fixed-40.png",
                     "overlays/synthetic-ocr/0/sample.json"}
    assert {str(path): stat.S_IMODE(path.stat().st_mode) for path in paths} == {
        str(path): 0o777 & ~umask if path.is_dir() else 0o666 & ~umask for path in paths}


# ---- parts -------------------------------------------------------------------------------------------------------


def test_variant_strings():
    variant = parse_variant("shirg-fixed@768:relevance_weight=1.0:detail_weight=0")
    assert variant.options == {"relevance_weight": 1.0, "detail_weight": 0.0}
    assert variant.label == "shirg-fixed@768:relevance_weight=1.0:detail_weight=0.0"
    assert parse_variant("shirg-v2@768:v2_summary_token=false").options == {"v2_summary_token": False}
    assert parse_variant("shirg-v2@768:v2_detail_weight=0.1:v2_edge_weight=0").options == {
        "v2_detail_weight": 0.1, "v2_edge_weight": 0.0}
    # a named preset expands into its fields (the label spells them out); options written after it override it
    seed = parse_variant("shirg-fixed@768:preset=seed:detail_weight=0.5")
    assert seed.options == {**SELECTION_PRESETS["seed"], "detail_weight": 0.5}
    assert seed.label == ("shirg-fixed@768:relevance_weight=0.7:detail_weight=0.5:detail_term=variance:"
                          "score_normalization=min-max:v2_detail_weight=0.25:v2_edge_weight=0.15:"
                          "x_suppression_penalty=0.5")
    assert parse_variant(seed.label) == seed
    assert parse_variant("shirg-x@768:hires_source=anyres-views:coverage_region_size=2").options == {
        "hires_source": "anyres-views", "coverage_region_size": 2}
    assert parse_variant("pooled").call_settings() == dict(selection_method="pooled", selection_budget=None,
                                                           selection_options=None)
    assert default_variants(256) == ("pooled,full,shirg-fixed@57,shirg-fixed@85,shirg-fixed@114,shirg-v2@85,"
                                     "shirg-x@85,random@85,visionzip@85,divprune@85")
    assert default_variants(2304).split(",")[2:5] == ["shirg-fixed@512", "shirg-fixed@768", "shirg-fixed@1024"]
    for text, message in [("pooled@64", "pooled keeps no budget"), ("shirg-fixed@x", "must be a positive integer"),
                          ("shirg-v2@8:v2_summary_token=maybe", "v2_summary_token takes true or false"),
                          ("shirg-fixed@8:selection_budget=3", "set selection_budget with METHOD@BUDGET"),
                          ("shirg-fixed@8:region", "options are written NAME=VALUE"),
                          ("shirg-fixed@8:preset=old", "unknown preset 'old'; presets: seed, synthetic-tuned"),
                          ("shirg-fixed@8:detail_weight=1:detail_weight=0", "option detail_weight is given twice")]:
        with pytest.raises(ValueError, match=message):
            parse_variant(text)
    with pytest.raises(ValueError, match="more than once"):
        parse_variants("random@8,random@8")


def test_diagnostic_values():
    torch.testing.assert_close(gini(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [-1.0, -1.0, -1.0, 0.0]])),
                               torch.tensor([0.0, 0.75, 0.75], dtype=torch.float64))
    kept = torch.zeros(1, 16, dtype=torch.bool)
    kept[0, [0, 1, 4, 15]] = True  # regions of a 4 x 4 grid with r = 2: 0, 0, 0 and 3
    assert coverage_kept(kept, (4, 4), 2).tolist() == [0.5]
    relevance = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert relevance_lift(relevance, torch.tensor([[False, False, False, True]])).tolist() == [2.0]
    assert relevance_lift(relevance, torch.tensor([[True, True, True, True]])).tolist() == [1.0]


def tiny_layout(**settings):
    from lavida_shirg import ShirgConfig

    config = ShirgConfig.from_preset("tiny")
    return config.selection_settings("shirg-fixed", 1, settings or None)


def test_token_geometry_and_answer_recall():
    views = source_views((32, 64), tiny_layout())  # 64 px hires view, 4 px patches: 16 x 16 tokens of 4 x 2 px
    assert len(views) == 1 and views[0].box == (0.0, 0.0, 64.0, 32.0)
    kept = np.zeros(256, dtype=bool)
    kept[0] = True
    assert answer_recall(kept, views, (0, 0, 8, 4)) == 0.25  # the box spans cells (0,0) (0,1) (1,0) (1,1)
    assert answer_recall(kept, views, (2, 0, 6, 2)) == 0.5  # half of it lies in cell (0, 0)
    anyres = source_views((30, 96), tiny_layout(hires_source="anyres-views"))  # 1 x 3 crops, image 1 px down
    assert [v.full_resolution for v in anyres] == [False, True, True, True]
    assert anyres[1].box == (0.0, -1.0, 32.0, 31.0) and anyres[3].box == (64.0, -1.0, 96.0, 31.0)
    assert pooled_token_area((96, 96), tiny_layout()) == {"global": 576.0, "crop": 144.0}


def test_single_view_layouts_have_one_pooled_grid(monkeypatch):
    """LaViDa's lowres layouts: "pad" centres the image on a square of side max(h, w) (the view reaches past the short
    side), "square" stretches it; one view of P x P pooled tokens, no crops."""
    from conftest import build_tiny_model
    from lavida_shirg import ShirgConfig
    from shirg_tools import overlays
    from shirg_tools.diagnostics import base_view_box
    from shirg_tools.variants import Variant

    pad, square, anyres = (ShirgConfig.from_preset("tiny", image_aspect_ratio=ratio).selection_settings("pooled")
                           for ratio in ("pad", "square", "anyres"))
    assert base_view_box((30, 90), pad) == (0.0, -30.0, 90.0, 60.0)
    assert base_view_box((30, 90), square) == base_view_box((30, 90), anyres) == (0.0, 0.0, 90.0, 30.0)
    pooled = pad["pooled_view_size"]
    assert pooled_token_area((30, 90), pad) == {"global": 90 * 90 / pooled**2}
    assert pooled_token_area((30, 90), square) == {"global": 30 * 90 / pooled**2}
    assert set(pooled_token_area((30, 90), anyres)) == {"global", "crop"}
    drawn = {}
    monkeypatch.setattr(overlays, "render_panel", lambda image, lines, **kwargs: drawn.update(lines=lines, **kwargs))
    model = build_tiny_model(seed=0, image_aspect_ratio="pad")
    overlays.variant_panel(model, Image.new("RGB", (90, 30)), Variant("pooled", "pooled", None, {}), ["pooled"],
                           {"token_area_px2": pooled_token_area((30, 90), pad)})
    assert drawn["pooled_grids"] == [((0.0, -30.0, 90.0, 60.0), pooled, pooled)]
    assert drawn["lines"] == ["pooled", f"pooled px2/token: global {90 * 90 / pooled**2:.0f}"]


def test_overlay_masks_follow_the_kept_cells():
    views = source_views((32, 32), tiny_layout(hires_image_size=8, budget_choices=[1]))  # 2 x 2 tokens over a 32 px image
    kept = np.array([True, False, False, True])
    mask = kept_pixel_mask(views, kept, scale=1.0, size=(32, 32))
    assert mask[:16, :16].min() == 1 and mask[:16, 16:].max() == 0 and mask[16:, 16:].min() == 1
    panel = render_panel(Image.new("RGB", (32, 32), (250, 250, 250)), ["caption"], display=32, views=views,
                         kept=kept)
    pixels = np.asarray(panel)[:32]
    assert pixels[20, 5].max() == 75 and pixels[5, 20].max() == 75, "dropped cells dimmed to 30%"
    assert tuple(pixels[8, 8]) == (250, 250, 250) and tuple(pixels[15, 5]) == (255, 140, 0), "kept edges outlined"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

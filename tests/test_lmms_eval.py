"""The lmms-eval plugin (lavida_shirg_lmms): entry-point registration; lmms-eval runs of a local TextVQA-style task
that report eval.py's predictions and scores, in one process and in two (accelerate, gloo); batching and per-task
answer lengths; and the errors raised before any sample runs. Tiny preset, offline."""

import json
import os
import signal
import socket
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from lmms_eval.api.instance import Instance
from PIL import Image, ImageFile

import eval as evaluation
import lavida_shirg_lmms.model as plugin
from conftest import build_tiny_model, save_tiny_dream_folder
from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer
from lavida_shirg_lmms.model import LavidaShirgLmms, variant_of
from shirg_tools.eval_tasks import TASKS
from shirg_tools.variants import parse_variant

ROOT = Path(__file__).resolve().parent.parent
VARIANT = "shirg-fixed@40:relevance_weight=0.5"
# the same variant as separate model_args keys (an option by its config field name)
VARIANT_ARGS = "selection_method=shirg-fixed,selection_budget=40,relevance_weight=0.5"
# lmms-eval's textvqa prompt capitalises the question (str.capitalize), and so does eval.py's: half of these change
QUESTIONS = ["what is written?", "Which BRAND is it?", "What colour is the sign?", "how many cars are there?",
             "What time is it?", "Who is there?"]
SIZES = [(96, 96), (64, 120), (120, 80), (100, 100), (72, 96), (96, 60)]  # (height, width): different token counts
TASK = "textvqa_local"  # a name starting with textvqa: eval.py's TextVQA answer length (16) applies
TASK_YAML = """task: {task}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: validation
output_type: generate_until
doc_to_visual: !function {task}_utils.textvqa_doc_to_visual
doc_to_text: !function {task}_utils.textvqa_doc_to_text
doc_to_target: answers
generation_kwargs:
  until:
    - "ASSISTANT:"
process_results: !function {task}_utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
"""
# lmms-eval's own TextVQA prompt, image and metric; its submission file left out
TASK_UTILS = """from lmms_eval.tasks.textvqa.utils import textvqa_doc_to_text, textvqa_doc_to_visual, textvqa_process_results


def process_results(doc, results):
    return {"exact_match": textvqa_process_results(doc, results)["exact_match"]}
"""


@pytest.fixture(autouse=True)
def strict_pil_decoding():
    """Importing lmms_eval.api.task sets PIL's ImageFile.LOAD_TRUNCATED_IMAGES = True for the whole process: undo it
    after each test, so other test modules still see truncated files refused."""
    strict = ImageFile.LOAD_TRUNCATED_IMAGES
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = strict


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny model folder (weights N(0, 0.2), so answers differ between samples) with its processor."""
    folder = tmp_path_factory.mktemp("lmms") / "model"
    model = build_tiny_model()
    model.save_pretrained(folder)
    LavidaShirgProcessor.from_config(model.config, build_tiny_tokenizer()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory):
    """A saved tiny LaViDa-Dream folder (Dream's generation config: topk_margin, top_k 50; "dream" chat format)."""
    folder = tmp_path_factory.mktemp("lmms-dream") / "model"
    save_tiny_dream_folder(folder, seed=1)
    return folder


@pytest.fixture(scope="module")
def lmms_model(model_dir):
    """The plugin as lmms-eval builds it (model_args string + the CLI's batch_size)."""
    return LavidaShirgLmms.create_from_arg_string(f"pretrained={model_dir},{VARIANT_ARGS},step_ratio=0.5",
                                                  {"batch_size": "3"})


def images():
    generator = np.random.default_rng(0)
    return [Image.fromarray(generator.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def write_textvqa(folder: Path, answers: list):
    """A local copy of a TextVQA split with lmms-lab/textvqa's fields (a save_to_disk DatasetDict: validation)."""
    features = datasets.Features({"question_id": datasets.Value("int64"), "question": datasets.Value("string"),
                                  "answers": datasets.Sequence(datasets.Value("string")), "image": datasets.Image()})
    rows = {"question_id": list(range(len(QUESTIONS))), "question": QUESTIONS, "answers": answers, "image": images()}
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(folder)


def run_eval_py(model_dir, data, output, *extra) -> tuple:
    """eval.py on the local TextVQA copy: {question id: record} of predictions/textvqa.jsonl, and the summary row."""
    assert evaluation.main(["--model", str(model_dir), "--tasks", "textvqa", "--data", f"textvqa={data}",
                            "--variants", VARIANT, "--batch-size", "2", "--overlays", "0", "--no-diagnostics",
                            "--step-ratio", "0.5", "--device", "cpu", "--output-dir", str(output), *extra]) == 0
    records = [json.loads(line) for line in (output / "predictions" / "textvqa.jsonl").read_text().splitlines()]
    summary = json.loads((output / "summary.json").read_text())
    return {int(r["id"]): r for r in records}, summary["tasks"]["textvqa"]["variants"][parse_variant(VARIANT).label]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_lmms_eval(tmp_path, model_dir, data, name, batch_size, processes=1, model_args="step_ratio=0.5"):
    """Start `lmms_eval` on the local task (a subprocess; several processes through accelerate launch). Returns what
    `lmms_eval_results` reads."""
    tasks = tmp_path / f"tasks-{name}"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    (tasks / f"{TASK}_utils.py").write_text(TASK_UTILS)
    output = tmp_path / f"lmms-{name}"
    arguments = ["-m", "lmms_eval", "--model", "lavida_shirg", "--model_args",
                 f"pretrained={model_dir},dtype=float32,device=cpu,{VARIANT_ARGS},{model_args}", "--tasks", TASK,
                 "--include_path", str(tasks), "--batch_size", str(batch_size), "--log_samples", "--output_path",
                 str(output)]
    if processes > 1:
        # the torchrun launcher of --multi_gpu starts the processes; the plugin's device=cpu makes them gloo ones
        arguments = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                     "--main_process_port", str(free_port()), *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / f"hf-{name}")}
    process = subprocess.Popen([sys.executable, *arguments], cwd=tmp_path, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return process, output


def lmms_eval_results(started):
    """The task's results entry, {doc_id: logged sample} and the output of a finished `start_lmms_eval` run."""
    process, output = started
    try:
        log = process.communicate(timeout=400)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and the processes it started
        raise
    assert process.returncode == 0 and "Error during evaluation" not in log, log[-4000:]
    (results_file,) = output.glob("*/*_results.json")
    (samples_file,) = output.glob(f"*/*_samples_{TASK}.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return json.loads(results_file.read_text())["results"][TASK], {s["doc_id"]: s for s in samples}, log


# ---- lmms-eval against eval.py -------------------------------------------------------------------------------------


def test_lmms_eval_reports_eval_py_predictions_and_scores_in_one_and_two_processes(model_dir, tmp_path):
    write_textvqa(tmp_path / "first", [["-"] * 10] * len(QUESTIONS))
    predictions, _ = run_eval_py(model_dir, tmp_path / "first", tmp_path / "eval-first")
    # references holding the prediction 0..5 times out of 10: VQA accuracies 0, 0.3, 0.6, 0.9, 1, 1
    answers = [[predictions[i]["prediction"]] * i + ["zzz"] * (10 - i) for i in range(len(QUESTIONS))]
    write_textvqa(tmp_path / "data", answers)
    records, row = run_eval_py(model_dir, tmp_path / "data", tmp_path / "eval")
    assert {i: r["prediction"] for i, r in records.items()} == {i: r["prediction"] for i, r in predictions.items()}
    assert sum(question != question.capitalize() for question in QUESTIONS) == 3, "prompts capitalize() changes"
    assert [records[i]["score"] for i in sorted(records)] == pytest.approx([0, 0.3, 0.6, 0.9, 1, 1])

    # one process with batches of 4, two processes with batches of 2, side by side
    started = [start_lmms_eval(tmp_path, model_dir, tmp_path / "data", "one", batch_size=4),
               start_lmms_eval(tmp_path, model_dir, tmp_path / "data", "two", batch_size=2, processes=2)]
    single, single_samples, _ = lmms_eval_results(started[0])
    assert sorted(single_samples) == sorted(records)
    for doc_id, sample in single_samples.items():
        assert sample["input"] == TASKS["textvqa"].prompt(QUESTIONS[doc_id]), "the same prompt in both"
        assert sample["filtered_resps"] == records[doc_id]["prediction"], doc_id
        assert sample["exact_match"] == records[doc_id]["score"], doc_id
    assert 100 * single["exact_match,none"] == pytest.approx(row["score"], abs=1e-9)

    double, double_samples, log = lmms_eval_results(started[1])
    assert "Running on rank 1" in log, "two processes ran"
    assert {d: (s["filtered_resps"], s["exact_match"]) for d, s in double_samples.items()} == {
        d: (s["filtered_resps"], s["exact_match"]) for d, s in single_samples.items()}
    assert double["exact_match,none"] == pytest.approx(single["exact_match,none"], abs=1e-12)


def test_lmms_eval_on_a_dream_folder_reports_eval_py_predictions(dream_dir, tmp_path):
    """A LaViDa-Dream folder through lmms-eval's command line (LaViDa's COCO settings: step_ratio 0.5, the shift
    schedule with shift 0.33) and through eval.py with the same settings: the same answers and scores."""
    write_textvqa(tmp_path / "first", [["-"] * 10] * len(QUESTIONS))
    predictions, _ = run_eval_py(dream_dir, tmp_path / "first", tmp_path / "eval-first", "--schedule", "shift",
                                 "--schedule-shift", "0.33")
    answers = [[predictions[i]["prediction"]] * i + ["zzz"] * (10 - i) for i in range(len(QUESTIONS))]
    write_textvqa(tmp_path / "data", answers)
    started = start_lmms_eval(tmp_path, dream_dir, tmp_path / "data", "dream", batch_size=4,
                              model_args="step_ratio=0.5,schedule=shift,schedule_shift=0.33")
    result, samples, _ = lmms_eval_results(started)
    assert len({sample["filtered_resps"] for sample in samples.values()}) > 1
    for doc_id, sample in samples.items():
        assert sample["filtered_resps"] == predictions[doc_id]["prediction"], doc_id
    assert [samples[i]["exact_match"] for i in sorted(samples)] == pytest.approx([0, 0.3, 0.6, 0.9, 1, 1])


# ---- registration, batching, answer lengths ------------------------------------------------------------------------


def test_a_plugin_refusal_fails_the_lmms_eval_command_line(model_dir, tmp_path):
    """lmms-eval's CLI catches an evaluation's exception, logs it and exits 0; the plugin's refusals end it with exit
    status 1 and the message instead (at model creation and at a request)."""
    write_textvqa(tmp_path / "data", [["-"] * 10] * len(QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=tmp_path / "data"))
    (tasks / f"{TASK}_utils.py").write_text(TASK_UTILS)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf")}
    for model_args, extra, message in [
        (f"pretrained={model_dir},foo=1", [], "error: lavida_shirg: unknown model_args key(s) ['foo']"),
        (f"pretrained={model_dir},device=cpu", ["--gen_kwargs", "num_beams=4"],
         f"error: lavida_shirg: task '{TASK}' gen_kwargs num_beams=4: a masked-diffusion sampler has no beam search"),
    ]:
        run = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "lavida_shirg", "--model_args", model_args,
                              "--tasks", TASK, "--include_path", str(tasks), "--batch_size", "2", "--output_path",
                              str(tmp_path / "out"), *extra], cwd=tmp_path, env=environment, capture_output=True,
                             text=True, timeout=400)
        assert run.returncode == 1 and message in run.stderr, (run.returncode, run.stdout[-2000:], run.stderr[-3000:])
    assert not list(tmp_path.glob("out/*/*_results.json"))


def test_the_plugin_is_registered_through_the_lmms_eval_entry_point():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    assert declared == {"lavida_shirg": "lavida_shirg_lmms:manifest"}
    (point,) = [point for point in entry_points(group="lmms_eval.models") if point.name == "lavida_shirg"]
    assert point.value == declared["lavida_shirg"], "the installed project is this checkout (pip install -e .)"
    from lmms_eval.models import get_model

    assert get_model("lavida_shirg") is LavidaShirgLmms
    assert Path(plugin.__file__).resolve().parent == ROOT / "lavida_shirg_lmms"


def tiny_tasks() -> dict:
    """lmms-eval's task_dict shape for three tasks of image documents and one text-only task."""
    docs = [{"question": question, "image": image} for question, image in zip(QUESTIONS, images())]
    return {"textvqa_val": {"validation": docs}, "docvqa_val": {"validation": docs[:2]},
            "chartqa": {"test": docs[2:3]}, "mmlu_text": {"test": [{"question": "2 + 2?"}]}}


def images_of(doc):
    return [doc["image"]] if "image" in doc else []


def request(task, doc_id, gen_kwargs=None, split=None, doc_to_visual=images_of):
    """A generate_until Instance as lmms-eval builds it: (context, gen_kwargs, doc_to_visual, doc_id, task, split)."""
    split = split or ("test" if task in ("chartqa", "mmlu_text") else "validation")
    context = QUESTIONS[doc_id] + "\nAnswer the question using a single word or phrase."
    return Instance("generate_until", (context, dict(gen_kwargs or {}), doc_to_visual, doc_id, task, split), 0,
                    {"task": task, "doc_id": doc_id, "repeats": 1})


@pytest.fixture
def calls(monkeypatch):
    """Every generate_answers call of the plugin: (batch size, the sampler arguments)."""
    recorded, generate = [], plugin.generate_answers

    def recording(model, processor, images, prompts, variant, generation):
        recorded.append((len(prompts), generation))
        return generate(model, processor, images, prompts, variant, generation)

    monkeypatch.setattr(plugin, "generate_answers", recording)
    return recorded


def test_generate_until_batches_with_lavidas_per_task_lengths(lmms_model, model_dir, calls):
    lmms_model.task_dict = tiny_tasks()
    requests = [request("textvqa_val", i, {"until": ["ASSISTANT:"]}) for i in range(4)]
    requests += [request("docvqa_val", 0), request("chartqa", 0, {"max_new_tokens": 8}), request("docvqa_val", 1)]
    answers = lmms_model.generate_until(requests)
    # batch_size 3 within each group of equal settings; TextVQA 16 and DocVQA 32 tokens from eval.py's tasks, the
    # task's max_new_tokens (8) first; steps = int(tokens x step_ratio 0.5); LaViDa's shift schedule
    assert [(size, call["gen_length"], call["steps"]) for size, call in calls] == [
        (3, 16, 8), (1, 16, 8), (2, 32, 16), (1, 8, 4)]
    assert all((call["block_length"], call["schedule"], call["schedule_shift"], call["temperature"])
               == (call["gen_length"], "shift", 3.0, 0.0) for _, call in calls)
    assert len(set(answers)) > 1 and all(isinstance(answer, str) for answer in answers)

    one_by_one = LavidaShirgLmms.create_from_arg_string(f"pretrained={model_dir},variant={VARIANT},step_ratio=0.5")
    one_by_one.task_dict = tiny_tasks()
    calls.clear()
    assert one_by_one.generate_until(requests) == answers, "batched answers equal one-by-one answers"
    assert [size for size, _ in calls] == [1] * len(requests)

    answer = next(answer for answer in answers[:4] if len(answer) > 3)
    stop = answer[2:4]
    (whole,) = lmms_model.generate_until([request("textvqa_val", answers.index(answer), {"until": [stop]})])
    assert whole == answer, "gen_kwargs until is ignored, as LaViDa's lmms-eval model ignores it"

    fixed = LavidaShirgLmms.create_from_arg_string(f"pretrained={model_dir},gen_length=4", {"batch_size": 8})
    fixed.task_dict = tiny_tasks()
    calls.clear()
    fixed.generate_until(requests)
    assert [(size, call["gen_length"], call["steps"]) for size, call in calls] == [(7, 4, 4)]


def lavida_dream_answers(plugin, requests, **settings) -> list:
    """The answers LaViDa's Dream evaluation gives: generate with its settings (alg topk_margin, Dream's top_k 50,
    the prefix cache, timesteps for one step per answer token, `settings`) on each request's prompt, one by one."""
    answers = []
    for request in requests:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        images = [image.convert("RGB") for image in doc_to_visual(plugin.task_dict[task][split][doc_id])]
        inputs = plugin.processor(images=[images], text=[plugin.processor.build_prompt(context)],
                                  **plugin.variant.call_settings())
        length = plugin.answer_length(task, gen_kwargs)
        sequences = plugin.model.generate(**inputs, max_new_tokens=length, steps=length,
                                          **{"alg": "topk_margin", "top_k": 50, "use_cache": True, **settings})
        answers.append(plugin.processor.decode_answers(sequences[:, inputs["input_ids"].shape[1]:])[0])
    return answers


@pytest.mark.parametrize("model_args, settings", [
    ("", {}),  # eval/run_dream.sh: alg=topk_margin,prefix_lm=True
    (",step_ratio=0.5,schedule=shift,schedule_shift=0.33", dict(step_ratio=0.5, schedule="shift",
                                                                 schedule_shift=0.33)),  # eval/run_coco_dream.sh
    (",alg=entropy,step_ratio=0.75", dict(step_ratio=0.75, alg="entropy")),
], ids=["run_dream", "run_coco_dream", "entropy"])
def test_generate_until_on_a_dream_folder_runs_lavidas_dream_evaluation(dream_dir, calls, model_args, settings):
    plugin = LavidaShirgLmms.create_from_arg_string(f"pretrained={dream_dir},{VARIANT_ARGS}{model_args}",
                                                    {"batch_size": "3"})
    plugin.task_dict = tiny_tasks()
    requests = [request("textvqa_val", i) for i in range(4)] + [request("chartqa", 0, {"max_new_tokens": 8})]
    answers = plugin.generate_until(requests)
    ratio = settings.get("step_ratio")
    assert [(size, call["max_new_tokens"], call["steps"], call["step_ratio"]) for size, call in calls] == [
        (3, 16, 16, ratio), (1, 16, 16, ratio), (1, 8, 8, ratio)]
    assert all((call["schedule"], call["schedule_shift"], call["do_sample"], call["use_prefix_cache"]) ==
               (settings.get("schedule", "uniform"), settings.get("schedule_shift", 3.0), False, True)
               for _, call in calls)
    assert "block_length" not in calls[0][1] and "remasking" not in calls[0][1]
    assert answers == lavida_dream_answers(plugin, requests, **settings)
    assert len(set(answers)) > 1


def test_dream_filters_of_a_task_reach_the_dream_sampler(dream_dir, calls):
    plugin = LavidaShirgLmms.create_from_arg_string(f"pretrained={dream_dir}")
    plugin.task_dict = tiny_tasks()
    filtered = [request("textvqa_val", i, {"top_p": 0.5, "top_k": 3}) for i in range(2)]
    assert plugin.generate_until(filtered) == lavida_dream_answers(plugin, filtered, top_p=0.5, top_k=3)
    assert calls[0][1]["top_p"] == 0.5 and calls[0][1]["top_k"] == 3
    with pytest.raises(ValueError, match=r"task 'textvqa_val' gen_kwargs top_p=0: Dream's top-p filter would keep "
                                         r"one token per position"):
        plugin.generate_until([request("textvqa_val", 0, {"top_p": 0})])


@pytest.mark.parametrize("folder, model_args, message", [
    ("dream_dir", "block_length=8", "block_length is a setting of LLaDA's sampler, and '{folder}' holds a Dream "
                                    "model (its sampler: alg, step_ratio, schedule)"),
    ("dream_dir", "remasking=random,block_length=8", "block_length, remasking are settings of LLaDA's sampler"),
    ("model_dir", "alg=entropy", "alg is a setting of Dream's sampler, and '{folder}' holds a LLaDA model (its "
                                 "sampler: block_length, remasking, schedule)"),
    ("dream_dir", "alg=greedy", "alg must be one of origin, maskgit_plus, topk_margin, entropy, got 'greedy'"),
])
def test_sampler_keys_of_the_other_backbone_are_refused(request, folder, model_args, message):
    folder = request.getfixturevalue(folder)
    with pytest.raises(ValueError) as refused:
        LavidaShirgLmms.create_from_arg_string(f"pretrained={folder},{model_args}")
    assert message.format(folder=folder) in str(refused.value)


def test_dream_step_settings_that_do_not_fit_are_refused_before_any_sample(dream_dir, calls):
    shifted = LavidaShirgLmms.create_from_arg_string(f"pretrained={dream_dir},schedule=shift")
    shifted.task_dict = tiny_tasks()
    with pytest.raises(ValueError, match=r"task 'textvqa_val': schedule='shift' commits at least one token per step: "
                                         r"16 steps exceed the 15 masked answer positions"):
        shifted.generate_until([request("textvqa_val", 0)])
    fewer = LavidaShirgLmms.create_from_arg_string(f"pretrained={dream_dir},step_ratio=0.1")
    fewer.task_dict = tiny_tasks()
    with pytest.raises(ValueError, match=r"task 'chartqa': step_ratio=0.1 runs int\(max_new_tokens x step_ratio\) = 0"):
        fewer.generate_until([request("textvqa_val", 0), request("chartqa", 0, {"max_new_tokens": 8})])
    assert calls == []


def lmms_eval_task(task: str) -> tuple:
    """(the installed lmms-eval task's YAML config, its utils module: the task's functions, imported with our
    dependencies)."""
    import importlib

    import lmms_eval.tasks
    from lmms_eval.utils import load_yaml_config

    (path,) = Path(lmms_eval.tasks.__file__).parent.glob(f"*/{task}.yaml")
    return (load_yaml_config(str(path), mode="simple"),
            importlib.import_module(f"lmms_eval.tasks.{path.parent.name}.utils"))


@pytest.mark.parametrize("task, length", [("textvqa_val", 16), ("docvqa_val", 32), ("docvqa_test", 32),
                                          ("chartqa", 16), ("infovqa_val", 32), ("infovqa_test", 32)])
def test_lmms_eval_task_configs_get_lavidas_answer_lengths(lmms_model, task, length):
    config, _ = lmms_eval_task(task)
    assert lmms_model.answer_length(task, config.get("generation_kwargs") or {}) == length


@pytest.mark.parametrize("name, task", [("textvqa", "textvqa_val"), ("docvqa", "docvqa_val"),
                                        ("infovqa", "infovqa_val"), ("chartqa", "chartqa")])
def test_eval_py_prompts_are_lmms_evals_doc_to_text(name, task):
    """eval.py's prompt of a task == lmms-eval's doc_to_text of it with its default lmms_eval_specific_kwargs."""
    config, utils = lmms_eval_task(task)
    doc_to_text = getattr(utils, config["doc_to_text"].value.removeprefix("utils."))
    kwargs = config["lmms_eval_specific_kwargs"]["default"]
    for question in [*QUESTIONS, "what is the BRAND of the camera?", "  who signed?", "iPhone or TV?", "Total (%)?"]:
        assert TASKS[name].prompt(question) == doc_to_text({"question": question}, kwargs), question


def test_variant_string_and_separate_keys_give_the_same_variant():
    assert variant_of(VARIANT, None, None, {}) == variant_of(None, "shirg-fixed", 40, {"relevance_weight": 0.5})
    assert variant_of(None, None, None, {}).label == "pooled"
    assert variant_of(None, "shirg-v2", 64, {"v2_summary_token": False, "budget_choices": "32/64"}) == parse_variant(
        "shirg-v2@64:v2_summary_token=false:budget_choices=32/64")


# ---- errors before any sample runs ---------------------------------------------------------------------------------


def eval_py_refusal(variant: str) -> str:
    with pytest.raises(ValueError) as refused:
        parse_variant(variant)
    return str(refused.value)


@pytest.mark.parametrize("model_args, extra, message", [
    ("foo=1", {}, "unknown model_args key(s) ['foo']; keys: pretrained, dtype, device, batch_size, variant"),
    ("gamma=1", {}, "unknown model_args key(s) ['gamma']"),
    ("", {"batch_size": "0"}, "batch_size must be a positive integer, got '0'"),
    ("", {"batch_size": "auto"}, "batch_size must be a positive integer, got 'auto'"),
    ("variant=best@64", {}, eval_py_refusal("best@64")),
    ("variant=shirg-v2@64:gamma=1", {}, eval_py_refusal("shirg-v2@64:gamma=1")),
    ("variant=pooled@64", {}, eval_py_refusal("pooled@64")),
    ("selection_method=best", {}, "selection_method must be one of pooled, full, shirg-fixed"),
    ("selection_method=shirg-fixed,selection_budget=0", {}, "selection_budget must be a positive integer, got 0"),
    ("selection_method=shirg-fixed,relevance_weight=high", {}, "relevance_weight takes a number, got 'high'"),
    ("variant=pooled,selection_budget=64", {}, "pass the variant as variant=STRING or as selection_method"),
    ("variant=shirg-fixed@300", {}, "variant 'shirg-fixed@300': selection_budget must be a positive integer at most "
                                    "the 256 high-resolution tokens"),
    ("step_ratio=2", {}, "step_ratio must be in (0, 1], got 2"),
    ("schedule=cosine", {}, "schedule must be one of uniform, shift, got 'cosine'"),
    ("schedule_shift=0", {}, "schedule_shift must be a finite number > 0 (LaViDa: 3.0), got 0"),
    ("remasking=top", {}, "remasking must be one of low_confidence, random, got 'top'"),
    ("kv_cache_dtype=int4", {}, "kv_cache_dtype must be one of bfloat16, float16, float8_e4m3fn, got 'int4'"),
    ("temperature=-1", {}, "temperature must be a finite number >= 0, got -1.0"),
    ("gen_length=0", {}, "gen_length must be a positive integer, got 0"),
    ("dtype=int8", {}, "dtype must be one of auto, float32, bfloat16, float16, got 'int8'"),
    ("device=mps", {}, "device 'mps' is not supported: use cpu, cuda or cuda:N"),
])
def test_bad_model_args_are_named_before_any_sample(model_dir, model_args, extra, message):
    with pytest.raises(ValueError) as refused:
        LavidaShirgLmms.create_from_arg_string(f"pretrained={model_dir},{model_args}", extra)
    assert message in str(refused.value)


def test_missing_or_wrong_model_folder(tmp_path):
    with pytest.raises(ValueError, match=r"pretrained=FOLDER is required"):
        LavidaShirgLmms.create_from_arg_string("")
    with pytest.raises(ValueError, match=r"pretrained '.*' is not a model folder \(no config.json\)"):
        LavidaShirgLmms.create_from_arg_string(f"pretrained={tmp_path}")


@pytest.mark.parametrize("bad, message", [
    (request("mmlu_text", 0), "task 'mmlu_text' document 0 has no image (doc_to_visual gave []): lavida_shirg "
                              "answers questions about images"),
    (request("chartqa", 0, {"num_beams": 4}), "task 'chartqa' gen_kwargs num_beams=4: a masked-diffusion sampler "
                                              "has no beam search"),
    (request("chartqa", 0, {"do_sample": True, "top_p": 0.9}), "task 'chartqa' gen_kwargs top_p=0.9"),
    (request("chartqa", 0, {"max_new_tokens": 0}), "task 'chartqa' gen_kwargs max_new_tokens must be a positive "
                                                   "integer, got 0"),
    (request("docvqa_val", 1, doc_to_visual=lambda doc: ["clip.mp4"]), "task 'docvqa_val' document 1 has no image "
                                                                       "(doc_to_visual gave ['str'])"),
])
def test_bad_requests_are_refused_before_any_sample_runs(lmms_model, calls, bad, message):
    lmms_model.task_dict = tiny_tasks()
    with pytest.raises(ValueError) as refused:
        lmms_model.generate_until([request("textvqa_val", 0), request("textvqa_val", 1), bad])
    assert message in str(refused.value) and calls == []


def test_tasks_without_a_known_length_and_blocks_that_do_not_fit_are_refused(lmms_model, model_dir,
                                                                                              calls):
    lmms_model.task_dict = {"ocrbench": {"test": tiny_tasks()["textvqa_val"]["validation"]}}
    with pytest.raises(ValueError, match=r"task 'ocrbench' sets no max_new_tokens .* pass gen_length=N in "
                                         r"--model_args or max_new_tokens=N in --gen_kwargs"):
        lmms_model.generate_until([request("ocrbench", 0, split="test")])
    blocks = LavidaShirgLmms.create_from_arg_string(f"pretrained={model_dir},block_length=5")
    blocks.task_dict = tiny_tasks()
    with pytest.raises(ValueError, match=r"task 'chartqa': block_length must divide gen_length=16, got 5"):
        blocks.generate_until([request("textvqa_val", 0, {"max_new_tokens": 15}), request("chartqa", 0)])
    assert calls == []


@pytest.mark.parametrize("folder", ["model_dir", "dream_dir"], ids=["llada", "dream"])
def test_loglikelihood_scores_each_choice_with_the_models_estimate(request, folder):
    """A local multiple-choice task: every (context, choice) request gets model.log_likelihood's value for the same
    prompt, images, continuation ids and seed, and the choices of one question differ (both backbones)."""
    model_dir = request.getfixturevalue(folder)
    scorer = LavidaShirgLmms.create_from_arg_string(f"pretrained={model_dir},mc_num=4,mc_batch_size=2,seed=3")
    scorer.task_dict = tiny_tasks()
    choices = [" red", " blue", " a green sign"]
    requests = [Instance("loglikelihood", (QUESTIONS[0], choice, images_of, 0, "textvqa_val", "validation"), index,
                         {"task": "textvqa_val", "doc_id": 0, "repeats": 1}) for index, choice in enumerate(choices)]
    scores = scorer.loglikelihood(requests)
    assert [greedy for _, greedy in scores] == [False] * 3 and len({score for score, _ in scores}) == 3
    document = tiny_tasks()["textvqa_val"]["validation"][0]
    prompt = scorer.processor.build_prompt(QUESTIONS[0], num_images=1)
    inputs = scorer.processor(images=[[document["image"].convert("RGB")]], text=[prompt])
    for choice, (score, _) in zip(choices, scores):
        answer = scorer.processor.tokenizer(choice, add_special_tokens=False, return_tensors="pt")["input_ids"]
        expected = scorer.model.log_likelihood(answer, **inputs, mc_num=4, batch_size=2,
                                               generator=torch.Generator().manual_seed(3))
        assert score == pytest.approx(float(expected[0]), abs=1e-6)
    with pytest.raises(ValueError, match=r"mc_num \(6\) must be a multiple of mc_batch_size \(4\)"):
        LavidaShirgLmms.create_from_arg_string(f"pretrained={model_dir},mc_num=6,mc_batch_size=4")

"""train.py: budget schedule, LoRA set-up, gradient accumulation, exact resume, saving, data sources, bad input,
and a 2-process `accelerate launch --cpu` run. Everything on the tiny preset with 96x96 synthetic canvases."""

import dataclasses
import io
import json
import logging
import os
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

import train
from lavida_shirg import ShirgConfig
from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion
from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer
from shirg_tools.batching import BatchBuilder, SampleEncoder, collate_samples
from shirg_tools.budget_schedule import BudgetSchedule, parse_budget_entries
from shirg_tools.lora import LoraPlan, apply_lora
from shirg_tools.synthetic_ocr import SYNTHETIC_TASKS, SyntheticOCRConfig, generate_sample
from shirg_tools.training_data import VQASource, load_vqa_table, majority_answer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--synthetic_num_samples", "24", "--synthetic_canvas_size", "96", "--synthetic_num_texts", "3",
        "--synthetic_font_min", "8", "--synthetic_font_max", "10", "--per_device_train_batch_size", "2",
        "--logging_steps", "1", "--save_steps", "1000", "--use_cpu", "--dataloader_num_workers", "0"]
# p = 1 in float32: every answer token masked, so the masks do not depend on the noise (GA comparison)
ALL_MASKED = '{"min_mask_probability": 0.99999999}'


def arguments(folder, *extra):
    return [*TINY, "--output_dir", str(folder), *extra]


def step_logs(output_dir):
    """{step: log entry} of the training-loss logs in output_dir's trainer_state.json."""
    with open(os.path.join(output_dir, "trainer_state.json")) as handle:
        history = json.load(handle)["log_history"]
    return {entry["step"]: entry for entry in history if "loss" in entry}


# ---- budget schedule -----------------------------------------------------------------------------------------------


def test_budget_schedule_is_seeded_balanced_and_the_same_everywhere():
    entries = parse_budget_entries("32,64,96,pooled", "shirg-fixed", {}, has_budget_head=False)
    assert [e.label for e in entries] == ["32", "64", "96", "pooled"]
    assert entries[3].call_kwargs() == {"selection_method": "pooled", "selection_budget": None,
                                        "selection_options": {"adaptive_budget": False}}
    schedule = BudgetSchedule(entries, seed=7)
    sequence = [schedule.index_at(step) for step in range(40)]
    for cycle in range(10):
        assert sorted(sequence[4 * cycle: 4 * cycle + 4]) == [0, 1, 2, 3], "each budget once per cycle"
    assert [BudgetSchedule(entries, seed=7).index_at(step) for step in reversed(range(40))] == sequence[::-1]
    assert [BudgetSchedule(entries, seed=8).index_at(step) for step in range(40)] != sequence
    assert len({tuple(sequence[i:i + 4]) for i in range(0, 40, 4)}) > 1, "the order is reshuffled per cycle"


@pytest.mark.parametrize("budgets", ["0,pooled", "32,abc", "32,32", "1000,pooled", "adaptive", "32,,64"])
def test_invalid_budget_lists_are_refused_before_training(budgets, tmp_path):
    with pytest.raises(ValueError, match="--budgets"):
        train.build_run(arguments(tmp_path, "--budgets", budgets))


# ---- LoRA ------------------------------------------------------------------------------------------------------------


def test_real_size_lora_has_2_63m_parameters():
    with torch.device("meta"):
        model = LavidaShirgForMaskedDiffusion(ShirgConfig.from_preset("lavida-llada"))
    peft_model = apply_lora(model, LoraPlan())
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    # projector: 64 (1152 + 4096) + 64 (4096 + 4096); SigLIP blocks 0-3 q/k/v: 12 x 64 (1152 + 1152)
    assert trainable == 64 * (1152 + 4096) + 64 * 8192 + 12 * 64 * 2304 == 2_629_632


def test_trainable_parameters_groups_and_schedule(tmp_path):
    run = train.build_run(arguments(tmp_path, "--coordinate_embedding", "--adaptive_budget", "--modules_to_save",
                                    "none", "--lora_projector_rank", "16", "--lora_vision_layers", "1"))
    model = run.trainer.model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in name or "coordinate_embedding.modules_to_save" in name
                              or "budget_head.modules_to_save" in name) for name in trainable)
    adapted = {name.split(".lora_")[0].replace("base_model.model.", "") for name in trainable if "lora_" in name}
    assert adapted == {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2",
                       *(f"model.vision_tower.encoder.layers.1.self_attn.{t}" for t in ("q_proj", "k_proj", "v_proj"))}
    base = model.get_base_model()
    assert base.multi_modal_projector.linear_1.lora_A["default"].weight.shape[0] == 16
    assert base.vision_tower.encoder.layers[1].self_attn.q_proj.lora_A["default"].weight.shape[0] == 64
    assert isinstance(base.vision_tower.encoder.layers[1].self_attn.q_proj.lora_dropout["default"], torch.nn.Identity)
    assert base.multi_modal_projector.linear_1.lora_dropout["default"].p == 0.05
    assert not any(p.requires_grad for p in base.language_model.parameters())

    optimizer = run.trainer.create_optimizer()
    groups = {(group["group"], group["weight_decay"] > 0): group for group in optimizer.param_groups}
    assert groups[("projector", True)]["lr"] == 2e-4 and groups[("projector", True)]["weight_decay"] == 0.01
    assert groups[("vision", True)]["lr"] == 1e-4
    assert groups[("coordinate_embedding", True)]["lr"] == 1e-3
    assert groups[("coordinate_embedding", False)]["lr"] == 1e-3, "its bias, without weight decay"
    assert groups[("budget_head", True)]["lr"] == 1e-3
    scheduler = run.trainer.create_scheduler(num_training_steps=100, optimizer=optimizer)
    rates = []
    for _ in range(100):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0 and max(rates) == pytest.approx(2e-4) and rates.index(max(rates)) == 3, "3% warm-up"
    assert rates[-1] < 1e-6 and rates[50] == pytest.approx(1e-4, rel=0.1), "cosine decay"


@pytest.mark.parametrize("extra, message", [
    (["--lora_vision_layers", "0,7"], "--lora_vision_layers"),
    (["--lora_vision_targets", "q_proj,query"], "--lora_vision_targets"),
    (["--lora_language_model", "--modules_to_save", "none", "--lora_lm_targets", "w_proj"], "--lora_lm_targets"),
    (["--modules_to_save", "decoder"], "--modules_to_save"),
    (["--lora_projector_rank", "0"], "--lora_projector_rank"),
    (["--config_overrides", '{"no_such_field": 1}'], "--config_overrides"),
    (["--data_path", "somewhere.json"], "--data_path is not used"),
    (["--data_format", "vqa", "--data_path", "/no/such/folder"], "--data_path"),
    (["--data_format", "llava-json", "--data_path", "/no/such/file.json", "--image_folder", "."], "--data_path"),
    (["--resume_from_checkpoint", "/no/such/checkpoint"], "--resume_from_checkpoint"),
    (["--config", "/no/such/config.yaml"], "--config"),
    (["--selection_method", "pooled"], "--selection_method"),
    (["--modules_to_save", "language_model,lm_head,vision_tower,multi_modal_projector"],
     "--modules_to_save 'vision_tower' holds LoRA targets .*--training_mode full"),
    (["--modules_to_save", "multi_modal_projector"], "'multi_modal_projector' holds LoRA targets"),
    (["--training_mode", "partial"], r"--training_mode must be one of \('lora', 'full'\)"),
    (["--training_mode", "full", "--lora_vision_rank", "8"], "--lora_vision_rank configure LoRA"),
    (["--training_mode", "full", "--save_merged_model"], "--save_merged_model merges a LoRA adapter"),
    (["--synthetic_task", "poems"], "--synthetic_task must be one of"),
])
def test_bad_arguments_are_named_before_training(extra, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train.build_run(arguments(tmp_path / "out", *extra))


@pytest.mark.parametrize("extra, message", [
    (["--budgets", "0,pooled"], "error: --budgets"),
    (["--data_format", "vqa", "--data_path", "/no/such/folder"], "error: --data_path"),
    (["--config_overrides", '{"min_mask_probability": 2}'], "error: min_mask_probability must be in (0, 1)"),
    (["--config", "{folder}/bad.yaml"], "error: --config {folder}/bad.yaml is not valid YAML"),
])
def test_command_line_reports_bad_input_as_one_error_line(extra, message, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("budgets: [32, pooled\n")
    extra = [item.replace("{folder}", str(tmp_path)) for item in extra]
    assert train.command_line(arguments(tmp_path / "out", *extra)) == 2
    error = capsys.readouterr().err
    assert error.startswith(message.replace("{folder}", str(tmp_path))) and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_config_file_yaml_and_json_with_command_line_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text("lora_projector_rank: 32\nbudgets: 32,pooled\nlearning_rate: 0.001\n")
    (tmp_path / "run.json").write_text(json.dumps({"lora_projector_rank": 16, "max_steps": 7}))
    model, data, shirg, lora, training = train.parse_arguments(
        ["--config", str(tmp_path / "run.yaml"), "--learning_rate", "0.002"])
    assert (lora.lora_projector_rank, shirg.budgets, training.learning_rate) == (32, "32,pooled", 0.002)
    assert training.lr_scheduler_type == "cosine" and training.weight_decay == 0.01
    _, _, _, lora, training = train.parse_arguments(["--config", str(tmp_path / "run.json")])
    assert (lora.lora_projector_rank, training.max_steps) == (16, 7)
    defaults, tiny = train.parse_arguments([]), train.parse_arguments(["--config", f"{ROOT}/configs/train_tiny.yaml"])
    for default, loaded in zip(defaults[:4], tiny[:4]):
        default, loaded = dataclasses.asdict(default), dataclasses.asdict(loaded)
        assert {k for k in default if default[k] != loaded[k]} <= {"preset", "budgets"}, "the yaml shows the defaults"
    for name in ("output_dir", "per_device_train_batch_size", "num_train_epochs", "learning_rate", "weight_decay",
                 "lr_scheduler_type", "warmup_steps", "logging_steps", "save_steps", "save_total_limit", "seed"):
        assert getattr(defaults[4], name) == getattr(tiny[4], name), name
    (tmp_path / "bad.yaml").write_text("lora_rank: 8\n")
    with pytest.raises(ValueError, match="--config .*lora_rank"):
        train.parse_arguments(["--config", str(tmp_path / "bad.yaml")])


def test_a_model_source_on_the_command_line_replaces_the_config_files(tmp_path):
    recipe = f"{ROOT}/configs/train_reader.yaml"
    model, *_ = train.parse_arguments(["--config", recipe])
    assert (model.preset, model.model_name_or_path) == ("reader", None)
    model, data, _, lora, training = train.parse_arguments(["--config", recipe, "--model_name_or_path", "FOLDER"])
    assert (model.preset, model.model_name_or_path) == (None, "FOLDER")
    assert (data.synthetic_task, lora.training_mode, training.learning_rate) == ("reading", "full", 0.001)
    (tmp_path / "folder.yaml").write_text("model_name_or_path: FOLDER\n")
    model, *_ = train.parse_arguments(["--config", str(tmp_path / "folder.yaml"), "--preset=tiny"])
    assert (model.preset, model.model_name_or_path) == ("tiny", None)
    with pytest.raises(ValueError, match="--preset and --tokenizer_name_or_path"):  # both on the command line
        train.build_run(["--config", recipe, "--model_name_or_path", "FOLDER", "--preset", "reader"])


def test_the_reader_recipe_builds_from_a_pretrained_folder(tmp_path):
    torch.manual_seed(5)
    pretrained = LavidaShirgForMaskedDiffusion(ShirgConfig.from_preset("reader"))
    pretrained.save_pretrained(tmp_path / "tower")
    LavidaShirgProcessor.from_config(pretrained.config, build_tiny_tokenizer()).save_pretrained(tmp_path / "tower")
    run = train.build_run(["--config", f"{ROOT}/configs/train_reader.yaml", "--model_name_or_path",
                           str(tmp_path / "tower"), "--output_dir", str(tmp_path / "out")])
    loaded = run.trainer.model.state_dict()
    for name, tensor in pretrained.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    assert run.processor.tokenizer("497", add_special_tokens=False)["input_ids"] == [
        run.processor.tokenizer.convert_tokens_to_ids(d) for d in "497"]


# ---- batches -------------------------------------------------------------------------------------------------------


def test_full_training_trains_every_parameter_and_saves_a_loadable_model(tmp_path):
    """--training_mode full: no adapter, every parameter in the optimizer (tower and projector at their own rates),
    every tensor moves;
    output_dir holds the trained model, which AutoModel loads (remote code) with the same weights."""
    folder = tmp_path / "full"
    run = train.build_run(arguments(folder, "--preset", "reader", "--training_mode", "full", "--synthetic_task",
                                    "reading", "--synthetic_canvas_size", "64", "--budgets", "24,pooled",
                                    "--max_steps", "2", "--learning_rate", "1e-3", "--warmup_steps", "0"))
    model = run.trainer.model
    assert isinstance(model, LavidaShirgForMaskedDiffusion)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    optimizer = run.trainer.create_optimizer()
    rates = {group["group"]: group["lr"] for group in optimizer.param_groups}
    assert rates == {"projector": 2e-4, "vision": 1e-4, "full": 1e-3}, "the tower and projector at their own rates"
    names = {id(p): n for n, p in model.named_parameters()}
    prefixes = {"projector": "model.multi_modal_projector.", "vision": "model.vision_tower."}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            owner = [key for key, prefix in prefixes.items() if names[id(parameter)].startswith(prefix)]
            assert owner == ([group["group"]] if group["group"] in prefixes else []), names[id(parameter)]
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == model.num_parameters()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    summary = train.execute(run)
    assert summary["model_dir"] == str(folder.resolve()) and "adapter_dir" not in summary
    assert not (folder / "adapter_model.safetensors").exists() and not (folder / "base_model").exists()
    saved = load_file(folder / "model.safetensors")
    moved = [name for name, value in before.items() if not torch.equal(saved[name], value)]
    assert len(moved) == len(before), "every parameter tensor trained"
    loaded = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert loaded.config.vision_config.hidden_size == ShirgConfig.from_preset("reader").vision_config.hidden_size
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, saved[name]), name
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert processor.tokenizer.convert_ids_to_tokens(loaded.config.image_token_id) == "<image>"


def test_synthetic_task_options_override_the_named_settings():
    reading = train.synthetic_data_config(train.DataArguments(synthetic_task="reading"))
    assert reading == SYNTHETIC_TASKS["reading"]
    changed = train.synthetic_data_config(train.DataArguments(synthetic_task="reading", synthetic_font_max=14,
                                                              synthetic_canvas_size=80, synthetic_seed=3))
    assert changed == dataclasses.replace(SYNTHETIC_TASKS["reading"], font_size_range=(10, 14),
                                          canvas_size=(80, 80), seed=3)
    assert train.synthetic_data_config(train.DataArguments()) == SyntheticOCRConfig()


def test_answer_window_pads_labels_with_eos_to_the_window():
    """--answer_window W: every sample gets >= W label positions after its prompt (answer, eot, then EOS ids and
    labels, attended); the prompt part is the processor's batch unchanged."""
    config = ShirgConfig.from_preset("reader")
    processor = LavidaShirgProcessor.from_config(config, build_tiny_tokenizer())
    entries = parse_budget_entries("32,pooled", "shirg-fixed", {}, has_budget_head=False)
    encoder = SampleEncoder(processor, entries)
    samples = [generate_sample(index, SYNTHETIC_TASKS["reading"]) for index in range(4)]
    batch = collate_samples([{**encoder.encode(s["image"], s["question"], s["answers"][0]), "skipped": []}
                             for s in samples])
    for entry in entries:
        plain, padded = BatchBuilder(processor).build(batch, entry), BatchBuilder(processor, 16).build(batch, entry)
        width = plain["input_ids"].shape[1]
        for name in ("input_ids", "labels", "attention_mask", "question_mask"):
            assert torch.equal(padded[name][:, :width], plain[name]), name
        prompt = (padded["labels"] == -100).sum(dim=1)
        assert int((padded["labels"].shape[1] - prompt).min()) == 16
        for row, sample in enumerate(samples):
            answer = padded["labels"][row, prompt[row]:]
            digits = processor.tokenizer(sample["answers"][0], add_special_tokens=False)["input_ids"]
            assert answer[:4].tolist() == digits + [config.eot_token_id]
            assert set(answer[4:].tolist()) == {config.eos_token_id} and len(answer) >= 16
        assert bool(padded["attention_mask"].all()) and not bool(padded["question_mask"][:, width:].any())
    with pytest.raises(ValueError, match="--answer_window"):
        BatchBuilder(processor, -1)


def test_batch_builder_equals_the_processor_for_every_budget():
    config = ShirgConfig.from_preset("tiny")
    processor = LavidaShirgProcessor.from_config(config, build_tiny_tokenizer())
    entries = parse_budget_entries("32,96,pooled", "shirg-fixed", {}, has_budget_head=False)
    encoder = SampleEncoder(processor, entries, prompt_suffix="\nShort answer.")
    synthetic = SyntheticOCRConfig(canvas_size=(96, 64), num_texts=2, font_size_range=(8, 9))
    samples = [generate_sample(i, synthetic) for i in range(3)]
    encoded = [{**encoder.encode(s["image"], s["question"], s["answers"][0]), "skipped": []} for s in samples]
    batch = collate_samples(encoded)
    for entry in entries:
        built = BatchBuilder(processor).build(dict(batch), entry)
        expected = processor(images=[s["image"] for s in samples],
                             text=[processor.build_prompt(s["question"] + "\nShort answer.") for s in samples],
                             answers=[s["answers"][0] for s in samples], **entry.call_kwargs())
        assert set(expected) <= set(built)
        assert built.pop("selection") == expected.pop("selection"), entry.label  # the settings travel once
        for name, value in expected.items():
            assert torch.equal(built[name], value), (entry.label, name)


# ---- gradient accumulation -------------------------------------------------------------------------------------------


def equal_length_vqa(folder, rows=8):
    """A VQA dataset (save_to_disk) whose samples all have the same image size and token lengths."""
    tokenizer = build_tiny_tokenizer()
    candidates = [str(number) for number in range(10, 100)]
    lengths = [len(tokenizer(word, add_special_tokens=False)["input_ids"]) for word in candidates]
    words = [word for word, length in zip(candidates, lengths) if length == 2]
    assert len(words) >= 4
    generator = np.random.default_rng(0)
    images = [Image.fromarray(generator.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(rows)]
    table = datasets.Dataset.from_dict({"image": images, "question": ["What is written in the image?"] * rows,
                                        "answers": [[words[i % len(words)]] for i in range(rows)]})
    table.save_to_disk(str(folder))
    return str(folder)


def test_gradient_accumulation_2x1_equals_batch_2(tmp_path):
    data = equal_length_vqa(tmp_path / "vqa")
    # one batch of 2 and two micro-batches of 1 draw different extra paddings: compare the unpadded batches
    common = ["--data_format", "vqa", "--data_path", data, "--max_steps", "2", "--config_overrides", ALL_MASKED,
              "--lora_projector_dropout", "0", "--budgets", "32,pooled", "--learning_rate", "1e-3",
              "--extra_eos_padding", "false"]
    big = train.main(arguments(tmp_path / "batch2", *common, "--per_device_train_batch_size", "2"))
    accumulated = train.main(arguments(tmp_path / "ga2", *common, "--per_device_train_batch_size", "1",
                                       "--gradient_accumulation_steps", "2"))
    assert big["budgets_per_process"] == accumulated["budgets_per_process"]
    big_logs, accumulated_logs = step_logs(tmp_path / "batch2"), step_logs(tmp_path / "ga2")
    for step in (1, 2):
        assert accumulated_logs[step]["loss"] == pytest.approx(big_logs[step]["loss"], rel=1e-5, abs=1e-6)
        assert accumulated_logs[step]["grad_norm"] == pytest.approx(big_logs[step]["grad_norm"], rel=1e-4)
    big_weights = load_file(tmp_path / "batch2" / "adapter_model.safetensors")
    accumulated_weights = load_file(tmp_path / "ga2" / "adapter_model.safetensors")
    assert big_weights.keys() == accumulated_weights.keys()
    for name, value in big_weights.items():
        torch.testing.assert_close(accumulated_weights[name], value, rtol=1e-4, atol=1e-6)


# ---- resume, saving --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """6 steps with a checkpoint at step 3, the merged model saved as well."""
    folder = tmp_path_factory.mktemp("straight") / "out"
    summary = train.main(arguments(folder, "--max_steps", "6", "--save_steps", "3", "--save_merged_model"))
    return folder, summary


def test_resume_continues_exactly(straight_run, tmp_path):
    folder, straight = straight_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(folder / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed = train.main(arguments(resumed_dir, "--max_steps", "6", "--save_steps", "3",
                                   "--resume_from_checkpoint", str(resumed_dir / "checkpoint-3")))
    straight_logs, resumed_logs = step_logs(folder), step_logs(resumed_dir)
    assert resumed["budgets_per_process"][0] == straight["budgets_per_process"][0][3:]
    assert len({label for _, label in straight["budgets_per_process"][0]}) > 1, "several budgets were trained"
    for step in (4, 5, 6):
        assert resumed_logs[step]["budgets"] == straight_logs[step]["budgets"]
        assert abs(resumed_logs[step]["loss"] - straight_logs[step]["loss"]) <= 1e-6, step


def test_resume_refuses_another_configuration(straight_run, tmp_path):
    folder, _ = straight_run
    with pytest.raises(ValueError, match="(?s)--resume_from_checkpoint.*lora_projector_rank"):
        train.build_run(arguments(tmp_path, "--max_steps", "6", "--lora_projector_rank", "16",
                                  "--resume_from_checkpoint", str(folder / "checkpoint-3")))


def test_a_record_without_extra_padding_resumes_with_it_off(straight_run, tmp_path):
    """Checkpoints written before --extra_eos_padding (their records lack it) resume with it false, not with the
    new default."""
    folder, _ = straight_run
    old = tmp_path / "old"
    shutil.copytree(folder / "checkpoint-3", old / "checkpoint-3")
    record_path = old / "checkpoint-3" / "shirg_run.json"
    record = json.loads(record_path.read_text())
    assert record["data"].pop("extra_eos_padding") is True
    record_path.write_text(json.dumps(record))
    resume = ["--max_steps", "6", "--save_steps", "3", "--resume_from_checkpoint", str(old / "checkpoint-3")]
    with pytest.raises(ValueError, match="data.extra_eos_padding: None in the checkpoint, True now"):
        train.build_run(arguments(old, *resume))
    assert train.build_run(arguments(old, *resume, "--extra_eos_padding", "false")).resume == str(old / "checkpoint-3")


def test_adapter_and_merged_model_load_and_agree(straight_run):
    folder, summary = straight_run
    assert summary["steps"] == 6 and np.isfinite(summary["last_logged_loss"])
    assert os.path.isfile(folder / "adapter_model.safetensors") and os.path.isfile(folder / "adapter_config.json")
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == summary["base_model"]
    processor = AutoProcessor.from_pretrained(summary["merged_dir"], trust_remote_code=True)
    sample = generate_sample(0, SyntheticOCRConfig(canvas_size=(96, 96), num_texts=3, font_size_range=(8, 10)))
    inputs = processor(images=[sample["image"]], text=[processor.build_prompt(sample["question"])],
                       selection_method="shirg-fixed", selection_budget=64)
    inputs = {**inputs, "selection_method": "shirg-fixed", "selection_budget": 64}
    adapted = train.load_trained(summary["base_model"], str(folder), train.ModelArguments()).eval()
    merged = AutoModel.from_pretrained(summary["merged_dir"], trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(summary["base_model"], trust_remote_code=True).eval()
    assert type(merged).__module__.startswith("transformers_modules")
    with torch.no_grad():
        adapted_logits, merged_logits = adapted(**inputs).logits, merged(**inputs).logits
        base_logits = base(**inputs).logits
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-4, atol=1e-4)
    assert (adapted_logits - base_logits).abs().max() > 1e-3, "training changed the model"


def test_the_tiny_dream_preset_trains_and_its_merged_folder_generates(tmp_path):
    """train.py --preset tiny-dream: the tiny tokenizer with Dream's ChatML tokens, a Dream decoder; the merged folder
    loads with its `dream` chat template and generates with Dream's sampler."""
    folder = tmp_path / "out"
    summary = train.main(arguments(folder, "--preset", "tiny-dream", "--max_steps", "2", "--save_merged_model"))
    assert summary["steps"] == 2 and np.isfinite(summary["last_logged_loss"])
    processor = AutoProcessor.from_pretrained(summary["merged_dir"], trust_remote_code=True)
    merged = AutoModel.from_pretrained(summary["merged_dir"], trust_remote_code=True).eval()
    assert merged.config.text_config.model_type == "lavida_shirg_dream_text"
    assert merged.generation_config.alg == "topk_margin"
    sample = generate_sample(0, SyntheticOCRConfig(canvas_size=(96, 96), num_texts=3, font_size_range=(8, 10)))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.count("<|im_start|>") == 3 and prompt.endswith("<|im_start|>assistant\n"), prompt
    inputs = processor(images=[sample["image"]], text=[prompt])
    sequences = merged.generate(**inputs, max_new_tokens=8)
    assert sequences.shape == (1, inputs["input_ids"].shape[1] + 8)
    assert torch.equal(sequences[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert not (sequences == merged.config.mask_token_id).any(), "every answer position was decoded"


def test_a_published_folder_trains_without_a_prompt_or_a_special_token_warning(straight_run, tmp_path):
    # a fresh process without a terminal: transformers' "[y/N]" trust prompt would hang a real job
    _, summary = straight_run
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                   "HF_MODULES_CACHE": str(tmp_path / "modules")}
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--model_name_or_path", summary["merged_dir"],
               *arguments(tmp_path / "out", "--max_steps", "1")]
    completed = subprocess.run(command, cwd=tmp_path, env=environment, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=300)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    assert "trust_remote_code" not in output and "[y/N]" not in output
    assert "PAD/BOS/EOS" not in output
    assert json.loads((tmp_path / "out" / train.SUMMARY_FILE).read_text())["steps"] == 1


def test_a_run_logs_no_special_token_warning(tmp_path):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    assert transformers_logger.getEffectiveLevel() <= logging.WARNING
    transformers_logger.addHandler(handler)
    try:
        train.main(arguments(tmp_path, "--max_steps", "1"))
    finally:
        transformers_logger.removeHandler(handler)
    assert not [record.getMessage() for record in records if "PAD/BOS/EOS" in record.getMessage()]


def test_nan_loss_stops_with_the_step(tmp_path, monkeypatch):
    original = LavidaShirgForMaskedDiffusion.diffusion_loss
    calls = []

    def sometimes_nan(self, *args, **kwargs):
        calls.append(1)
        loss, logits, masks = original(self, *args, **kwargs)
        return (loss * float("nan") if len(calls) == 2 else loss), logits, masks

    monkeypatch.setattr(LavidaShirgForMaskedDiffusion, "diffusion_loss", sometimes_nan)
    with pytest.raises(FloatingPointError, match=r"nan at step 2 \(micro-batch 0, budget"):
        train.command_line(arguments(tmp_path, "--max_steps", "4"))  # an error in training keeps its traceback


@pytest.mark.parametrize("extra, flag", [
    (["--vision_learning_rate", "nan"], "--vision_learning_rate"),
    (["--projector_learning_rate", "-1"], "--projector_learning_rate"),
    (["--learning_rate", "inf", "--training_mode", "full"], "--learning_rate"),
    (["--lm_lora_learning_rate=-inf"], "--lm_lora_learning_rate"),
    (["--coordinate_learning_rate", "nan"], "--coordinate_learning_rate"),
    (["--budget_head_learning_rate", "-0.1"], "--budget_head_learning_rate"),
])
def test_every_learning_rate_must_be_finite_and_not_negative(extra, flag, tmp_path, capsys):
    assert train.command_line(arguments(tmp_path / "out", *extra)) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {flag} must be a finite number >= 0, got ") and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_weights_that_turned_nan_are_never_saved_over_good_ones(tmp_path, monkeypatch):
    out = tmp_path / "out"
    train.main(arguments(out, "--max_steps", "1"))
    good = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    listing = sorted(os.listdir(out))  # with base_model and the final step's checkpoint-1
    # an update that leaves the loss of its own step finite but the weights NaN (what a NaN learning rate did)
    monkeypatch.setattr(train, "check_learning_rates", lambda *args: None)
    for extra in (["--save_steps", "1"], []):  # refused at the step-1 checkpoint, then at the final save
        with pytest.raises(FloatingPointError, match=r"after step 1 \d+ trained tensor\(s\) hold NaN/inf"):
            train.main(arguments(out, "--max_steps", "1", "--vision_learning_rate", "nan", *extra))
        assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == good
        assert sorted(os.listdir(out)) == listing, "nothing saved, nothing left"


def test_a_second_run_into_the_same_output_dir_is_refused(tmp_path, capsys):
    first = train.build_run(arguments(tmp_path / "out", "--max_steps", "1"))
    capsys.readouterr()
    try:
        assert train.command_line(arguments(tmp_path / "out", "--max_steps", "1")) == 2
        assert capsys.readouterr().err.startswith(
            f"error: --output_dir '{tmp_path / 'out'}' is being written by another process (pid {os.getpid()})")
    finally:
        first.release()
    summary = train.main(arguments(tmp_path / "out", "--max_steps", "1"))  # free again
    assert summary["steps"] == 1


def test_an_unwritable_output_dir_is_one_error_line(unwritable, capsys):
    assert train.command_line(arguments(unwritable / "out", "--max_steps", "1")) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot write --output_dir {str(unwritable / 'out')!r}: [Errno ")
    assert "Traceback" not in error


KILLED_DURING_A_SAVE = """
import os, signal, sys
import torch
from transformers import Trainer
import train

torch.set_num_threads(1)
save_rng_state = Trainer._save_rng_state

def terminated_at_step_2(self, output_dir):
    if self.state.global_step == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # the model and optimizer of checkpoint-2 are written, not the rest
    return save_rng_state(self, output_dir)

Trainer._save_rng_state = terminated_at_step_2
train.command_line(sys.argv[1:])
"""


def test_a_checkpoint_is_visible_only_once_complete(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-c", KILLED_DURING_A_SAVE, *arguments(out, "--max_steps", "3", "--save_steps", "1")]
    killed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert killed.returncode == -15, killed.stderr[-3000:]
    assert sorted(name for name in os.listdir(out) if name.startswith("checkpoint")) == ["checkpoint-1"]
    summary = train.main(arguments(out, "--max_steps", "3", "--save_steps", "1", "--resume_from_checkpoint", "last"))
    assert summary["budgets_per_process"][0][0][0] == 2, "resumed after step 1, the last complete checkpoint"
    assert sorted(name for name in os.listdir(out) if name.startswith((".", "checkpoint"))) == [
        "checkpoint-2", "checkpoint-3"], "save_total_limit 2 kept; the killed save's staging folder is gone"


def test_outputs_follow_the_umask(straight_run):
    folder, _ = straight_run
    mask = os.umask(0o022)
    os.umask(mask)
    paths = [folder, *folder.rglob("*")]
    assert any(path.name == "adapter_model.safetensors" for path in paths)
    assert any(path.name == "model.safetensors" and path.parent.name == "base_model" for path in paths)
    assert {str(path): oct(path.stat().st_mode & 0o777) for path in paths} == {
        str(path): oct((0o777 if path.is_dir() else 0o666) & ~mask) for path in paths}


def test_a_truncated_weight_file_is_named(straight_run, tmp_path, capsys):
    _, summary = straight_run
    model = tmp_path / "model"
    shutil.copytree(summary["merged_dir"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert train.command_line(["--model_name_or_path", str(model), *arguments(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: --model_name_or_path '{model}': model.safetensors is not a complete safetensors "
                            "file (") and "Traceback" not in error


def test_budget_cost_trains_the_adaptive_head(tmp_path):
    common = ["--adaptive_budget", "--budgets", "adaptive,32", "--max_steps", "2", "--modules_to_save", "none"]
    train.main(arguments(tmp_path / "cost", *common, "--budget_cost_weight", "1.0"))
    train.main(arguments(tmp_path / "plain", *common))
    key = "base_model.model.model.token_selector.budget_head.output_bias"
    initial = torch.tensor([0.0, 1.0, 0.0])  # the untrained head picks the default budget (64)
    assert not torch.equal(load_file(tmp_path / "cost" / "adapter_model.safetensors")[key], initial)
    logs = step_logs(tmp_path / "cost").values()
    assert all(("budget_cost" in log) == (log["budgets"] == "adaptive") for log in logs)
    assert 32 / 96 <= [log["budget_cost"] for log in logs if "budget_cost" in log][0] <= 1, "E_p[K] / max K"
    # without the cost term the head gets no gradient: the model's LM loss does not reach its argmax choice
    assert torch.equal(load_file(tmp_path / "plain" / "adapter_model.safetensors")[key], initial)


# ---- data sources ----------------------------------------------------------------------------------------------------


def write_image(path, size=(80, 60)):
    pixels = np.random.default_rng(len(str(path))).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_llava_json_counts_and_skips_bad_samples(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        write_image(images / name)
    (images / "corrupt.png").write_bytes(b"not an image at all")
    human = {"from": "human", "value": "<image>\nWhat is in the picture?"}
    records = [
        {"image": "a.png", "conversations": [human, {"from": "gpt", "value": "a cat"}]},
        {"image": "missing.png", "conversations": [human, {"from": "gpt", "value": "a dog"}]},
        {"image": "corrupt.png", "conversations": [human, {"from": "gpt", "value": "a cup"}]},
        {"image": "b.png", "conversations": [human]},
        {"image": "c.png", "conversations": [human, {"from": "gpt", "value": "a bus"},
                                             {"from": "human", "value": "And the colour?"},
                                             {"from": "gpt", "value": "red"}]},
        {"image": "a.png", "conversations": [human, {"from": "gpt", "value": "a tree"}]},
    ]
    data = tmp_path / "llava.json"
    data.write_text(json.dumps(records))
    summary = train.main(arguments(tmp_path / "out", "--data_format", "llava-json", "--data_path", str(data),
                                   "--image_folder", str(images), "--num_train_epochs", "1", "--max_steps", "-1"))
    assert summary["steps"] == 3
    reasons = summary["skipped"]["by_reason"]
    assert {"missing image", "corrupt image", "malformed conversation"} <= set(reasons)
    assert summary["skipped"]["total"] == sum(reasons.values()) >= 3
    assert step_logs(tmp_path / "out")[3]["skipped_samples"] == summary["skipped"]["total"]

    for missing in ("conversations", "image"):
        broken = tmp_path / f"no_{missing}.json"
        broken.write_text(json.dumps([{k: v for k, v in records[0].items() if k != missing}] * 2))
        with pytest.raises(ValueError, match=f"--data_path .*{missing}"):
            train.build_run(arguments(tmp_path / "out2", "--data_format", "llava-json", "--data_path", str(broken),
                                      "--image_folder", str(images)))


def png_bytes(seed):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_vqa_sources_in_the_lmms_lab_schemas(tmp_path):
    image = {"bytes": png_bytes(0), "path": None}
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answers": datasets.Sequence(datasets.Value("string")),
                                  "question_id": datasets.Value("int64"),
                                  "ocr_tokens": datasets.Sequence(datasets.Value("string"))})
    textvqa = datasets.Dataset.from_dict({
        "image": [image, {"bytes": b"corrupt", "path": None}, image, image],
        "question": ["what is the price?", "what brand?", "which word?", "what number?"],
        "answers": [["2.25"] * 3 + ["2.50"] * 7, ["acme"] * 10, ["stop", "exit", "exit", "stop"], ["7"] * 10],
        "question_id": [1, 2, 3, 4], "ocr_tokens": [["2.50"], [], ["stop"], ["7"]],
    }, features=features)
    (tmp_path / "textvqa" / "data").mkdir(parents=True)
    textvqa.to_parquet(str(tmp_path / "textvqa" / "data" / "train-00000-of-00001.parquet"))
    textvqa.select([0]).to_parquet(str(tmp_path / "textvqa" / "data" / "validation-00000-of-00001.parquet"))
    table = load_vqa_table(str(tmp_path / "textvqa"), None, None, "train")
    source = VQASource(table, "--data_path")
    assert len(source) == 4 and source.load(0)[2] == "2.50" and source.load(2)[2] == "stop"
    assert len(load_vqa_table(str(tmp_path / "textvqa"), None, None, "validation")) == 1
    with pytest.raises(ValueError, match="--split 'test'"):
        load_vqa_table(str(tmp_path / "textvqa"), None, None, "test")

    docvqa = datasets.DatasetDict({"validation": datasets.Dataset.from_dict({
        "questionId": ["q1"], "question": ["What is the date?"], "image": [image], "docId": [3],
        "answers": [["1 May", "May 1"]], "data_split": ["validation"]},
        features=datasets.Features({"questionId": datasets.Value("string"), "question": datasets.Value("string"),
                                    "image": datasets.Image(), "docId": datasets.Value("int64"),
                                    "answers": datasets.Sequence(datasets.Value("string")),
                                    "data_split": datasets.Value("string")}))})
    docvqa.save_to_disk(str(tmp_path / "docvqa"))
    source = VQASource(load_vqa_table(str(tmp_path / "docvqa"), None, None, "validation"), "--data_path")
    assert source.load(0)[1:] == ("What is the date?", "1 May")

    chartqa = datasets.Dataset.from_dict({"type": ["human_test"], "question": ["Max value?"], "answer": ["42"],
                                          "image": [image]},
                                         features=datasets.Features({"type": datasets.Value("string"),
                                                                     "question": datasets.Value("string"),
                                                                     "answer": datasets.Value("string"),
                                                                     "image": datasets.Image()}))
    chartqa.to_parquet(str(tmp_path / "chartqa.parquet"))
    image_out, question, answer = VQASource(load_vqa_table(str(tmp_path / "chartqa.parquet"), None, None, "test"),
                                            "--data_path").load(0)
    assert (image_out.size, question, answer) == ((64, 48), "Max value?", "42")
    assert majority_answer(["b", "a", "a", "b"]) == "b"

    summary = train.main(arguments(tmp_path / "out", "--data_format", "vqa", "--data_path", str(tmp_path / "textvqa"),
                                   "--max_steps", "2"))
    assert summary["steps"] == 2 and summary["skipped"]["by_reason"].get("corrupt image", 0) >= 1

    no_answers = datasets.Dataset.from_dict({"image": [image], "question": ["q?"]},
                                            features=datasets.Features({"image": datasets.Image(),
                                                                        "question": datasets.Value("string")}))
    with pytest.raises(ValueError, match="--data_path: a VQA dataset needs columns"):
        VQASource(no_answers, "--data_path")


# ---- distributed -----------------------------------------------------------------------------------------------------


def test_accelerate_launch_two_cpu_processes_share_budgets(tmp_path):
    output_dir = tmp_path / "ddp"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT,
                   "HF_MODULES_CACHE": str(tmp_path / "modules")}
    # `accelerate launch --cpu` runs one process (several CPU processes need mpirun); the torchrun launcher of
    # --multi_gpu starts two, and train.py's --use_cpu (in TINY) makes them CPU processes over gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               os.path.join(ROOT, "train.py"), *arguments(output_dir, "--max_steps", "3")]
    completed = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads((output_dir / "training_summary.json").read_text())
    first, second = summary["budgets_per_process"]
    assert first == second and [step for step, _ in first] == [1, 2, 3]
    assert [entry["budgets"] for _, entry in sorted(step_logs(output_dir).items())] == [b for _, b in first]
    model = train.load_trained(summary["base_model"], str(output_dir), train.ModelArguments())
    assert any("lora_A" in name for name, _ in model.named_parameters())

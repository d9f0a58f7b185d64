"""Mixed-budget LoRA training of LaViDa-SHIRG with transformers' Trainer (runs under `accelerate launch` or python).

LoRA on the projector and SigLIP's first blocks (optionally the LM's attention), SHIRG's learned modules trained in
full, the token budget of every optimizer step drawn from a list (default: the model's budget_choices + pooled) by
a seeded schedule that every process shares. Data: LLaVA-format JSON + image folder, VQA datasets (TextVQA / DocVQA
/ ChartQA schemas) or an offline synthetic OCR set rendered with PIL.

    python train.py                                   # offline demo: tiny preset, synthetic OCR, 2 CPU cores
    python train.py --config configs/train_tiny.yaml  # arguments from a YAML or JSON file (command line overrides)
    accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml train.py --model_name_or_path ... ...

Arguments: the dataclasses below plus transformers' TrainingArguments (`python train.py --help`). A bad argument,
config value or data set is reported as one `error: ...` line (exit status 2) before any training step. The offline
demo shows the pipeline working (falling loss); a tiny model trained from scratch does not learn to read, so its
accuracy means nothing.
"""

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import time

import huggingface_hub
import torch
import yaml
from accelerate import PartialState
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer, HfArgumentParser, TrainingArguments, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint

from lavida_shirg.configuration_lavida_shirg import PRESETS, SELECTION_METHODS, TINY_TOKENIZER_PRESETS, ShirgConfig
from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion
from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer
from shirg_tools.batching import BatchBuilder, SampleEncoder, collate_samples
from shirg_tools.budget_schedule import BudgetSchedule, parse_budget_entries, validate_entries
from shirg_tools.inference import check_weight_files
from shirg_tools.lora import LEARNED_SHIRG_MODULES, LoraPlan, apply_lora, target_patterns, trainable_summary
from shirg_tools.output_folder import FolderWriter, staged_folder, write_folder
from shirg_tools.run_record import RUN_RECORD, check_resume, write_run_record
from shirg_tools.synthetic_ocr import SYNTHETIC_OCR_PROMPT_SUFFIX, SYNTHETIC_TASKS, SyntheticOCRConfig, synthetic_task
from shirg_tools.trainer import ShirgTrainer
from shirg_tools.training_data import (
    FimAnswers,
    LlavaJsonSource,
    SyntheticOCRSource,
    TrainingSamples,
    VQASource,
    load_vqa_table,
)

DATA_FORMATS = ("synthetic-ocr", "llava-json", "vqa")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUMMARY_FILE = "training_summary.json"


@dataclasses.dataclass
class ModelArguments:
    model_name_or_path: str | None = dataclasses.field(default=None, metadata={
        "help": "A converted LaViDa-SHIRG folder or Hub id (loaded with trust_remote_code). Without it, --preset."})
    preset: str | None = dataclasses.field(default=None, metadata={
        "help": f"Build a randomly initialised model from a ShirgConfig preset {sorted(PRESETS)} (default: tiny "
                "when no --model_name_or_path)."})
    tokenizer_name_or_path: str | None = dataclasses.field(default=None, metadata={
        "help": "Tokenizer of a preset (the tiny preset builds its own; lavida-llada needs LLaDA's)."})
    coordinate_embedding: bool = dataclasses.field(default=False, metadata={
        "help": "Give the model SHIRG-X's coordinate layer (zero-initialised, trained in full)."})
    adaptive_budget: bool = dataclasses.field(default=False, metadata={
        "help": "Give the model the adaptive-budget head (trained in full; budget entry 'adaptive' uses it)."})
    config_overrides: str | None = dataclasses.field(default=None, metadata={
        "help": "JSON object of ShirgConfig fields to override, e.g. "
                "'{\"loss_weighting\": \"inverse_probability\"}'."})
    dtype: str = dataclasses.field(default="float32", metadata={
        "help": f"dtype of the frozen weights {sorted(DTYPES)}; trainable parameters are kept in float32."})
    attn_implementation: str | None = dataclasses.field(default=None, metadata={
        "help": "Attention kernel (sdpa, eager, flash_attention_2); default: the model's."})


@dataclasses.dataclass
class DataArguments:
    data_format: str = dataclasses.field(default="synthetic-ocr", metadata={"help": f"One of {DATA_FORMATS}."})
    data_path: str | None = dataclasses.field(default=None, metadata={
        "help": "llava-json: the JSON file; vqa: a save_to_disk folder, a parquet file or a folder of parquet files."})
    image_folder: str | None = dataclasses.field(default=None, metadata={
        "help": "llava-json: the folder the records' image paths are relative to."})
    hub_dataset: str | None = dataclasses.field(default=None, metadata={
        "help": "vqa: a Hub dataset id (e.g. lmms-lab/textvqa) when online."})
    hub_config: str | None = dataclasses.field(default=None, metadata={"help": "vqa: the Hub dataset's config."})
    split: str = dataclasses.field(default="train", metadata={"help": "vqa: the split."})
    max_samples: int | None = dataclasses.field(default=None, metadata={"help": "Use only the first N records."})
    prompt_suffix: str | None = dataclasses.field(default=None, metadata={
        "help": "Appended to every question; default: the short-answer instruction for vqa and synthetic-ocr, "
                "nothing for llava-json."})
    answer_window: int = dataclasses.field(default=0, metadata={
        "help": "Pad every sample's labels with EOS to at least this many answer positions (answer + <|eot_id|> + "
                "EOS), as a LaViDa batch pads short answers to its longest one: a model whose answers all have one "
                "length learns to fill a generation window of this size with EOS. 0: the batch's longest only."})
    extra_eos_padding: bool = dataclasses.field(default=True, metadata={
        "help": "LaViDa's collation: each micro-batch draws n ~ U{-128..127} (from the seed, step and micro-batch: "
                "the same on every process and after a resume) and, when n > 0, pads every sample n EOS targets "
                "further, so that every data set teaches what follows an answer (31.75 positions per row on average, "
                "127 at most). false: pad to the longest sample (and --answer_window) only."})
    synthetic_task: str = dataclasses.field(default="ocr", metadata={
        "help": f"synthetic-ocr: the generator's settings {sorted(SYNTHETIC_TASKS)} (ocr: 672 px, 8 mixed texts; "
                "reading: 64 px, two coloured boxes of 3-digit numbers), which the options below override."})
    synthetic_num_samples: int = dataclasses.field(default=6400, metadata={"help": "synthetic-ocr: samples per epoch."})
    synthetic_canvas_size: int | None = dataclasses.field(default=None, metadata={
        "help": "synthetic-ocr: canvas side (px); default: the task's."})
    synthetic_num_texts: int | None = dataclasses.field(default=None, metadata={
        "help": "synthetic-ocr: texts per image; default: the task's."})
    synthetic_font_min: int | None = dataclasses.field(default=None, metadata={
        "help": "synthetic-ocr: smallest font (px); default: the task's."})
    synthetic_font_max: int | None = dataclasses.field(default=None, metadata={
        "help": "synthetic-ocr: largest font (px); default: the task's."})
    synthetic_seed: int = dataclasses.field(default=0, metadata={"help": "synthetic-ocr: the generator's seed."})
    fim: bool = dataclasses.field(default=False, metadata={
        "help": "Train text infilling as LaViDa's FIM checkpoint: 80% of the answers of more than 3 words get 1..N "
                "(N = clamp(words / 10, 5, 10)) FIM markers at random word boundaries, each after 0..5 filler tokens "
                "(drawn from the seed and the sample's index); the markers are never masked nor predicted. Needs a "
                "model whose config has fim_token_id and fill_token_id (LLaDA presets and tiny)."})


@dataclasses.dataclass
class ShirgArguments:
    budgets: str | None = dataclasses.field(default=None, metadata={
        "help": "Comma-separated budgets drawn per optimizer step: numbers K (--selection_method keeps K tokens), "
                "'pooled', 'adaptive' (needs --adaptive_budget). Default: the model's budget_choices + pooled "
                "(+ adaptive with the head): 512,768,1024,pooled at real size, 32,64,96,pooled for tiny."})
    selection_method: str = dataclasses.field(default="shirg-fixed", metadata={
        "help": f"Selection method of the numeric budgets {SELECTION_METHODS[2:]}."})
    selection_options: str | None = dataclasses.field(default=None, metadata={
        "help": "JSON object of SHIRG options for every call (e.g. '{\"relevance_weight\": 1.0}')."})
    budget_cost_weight: float = dataclasses.field(default=0.0, metadata={
        "help": "Weight of the adaptive-budget head's cost E_p[K] / max K on 'adaptive' steps. The model's head "
                "picks K by argmax, so the LM loss does not reach it: with this term alone the head drifts to the "
                "smallest budget. Keep 0 unless the head gets an LM-loss signal."})


TRAINING_MODES = ("lora", "full")


@dataclasses.dataclass
class LoraArguments:
    training_mode: str = dataclasses.field(default="lora", metadata={
        "help": f"One of {TRAINING_MODES}. lora: PEFT adapters (the --lora_* arguments) plus --modules_to_save; "
                "full: every parameter trains, no adapter (the vision tower at --vision_learning_rate, the projector "
                "at --projector_learning_rate, SHIRG's learned modules at theirs, the LM at --learning_rate), the "
                "trained model saved in output_dir (for a preset trained from scratch)."})
    lora_projector_rank: int = dataclasses.field(default=64, metadata={"help": "Projector LoRA rank (16/32/64)."})
    lora_projector_alpha: int = 32
    lora_projector_dropout: float = 0.05
    lora_vision_layers: str | None = dataclasses.field(default=None, metadata={
        "help": "SigLIP blocks with LoRA, comma-separated ('' for none); default: the first 4 (or all if fewer)."})
    lora_vision_targets: str = "q_proj,k_proj,v_proj"
    lora_vision_rank: int = 64
    lora_vision_alpha: int = 32
    lora_vision_dropout: float = 0.0
    lora_language_model: bool = dataclasses.field(default=False, metadata={"help": "LoRA on the LM's attention."})
    lora_lm_layers: str | None = dataclasses.field(default=None, metadata={"help": "LM blocks (default: all)."})
    lora_lm_targets: str = "q_proj,k_proj,v_proj,o_proj"
    lora_lm_rank: int = 16
    lora_lm_alpha: int = 32
    lora_lm_dropout: float = 0.05
    modules_to_save: str = dataclasses.field(default="auto", metadata={
        "help": "Modules trained in full besides coordinate_embedding / budget_head (always, when present): a "
                "comma-separated list, 'none', or 'auto' (language_model,lm_head for a randomly initialised "
                "preset, none for a pretrained model)."})
    projector_learning_rate: float = 2e-4
    vision_learning_rate: float = 1e-4
    lm_lora_learning_rate: float = 2e-4
    coordinate_learning_rate: float = 1e-3
    budget_head_learning_rate: float = 1e-3
    save_merged_model: bool = dataclasses.field(default=False, metadata={
        "help": "Also save the base model with the adapter merged into output_dir/merged (AutoModel-loadable)."})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, ShirgArguments, LoraArguments, TrainingArguments)
# where the model comes from: a --config file's values are dropped when the command line names another source
MODEL_SOURCE_ARGUMENTS = ("model_name_or_path", "preset", "tokenizer_name_or_path")

# TrainingArguments defaults of this script (the plan's optimisation; the command line and --config override them)
TRAINING_DEFAULTS = dict(
    output_dir="outputs/shirg-lora", learning_rate=2e-4, weight_decay=0.01, lr_scheduler_type="cosine",
    warmup_steps=0.03, logging_steps=10, logging_first_step=True, save_steps=200, save_total_limit=2,
    per_device_train_batch_size=8, num_train_epochs=1.0, report_to="none", remove_unused_columns=False,
)


# ---- arguments ---------------------------------------------------------------------------------------------------


def load_config_file(path: str) -> dict:
    """The arguments of a YAML (.yaml/.yml) or JSON (.json) file: a mapping of argument name -> value."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path} does not exist")
    is_yaml = path.endswith((".yaml", ".yml"))
    try:
        with open(path) as handle:
            values = yaml.safe_load(handle) if is_yaml else json.load(handle)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ValueError(f"--config {path} is not valid {'YAML' if is_yaml else 'JSON'}: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a mapping of argument names to values")
    known = {field.name for cls in ARGUMENT_CLASSES for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown arguments {unknown}")
    return values


def parse_arguments(argv=None):
    """(model, data, shirg, lora, training) arguments from the command line, over an optional `--config FILE`
    whose values replace the defaults (explicit command-line arguments win). A model source on the command line
    (--model_name_or_path or --preset) replaces the file's whole model source (MODEL_SOURCE_ARGUMENTS), so that a
    preset recipe runs from a pretrained folder: `--config configs/train_reader.yaml --model_name_or_path FOLDER`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    parser.set_defaults(**TRAINING_DEFAULTS)
    if "--config" in argv:
        position = argv.index("--config")
        if position + 1 >= len(argv):
            raise ValueError("--config needs a file path")
        values = load_config_file(argv[position + 1])
        argv = argv[:position] + argv[position + 2:]
        named = {argument.split("=")[0] for argument in argv if argument.startswith("--")}
        if named & {"--model_name_or_path", "--preset"}:
            values = {name: value for name, value in values.items() if name not in MODEL_SOURCE_ARGUMENTS}
        parser.set_defaults(**values)
    *arguments, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.remove_unused_columns:
        raise ValueError("--remove_unused_columns must stay False: the collated batches carry prompts and answers "
                         "that the trainer turns into model inputs")
    return (*arguments, training_args)


def int_list(text: str | None, argument: str):
    """Comma-separated integers ('' -> ()), None stays None; ValueError naming `argument` otherwise."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not all(part.lstrip("-").isdigit() for part in parts):
        raise ValueError(f"{argument} must be comma-separated integers, got {text!r}")
    return tuple(int(part) for part in parts)


def name_list(text: str, argument: str) -> tuple:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise ValueError(f"{argument} must list at least one name, got {text!r}")
    return names


# ---- data --------------------------------------------------------------------------------------------------------


def build_source(data_args: DataArguments, seed: int):
    """The training source of --data_format, its arguments checked (unused ones refused, paths must exist)."""
    fmt = data_args.data_format
    if fmt not in DATA_FORMATS:
        raise ValueError(f"--data_format must be one of {DATA_FORMATS}, got {fmt!r}")
    used = {"synthetic-ocr": set(), "llava-json": {"data_path", "image_folder"},
            "vqa": {"data_path", "hub_dataset", "hub_config"}}[fmt]
    for name in ("data_path", "image_folder", "hub_dataset", "hub_config"):
        if getattr(data_args, name) is not None and name not in used:
            raise ValueError(f"--{name} is not used by --data_format {fmt}")
    if data_args.max_samples is not None and data_args.max_samples < 1:
        raise ValueError(f"--max_samples must be positive, got {data_args.max_samples}")
    if fmt == "synthetic-ocr":
        return SyntheticOCRSource(data_args.synthetic_num_samples, synthetic_data_config(data_args))
    if fmt == "llava-json":
        if data_args.data_path is None:
            raise ValueError("--data_format llava-json needs --data_path (the JSON file) and --image_folder")
        return LlavaJsonSource(data_args.data_path, data_args.image_folder, seed)
    if data_args.data_path is not None and data_args.hub_dataset is not None:
        raise ValueError("pass either --data_path or --hub_dataset, not both")
    table = load_vqa_table(data_args.data_path, data_args.hub_dataset, data_args.hub_config, data_args.split)
    return VQASource(table, "--data_path" if data_args.data_path else "--hub_dataset")


def synthetic_data_config(data_args: DataArguments) -> SyntheticOCRConfig:
    """The generator config of --synthetic_task with the --synthetic_* options given (None keeps the task's)."""
    if data_args.synthetic_task not in SYNTHETIC_TASKS:
        raise ValueError(f"--synthetic_task must be one of {sorted(SYNTHETIC_TASKS)}, got {data_args.synthetic_task!r}")
    task = SYNTHETIC_TASKS[data_args.synthetic_task]
    side = data_args.synthetic_canvas_size
    font_min, font_max = task.font_size_range
    overrides = {
        "canvas_size": task.canvas_size if side is None else (side, side),
        "num_texts": task.num_texts if data_args.synthetic_num_texts is None else data_args.synthetic_num_texts,
        "font_size_range": (font_min if data_args.synthetic_font_min is None else data_args.synthetic_font_min,
                            font_max if data_args.synthetic_font_max is None else data_args.synthetic_font_max),
        "seed": data_args.synthetic_seed,
    }
    return synthetic_task(data_args.synthetic_task, **overrides)


def prompt_suffix(data_args: DataArguments) -> str:
    if data_args.prompt_suffix is not None:
        return data_args.prompt_suffix
    return "" if data_args.data_format == "llava-json" else SYNTHETIC_OCR_PROMPT_SUFFIX


# ---- model -------------------------------------------------------------------------------------------------------


def parse_json_object(text: str, argument: str) -> dict:
    """The dict written as JSON in `text`; a ValueError naming `argument` for anything else."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{argument} must be a JSON object: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{argument} must be a JSON object, got {text!r}")
    return value


def config_overrides(model_args: ModelArguments) -> dict:
    """ShirgConfig fields to override: --config_overrides plus the --coordinate_embedding / --adaptive_budget flags."""
    overrides = {}
    if model_args.config_overrides is not None:
        overrides = parse_json_object(model_args.config_overrides, "--config_overrides")
        known = {field.name for field in dataclasses.fields(ShirgConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"--config_overrides: {unknown} are not ShirgConfig fields")
    for name in ("coordinate_embedding", "adaptive_budget"):
        if getattr(model_args, name):
            overrides[name] = True
    return overrides


def load_model(model_args: ModelArguments, seed: int):
    """(model, tokenizer, randomly_initialised): a pretrained folder / Hub id, or a preset built with `seed`."""
    if model_args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {model_args.dtype!r}")
    dtype = DTYPES[model_args.dtype]
    attention = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    source = model_args.model_name_or_path
    if source is not None:
        if model_args.preset is not None or model_args.tokenizer_name_or_path is not None:
            raise ValueError("--preset and --tokenizer_name_or_path build a model from a preset; a "
                             "--model_name_or_path folder brings its own config and tokenizer")
        if not os.path.isdir(source) and huggingface_hub.constants.HF_HUB_OFFLINE:
            raise ValueError(f"--model_name_or_path {source} is not a local folder and the Hub is offline "
                             "(HF_HUB_OFFLINE=1)")
        if os.path.isdir(source):
            check_weight_files(source, "--model_name_or_path")
        model = AutoModel.from_pretrained(source, trust_remote_code=True, dtype=dtype, **attention,
                                          **config_overrides(model_args))
        # the folder's remote code is trusted for its model, so for its tokenizer too (no interactive prompt)
        return model, AutoTokenizer.from_pretrained(source, trust_remote_code=True), False
    preset = model_args.preset or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if preset in TINY_TOKENIZER_PRESETS and model_args.tokenizer_name_or_path is None:
        tokenizer = build_tiny_tokenizer(TINY_TOKENIZER_PRESETS[preset])
    elif model_args.tokenizer_name_or_path is None:
        raise ValueError(f"--preset {preset} needs --tokenizer_name_or_path (only "
                         f"{', '.join(TINY_TOKENIZER_PRESETS)} build their own)")
    else:
        # the preset's model runs no remote code: neither does its tokenizer (and no interactive prompt asks)
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path, trust_remote_code=False)
    set_seed(seed)
    config = ShirgConfig.from_preset(preset, **config_overrides(model_args))
    model = LavidaShirgForMaskedDiffusion._from_config(config, **attention).to(dtype)
    return model, tokenizer, True


def lora_plan(lora_args: LoraArguments, model, randomly_initialised: bool) -> LoraPlan:
    """The LoRA plan of the arguments, with the defaults that depend on the model resolved."""
    vision_layers = int_list(lora_args.lora_vision_layers, "--lora_vision_layers")
    if vision_layers is None:
        vision_layers = tuple(range(min(4, len(model.vision_tower.encoder.layers))))
    extra = lora_args.modules_to_save.strip()
    if extra == "auto":
        extra_modules = ("language_model", "lm_head") if randomly_initialised else ()
    elif extra == "none":
        extra_modules = ()
    else:
        extra_modules = name_list(extra, "--modules_to_save")
    selector = model.model.token_selector
    learned = tuple(name for name in LEARNED_SHIRG_MODULES if getattr(selector, name) is not None)
    if lora_args.lora_language_model and "language_model" in extra_modules:
        raise ValueError("--lora_language_model adapts the LM that --modules_to_save trains in full: choose one")
    plan = LoraPlan(
        projector_rank=lora_args.lora_projector_rank, projector_alpha=lora_args.lora_projector_alpha,
        projector_dropout=lora_args.lora_projector_dropout,
        vision_layers=vision_layers, vision_targets=name_list(lora_args.lora_vision_targets, "--lora_vision_targets"),
        vision_rank=lora_args.lora_vision_rank, vision_alpha=lora_args.lora_vision_alpha,
        vision_dropout=lora_args.lora_vision_dropout,
        language_model=lora_args.lora_language_model, lm_layers=int_list(lora_args.lora_lm_layers, "--lora_lm_layers"),
        lm_targets=name_list(lora_args.lora_lm_targets, "--lora_lm_targets"), lm_rank=lora_args.lora_lm_rank,
        lm_alpha=lora_args.lora_lm_alpha, lm_dropout=lora_args.lora_lm_dropout,
        modules_to_save=learned + tuple(name for name in extra_modules if name not in learned),
    )
    check_full_modules(model, plan)
    return plan


def check_full_modules(model, plan: LoraPlan):
    """A module trained in full (--modules_to_save) must not hold a LoRA target: PEFT cannot wrap one module both
    ways. Raises ValueError naming the module and the targets it holds, pointing at --training_mode full."""
    targets = [name for name, _ in model.named_modules()
               if any(re.fullmatch(pattern, name) for pattern in target_patterns(plan).values())]
    for module in plan.modules_to_save:
        inside = [name for name in targets if re.search(rf"(^|\.){re.escape(module)}(\.|$)", name)]
        if inside:
            raise ValueError(f"--modules_to_save {module!r} holds LoRA targets ({inside[0]}, ... {len(inside)} in "
                             "all): a module cannot train both in full and through adapters. Remove it from "
                             "--modules_to_save, or train every parameter with --training_mode full")


def check_training_mode(lora_args: LoraArguments) -> bool:
    """True for --training_mode full, False for lora; ValueError for another mode, or for full training with
    LoRA arguments set (they would be silently unused) or --save_merged_model (there is no adapter to merge)."""
    if lora_args.training_mode not in TRAINING_MODES:
        raise ValueError(f"--training_mode must be one of {TRAINING_MODES}, got {lora_args.training_mode!r}")
    if lora_args.training_mode == "lora":
        return False
    defaults = LoraArguments()
    kept = {"training_mode", "projector_learning_rate", "vision_learning_rate", "coordinate_learning_rate",
            "budget_head_learning_rate"}
    changed = [f"--{field.name}" for field in dataclasses.fields(LoraArguments)
               if field.name not in kept and getattr(lora_args, field.name) != getattr(defaults, field.name)]
    if "--save_merged_model" in changed:
        raise ValueError("--save_merged_model merges a LoRA adapter; --training_mode full saves the trained model "
                         "itself in --output_dir")
    if changed:
        raise ValueError(f"{', '.join(changed)} configure LoRA and are unused by --training_mode full (every "
                         "parameter trains): remove them or use --training_mode lora")
    return True


def learning_rates(lora_args: LoraArguments, training_args: TrainingArguments) -> dict:
    """Learning rate of each parameter group (see shirg_tools.lora.parameter_group_name)."""
    return {"projector": lora_args.projector_learning_rate, "vision": lora_args.vision_learning_rate,
            "language_model": lora_args.lm_lora_learning_rate,
            "coordinate_embedding": lora_args.coordinate_learning_rate,
            "budget_head": lora_args.budget_head_learning_rate, "full": training_args.learning_rate}


def check_learning_rates(lora_args: LoraArguments, training_args: TrainingArguments):
    """ValueError naming the flag of a learning rate that is not a finite number >= 0."""
    flags = {"--learning_rate": training_args.learning_rate}
    flags.update({f"--{field.name}": getattr(lora_args, field.name) for field in dataclasses.fields(LoraArguments)
                  if field.name.endswith("_learning_rate")})
    for flag, value in flags.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{flag} must be a finite number >= 0, got {value}")


def selection_options(shirg_args: ShirgArguments) -> dict:
    if shirg_args.selection_options is None:
        return {}
    return parse_json_object(shirg_args.selection_options, "--selection_options")


def budget_entries(shirg_args: ShirgArguments, model, processor) -> list:
    """The budget list (default: the model's budget_choices + pooled (+ adaptive)), checked against the model."""
    if shirg_args.selection_method in ("pooled", "full"):
        raise ValueError(f"--selection_method must be a selection method (not {shirg_args.selection_method!r}); "
                         "'pooled' is a budget-list entry")
    has_head = model.model.token_selector.budget_head is not None
    text = shirg_args.budgets
    if text is None:
        text = ",".join([*map(str, model.config.budget_choices), "pooled", *(["adaptive"] if has_head else [])])
    entries = parse_budget_entries(text, shirg_args.selection_method, selection_options(shirg_args), has_head)
    validate_entries(entries, model, processor)
    return entries


def run_record(model_args, data_args, shirg_args, lora_args, training_args, plan, entries) -> dict:
    """What a checkpoint must share with a run that resumes from it (see shirg_tools.run_record)."""
    return {
        "model": dataclasses.asdict(model_args),
        # checkpoints written before --extra_eos_padding existed (no such padding) resume with it false
        "data": {k: v for k, v in dataclasses.asdict(data_args).items() if k != "extra_eos_padding" or v},
        "shirg": dataclasses.asdict(shirg_args),
        "lora": {k: v for k, v in dataclasses.asdict(lora_args).items() if k != "save_merged_model"},
        "resolved": {"budgets": [entry.label for entry in entries],
                     "lora_plan": dataclasses.asdict(plan) if plan else None},
        "training": {"seed": training_args.seed, "world_size": training_args.world_size,
                     "per_device_train_batch_size": training_args.per_device_train_batch_size,
                     "gradient_accumulation_steps": training_args.gradient_accumulation_steps},
    }


def load_trained(base_source: str, adapter_dir: str, model_args: ModelArguments):
    """The base model (folder or Hub id, with this run's config overrides) with the saved adapter loaded."""
    base = AutoModel.from_pretrained(base_source, trust_remote_code=True, dtype=DTYPES[model_args.dtype],
                                     **config_overrides(model_args))
    return PeftModel.from_pretrained(base, adapter_dir)


def save_base_model(model, processor, folder: str):
    """Save a randomly initialised base model (and processor) for the adapter trained on it: into `folder` when it
    does not exist yet (the checkpoints' adapters name it), else aside (`staged_folder(folder)`), to replace the
    earlier run's base model only in the final save (train_and_save): a failed run leaves the earlier output whole."""
    if not os.path.isdir(folder):
        with write_folder(folder, "--output_dir", overwrite=True, lock=False) as staged:  # covered by the run's lock
            model.save_pretrained(staged)
            processor.save_pretrained(staged)
        return
    pending = staged_folder(folder)
    if pending.parent.exists():
        shutil.rmtree(pending.parent)
    model.save_pretrained(pending)
    processor.save_pretrained(pending)


# ---- main --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """A checked, ready-to-train run: the trainer and what saving needs."""

    trainer: ShirgTrainer
    model_args: ModelArguments
    lora_args: LoraArguments
    processor: LavidaShirgProcessor
    resume: str | None
    base_model: str
    output: FolderWriter | None  # the lock and final writer of --output_dir (main process; None elsewhere)

    def release(self):
        """Free the lock of --output_dir (and remove what a failed run staged: the final folder, the base model)."""
        if self.output is not None:
            pending_base = staged_folder(os.path.join(self.trainer.args.output_dir, "base_model")).parent
            if pending_base.exists():
                shutil.rmtree(pending_base)
            self.output.release()


def build_run(argv=None) -> Run:
    """Parse and check every argument (data, model, budgets, LoRA targets, resume folder) and build the trainer;
    every error names its argument and comes before any training step. The main process holds the lock of
    --output_dir from here until `execute` ends (`Run.release` frees it): a second run into it is refused."""
    model_args, data_args, shirg_args, lora_args, training_args = parse_arguments(argv)
    check_learning_rates(lora_args, training_args)
    output = (FolderWriter(training_args.output_dir, "--output_dir", overwrite=True)
              if training_args.process_index == 0 else None)
    try:
        return _build_run(output, model_args, data_args, shirg_args, lora_args, training_args)
    except BaseException:
        if output is not None:
            output.release()
        raise


def _build_run(output, model_args, data_args, shirg_args, lora_args, training_args) -> Run:
    seed = training_args.seed
    source = build_source(data_args, seed)
    model, tokenizer, randomly_initialised = load_model(model_args, seed)
    processor = LavidaShirgProcessor.from_config(model.config, tokenizer)
    if data_args.fim:
        if model.config.fim_token_id is None:
            raise ValueError("--fim needs a model whose config has fim_token_id and fill_token_id (LaViDa's FIM is "
                             "on the LLaDA backbone; its presets and tiny have them), this one has none")
        fim_token, fill_token = tokenizer.convert_ids_to_tokens([model.config.fim_token_id, model.config.fill_token_id])
        source = FimAnswers(source, seed, fim_token, fill_token)
    entries = budget_entries(shirg_args, model, processor)
    full_training = check_training_mode(lora_args)
    plan = None if full_training else lora_plan(lora_args, model, randomly_initialised)
    record = run_record(model_args, data_args, shirg_args, lora_args, training_args, plan, entries)
    resume = training_args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            raise ValueError(f"--resume_from_checkpoint last: {training_args.output_dir} holds no checkpoint")
    if resume is not None:
        check_resume(resume, record)

    output_dir = training_args.output_dir
    base_model = model_args.model_name_or_path
    base_parameters = sum(p.numel() for p in model.parameters())
    if full_training:
        trained_model = model.float().requires_grad_(True)
    else:
        if randomly_initialised:  # the adapter is only usable with these random base weights: keep them
            base_model = os.path.abspath(os.path.join(output_dir, "base_model"))
            if training_args.process_index == 0:
                save_base_model(model, processor, base_model)
        trained_model = apply_lora(model, plan)
        trained_model.peft_config["default"].base_model_name_or_path = base_model
        for parameter in trained_model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    print(trainable_summary(trained_model, base_parameters, full_training), flush=True)
    print(f"budgets per step (seeded shuffle of each cycle): {[entry.label for entry in entries]}; numeric budgets "
          f"use {shirg_args.selection_method}", flush=True)

    dataset = TrainingSamples(source, SampleEncoder(processor, entries, prompt_suffix(data_args), data_args.fim), seed,
                              data_args.max_samples)
    print(f"training samples: {len(dataset)} ({data_args.data_format})", flush=True)
    if training_args.process_index == 0 and not os.path.exists(os.path.join(output_dir, RUN_RECORD)):
        os.makedirs(output_dir, exist_ok=True)  # an earlier run's record is replaced only by the final save
        write_run_record(output_dir, record)
    trainer = ShirgTrainer(
        model=trained_model, args=training_args, train_dataset=dataset, data_collator=collate_samples,
        processing_class=processor, run_record=record, schedule=BudgetSchedule(entries, seed),
        batch_builder=BatchBuilder(processor, data_args.answer_window,
                                   training_args.seed if data_args.extra_eos_padding else None),
        learning_rates=learning_rates(lora_args, training_args),
        budget_cost_weight=shirg_args.budget_cost_weight,
    )
    return Run(trainer, model_args, lora_args, processor, resume, base_model, output)


def train_and_save(run: Run) -> dict:
    """Train; save the adapter (PEFT format, + processor) into output_dir and, with --save_merged_model, the merged
    model into output_dir/merged (--training_mode full: the trained model itself into output_dir); write and print
    the summary (budgets, skipped samples, losses, folders). The final files are written aside with the checkpoints
    linked in, and swapped in for output_dir in one step (shirg_tools.output_folder)."""
    trainer = run.trainer
    output_dir = trainer.args.output_dir
    started = time.time()
    result = trainer.train(resume_from_checkpoint=run.resume)
    if run.output is not None:
        run.output.stage()
    trainer.accelerator.wait_for_everyone()
    staged = str(staged_folder(output_dir))
    trainer.save_model(staged)
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        write_run_record(staged, trainer.run_record)
        pending_base = staged_folder(os.path.join(output_dir, "base_model"))  # see build_run
        if pending_base.is_dir():
            os.rename(pending_base, os.path.join(staged, "base_model"))
    summary = trainer.run_summary()
    if trainer.is_world_process_zero():
        summary = write_summary(run, summary, result, started, staged)
        run.output.commit(keep_others=True)  # checkpoints, base_model and the run record carried over
    trainer.accelerator.wait_for_everyone()  # no process exits while another still writes or merges
    return summary


def write_summary(run: Run, summary: dict, result, started: float, staged: str) -> dict:
    """Main process only: complete the summary (steps, losses, folders), save the merged model when asked, write
    training_summary.json and print it. Files go into `staged`, the folder that becomes output_dir."""
    trainer = run.trainer
    output_dir = trainer.args.output_dir
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary.update({
        "steps": trainer.state.global_step, "wall_time_s": round(time.time() - started, 1),
        "first_logged_loss": losses[0] if losses else math.nan, "last_logged_loss": losses[-1] if losses else math.nan,
        "train_loss": result.training_loss,
    })
    if run.lora_args.training_mode == "full":
        summary["model_dir"] = os.path.abspath(output_dir)
    else:
        summary.update({"adapter_dir": os.path.abspath(output_dir), "base_model": run.base_model})
    if run.lora_args.save_merged_model:
        base = os.path.join(staged, "base_model")  # this run's random base weights, if it has them
        base = base if os.path.isdir(base) else run.base_model
        merged = load_trained(base, staged, run.model_args).merge_and_unload()
        merged.save_pretrained(os.path.join(staged, "merged"))
        run.processor.save_pretrained(os.path.join(staged, "merged"))
        summary["merged_dir"] = os.path.abspath(os.path.join(output_dir, "merged"))
    with open(os.path.join(staged, SUMMARY_FILE), "w") as handle:
        json.dump(summary, handle, indent=2)
    skipped = summary["skipped"]
    print(f"\nskipped samples: {skipped['total']} {skipped['by_reason']}", flush=True)
    for reason, examples in skipped["examples"].items():
        print(f"  {reason}: " + "; ".join(f"#{index} {detail}" for index, detail in examples), flush=True)
    print(f"steps: {summary['steps']}, logged loss {summary['first_logged_loss']:.4f} -> "
          f"{summary['last_logged_loss']:.4f}, {summary['wall_time_s']} s", flush=True)
    if "model_dir" in summary:
        print(f"model saved to {summary['model_dir']} (AutoModel-loadable)", flush=True)
    else:
        print(f"adapter saved to {summary['adapter_dir']} (base model: {summary['base_model']})", flush=True)
    if "merged_dir" in summary:
        print(f"merged model saved to {summary['merged_dir']}", flush=True)
    return summary


def main(argv=None) -> dict:
    """Check everything (a ValueError names the bad argument), train, save; returns the run summary (see
    `execute`)."""
    return execute(build_run(argv))


def command_line(argv=None) -> int:
    """The script: `main`, with a ValueError raised while the run is checked and built (a bad argument, config value
    or data set; before any training step) reported as one `error: ...` line on stderr and exit status 2. Errors
    during training keep their traceback."""
    try:
        run = build_run(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    execute(run, exit_after_gloo_run=True)
    return 0


def execute(run: Run, exit_after_gloo_run: bool = False) -> dict:
    """Train and save a built run; returns the run summary (also written to output_dir/training_summary.json).
    Ends training explicitly (trackers finished, process group destroyed) whatever happened. With
    exit_after_gloo_run (the script entry point), a multi-process CPU run then leaves through
    exit_without_interpreter_teardown while the trainer, and so DDP's reducer, is still alive."""
    try:
        summary = train_and_save(run)
    finally:
        run.trainer.accelerator.end_training()
        run.release()
    state = PartialState()  # the state TrainingArguments set up; still readable after destroy_process_group
    if exit_after_gloo_run and state.num_processes > 1 and state.backend == "gloo":
        exit_without_interpreter_teardown()
    return summary


def exit_without_interpreter_teardown() -> None:
    """Leave a multi-process CPU (gloo) run with os._exit(0) once every file is written and closed and the process
    group is destroyed. Freeing DDP's reducer (at the return of main or at interpreter teardown) makes its gloo
    process group join its worker threads while holding the GIL, and a worker that still has to free a finished
    collective's Python tensors waits for that GIL: a deadlock, or a SIGABRT ("terminate called without an active
    exception") once the interpreter is finalizing (pytorch/pytorch#190489). About one 2-process run in ten on 2
    busy cores hit it. NCCL runs exit normally."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(command_line())

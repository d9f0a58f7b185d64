"""Stage 0 of the reading recipe: pretrain a preset's vision tower alone on the synthetic generator, with dense
per-patch glyph labels (shirg_tools.glyph_pretraining), on transformers' Trainer as train.py (checkpoints, resume,
seeded data order, logging, evaluation on held-out images every --eval_steps).

    OMP_NUM_THREADS=1 python train_tower.py --output_dir runs/reader-tower --max_steps 4000 --stop_at_per_digit 0.975
    python train_tower.py --output_dir runs/reader-tower --max_steps 4000 --resume_from_checkpoint last
    python train.py --config configs/train_reader.yaml --model_name_or_path runs/reader-tower/model   # stage 1

The model is the preset's VLM built as train.py builds it (same seed, same tokenizer); only its vision tower and
the read-out heads train. Every checkpoint also writes the VLM, with the tower trained so far, to output_dir/model
(AutoModel-loadable, + processor) and the heads to output_dir/model/glyph_head.safetensors. The evaluation logs
eval_per_digit (each digit of the held-out images read from its patches), the heads' patch accuracies and wall_s.
"""

import dataclasses
import functools
import json
import os
import sys

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

import train
from lavida_shirg.configuration_lavida_shirg import PRESETS
from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from shirg_tools.glyph_pretraining import (
    HEADS,
    GlyphCurve,
    GlyphReadout,
    GlyphSamples,
    GlyphTrainer,
    check_targets,
    glyph_metrics,
)
from shirg_tools.synthetic_ocr import SYNTHETIC_TASKS, synthetic_task
from shirg_tools.training_curve import PANEL, draw_chart

MODEL_FOLDER = "model"
HEAD_FILE = "glyph_head.safetensors"
SUMMARY_FILE = "tower_summary.json"
CURVE_FILE = "tower_curve.png"


@dataclasses.dataclass
class TowerArguments:
    preset: str = dataclasses.field(default="reader", metadata={"help": f"The VLM preset {sorted(PRESETS)}."})
    model_name_or_path: str | None = dataclasses.field(default=None, metadata={
        "help": "Start from this VLM folder (e.g. an earlier stage 0's model/) instead of the preset."})
    synthetic_task: str = dataclasses.field(default="reading", metadata={
        "help": f"Generator settings {sorted(SYNTHETIC_TASKS)}, overridden by the options below."})
    synthetic_num_texts: int | None = None
    synthetic_font_min: int | None = None
    synthetic_font_max: int | None = None
    synthetic_seed: int = dataclasses.field(default=0, metadata={"help": "Seed of the training images."})
    synthetic_num_samples: int = dataclasses.field(default=400000, metadata={"help": "Training images per epoch."})
    heldout_seed: int = dataclasses.field(default=1, metadata={"help": "Seed of the held-out images."})
    heldout_samples: int = dataclasses.field(default=256, metadata={"help": "Held-out images per evaluation."})
    min_ink: int = dataclasses.field(default=2, metadata={"help": "Ink pixels that make a patch a glyph patch."})
    targets: str = dataclasses.field(default="glyph", metadata={
        "help": f"Comma-separated per-patch targets of {list(HEADS)} (glyph always)."})
    stop_at_per_digit: float | None = dataclasses.field(default=None, metadata={
        "help": "Stop (and save) at the first evaluation with eval_per_digit >= this."})


TRAINING_DEFAULTS = dict(
    output_dir="runs/reader-tower", learning_rate=1e-3, weight_decay=0.01, lr_scheduler_type="cosine",
    warmup_steps=100, max_steps=4000, per_device_train_batch_size=32, per_device_eval_batch_size=64,
    logging_steps=25, logging_first_step=True, eval_strategy="steps", eval_steps=250, save_steps=250,
    save_total_limit=3, report_to="none", remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
    label_names=["labels", "position_labels", "colour_labels", "char_ids", "char_digits"], seed=42,
)


class ExportCallback(TrainerCallback):
    """At every save: the VLM with the tower so far into output_dir/model (+ processor, + read-out heads)."""

    def __init__(self, vlm, processor, readout):
        self.vlm, self.processor, self.readout = vlm, processor, readout

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            export(self.vlm, self.processor, self.readout, args.output_dir, state.global_step)


class StopAtCallback(TrainerCallback):
    def __init__(self, level: float):
        self.level = level

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics is not None and metrics.get("eval_per_digit", 0.0) >= self.level:
            control.should_training_stop = True
            control.should_save = True


def export(vlm, processor, readout, output_dir: str, step: int) -> str:
    folder = os.path.join(output_dir, MODEL_FOLDER)
    vlm.save_pretrained(folder)
    processor.save_pretrained(folder)
    heads = {name: tensor for name, tensor in readout.state_dict().items() if not name.startswith("vision_tower.")}
    save_file({name: tensor.detach().contiguous() for name, tensor in heads.items()},
              os.path.join(folder, HEAD_FILE), metadata={"step": str(step)})
    return folder


def data_config(args: TowerArguments, seed: int):
    task = SYNTHETIC_TASKS[args.synthetic_task] if args.synthetic_task in SYNTHETIC_TASKS else None
    if task is None:
        raise ValueError(f"--synthetic_task must be one of {sorted(SYNTHETIC_TASKS)}, got {args.synthetic_task!r}")
    low, high = task.font_size_range
    return synthetic_task(
        args.synthetic_task, seed=seed,
        num_texts=task.num_texts if args.synthetic_num_texts is None else args.synthetic_num_texts,
        font_size_range=(low if args.synthetic_font_min is None else args.synthetic_font_min,
                         high if args.synthetic_font_max is None else args.synthetic_font_max))


def build_trainer(argv=None):
    """(trainer, resume checkpoint or None, tower arguments); every argument checked before any step."""
    parser = HfArgumentParser((TowerArguments, TrainingArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if args.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {args.preset!r}")
    if args.synthetic_seed == args.heldout_seed:
        raise ValueError("--heldout_seed must differ from --synthetic_seed (held-out images)")
    source = {"model_name_or_path": args.model_name_or_path} if args.model_name_or_path else {"preset": args.preset}
    vlm, tokenizer, _ = train.load_model(train.ModelArguments(**source), training_args.seed)
    vlm = vlm.float()
    if args.model_name_or_path:
        set_seed(training_args.seed)  # the heads' initialisation
    processor = LavidaShirgProcessor.from_config(vlm.config, tokenizer)
    targets = check_targets([name.strip() for name in args.targets.split(",") if name.strip()])
    readout = GlyphReadout(vlm.model.vision_tower, targets)  # its initialisation follows the seeded VLM's
    if args.model_name_or_path and os.path.isfile(os.path.join(args.model_name_or_path, HEAD_FILE)):
        # an earlier stage 0's heads; a head it did not have starts fresh
        missing, unexpected = readout.load_state_dict(load_file(os.path.join(args.model_name_or_path, HEAD_FILE)),
                                                      strict=False)
        if unexpected or any(not name.startswith("heads.") for name in missing if not name.startswith("vision_tower.")):
            raise ValueError(f"--model_name_or_path {args.model_name_or_path}: {HEAD_FILE} does not fit the read-out "
                             f"(unexpected {unexpected})")
    hires, patch = vlm.config.hires_image_size, vlm.config.vision_config.patch_size

    def samples(seed, count):
        return GlyphSamples(data_config(args, seed), count, processor.image_processor, hires, patch, args.min_ink)

    resume = training_args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            raise ValueError(f"--resume_from_checkpoint last: {training_args.output_dir} holds no checkpoint")
    callbacks = [ExportCallback(vlm, processor, readout)]
    if args.stop_at_per_digit is not None:
        callbacks.append(StopAtCallback(args.stop_at_per_digit))
    trainer = GlyphTrainer(model=readout, args=training_args,
                           train_dataset=samples(args.synthetic_seed, args.synthetic_num_samples),
                           eval_dataset=samples(args.heldout_seed, args.heldout_samples),
                           compute_metrics=functools.partial(glyph_metrics, targets=targets), callbacks=callbacks)
    trainer.tower_export = (vlm, processor, readout)
    return trainer, resume, args


def curve_image(history: list) -> Image.Image:
    """Training loss (left) and held-out accuracies (right: per digit, glyph / position / colour patches) against
    the optimizer step."""
    loss = [[entry["step"], entry["loss"]] for entry in history if "loss" in entry]
    evaluations = [entry for entry in history if "eval_per_digit" in entry]
    accuracy = {name: [[entry["step"], 100 * entry[f"eval_{key}"]] for entry in evaluations]
                for name, key in (("per digit", "per_digit"), ("glyph patches", "glyph_patch_accuracy"),
                                  ("position", "position_accuracy"), ("colour", "colour_accuracy"))
                if evaluations and f"eval_{key}" in evaluations[0]}
    sheet = Image.new("RGB", (2 * PANEL[0], PANEL[1]), "white")
    sheet.paste(draw_chart("stage 0: loss (training)", {"loss": loss}), (0, 0))
    sheet.paste(draw_chart("stage 0: held-out accuracy (%)", accuracy, (0, 100)), (PANEL[0], 0))
    return sheet


def main(argv=None) -> dict:
    trainer, resume, args = build_trainer(argv)
    parameters = sum(p.numel() for p in trainer.model.parameters())
    print(f"stage 0: {args.preset} tower + read-out heads, {parameters} trainable parameters", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    metrics = trainer.evaluate()
    output_dir = trainer.args.output_dir
    folder = export(*trainer.tower_export, output_dir, trainer.state.global_step)
    curve = GlyphCurve.from_log_history(trainer.state.log_history)
    reached = curve.first_reaching(0.9)
    summary = {"steps": trainer.state.global_step, "final": metrics, "model_dir": os.path.abspath(folder),
               "per_digit_0.9_at": None if reached is None else {"step": reached[0], "wall_s": reached[1]},
               "curve": dataclasses.asdict(curve), "arguments": dataclasses.asdict(args)}
    with open(os.path.join(output_dir, SUMMARY_FILE), "w") as handle:
        json.dump(summary, handle, indent=1)
    curve_image(trainer.state.log_history).save(os.path.join(output_dir, CURVE_FILE))
    print(f"per-digit {metrics['eval_per_digit']:.3f} at step {summary['steps']}; 0.9 reached at "
          f"{summary['per_digit_0.9_at']}; tower in {folder}", flush=True)
    return summary


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        main()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

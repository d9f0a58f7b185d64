"""Training throughput of pooled LaViDa tokens vs SHIRG-768, through train.py's own trainer, in one run.

Small config with the real image geometry (SigLIP at 384px / patch 14 for LaViDa's anyres views, 672px / 2304
tokens for SHIRG's high-resolution view, pooled views of 14x14) but narrow, 2-layer vision and LM, on 672x672
synthetic OCR images. Each variant trains the same LoRA set-up for --warmup + --steps optimizer steps; the rate
counts the last --steps (data loading included, as in training). Prints samples per second and their ratio.

    python benchmarks/bench_train.py                 # CPU or the first GPU
    python benchmarks/bench_train.py --steps 20 --batch-size 8
"""

import argparse
import json
import os
import runpy
import tempfile
import time

import torch
from transformers import TrainerCallback

# train.py is a script beside this folder, not a package module: its functions, loaded from the file
build_run = runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py"))[
    "build_run"]

SMALL_CONFIG = {
    "vision_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          image_size=384, patch_size=14, num_channels=3, layer_norm_eps=1e-6,
                          hidden_act="gelu_pytorch_tanh", vision_use_head=False),
    "text_config": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
    "pooled_view_size": 14, "hires_image_size": 672, "budget_choices": [512, 768, 1024], "selection_budget": 768,
    "x_scaffold_size": 8, "visionzip_contextual_tokens": 16,
}


class StepClock(TrainerCallback):
    """perf_counter() at the end of every optimizer step."""

    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def samples_per_second(budget: str, options, folder: str) -> tuple:
    """(samples per second over the last options.steps steps, image tokens per sample) of one budget entry."""
    argv = ["--config_overrides", json.dumps(SMALL_CONFIG), "--budgets", budget, "--modules_to_save", "none",
            "--synthetic_num_samples", str(options.batch_size * (options.warmup + options.steps)),
            "--per_device_train_batch_size", str(options.batch_size), "--max_steps",
            str(options.warmup + options.steps), "--output_dir", folder, "--save_strategy", "no",
            "--logging_steps", "1000", "--logging_first_step", "false", "--disable_tqdm", "true",
            "--dataloader_num_workers", "0", "--seed", "0"]
    if torch.cuda.is_available():
        argv.append("--bf16")
    run = build_run(argv)
    clock = StepClock()
    run.trainer.add_callback(clock)
    run.trainer.train()
    elapsed = clock.times[-1] - clock.times[options.warmup - 1]
    entry = run.trainer.schedule.entries[0]
    tokens = run.processor.image_token_count((672, 672), entry.method, entry.budget, entry.options)
    return options.steps * options.batch_size / elapsed, tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=4)
    options = parser.parse_args()
    if options.steps < 1 or options.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for label, budget in (("pooled", "pooled"), ("shirg-fixed-768", "768")):
            results[label] = samples_per_second(budget, options, os.path.join(folder, label))
    print(f"\ntraining throughput, small config, 672x672 images, batch {options.batch_size}, {device}:")
    for label, (rate, tokens) in results.items():
        print(f"  {label:16s} {rate:8.2f} samples/s   ({tokens} image tokens per sample)")
    print(f"  ratio shirg-fixed-768 / pooled: {results['shirg-fixed-768'][0] / results['pooled'][0]:.2f}x")


if __name__ == "__main__":
    main()

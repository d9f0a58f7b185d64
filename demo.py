"""The main job, offline: evaluate the shipped reading model (reader_model/) with every variant on held-out samples
of the synthetic reading task, draw the overlays, build a Hub folder.

    python demo.py                  # the shipped model: about 5 minutes on 2 CPU cores
    python demo.py --retrain        # first train the reader from scratch (configs/train_reader.yaml, about 1 hour)

Steps (each is the project's own command, run as written below, so the demo exercises the real CLIs):
  1. (--retrain only) train.py --config configs/train_reader.yaml: the "reader" preset, every parameter, mixed
     budgets 32/64/85/pooled, on the synthetic reading task (64 px canvases, two coloured boxes of 3-digit numbers);
  2. eval.py: pooled, full, SHIRG-Fixed/v2/X, the baselines and the score-term ablations on held-out samples of the
     reading task: exact match, image tokens, answer-region recall, latency, overlays;
  3. publish.py: a Hub-ready folder with the model card and the results table.
What it shows: pooled LaViDa (16 px tokens) cannot resolve digits 8-9 px tall; the full 4 px view can, and SHIRG at a
third of its tokens keeps what the answer needs (README "The reading demo" has the numbers this run prints).
"""

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
SHIPPED_MODEL = os.path.join(ROOT, "reader_model")
TRAIN_CONFIG = os.path.join("configs", "train_reader.yaml")
# default_variants for 256 tokens, plus the seed's planned ablation at the 1/3 budget (85 of 256 tokens):
# SHIRG-Fixed with relevance only / detail only / the seed's variance term; v2 without its edge term
VARIANTS = ("pooled,full,shirg-fixed@32,shirg-fixed@57,shirg-fixed@85,shirg-fixed@114,"
            "shirg-fixed@85:relevance=1:variance=0,shirg-fixed@85:relevance=0:variance=1,"
            "shirg-fixed@85:detail=variance,shirg-v2@85,shirg-v2@85:beta=0,shirg-x@85,"
            "random@85,visionzip@85,divprune@85")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/demo", help="folder for the steps' outputs")
    parser.add_argument("--retrain", action="store_true",
                        help=f"train the reader from scratch with {TRAIN_CONFIG} and evaluate that model instead")
    parser.add_argument("--train-steps", type=int, default=None, help="with --retrain: override max_steps")
    parser.add_argument("--eval-limit", type=int, default=200, help="held-out samples evaluated per variant")
    parser.add_argument("--variants", default=VARIANTS, help="eval.py --variants")
    return parser.parse_args(argv)


def run(step, command):
    """Run one step, streaming its output; stop the demo with its exit code if it fails."""
    print(f"\n=== {step}: {' '.join(command)}", flush=True)
    done = subprocess.run([sys.executable, *command], cwd=ROOT)
    if done.returncode:
        sys.exit(f"{step} failed with exit code {done.returncode}")


def main(argv=None):
    args = parse_args(argv)
    if args.train_steps is not None and not args.retrain:
        sys.exit("error: --train-steps only applies with --retrain")
    model = SHIPPED_MODEL
    if args.retrain:
        model = os.path.join(args.output, "train")
        train = ["train.py", "--config", TRAIN_CONFIG, "--output_dir", model]
        if args.train_steps is not None:
            train += ["--max_steps", str(args.train_steps)]
        run("train", train)
    elif not os.path.isfile(os.path.join(model, "model.safetensors")):
        sys.exit(f"error: the shipped model {model} is missing; run `python demo.py --retrain` to train it")
    eval_dir = os.path.join(args.output, "eval")
    hub_dir = os.path.join(args.output, "hub-folder")
    run("evaluate", ["eval.py", "--model", model, "--synthetic", "task=reading", "--limit", str(args.eval_limit),
                     "--variants", args.variants, "--output-dir", eval_dir])
    run("publish", ["publish.py", "--model", model, hub_dir, "--results", os.path.join(eval_dir, "summary.md"),
                    "--overwrite"])
    print(f"\nresults table: {os.path.join(eval_dir, 'summary.md')}\noverlays: {os.path.join(eval_dir, 'overlays')}"
          f"\nmodel card folder: {hub_dir}")


if __name__ == "__main__":
    main()

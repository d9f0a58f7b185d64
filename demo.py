"""The main job, offline: train the "reader" preset on the synthetic reading task, evaluate every variant on held-out
samples of that task, draw the overlays, build a Hub folder.

    python demo.py                          # 300 training steps, then eval and publish: about 8 minutes on 2 cores
    python demo.py --model FOLDER           # evaluate a trained model folder instead of training one
    python demo.py --train-steps 6000       # the whole recipe of configs/train_reader.yaml (about 1 hour)

Steps (each is the project's own command, run as written below, so the demo exercises the real CLIs):
  1. train.py --config configs/train_reader.yaml: the "reader" preset (4 px high-resolution patches, 16 px pooled
     tokens), every parameter (--training_mode full), budgets 64/85/256/pooled, on the reading task (64 px canvases,
     two coloured boxes of 3-digit numbers 8-9 px tall);
  2. eval.py: pooled, full, SHIRG-Fixed/v2/X, the baselines and the score-term ablations on held-out samples:
     exact match, image tokens, answer-region recall, latency, overlays;
  3. publish.py: a Hub-ready folder with the model card and the results table.
What it shows: which high-resolution patches each variant keeps (answer-region recall, overlays) on text that pooled
tokens cannot resolve. What it cannot show: accuracy. No model of this size learned to read the digits within the
CPU budgets measured (README "The reading demo"); its exact-match column is labelled.
"""

import argparse
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
TRAIN_CONFIG = os.path.join("configs", "train_reader.yaml")
# default_variants for 256 tokens, plus the seed's planned ablation at the 1/3 budget (85 of 256 tokens):
# SHIRG-Fixed with relevance only / detail only / the seed's variance term; v2 without its edge term
VARIANTS = ("pooled,full,shirg-fixed@32,shirg-fixed@57,shirg-fixed@85,shirg-fixed@114,"
            "shirg-fixed@85:relevance_weight=1:detail_weight=0,shirg-fixed@85:relevance_weight=0:detail_weight=1,"
            "shirg-fixed@85:detail_term=variance,shirg-v2@85,shirg-v2@85:v2_edge_weight=0,shirg-x@85,"
            "random@85,visionzip@85,divprune@85")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/demo", help="folder for the steps' outputs")
    parser.add_argument("--model", help="evaluate this model folder instead of training one")
    parser.add_argument("--train-steps", type=int, default=300, help=f"max_steps of {TRAIN_CONFIG}'s run")
    parser.add_argument("--eval-limit", type=int, default=48, help="held-out samples evaluated per variant")
    parser.add_argument("--variants", default=VARIANTS, help="eval.py --variants")
    return parser.parse_args(argv)


def check_args(args):
    """Exit with one `error:` line for arguments that cannot work (before any step runs)."""
    if args.train_steps < 1 or args.eval_limit < 1:
        sys.exit("error: --train-steps and --eval-limit must be positive integers")
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        sys.exit(f"error: --model {args.model} is not a model folder (no config.json)")


def run(step, command):
    """Run one step, streaming its output; stop the demo with its exit code if it fails."""
    print(f"\n=== {step}: {' '.join(command)}", flush=True)
    done = subprocess.run([sys.executable, *command], cwd=ROOT)
    if done.returncode:
        sys.exit(f"{step} failed with exit code {done.returncode}")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    model = args.model
    eval_dir = os.path.join(args.output, "eval")
    hub_dir = os.path.join(args.output, "hub-folder")
    # eval.py resumes a folder by (variant, sample): results of an earlier model there would be reported as this one's
    stale = {eval_dir: "run_config.json"}
    if model is None:
        stale[os.path.join(args.output, "train")] = "shirg_run.json"
    for folder, marker in stale.items():
        if os.path.exists(folder) and os.listdir(folder):
            if not os.path.isfile(os.path.join(folder, marker)):
                sys.exit(f"error: {folder} holds files that are not a previous demo's output (no {marker}); choose "
                         "another --output")
            print(f"removing the previous demo output {folder}", flush=True)
            shutil.rmtree(folder)
    if model is None:
        model = os.path.join(args.output, "train")
        # a short run saves once, at its end; checkpoints every 250 steps otherwise
        run("train", ["train.py", "--config", TRAIN_CONFIG, "--output_dir", model, "--max_steps", str(args.train_steps),
                      "--save_steps", str(min(250, args.train_steps))])
    run("evaluate", ["eval.py", "--model", model, "--synthetic", "task=reading", "--limit", str(args.eval_limit),
                     "--variants", args.variants, "--batch-size", "16", "--output-dir", eval_dir])
    run("publish", ["publish.py", "--model", model, hub_dir, "--results", os.path.join(eval_dir, "summary.md"),
                    "--overwrite"])
    print(f"\nresults table: {os.path.join(eval_dir, 'summary.md')}\noverlays: {os.path.join(eval_dir, 'overlays')}"
          f"\nmodel card folder: {hub_dir}\nweb page: python app.py --model {model}")


if __name__ == "__main__":
    main()

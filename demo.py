"""The main job on the embedded default, offline: train, evaluate every variant, draw overlays, build a Hub folder.

    python demo.py                 # tiny preset + synthetic OCR data, about 5 minutes on 2 CPU cores
    python demo.py --output runs/demo --train-steps 200

Steps (each is the project's own command, run as written below, so the demo exercises the real CLIs):
  1. train.py: mixed-budget LoRA training of the tiny preset on the synthetic OCR set, merged model saved;
  2. eval.py: every selection variant of that model on held-out synthetic samples: table, predictions, overlays;
  3. publish.py: a Hub-ready folder with the model card and the results table.
What it shows: the pipeline end to end and which patches each variant keeps (answer-region recall, overlays).
What it cannot show: accuracy. A tiny model trained for minutes does not learn to read; its scores are not evidence.
"""

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/demo", help="folder for the three steps' outputs")
    parser.add_argument("--train-steps", type=int, default=None, help="override train.py's default max_steps")
    parser.add_argument("--eval-limit", type=int, default=16, help="synthetic samples evaluated per variant")
    return parser.parse_args()


def run(step, command):
    """Run one step, streaming its output; stop the demo with its exit code if it fails."""
    print(f"\n=== {step}: {' '.join(command)}", flush=True)
    done = subprocess.run([sys.executable, *command], cwd=ROOT)
    if done.returncode:
        sys.exit(f"{step} failed with exit code {done.returncode}")


def main():
    args = parse_args()
    train_dir = os.path.join(args.output, "train")
    eval_dir = os.path.join(args.output, "eval")
    hub_dir = os.path.join(args.output, "hub-folder")
    train = ["train.py", "--output_dir", train_dir, "--save_merged_model"]
    if args.train_steps is not None:
        train += ["--max_steps", str(args.train_steps)]
    run("train", train)
    merged = os.path.join(train_dir, "merged")
    run("evaluate", ["eval.py", "--model", merged, "--output-dir", eval_dir, "--limit", str(args.eval_limit)])
    run("publish", ["publish.py", "--model", merged, hub_dir, "--results", os.path.join(eval_dir, "summary.md"),
                    "--overwrite"])
    print(f"\nresults table: {os.path.join(eval_dir, 'summary.md')}\noverlays: {os.path.join(eval_dir, 'overlays')}"
          f"\nmodel card folder: {hub_dir}")


if __name__ == "__main__":
    main()

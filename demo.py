"""The main job, offline: evaluate the shipped reading model (reader_model/) on held-out samples of the synthetic
reading task, every variant side by side, draw the overlays, build a Hub folder; or retrain it from scratch.

    python demo.py                          # evaluate reader_model/ (15 variants, 200 held-out samples) and publish
    python demo.py --model FOLDER           # evaluate another model folder instead
    python demo.py --retrain                # stage 0 + stage 1 as reader_model/ was trained, then evaluate

Steps (each is the project's own command, run as written below, so the demo exercises the real CLIs):
  0. (--retrain) train_tower.py: the "reader" preset's vision tower alone learns glyphs from dense per-patch labels
     on the synthetic reading task (stage 0);
  1. (--retrain) train.py --config configs/train_reader.yaml --model_name_or_path <stage 0>/model: the reader VLM
     from that tower, every parameter, budgets 64/85/256/pooled (stage 1, LaViDa's stage);
  2. eval.py: pooled, full, SHIRG-Fixed/v2/X, the baselines and the score-term ablations on held-out samples:
     exact match, image tokens, answer-region recall, latency, overlays;
  3. publish.py: a Hub-ready folder with the model card and the results table.
"""

import argparse
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
SHIPPED_MODEL = "reader_model"
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
    parser.add_argument("--model", help=f"evaluate this model folder (default: {SHIPPED_MODEL}/)")
    parser.add_argument("--retrain", action="store_true", help="train stage 0 and stage 1, then evaluate that model")
    parser.add_argument("--tower-steps", type=int, default=4000, help="stage 0: train_tower.py --max_steps")
    parser.add_argument("--tower-stop-at", type=float, default=0.975,
                        help="stage 0 stops at this held-out per-digit accuracy")
    parser.add_argument("--train-steps", type=int, default=None, help=f"stage 1: max_steps (default: {TRAIN_CONFIG}'s)")
    parser.add_argument("--eval-limit", type=int, default=200, help="held-out samples evaluated per variant")
    parser.add_argument("--variants", default=VARIANTS, help="eval.py --variants")
    return parser.parse_args(argv)


def check_args(args):
    """Exit with one `error:` line for arguments that cannot work (before any step runs)."""
    steps = [args.tower_steps, args.eval_limit] + ([] if args.train_steps is None else [args.train_steps])
    if min(steps) < 1:
        sys.exit("error: --tower-steps, --train-steps and --eval-limit must be positive integers")
    if not 0 < args.tower_stop_at <= 1:
        sys.exit(f"error: --tower-stop-at must be in (0, 1], got {args.tower_stop_at}")
    if args.retrain and args.model is not None:
        sys.exit("error: --retrain trains the model it evaluates: leave out --model")
    if not args.retrain:
        model = args.model or os.path.join(ROOT, SHIPPED_MODEL)
        if not os.path.isfile(os.path.join(model, "config.json")):
            hint = "" if args.model else " (pass --model FOLDER, or --retrain to train one)"
            sys.exit(f"error: --model {model} is not a model folder (no config.json){hint}")


def run(step, command):
    """Run one step, streaming its output; stop the demo with its exit code if it fails."""
    print(f"\n=== {step}: {' '.join(command)}", flush=True)
    done = subprocess.run([sys.executable, *command], cwd=ROOT)
    if done.returncode:
        sys.exit(f"{step} failed with exit code {done.returncode}")


def remove_stale(folders: dict):
    """Remove earlier demo outputs (eval.py and the trainers would resume from them), never a folder without its
    marker file (not a demo's output: exit with an error instead)."""
    for folder, marker in folders.items():
        if os.path.exists(folder) and os.listdir(folder):
            if not os.path.exists(os.path.join(folder, marker)):
                sys.exit(f"error: {folder} holds files that are not a previous demo's output (no {marker}); choose "
                         "another --output")
            print(f"removing the previous demo output {folder}", flush=True)
            shutil.rmtree(folder)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    eval_dir = os.path.join(args.output, "eval")
    hub_dir = os.path.join(args.output, "hub-folder")
    tower_dir, train_dir = os.path.join(args.output, "tower"), os.path.join(args.output, "train")
    stale = {eval_dir: "run_config.json"}
    if args.retrain:
        stale.update({tower_dir: "model", train_dir: "shirg_run.json"})
    remove_stale(stale)
    model = args.model or SHIPPED_MODEL
    if args.retrain:
        run("stage 0", ["train_tower.py", "--output_dir", tower_dir, "--max_steps", str(args.tower_steps),
                        "--stop_at_per_digit", str(args.tower_stop_at)])
        steps = [] if args.train_steps is None else ["--max_steps", str(args.train_steps)]
        run("stage 1", ["train.py", "--config", TRAIN_CONFIG, "--model_name_or_path", os.path.join(tower_dir, "model"),
                        "--output_dir", train_dir, *steps])
        model = train_dir
    run("evaluate", ["eval.py", "--model", model, "--synthetic", "task=reading", "--limit", str(args.eval_limit),
                     "--variants", args.variants, "--batch-size", "16", "--output-dir", eval_dir])
    run("publish", ["publish.py", "--model", model, hub_dir, "--results", os.path.join(eval_dir, "summary.md"),
                    "--overwrite"])
    print(f"\nresults table: {os.path.join(eval_dir, 'summary.md')}\noverlays: {os.path.join(eval_dir, 'overlays')}"
          f"\nmodel card folder: {hub_dir}\nweb page: python app.py --model {model}")


if __name__ == "__main__":
    main()

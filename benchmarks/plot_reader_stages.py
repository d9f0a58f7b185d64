"""The reading recipe's curves in one PNG: stage 0 (train_tower.py: held-out per-digit and glyph-patch accuracy)
and stage 1 runs (train.py: training loss from step 100 on), from their trainer_state.json files.

    python benchmarks/plot_reader_stages.py --tower runs/reader-tower/checkpoint-1250 \\
        --stage1 "2 boxes, batch 8=runs/reader-train/checkpoint-500" --output docs/reading-stages.png
"""

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from shirg_tools.training_curve import PANEL, draw_chart


def log_history(folder: str) -> list:
    path = Path(folder) / "trainer_state.json"
    if not path.is_file():
        sys.exit(f"error: {folder} holds no trainer_state.json")
    return json.loads(path.read_text())["log_history"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tower", required=True, help="a train_tower.py output or checkpoint folder")
    parser.add_argument("--stage1", action="append", default=[], metavar="LABEL=FOLDER",
                        help="a train.py output or checkpoint folder, with its legend label")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    evaluations = [entry for entry in log_history(args.tower) if "eval_per_digit" in entry]
    tower = {"per digit": [[e["step"], 100 * e["eval_per_digit"]] for e in evaluations],
             "glyph patches": [[e["step"], 100 * e["eval_glyph_patch_accuracy"]] for e in evaluations]}
    losses = {}
    for item in args.stage1:
        label, _, folder = item.partition("=")
        if not folder:
            sys.exit(f"error: --stage1 {item!r} must be LABEL=FOLDER")
        losses[label] = [[e["step"], e["loss"]] for e in log_history(folder) if "loss" in e and e["step"] >= 100]
    sheet = Image.new("RGB", (2 * PANEL[0], PANEL[1]), "white")
    sheet.paste(draw_chart("stage 0: tower alone, held-out accuracy (%)", tower, (0, 100)), (0, 0))
    sheet.paste(draw_chart("stage 1: VLM training loss (from step 100)", losses, (0.40, 0.60)), (PANEL[0], 0))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

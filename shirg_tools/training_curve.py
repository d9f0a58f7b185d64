"""Training curves of a train.py run: the logged loss per budget and the held-out exact-match accuracy of its
checkpoints per variant (eval.py on each checkpoint), drawn with PIL into one PNG and written as JSON.

    python -m shirg_tools.training_curve runs/reader-train --output reader_model/training_curve.png \\
        --variants pooled,full,shirg-fixed@85 --limit 64 --synthetic task=reading

The checkpoints' evaluations are kept under <run>/curve-eval/checkpoint-N (eval.py output folders), so a second
call only evaluates checkpoints it has not seen.
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
PANEL = (520, 340)  # width, height of one chart
MARGIN = (56, 30, 16, 44)  # left, top, right, bottom


def checkpoints(run_dir: Path) -> list:
    """[(step, folder)] of the run's checkpoint-N folders, by step."""
    found = [(int(match.group(1)), path) for path in run_dir.iterdir()
             if path.is_dir() and (match := CHECKPOINT.match(path.name))]
    return sorted(found)


def loss_curves(run_dir: Path) -> dict:
    """{budget label: [[step, loss], ...]} from the `loss_<budget>` entries of the latest trainer_state.json (the
    run folder's own when training finished, else the last checkpoint's)."""
    latest_first = [folder / "trainer_state.json" for _, folder in checkpoints(run_dir)[::-1]]
    states = [run_dir / "trainer_state.json", *latest_first]
    state = next((path for path in states if path.is_file()), None)
    if state is None:
        raise ValueError(f"{run_dir} holds no trainer_state.json (not a train.py output folder)")
    curves = {}
    for entry in json.loads(state.read_text())["log_history"]:
        for key, value in entry.items():
            if key.startswith("loss_"):
                curves.setdefault(key[len("loss_"):], []).append([entry["step"], value])
    return curves


def evaluate_checkpoint(folder: Path, output: Path, variants: str, limit: int, synthetic: list) -> dict:
    """{variant: exact-match %} of eval.py on checkpoint `folder` (its summary reused when already written)."""
    summary_path = output / "summary.json"
    if not summary_path.is_file():
        command = [sys.executable, str(ROOT / "eval.py"), "--model", str(folder), "--variants", variants,
                   "--limit", str(limit), "--output-dir", str(output), "--overlays", "0", "--no-diagnostics"]
        for option in synthetic:
            command += ["--synthetic", option]
        subprocess.run(command, check=True, cwd=ROOT)
    rows = json.loads(summary_path.read_text())["tasks"]["synthetic-ocr"]["variants"]
    return {label: row["exact_match"] for label, row in rows.items()}


def _font(size: int):
    return ImageFont.load_default(size=size)


def draw_chart(title: str, series: dict, y_range=None) -> Image.Image:
    """A line chart of {name: [[x, y], ...]} with axes, ticks and a legend, on white."""
    width, height = PANEL
    left, top, right, bottom = MARGIN
    image = Image.new("RGB", PANEL, "white")
    draw = ImageDraw.Draw(image)
    points = [point for values in series.values() for point in values]
    x_max = max(x for x, _ in points) if points else 1
    y_low, y_high = y_range or (min(y for _, y in points), max(y for _, y in points))
    y_high = y_high if y_high > y_low else y_low + 1

    def place(x, y):
        return (left + (width - left - right) * x / x_max,
                height - bottom - (height - top - bottom) * (y - y_low) / (y_high - y_low))

    draw.rectangle((left, top, width - right, height - bottom), outline=(0, 0, 0))
    for fraction in (0, 0.25, 0.5, 0.75, 1):
        y = y_low + fraction * (y_high - y_low)
        _, pixel_y = place(0, y)
        draw.line((left - 4, pixel_y, left, pixel_y), fill=(0, 0, 0))
        draw.text((4, pixel_y - 6), f"{y:.2f}" if y_high - y_low < 10 else f"{y:.0f}", fill=(0, 0, 0), font=_font(11))
        x = fraction * x_max
        pixel_x, _ = place(x, y_low)
        draw.line((pixel_x, height - bottom, pixel_x, height - bottom + 4), fill=(0, 0, 0))
        draw.text((pixel_x - 12, height - bottom + 6), f"{x:.0f}", fill=(0, 0, 0), font=_font(11))
    draw.text((left, 8), title, fill=(0, 0, 0), font=_font(14))
    draw.text((width // 2 - 30, height - 18), "optimizer step", fill=(0, 0, 0), font=_font(11))
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        pixels = [place(x, min(max(y, y_low), y_high)) for x, y in values]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for x, y in pixels:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        legend_y = top + 6 + 15 * index
        legend_x = width - right - 40 - int(draw.textlength(name, font=_font(12)))
        draw.line((legend_x, legend_y + 6, legend_x + 18, legend_y + 6), fill=colour, width=3)
        draw.text((legend_x + 24, legend_y), name, fill=(0, 0, 0), font=_font(12))
    return image


def curve_image(losses: dict, accuracy: dict) -> Image.Image:
    """Loss per budget (left) and held-out exact match per variant (right), side by side."""
    left = draw_chart("training loss per budget (window means)", {f"loss {k}": v for k, v in losses.items()})
    right = draw_chart("held-out exact match (%)", accuracy, (0, 100))
    sheet = Image.new("RGB", (2 * PANEL[0], PANEL[1]), "white")
    sheet.paste(left, (0, 0))
    sheet.paste(right, (PANEL[0], 0))
    return sheet


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a train.py --output_dir with checkpoint-N folders")
    parser.add_argument("--output", type=Path, required=True, help="the PNG to write (and its .json beside it)")
    parser.add_argument("--variants", default="pooled,full,shirg-fixed@85", help="eval.py --variants")
    parser.add_argument("--limit", type=int, default=64, help="held-out samples per checkpoint and variant")
    parser.add_argument("--synthetic", action="append", default=[], metavar="FIELD=VALUE",
                        help="eval.py --synthetic options (e.g. task=reading)")
    parser.add_argument("--every", type=int, default=1, help="evaluate every N-th checkpoint (the last always)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.run_dir.is_dir():
        sys.exit(f"error: run_dir {args.run_dir} is not a folder")
    found = checkpoints(args.run_dir)
    if not found:
        sys.exit(f"error: run_dir {args.run_dir} holds no checkpoint-N folder")
    chosen = found[::-args.every][::-1] if args.every > 1 else found
    accuracy = {}
    for step, folder in chosen:
        scores = evaluate_checkpoint(folder, args.run_dir / "curve-eval" / folder.name, args.variants, args.limit,
                                     args.synthetic)
        for label, value in scores.items():
            accuracy.setdefault(label, []).append([step, value])
        print(f"step {step}: " + ", ".join(f"{label} {value:.1f}" for label, value in scores.items()), flush=True)
    losses = loss_curves(args.run_dir)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    curve_image(losses, accuracy).save(args.output)
    data = {"run_dir": str(args.run_dir), "variants": args.variants, "limit": args.limit,
            "synthetic": args.synthetic, "loss": losses, "exact_match": accuracy}
    args.output.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print(f"wrote {args.output} and {args.output.with_suffix('.json')}")


if __name__ == "__main__":
    main()

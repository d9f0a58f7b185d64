"""Selection quality: do SHIRG's score terms and every selection method keep the high-resolution tokens with text?

For one model (a model folder via --model, or by default the tiny preset with random weights) and two image sets
(--sets), prints one markdown table per set and a side-by-side summary:
* synthetic: synthetic OCR images rendered at the model's own geometry (canvas = its high-resolution view, so one
  token = one patch of the image);
* photo: photographs (shirg_tools/photo_text.py): scikit-image's photos with pasted text strips (on signs and
  straight on the photo, light and dark, 1.5-3 patches tall; ground truth: the ink), and two photos with real text
  (a printed page, handwriting; ground truth: hand-drawn boxes).
Per row:
* AUC: probability that a text token scores above a background token (ties 1/2), mean over the images, of the
  scores the row ranks by (none for DivPrune, which has no per-token score);
* recall@K: fraction of the text tokens the row's selection keeps at budget K, mean over the images;
* answer@K: the same for the text tokens of the text that answers the image's question (what relevance aims at).
Text token = a token whose patch holds ink of the rendered text (the generator's ink mask: the same glyphs drawn
on a separate mask; a hand-drawn box for the real-text photos; see shirg_tools/selection_quality.py). Rows:
* term: one score term alone, as plain top-K (shirg-fixed with the other weight 0 and region size 1, so no
  coverage): each SHIRG detail term (DETAIL_TERMS: the seed's token variance, variance after removing the view's
  mean token, the spatial edge density of the features, the luminance contrast of the patch's pixels), question
  relevance, and the projected token norm (top-norm);
* method: shirg-fixed, shirg-v2 and shirg-x with the seed's formula, with each detail term (the model's other
  settings; "[model default]" marks the model's own detail term) and their ablations; the baselines random,
  top-norm, VisionZip and DivPrune.
Every row runs the model's own selection path (`inspect_selection`, the processor's inputs); extra rows with
--variants (eval.py's variant syntax, without @BUDGET). Deterministic (seeded data, seeded random baseline).

    python benchmarks/bench_selection_quality.py                        # tiny preset, random weights (seconds)
    OMP_NUM_THREADS=1 python benchmarks/train_probe_tower.py --output runs/probe-tower
    python benchmarks/bench_selection_quality.py --model runs/probe-tower --images 24 --threads 1
    python benchmarks/bench_selection_quality.py --model ./lavida-shirg-llada --device cuda --font-min 10 --font-max 16
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from lavida_shirg import ShirgConfig
from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion
from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from lavida_shirg.shirg_selection import DETAIL_TERMS
from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer
from shirg_tools.diagnostics import cell_boxes, kept_masks, source_views
from shirg_tools.photo_text import photo_set
from shirg_tools.selection_quality import (ink_token_mask, kept_recall, nan_mean, quality_table,
                                           ranking_auc)
from shirg_tools.synthetic_ocr import SYNTHETIC_OCR_PROMPT_SUFFIX, SyntheticOCRConfig, generate_sample
from shirg_tools.variants import parse_variant

SEED_OPTIONS = {"shirg-fixed": "relevance_weight=0.7:detail_weight=0.3:detail_term=variance",
                "shirg-v2": "v2_detail_weight=0.25:v2_edge_weight=0.15:detail_term=variance",
                "shirg-x": "relevance_weight=0.7:detail_weight=0.3:detail_term=variance"}
ABLATIONS = {"shirg-fixed": [("relevance only", "detail_weight=0"), ("detail only", "relevance_weight=0"),
                             ("no coverage (region 1)", "coverage_region_size=1")],
             "shirg-v2": [("no relevance (v2_detail_weight 1)", "v2_detail_weight=1"),
                          ("no detail (v2_detail_weight 0)", "v2_detail_weight=0"),
                          ("no edge (v2_edge_weight 0)", "v2_edge_weight=0")],
             "shirg-x": [("relevance only", "detail_weight=0"), ("detail only", "relevance_weight=0"),
                         ("no suppression (penalty 0)", "x_suppression_penalty=0")]}
BASELINES = ("random", "top-norm", "visionzip", "divprune")


def default_rows(config) -> list:
    """(kind, label, variant string without @BUDGET) of the default table (see the module docstring)."""
    rows = [("term", f"detail {term}" + (" (the seed's)" if term == "variance" else ""),
             f"shirg-fixed:relevance_weight=0:detail_weight=1:detail_term={term}:coverage_region_size=1")
            for term in DETAIL_TERMS]
    rows += [("term", "relevance", "shirg-fixed:relevance_weight=1:detail_weight=0:coverage_region_size=1"),
             ("term", "projected token norm", "top-norm")]
    for method in ("shirg-fixed", "shirg-v2", "shirg-x"):
        rows.append(("method", f"{method} seed formula", f"{method}:{SEED_OPTIONS[method]}"))
        rows += [("method", f"{method} detail={term}" + (" [model default]" if term == config.detail_term else ""),
                  f"{method}:detail_term={term}") for term in DETAIL_TERMS]
        rows += [("method", f"{method} {label}", f"{method}:{options}") for label, options in ABLATIONS[method]]
    rows += [("baseline", method, method) for method in BASELINES]
    return rows


def side_by_side_table(results: dict, budgets: list) -> str:
    """Markdown table: one line per row, AUC and recall@K of every set next to each other."""
    names = list(results)
    header = "| row | " + " | ".join(f"{name} AUC | " + " | ".join(f"{name} @{k}" for k in budgets)
                                    for name in names) + " |"
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]

    def number(value):
        return "-" if value is None or math.isnan(value) else f"{value:.3f}"

    for index, row in enumerate(results[names[0]]["rows"]):
        cells = []
        for name in names:
            measured = results[name]["rows"][index]
            cells += [number(measured["auc"])] + [number(measured["recall"][k]) for k in budgets]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load(args):
    """(model, processor, label): the --model folder (or its merged/ model) with this checkout's classes (not the
    folder's copy of the code: the rows measure this checkout's options), or the tiny preset with random weights
    (seed --seed)."""
    if args.model is None:
        torch.manual_seed(args.seed)
        model = LavidaShirgForMaskedDiffusion(ShirgConfig.from_preset("tiny"))
        processor = LavidaShirgProcessor.from_config(model.config, build_tiny_tokenizer())
        label = f"tiny preset, random weights (seed {args.seed})"
    else:
        folder = Path(args.model)
        if not (folder / "config.json").is_file() and (folder / "merged" / "config.json").is_file():
            folder = folder / "merged"
        model = LavidaShirgForMaskedDiffusion.from_pretrained(str(folder))
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)  # a plain tokenizer
        processor = LavidaShirgProcessor.from_config(model.config, tokenizer)
        label = str(folder)
    return model.to(args.device).eval(), processor, label


def measure(model, processor, samples, truths, variant_text, budgets, source, batch_size):
    """(AUC, {K: recall@K}, {K: answer recall@K}) of one row, means over the images (AUC None when the row has no
    scores). truths: per image, the (N,) bool text tokens and the (N,) bool text tokens of the answer."""
    aucs, recalls, answer_recalls = [], {k: [] for k in budgets}, {k: [] for k in budgets}
    for k in budgets:
        options = f":hires_source={source}" if source else ""
        method, _, rest = variant_text.partition(":")
        variant = parse_variant(f"{method}@{k}" + (f":{rest}" if rest else "") + options)
        settings = model.selection_settings(variant.method, variant.budget, variant.options)
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            prompts = [processor.build_prompt(s["question"] + SYNTHETIC_OCR_PROMPT_SUFFIX) for s in batch]
            inputs = processor(images=[s["image"] for s in batch], text=prompts,
                               **variant.call_settings()).to(model.device)
            for (kept, scores, _), (text, answer) in zip(kept_masks(model, inputs, settings),
                                                         truths[start:start + batch_size]):
                recalls[k].append(float(kept_recall(kept[None], text[None])[0]))
                answer_recalls[k].append(float(kept_recall(kept[None], answer[None])[0]))
                if k == budgets[0] and scores is not None:
                    aucs.append(float(ranking_auc(scores[None], text[None])[0]))
    means = [{k: nan_mean(values) for k, values in per_budget.items()} for per_budget in (recalls, answer_recalls)]
    return (nan_mean(aucs) if aucs else None), *means


def answer_ink(sample):
    """The ink mask of the text that answers the question (the sample's ink inside its answer box)."""
    x0, y0, x1, y1 = sample["text_boxes"][sample["answer_box"]]
    ink = sample["ink_mask"]
    mask = np.zeros_like(ink)
    mask[y0:y1, x0:x1] = ink[y0:y1, x0:x1]
    return mask


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a lavida_shirg model folder (default: the tiny preset, random weights)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the default model's random weights")
    parser.add_argument("--sets", nargs="+", choices=("synthetic", "photo"), default=["synthetic", "photo"],
                        help="image sets (default: both)")
    parser.add_argument("--images", type=int, default=24, help="synthetic OCR images")
    parser.add_argument("--photos", type=int, default=48, help="photo-set images (2 real-text photos + composites)")
    parser.add_argument("--data-seed", type=int, default=1,
                        help="seed of the synthetic set (train_probe_tower.py trains on seed 0)")
    parser.add_argument("--canvas", type=int, help="canvas side in pixels (default: the model's hires_image_size)")
    parser.add_argument("--font-min", type=int, help="smallest font in pixels (default: 11, scaled by canvas / 192 "
                        "on smaller canvases, at least 4: the tiny preset's 64 px view gets 4 px)")
    parser.add_argument("--font-max", type=int, help="largest font in pixels (default: 13, scaled likewise)")
    parser.add_argument("--num-texts", type=int, default=8)
    parser.add_argument("--budgets", type=int, nargs="+", help="K values (default: the model's budget_choices)")
    parser.add_argument("--source", choices=("single-view", "anyres-views"),
                        help="hires_source of every row (default: the model's)")
    parser.add_argument("--variants", default="", help="extra rows: comma-separated METHOD[:OPTION=VALUE...]")
    parser.add_argument("--only-extra", action="store_true", help="measure only the --variants rows")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--json", help="also write the rows and settings to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    model, processor, label = load(args)
    config = model.config
    canvas = args.canvas or config.hires_image_size
    budgets = args.budgets or list(config.budget_choices)
    scale = min(1.0, canvas / 192)
    fonts = (args.font_min or max(4, round(11 * scale)), args.font_max or max(4, round(13 * scale)))
    data = SyntheticOCRConfig(canvas_size=(canvas, canvas), num_texts=args.num_texts, font_size_range=fonts,
                              seed=args.data_seed)
    patch = config.vision_config.patch_size
    image_sets = {"synthetic": lambda: [generate_sample(i, data, with_ink_mask=True) for i in range(args.images)],
                  "photo": lambda: photo_set(args.photos, canvas, patch, args.data_seed)}
    layout = config.selection_settings(options={"hires_source": args.source} if args.source else None)
    rows = [] if args.only_extra else default_rows(config)
    rows += [("extra", text.strip(), text.strip()) for text in args.variants.split(",") if text.strip()]
    print(f"model: {label}")
    print(f"geometry: hires_source={layout['hires_source']}, patch {patch} px, view {layout['hires_image_size']} px; "
          f"model defaults: detail_term={config.detail_term}, relevance_weight={config.relevance_weight}, "
          f"detail_weight={config.detail_weight}, v2_detail_weight={config.v2_detail_weight}, "
          f"v2_edge_weight={config.v2_edge_weight}")
    results = {}
    for name in args.sets:
        samples = image_sets[name]()
        truths = []
        for sample in samples:
            cells = cell_boxes(source_views((sample["image"].height, sample["image"].width), layout))
            truths.append((torch.from_numpy(ink_token_mask(sample["ink_mask"], cells)),
                           torch.from_numpy(ink_token_mask(answer_ink(sample), cells))))
        measured = []
        with torch.no_grad():
            for kind, row_label, variant in rows:
                auc, recall, answer = measure(model, processor, samples, truths, variant, budgets, args.source,
                                              args.batch_size)
                measured.append({"kind": kind, "label": row_label, "variant": variant, "auc": auc, "recall": recall,
                                 "answer_recall": answer})
        num = truths[0][0].numel()
        fraction = nan_mean([float(text.float().mean()) for text, _ in truths])
        results[name] = {"rows": measured, "text_fraction": fraction, "images": len(samples)}
        what = (f"{args.images} synthetic OCR images, seed {args.data_seed}, canvas {canvas} px, fonts "
                f"{fonts[0]}-{fonts[1]} px, {args.num_texts} texts" if name == "synthetic" else
                f"{len(samples)} photos (2 with real text, {len(samples) - 2} composites), seed {args.data_seed}")
        print(f"\n### {name}: {what}; {num} high-resolution tokens per image; text tokens: {fraction:.3f} of the "
              f"tokens (random keeps recall = K / N: " + ", ".join(f"{k / num:.3f} at K={k}" for k in budgets) + ")")
        print(quality_table(measured, budgets), end="")
    if len(results) > 1:
        print("\n### side by side (AUC, recall@K)\n")
        print(side_by_side_table(results, budgets), end="")
    print(f"\ndevice: {args.device}, {torch.get_num_threads()} threads, {time.time() - started:.0f} s")
    if args.json:
        def finite(value):  # NaN (no image defines the mean) -> null
            return None if value is None or math.isnan(value) else value

        sets = {name: {**result, "rows": [
            {**row, "auc": finite(row["auc"]),
             **{key: {str(k): finite(v) for k, v in row[key].items()} for key in ("recall", "answer_recall")}}
            for row in result["rows"]]} for name, result in results.items()}
        Path(args.json).write_text(json.dumps({"model": label, "arguments": vars(args), "sets": sets}, indent=1))
    return {name: result["rows"] for name, result in results.items()}


if __name__ == "__main__":
    main()

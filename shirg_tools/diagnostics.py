"""Selection diagnostics: where each variant's tokens lie in the image, and what it kept.

Geometry (`source_views`): the high-resolution tokens of one image are laid on views of regular cells.
* single-view: the image is squashed to S x S (S = hires_image_size) and SigLIP sees floor(S / p) patches per side
  (p = patch size; the conv drops the S mod p remainder), so token (r, c) of the H x W grid covers original pixels
  y in [r p h / S, (r + 1) p h / S), x in [c p w / S, (c + 1) p w / S) of an h x w image.
* anyres-views: LaViDa's views. The global view is the whole image squashed (its tokens are low resolution);
  crop (i, j) of the best pinpoint canvas (Hc, Wc) covers canvas pixels [j v, (j + 1) v) x [i v, (i + 1) v)
  (v = view size), mapped to the image by x = (x_c - left) w / w', y = (y_c - top) h / h' where (h', w') is the
  image's size in the canvas and (left, top) its offset (the processor's paste). Crop tokens are "full
  resolution"; the global view's are not.

Per image (`selection_diagnostics`):
* relevance_lift = mean over kept tokens of r' / mean over all tokens of r', with r' the relevance (max cosine of
  a token's projected feature with the question's LM embeddings, as SHIRG scores it) min-max normalised per image:
  the mean a uniformly random selection of the same size gets in expectation, so 1 = random, > 1 = question-led.
* coverage_kept = fraction of the r x r coverage regions (r = coverage_region_size) holding >= 1 kept token.
* score_gini = Gini coefficient of the method's per-token scores (shifted to >= 0 by their minimum when negative):
  0 = flat scores, -> 1 = a few tokens carry the score.
* answer_recall (synthetic set) = area of the answer's box covered by kept full-resolution tokens / area of the box
  covered by all full-resolution tokens.
* text_auc, text_recall (synthetic set; `selection_quality`): with text tokens = the tokens whose cell overlaps a
  text box, the AUC of the method's scores (P(a text token scores above a background token), ties 1/2; None
  without scores) and the fraction of the text tokens kept.
* token_area_px2 = original-image pixels one full-resolution token covers; for pooled, what one pooled token
  averages: {"global": h w / P^2, "crop": (v / P)^2 (h / h') (w / w')} with P = pooled_view_size.
"""

import dataclasses

import numpy as np
import torch

from lavida_shirg.image_layout import anyres_grid, resized_size_in_canvas, select_best_resolution, source_grid
from lavida_shirg.shirg_selection import normalize_per_sample, region_labels, relevance_scores
from shirg_tools.selection_quality import box_token_mask, kept_recall, ranking_auc


@dataclasses.dataclass
class ViewGeometry:
    """One view of tokens: its (x0, y0, x1, y1) extent in original-image pixels (the pixels its tokens cover, may
    reach outside the image into the canvas padding), its rows x cols cells, and whether they are full resolution."""

    box: tuple
    rows: int
    cols: int
    full_resolution: bool


def canvas_placement(image_size, layout):
    """(canvas (Hc, Wc), resized image (h', w'), offset (left, top)) of an image in its best pinpoint canvas."""
    canvas = select_best_resolution(image_size, layout["image_grid_pinpoints"])
    resized = resized_size_in_canvas(image_size, canvas)
    return canvas, resized, ((canvas[1] - resized[1]) // 2, (canvas[0] - resized[0]) // 2)


def source_views(image_size, layout) -> list:
    """The views of an (h, w) image's high-resolution tokens under `layout` (a token layout with a call's
    settings), in the model's token order (see the module docstring)."""
    height, width = image_size
    patch = layout["patch_size"]
    if layout["hires_source"] == "single-view":
        _, rows, cols = source_grid(image_size, layout)
        size = layout["hires_image_size"]
        return [ViewGeometry((0.0, 0.0, cols * patch * width / size, rows * patch * height / size), rows, cols, True)]
    view = layout["view_size"]
    side = view // patch
    covered = side * patch  # pixels of a view its tokens cover
    views = [ViewGeometry((0.0, 0.0, covered * width / view, covered * height / view), side, side, False)]
    (grid_rows, grid_cols) = anyres_grid(image_size, layout["image_grid_pinpoints"], view)
    _, (resized_h, resized_w), (left, top) = canvas_placement(image_size, layout)
    scale_x, scale_y = width / resized_w, height / resized_h
    for i in range(grid_rows):
        for j in range(grid_cols):
            x0, y0 = (j * view - left) * scale_x, (i * view - top) * scale_y
            views.append(ViewGeometry((x0, y0, x0 + covered * scale_x, y0 + covered * scale_y), side, side, True))
    return views


def cell_boxes(views) -> np.ndarray:
    """(N, 4) pixel boxes (x0, y0, x1, y1) of every token, view after view, raster order within a view."""
    boxes = []
    for view in views:
        x0, y0, x1, y1 = view.box
        xs = np.linspace(x0, x1, view.cols + 1)
        ys = np.linspace(y0, y1, view.rows + 1)
        left, top = np.meshgrid(xs[:-1], ys[:-1])
        right, bottom = np.meshgrid(xs[1:], ys[1:])
        boxes.append(np.stack([left, top, right, bottom], axis=-1).reshape(-1, 4))
    return np.concatenate(boxes)


def full_resolution_mask(views) -> np.ndarray:
    """(N,) bool: whether each token belongs to a full-resolution view."""
    return np.concatenate([np.full(view.rows * view.cols, view.full_resolution) for view in views])


def box_overlap(boxes: np.ndarray, box) -> np.ndarray:
    """Area of the intersection of each (x0, y0, x1, y1) row of `boxes` with `box`: (N,)."""
    width = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
    height = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
    return width * height


def answer_recall(kept: np.ndarray, views, box):
    """Fraction of `box`'s area under full-resolution tokens that lies under kept ones; None if no full-resolution
    token touches the box. kept: (N,) bool."""
    overlap = box_overlap(cell_boxes(views), box) * full_resolution_mask(views)
    total = overlap.sum()
    return float((overlap * kept).sum() / total) if total > 0 else None


def gini(scores: torch.Tensor) -> torch.Tensor:
    """Gini coefficient per row of (I, N) scores: G = sum_i (2 i - N - 1) x_(i) / (N sum x), x sorted ascending,
    i = 1..N, after shifting rows with negative entries by their minimum; 0 for an all-zero row. (I,) float64."""
    values = scores.double()
    values = values - values.amin(dim=1, keepdim=True).clamp(max=0)
    ordered = values.sort(dim=1).values
    num = ordered.shape[1]
    weights = 2 * torch.arange(1, num + 1, dtype=torch.float64, device=ordered.device) - num - 1
    total = ordered.sum(dim=1)
    return torch.where(total > 0, (ordered * weights).sum(dim=1) / (num * total.clamp(min=1e-300)),
                       torch.zeros_like(total))


def coverage_kept(kept: torch.Tensor, grid, region_size: int) -> torch.Tensor:
    """Fraction of the r x r regions of `grid` with at least one kept token, per row of kept (I, N) bool. (I,)."""
    labels, num_regions = region_labels(grid, region_size, kept.device)
    hit = torch.zeros(kept.shape[0], num_regions, dtype=torch.float32, device=kept.device)
    hit.scatter_reduce_(1, labels.expand_as(kept), kept.float(), "amax")
    return hit.mean(dim=1)


def relevance_lift(relevance: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Mean normalised relevance of the kept tokens over its mean over all tokens, per row: (I, N) x (I, N) bool ->
    (I,) (NaN when an image's relevance is constant)."""
    normalised = normalize_per_sample(relevance)
    kept_mean = (normalised * kept).sum(dim=1) / kept.sum(dim=1).clamp(min=1)
    return kept_mean / normalised.mean(dim=1)


@torch.no_grad()
def token_relevance(model, inputs: dict, settings: dict) -> list:
    """Relevance of every high-resolution token of each image to its sample's question, on the grid the variant
    selects from: a list of (N_i,) float32 tensors, one per image in order (relevance_scores of the projected
    tokens against the LM embeddings of the question tokens marked by the processor's question_mask)."""
    input_ids = inputs["input_ids"]
    is_image = input_ids == model.config.image_token_id
    owners = model.model.image_samples(is_image, inputs["image_sizes"], settings)
    question_embeds = model.get_input_embeddings()(input_ids.masked_fill(is_image, 0))[owners]
    question_mask = inputs["question_mask"].bool()[owners]
    if settings["hires_source"] == "single-view":
        projected = model.multi_modal_projector(model.model.vision_features(inputs["hires_pixel_values"])[0])
        return list(relevance_scores(projected, question_embeds, question_mask).cpu())
    projected = model.multi_modal_projector(model.model.vision_features(inputs["pixel_values"])[0])
    views = model.model.views_of_images(inputs["pixel_values"], inputs["image_sizes"])
    relevance = []
    for image, ((rows, cols), _, start) in enumerate(views):
        tokens = projected[start:start + 1 + rows * cols].flatten(0, 1)[None]
        relevance.append(relevance_scores(tokens, question_embeds[image:image + 1],
                                          question_mask[image:image + 1])[0].cpu())
    return relevance


def base_view_box(image_size, layout) -> tuple:
    """(x0, y0, x1, y1) in image pixels of the view every layout has (anyres: its global view; "pad": the single
    view, the image centred on a square of side max(h, w), so the box reaches past the short side; "square": the
    single view, the image resized)."""
    height, width = image_size
    if layout.get("image_aspect_ratio", "anyres") != "pad":
        return 0.0, 0.0, float(width), float(height)
    side = max(height, width)
    left, top = (side - width) / 2, (side - height) / 2
    return -left, -top, side - left, side - top


def pooled_token_area(image_size, layout) -> dict:
    """Original-image pixels^2 one pooled token averages: {"global": area of the base view / P^2} (`base_view_box`),
    and for anyres {"crop": (v / P)^2 (h / h') (w / w')} too."""
    height, width = image_size
    pooled = layout["pooled_view_size"]
    x0, y0, x1, y1 = base_view_box(image_size, layout)
    if layout.get("image_aspect_ratio", "anyres") != "anyres":
        return {"global": (x1 - x0) * (y1 - y0) / pooled**2}
    _, (resized_h, resized_w), _ = canvas_placement(image_size, layout)
    crop = (layout["view_size"] / pooled) ** 2 * (height / resized_h) * (width / resized_w)
    return {"global": height * width / pooled**2, "crop": crop}


def full_resolution_token_area(views) -> float:
    """Original-image pixels^2 one full-resolution token covers (the first full-resolution view's cell)."""
    view = next(view for view in views if view.full_resolution)
    x0, y0, x1, y1 = view.box
    return (x1 - x0) / view.cols * (y1 - y0) / view.rows


def kept_masks(model, inputs: dict, settings) -> list:
    """Per image: ((N,) bool kept mask, (N,) float32 scores or None, grid) of the selection under `settings` (the
    call's validated SelectionSettings). full keeps every token (scores None); pooled has no high-resolution
    selection (None per image)."""
    sizes = [tuple(size) for size in inputs["image_sizes"].tolist()]
    method = settings["selection_method"]
    if method == "pooled":
        return [None] * len(sizes)
    if method == "full":
        results = []
        for size in sizes:
            views, rows, cols = source_grid(size, settings)
            grid = (rows, cols) if settings["hires_source"] == "single-view" else (views, rows, cols)
            results.append((torch.ones(views * rows * cols, dtype=torch.bool), None, grid))
        return results
    results = [None] * len(sizes)
    call = {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes",
                                         "hires_pixel_values", "question_mask") if key in inputs}
    entries = model.inspect_selection(**call, selection=settings)
    for entry in entries:
        indices = entry["indices"].cpu()
        num = int(np.prod(entry["grid"]))
        kept = torch.zeros(indices.shape[0], num, dtype=torch.bool).scatter_(1, indices, True)
        scores = None if entry["scores"] is None else entry["scores"].float().cpu()
        for row, image in enumerate(entry["images"]):
            results[image] = (kept[row], None if scores is None else scores[row], tuple(entry["grid"]))
    return results


def selection_diagnostics(model, inputs: dict, settings: dict, samples: list, relevance: list | None) -> list:
    """Per sample (one image each): a dict with relevance_lift, coverage_kept, score_gini, answer_recall (when the
    sample has an answer box) and token_area_px2, plus the kept mask and geometry for overlays under "_kept",
    "_views" (see the module docstring). `relevance`: `token_relevance` of the batch (None for pooled)."""
    selections = kept_masks(model, inputs, settings)
    results = []
    for index, (sample, selection) in enumerate(zip(samples, selections)):
        size = (sample.image.height, sample.image.width)
        if selection is None:
            results.append({"token_area_px2": pooled_token_area(size, settings), "_kept": None, "_views": None})
            continue
        kept, scores, grid = selection
        views = source_views(size, settings)
        lift = float(relevance_lift(relevance[index][None], kept[None])[0])
        result = {
            "relevance_lift": None if np.isnan(lift) else lift,
            "coverage_kept": float(coverage_kept(kept[None], grid, settings["coverage_region_size"])[0]),
            "score_gini": None if scores is None else float(gini(scores[None])[0]),
            "token_area_px2": full_resolution_token_area(views),
            "_kept": kept.numpy(), "_views": views,
        }
        if sample.answer_box is not None:
            result["answer_recall"] = answer_recall(kept.numpy(), views, sample.text_boxes[sample.answer_box])
        if sample.text_boxes:
            text = torch.from_numpy(box_token_mask(sample.text_boxes, cell_boxes(views)))[None]
            recall, auc = float(kept_recall(kept[None], text)[0]), None
            if scores is not None:
                auc = float(ranking_auc(scores[None], text)[0])
            result["text_recall"] = None if np.isnan(recall) else recall
            result["text_auc"] = None if auc is None or np.isnan(auc) else auc
        results.append(result)
    return results


def variant_diagnostics(model, inputs: dict, variant, samples: list) -> list:
    """`selection_diagnostics` of `variant` (a shirg_tools.variants.Variant) on a batch of processor outputs built for
    it (their `selection`, when the processor has one, holds its validated settings), its relevance computed by
    `token_relevance` (none for pooled)."""
    settings = model.selection_settings(variant.method, variant.budget, variant.options, inputs.get("selection"))
    relevance = None if variant.method == "pooled" else token_relevance(model, inputs, settings)
    return selection_diagnostics(model, inputs, settings, samples, relevance)

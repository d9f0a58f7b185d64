"""Selection quality: do a score term, or a selection method, find the tokens that carry text?

Ground truth: a token is a TEXT TOKEN when its cell holds text. Two sources:
* `ink_token_mask`: from an ink mask (the synthetic OCR generator's `ink_mask`, the rendered glyphs): a cell holds
  text when one of the pixels whose centre lies in it is ink.
* `box_token_mask`: from text boxes (x0, y0, x1, y1) (the synthetic set's `text_boxes`): a cell holds text when it
  overlaps a box (coarser: a box also covers the gaps between letters).
Cells are the (N, 4) pixel boxes of `diagnostics.cell_boxes` (original-image pixels, the model's token order).

Measures, per image (rows of (I, N) tensors):
* `ranking_auc`: AUC = P(score of a text token > score of a background token) + 0.5 P(equal) (Mann-Whitney U / PQ):
  1 = every text token above every background token, 0.5 = no preference (or constant scores), 0 = reversed.
* `kept_recall`: recall at K = |kept ∩ text| / |text|, the fraction of the text tokens a selection of K keeps
  (answer recall: the same for the text tokens of the text that answers the question).
Both are NaN for an image without text tokens (and AUC also for one without background tokens); `nan_mean`
averages over the images where they are defined. `quality_table` prints the rows of a measurement as markdown.
"""

import math

import numpy as np
import torch


def ink_token_mask(ink: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """(N,) bool: whether each cell (x0, y0, x1, y1) of `cells` (N, 4) holds an ink pixel of `ink` (h, w) bool.

    Pixel (y, x) belongs to a cell when its centre (x + 0.5, y + 0.5) lies in [x0, x1) x [y0, y1); counted with a
    summed-area table (no loop over cells).
    """
    height, width = ink.shape
    table = np.zeros((height + 1, width + 1), dtype=np.int64)
    table[1:, 1:] = ink.astype(np.int64).cumsum(axis=0).cumsum(axis=1)
    # first pixel whose centre is >= the edge: ceil(edge - 0.5), clipped to the image
    x0, y0, x1, y1 = (np.clip(np.ceil(cells[:, i] - 0.5).astype(np.int64), 0, limit)
                      for i, limit in ((0, width), (1, height), (2, width), (3, height)))
    x1, y1 = np.maximum(x1, x0), np.maximum(y1, y0)
    count = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    return count > 0


def box_token_mask(boxes, cells: np.ndarray) -> np.ndarray:
    """(N,) bool: whether each cell (x0, y0, x1, y1) of `cells` (N, 4) overlaps one of the (x0, y0, x1, y1) `boxes`
    with a positive area."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    width = np.minimum(cells[:, None, 2], boxes[None, :, 2]) - np.maximum(cells[:, None, 0], boxes[None, :, 0])
    height = np.minimum(cells[:, None, 3], boxes[None, :, 3]) - np.maximum(cells[:, None, 1], boxes[None, :, 1])
    return ((width > 0) & (height > 0)).any(axis=1)


def ranking_auc(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """AUC per row: (sum of the positives' mid-ranks - P (P + 1) / 2) / (P Q), P / Q = positives / negatives.

    The mid-rank of a score is 1 + (#scores below it) + (#others equal to it) / 2, so ties count 1/2.
    scores (I, N) float, positives (I, N) bool -> (I,) float64; NaN where P = 0 or Q = 0.
    """
    scores = scores.double().contiguous()
    ordered = scores.sort(dim=1).values
    below = torch.searchsorted(ordered, scores, side="left")
    up_to = torch.searchsorted(ordered, scores, side="right")
    mid_rank = (below + up_to + 1).double() / 2
    positives = positives.bool()
    count = positives.sum(dim=1).double()
    others = positives.shape[1] - count
    statistic = (mid_rank * positives).sum(dim=1) - count * (count + 1) / 2
    pairs = count * others
    return torch.where(pairs > 0, statistic / pairs.clamp(min=1), torch.full_like(pairs, math.nan))


def kept_recall(kept: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Recall per row: |kept ∩ positives| / |positives|; (I, N) bool x (I, N) bool -> (I,) float64, NaN without
    positives."""
    positives = positives.bool()
    count = positives.sum(dim=1).double()
    hits = (kept.bool() & positives).sum(dim=1).double()
    return torch.where(count > 0, hits / count.clamp(min=1), torch.full_like(count, math.nan))


def nan_mean(values) -> float:
    """Mean of the finite values (NaN when there is none)."""
    values = [float(v) for v in values if not math.isnan(float(v))]
    return sum(values) / len(values) if values else math.nan


def quality_table(rows: list, budgets: list) -> str:
    """Markdown table of measured rows: each row a dict with "kind", "label", "variant", "auc" (float or None),
    "recall" and "answer_recall" ({budget: float}); one recall and one answer-recall column per budget."""
    header = ("| kind | row | AUC | " + " | ".join(f"recall@{k}" for k in budgets) + " | "
              + " | ".join(f"answer@{k}" for k in budgets) + " | variant |")
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]

    def number(value):
        return "-" if value is None or math.isnan(value) else f"{value:.3f}"

    for row in rows:
        recalls = " | ".join(number(row[key].get(k)) for key in ("recall", "answer_recall") for k in budgets)
        lines.append(f"| {row['kind']} | {row['label']} | {number(row['auc'])} | {recalls} | `{row['variant']}` |")
    return "\n".join(lines) + "\n"

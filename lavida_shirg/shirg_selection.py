"""SHIRG: text-conditioned, coverage-guaranteed selection of high-resolution vision tokens, and the baselines.

Pure, batched, vectorised functions (torch and the standard library only, no I/O: this module travels as HF
remote code next to the model).

Conventions
-----------
* One view's high-resolution tokens are a batch ``(B, N, D)`` laid on a spatial ``grid = (H, W)``, ``N = H * W``,
  in raster order: token ``n`` sits at row ``n // W``, column ``n % W``. Several views of one image (LaViDa's
  unpooled anyres views) use ``grid = (V, H, W)``, ``N = V * H * W``, view after view: regions, edges, clusters and
  suppression then stay inside each view (coverage is counted per view). Grid sizes always come from arguments.
* ``vision_features`` (B, N, D): the vision tower's tokens BEFORE the projector (variance, edges, clustering).
  ``projected`` (B, N, E): ALL the tokens through the model's projector (relevance, summaries, scaffold). The caller
  projects once and keeps the selected rows (``gather_tokens(projected, selection.indices)``): no second projection.
* ``question_embeds`` (B, L, E): the LM input embeddings of the question; ``question_mask`` (B, L) bool marks the
  usable question tokens (padding and chat template masked out).
* Every selection method returns ``TokenSelection(indices, extra_tokens, scores)``:
  ``indices`` (B, K) int64, exactly K = ``budget`` distinct token indices per sample, sorted ascending (raster order);
  ``extra_tokens`` None or (B, M, E) tokens (in ``projected.dtype``) to append after the kept ones, NOT counted in the
  budget (SHIRG-v2: M = 1 summary of the dropped tokens; SHIRG-X: M = g*g low-resolution scaffold; VisionZip: M =
  contextual tokens); ``scores`` None or (B, N) float32, the per-token score the method ranked by.
* Everything is computed in float32 whatever the input dtype (bf16 inputs are fine).
* Per-sample normalisation (``normalize_per_sample``): every score term is min-max normalised to [0, 1] over the
  N tokens of its own sample before the terms are mixed, so the weights are fractions of each term's range on that
  image; a term that is constant over a sample becomes 0 there (it cannot rank anything).
* Detail term (`detail_scores`, DETAIL_TERMS): the term SHIRG mixes with relevance. "variance" (the seed's token
  variance; the default of these functions, so that they compute the seed's formulas) points AWAY from text on a
  trained tower (background and outlier tokens have the larger variance); "centered-variance", "edge-density" and
  "pixel-contrast" (the luminance contrast of each token's own pixel patch) point at it. The model's default is its
  config's `detail_term` (see README, "Selection quality"); benchmarks/bench_selection_quality.py measures them.
* Ties are broken towards the lower raster index (stable sorts, first-occurrence argmax/argmin): every method is
  deterministic, and a per-sample method commutes with permutations of the batch.
* No host synchronisation: the selection paths use no ``.item()``, ``.tolist()``, ``.cpu()``, ``bool(tensor)``,
  boolean-mask indexing or ``nonzero``.
* These functions trust their callers: the settings are validated once, at the boundary (ShirgConfig's
  ``selection_settings`` / ``validate_selection_settings``); a sample without a usable question token gets
  relevance 0 (the model refuses such inputs before selecting).

Registry
--------
``METHODS[name]`` (a ``SelectionMethod``) holds everything about one method: how many image tokens it gives the LM
(``token_count``, what the processor reserves), its selection (``select``: the function of this module with the
call's settings), the tokens it adds and their order (``extra``, ``extra_first``: SHIRG-X's scaffold comes first).
``TokenSelector`` (an ``nn.Module`` of the model) runs a method and owns its learned parts (``CoordinateEmbedding``,
``AdaptiveBudgetHead``).
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .image_layout import pooled_image_token_count, source_grid


class TokenSelection(NamedTuple):
    """The output of every selection method (see the module docstring)."""

    indices: torch.Tensor  # (B, K) int64, distinct, ascending
    extra_tokens: Optional[torch.Tensor] = None  # (B, M, E) in projected.dtype, appended after the kept tokens
    scores: Optional[torch.Tensor] = None  # (B, N) float32, what the method ranked by


def view_shape(grid) -> tuple:
    """(views, height, width) of a (H, W) or (V, H, W) grid."""
    return (1, *grid) if len(grid) == 2 else tuple(grid)


# ----------------------------------------------------------------------------------------------------------------
# score terms


def normalize_per_sample(scores: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max normalisation: s'[b, n] = (s[b, n] - min_n s[b]) / (max_n s[b] - min_n s[b]), in [0, 1].

    (B, N) -> (B, N) float32. A sample whose scores are all equal maps to 0 everywhere.
    """
    scores = scores.float()
    low = scores.amin(dim=1, keepdim=True)
    span = scores.amax(dim=1, keepdim=True) - low
    return (scores - low) / torch.where(span > 0, span, torch.ones_like(span))


def rank_per_sample(scores: torch.Tensor) -> torch.Tensor:
    """Per-sample rank normalisation: r[b, n] = (mid-rank of s[b, n] among the N scores of sample b - 1) / (N - 1),
    in [0, 1], the mid-rank of tied scores being their mean rank (a constant sample maps to 0.5 everywhere).

    (B, N) -> (B, N) float32. The terms then mix by order only: a term's outliers or its spread cannot make it
    dominate the others (what min-max normalisation lets a near-constant term with one extreme token do).
    """
    scores = scores.float().contiguous()
    ordered = scores.sort(dim=1).values
    below = torch.searchsorted(ordered, scores, side="left")
    up_to = torch.searchsorted(ordered, scores, side="right")
    return (below + up_to - 1).float() / (2 * max(scores.shape[1] - 1, 1))


SCORE_NORMALIZATIONS = {"min-max": normalize_per_sample, "rank": rank_per_sample}


def token_variance(features: torch.Tensor) -> torch.Tensor:
    """Variance of each token's feature vector: var[b, n] = mean_d (x[b, n, d] - mean_d x[b, n])^2 (no correction).

    (B, N, D) -> (B, N) float32. SHIRG uses the pre-projector vision features (the projector's biases and GELU
    would otherwise dominate the spread of a token).
    """
    return features.float().var(dim=-1, correction=0)


def centered_token_variance(features: torch.Tensor, grid) -> torch.Tensor:
    """Variance of each token after removing its view's mean token: cvar[b, n] = token_variance(x[b, n] - m[b, v(n)]),
    m[b, v] = mean of the H W tokens of view v of sample b.

    The part of a token that every token of its view shares (the channel offsets that make background and outlier
    tokens high-variance in a trained tower) drops out; what is left grows with how much a token differs from its
    view's typical (background) token. (B, N, D), grid (H, W) or (V, H, W) -> (B, N) float32.
    """
    batch, num, channels = features.shape
    views, _, _ = view_shape(grid)
    per_view = features.float().reshape(batch, views, num // views, channels)
    return token_variance((per_view - per_view.mean(dim=2, keepdim=True)).reshape(batch, num, channels))


def edge_density(features: torch.Tensor, grid) -> torch.Tensor:
    """Mean absolute Laplacian of the token map: e[b, n] = mean_d |(x_d * K)[b, n]|, K = [[0,1,0],[1,-4,1],[0,1,0]].

    The (B, N, D) tokens are laid as a (B V, D, H, W) map (one per view), convolved depthwise with the 4-neighbour
    Laplacian kernel after REPLICATE padding of one token on every side (a border token is compared with itself, so
    a constant map has zero edge density everywhere, borders included). (B, N, D) -> (B, N) float32.
    """
    batch, num, channels = features.shape
    views, height, width = view_shape(grid)
    # (B V, D, H, W) view of the (B, N, D) tokens in channels-last memory layout: no transposing copy
    grid_map = features.float().reshape(batch * views, height, width, channels).permute(0, 3, 1, 2)
    grid_map = F.pad(grid_map, (1, 1, 1, 1), mode="replicate")
    kernel = grid_map.new_zeros(3, 3)  # built on the device (no host-to-device copy)
    kernel[1, :] = 1.0
    kernel[:, 1] = 1.0
    kernel[1, 1] = -4.0
    laplacian = F.conv2d(grid_map, kernel.expand(channels, 1, 3, 3), groups=channels)
    return laplacian.abs().mean(dim=1).reshape(batch, num)


LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of (R, G, B)


def pixel_contrast(pixels: torch.Tensor, grid, patch_size: int) -> torch.Tensor:
    """Luminance contrast of each token's own pixels: c[b, n] = std over the p x p pixels of patch n of
    Y = 0.299 R + 0.587 G + 0.114 B (no correction).

    pixels (B V, 3, S, S): the views the (B, N) tokens were computed from (sample b's V views consecutive), in the
    processor's normalisation (an affine map per channel; with equal per-channel maps, as SigLIP's, c is the contrast
    of the image up to one factor, which the per-sample normalisation removes). Token (r, c) of a view is the
    patch rows [r p, (r + 1) p) x columns [c p, (c + 1) p), as the patch embedding's stride-p convolution sees it
    (pixels beyond floor(S / p) p are dropped). grid (H, W) or (V, H, W) with H = floor(S_h / p), W = floor(S_w / p).
    Needs no pass through the tower. -> (B, N) float32.
    """
    views, height, width = view_shape(grid)
    rows, cols = pixels.shape[-2] // patch_size, pixels.shape[-1] // patch_size
    torch._check((rows, cols) == (height, width), lambda: f"pixels {tuple(pixels.shape)} do not tile the grid {grid}")
    pixels = pixels.float()[:, :, :rows * patch_size, :cols * patch_size]
    luminance = sum(weight * pixels[:, channel] for channel, weight in enumerate(LUMINANCE))  # (B V, S, S)
    blocks = luminance.reshape(-1, rows, patch_size, cols, patch_size)
    contrast = blocks.var(dim=(2, 4), correction=0).sqrt()
    return contrast.reshape(pixels.shape[0] // views, views * rows * cols)


def local_contrast(pixels: torch.Tensor, grid, patch_size: int, radius: int = 2) -> torch.Tensor:
    """Pixel contrast above its neighbourhood's: l[b, n] = max(0, c[b, n] - mean of c over the (2R + 1)^2 tokens
    around n), c = `pixel_contrast`, R = `radius`, the map of each view padded by replication.

    A uniformly busy background (gravel, grass, brick) has a high contrast everywhere and cancels; text on it, or on a
    smooth sign or sky, stands above its surroundings. (B V, 3, S, S) pixels -> (B, N) float32.
    """
    contrast = pixel_contrast(pixels, grid, patch_size)
    views, height, width = view_shape(grid)
    maps = F.pad(contrast.reshape(-1, 1, height, width), (radius,) * 4, mode="replicate")
    around = F.avg_pool2d(maps, 2 * radius + 1, stride=1).reshape(contrast.shape)
    return (contrast - around).clamp(min=0)


DETAIL_TERMS = ("variance", "centered-variance", "edge-density", "pixel-contrast", "local-contrast")


def detail_scores(detail_term: str, vision_features: torch.Tensor, grid=None, pixels=None,
                  patch_size: Optional[int] = None) -> torch.Tensor:
    """SHIRG's detail term d (B, N) float32 by name: "variance" = `token_variance(x)` (the seed's), "centered-variance"
    = `centered_token_variance(x, grid)`, "edge-density" = `edge_density(x, grid)`, "pixel-contrast" =
    `pixel_contrast(pixels, grid, patch_size)`, "local-contrast" = `local_contrast(pixels, grid, patch_size)` (x: the
    pre-projector vision features (B, N, D))."""
    if detail_term == "variance":
        return token_variance(vision_features)
    if detail_term == "centered-variance":
        return centered_token_variance(vision_features, grid)
    if detail_term == "edge-density":
        return edge_density(vision_features, grid)
    if detail_term == "local-contrast":
        return local_contrast(pixels, grid, patch_size)
    return pixel_contrast(pixels, grid, patch_size)


def _detail_term(weight, detail_term, vision_features, grid, pixels, patch_size, normalization):
    """weight * norm(d) of `detail_scores`, or zeros (B, N) when weight = 0 (the term's inputs are then not needed)."""
    if weight == 0:
        return vision_features.new_zeros(vision_features.shape[:2], dtype=torch.float32)
    normalize = SCORE_NORMALIZATIONS[normalization]
    return weight * normalize(detail_scores(detail_term, vision_features, grid, pixels, patch_size))


def relevance_scores(projected: torch.Tensor, question_embeds: torch.Tensor,
                     question_mask: torch.Tensor) -> torch.Tensor:
    """Text relevance in the LM space: rel[b, n] = max_{l : mask[b, l]} cos(proj[b, n], q[b, l]).

    projected (B, N, E), question_embeds (B, L, E), question_mask (B, L) bool -> (B, N) float32 in [-1, 1]; a sample
    without a usable question token gets 0.
    """
    mask = question_mask.bool()
    question = F.normalize(question_embeds.float(), dim=-1, eps=1e-6)
    tokens = projected.float()
    # cos = <p, q_hat> / max(|p|, eps), dividing the (B, N, L) products rather than the (B, N, E) tokens
    cosine = torch.bmm(tokens, question.transpose(1, 2)) / feature_norm(tokens).clamp(min=1e-6).unsqueeze(-1)
    cosine = cosine.masked_fill(~mask[:, None, :], float("-inf"))
    best = cosine.amax(dim=2)
    return torch.where(mask.any(dim=1, keepdim=True), best, torch.zeros_like(best))


def feature_norm(features: torch.Tensor) -> torch.Tensor:
    """L2 norm of each token: norm[b, n] = ||x[b, n]||_2. (B, N, C) -> (B, N) float32."""
    return torch.linalg.vector_norm(features.float(), dim=-1)


def _relevance_term(projected, question_embeds, question_mask, weight, normalization):
    """weight * norm(rel) of `relevance_scores`, or None when weight = 0 (no question is then needed)."""
    if weight == 0:
        return None
    normalize = SCORE_NORMALIZATIONS[normalization]
    return weight * normalize(relevance_scores(projected, question_embeds, question_mask))


# ----------------------------------------------------------------------------------------------------------------
# coverage and top-k machinery


def region_labels(grid, region_size: int, device=None):
    """Label of the r x r region of every token, in raster order of regions: (N,) int64 and the region count.

    Regions tile each view from its top-left corner; when H or W is not a multiple of r the last row/column of
    regions is partial and still counts as a region (ceil(H / r) * ceil(W / r) regions per view, V times that for a
    (V, H, W) grid). A view smaller than r x r is one (partial) region.
    """
    views, height, width = view_shape(grid)
    per_row = -(-width // region_size)
    per_view = (-(-height // region_size)) * per_row
    rows = torch.arange(height, device=device) // region_size
    cols = torch.arange(width, device=device) // region_size
    labels = (rows[:, None] * per_row + cols[None, :]).reshape(-1)  # (H W,)
    offsets = torch.arange(views, device=device) * per_view  # (V,)
    return (offsets[:, None] + labels[None, :]).reshape(-1), views * per_view


def top1_per_group(scores: torch.Tensor, labels: torch.Tensor, num_groups: int):
    """Best-scoring token of every group, per sample: winner[b, g] = argmax_{n : label[b, n] = g} s[b, n].

    scores (B, N), labels (N,) or (B, N) int64 in [0, G). Returns winners (B, G) int64 (ties -> lowest index; N for an
    empty group).
    """
    batch, num = scores.shape
    scores = scores.float()
    labels = labels.expand(batch, num)
    group_max = scores.new_full((batch, num_groups), float("-inf")).scatter_reduce(1, labels, scores, "amax")
    is_max = scores == group_max.gather(1, labels)
    positions = torch.arange(num, device=scores.device).expand(batch, num)
    candidates = torch.where(is_max, positions, torch.full_like(positions, num))
    winners = torch.full((batch, num_groups), num, dtype=torch.long, device=scores.device)
    return winners.scatter_reduce(1, labels, candidates, "amin")


def _winners_mask(winners: torch.Tensor, num: int) -> torch.Tensor:
    """(B, G) winner indices (N for none) -> (B, N) bool mask."""
    mask = torch.zeros(winners.shape[0], num + 1, dtype=torch.bool, device=winners.device)
    return mask.scatter_(1, winners, True)[:, :num]


def mask_to_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending indices of the True entries of a (B, N) mask holding exactly `count` Trues per sample: (B, count)."""
    return torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :count]


def select_with_priority(scores: torch.Tensor, priority: torch.Tensor, budget: int) -> torch.Tensor:
    """Top-`budget` tokens by (priority, score), lexicographically: the priority tokens first, best score first.

    scores (B, N), priority (B, N) bool -> (B, K) distinct indices, ascending. When fewer than K tokens have priority
    all of them are kept and the best-scoring others fill the budget; when more, the best-scoring K priority tokens.
    """
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    first = torch.sort(priority.gather(1, order).to(torch.int8), dim=1, descending=True, stable=True).indices
    return torch.sort(order.gather(1, first[:, :budget]), dim=1).values


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Keep the rows `indices` (B, K) of `tokens` (B, N, C): (B, K, C) (differentiable w.r.t. tokens)."""
    return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def region_coverage(scores: torch.Tensor, grid, region_size: int) -> torch.Tensor:
    """Coverage of SHIRG-Fixed / SHIRG-X: c[b, n] = 1 iff n = argmax of s[b] over its r x r region (every sample).

    (B, N) -> (B, N) bool with exactly ceil(H/r) * ceil(W/r) Trues per sample (partial border regions included).
    """
    labels, num_regions = region_labels(grid, region_size, scores.device)
    return _winners_mask(top1_per_group(scores, labels, num_regions), scores.shape[1])


# ----------------------------------------------------------------------------------------------------------------
# SHIRG-Fixed


def shirg_fixed_scores(vision_features, projected, question_embeds=None, question_mask=None, *,
                       relevance_weight: float = 0.7, detail_weight: float = 0.3, detail_term: str = "variance",
                       score_normalization: str = "min-max", grid=None, pixels=None,
                       patch_size: Optional[int] = None) -> torch.Tensor:
    """SHIRG-Fixed score: s = w_r * norm(rel) + w_d * norm(d), w_r = 0.7, w_d = 0.3 (norm: per-sample min-max, the
    seed's, or per-sample ranks with score_normalization="rank", SCORE_NORMALIZATIONS).

    rel = `relevance_scores(projected, question)`, d = `detail_scores(detail_term, vision_features, grid, pixels,
    patch_size)`; detail_term "variance" (d = `token_variance`) is the seed's formula, bit for bit. A zero weight
    skips its term (no question needed with w_r = 0). (B, N) float32.
    """
    scores = _detail_term(detail_weight, detail_term, vision_features, grid, pixels, patch_size, score_normalization)
    relevance = _relevance_term(projected, question_embeds, question_mask, relevance_weight, score_normalization)
    return scores if relevance is None else scores + relevance


def shirg_fixed_select(vision_features, projected, grid, budget, question_embeds=None, question_mask=None, *,
                       coverage_region_size: int = 4, relevance_weight: float = 0.7, detail_weight: float = 0.3,
                       detail_term: str = "variance", score_normalization: str = "min-max", pixels=None,
                       patch_size: Optional[int] = None) -> TokenSelection:
    """SHIRG-Fixed: keep = cover(s) ∪ top_{K - |cover|}(s), cover = {argmax_{n in R} s[b, n] : every r x r region R}.

    s = `shirg_fixed_scores` (detail term `detail_term`; pixels / patch_size for "pixel-contrast"). The coverage
    winners are taken for every sample independently; the global top-k of the
    remaining tokens fills the budget. K smaller than the region count: the K best-scoring region winners are kept
    (coverage cannot be complete; r = 1 then equals plain top-k). Returns indices (B, K) ascending, scores (B, N).
    """
    scores = shirg_fixed_scores(vision_features, projected, question_embeds, question_mask,
                                relevance_weight=relevance_weight, detail_weight=detail_weight,
                                detail_term=detail_term, score_normalization=score_normalization, grid=grid,
                                pixels=pixels, patch_size=patch_size)
    coverage = region_coverage(scores, grid, coverage_region_size)
    return TokenSelection(select_with_priority(scores, coverage, budget), None, scores)


# ----------------------------------------------------------------------------------------------------------------
# SHIRG-v2


def shirg_v2_scores(vision_features, projected, grid, question_embeds=None, question_mask=None, *,
                    v2_detail_weight: float = 0.25, v2_edge_weight: float = 0.15, detail_term: str = "variance",
                    score_normalization: str = "min-max", pixels=None,
                    patch_size: Optional[int] = None) -> torch.Tensor:
    """SHIRG-v2 score: s = a * norm(d) + (1 - a) * norm(rel) + b * norm(edge), a = 0.25, b = 0.15.

    d = `detail_scores(detail_term, ...)` ("variance": `token_variance`, the seed's formula bit for bit), edge =
    `edge_density` (of the pre-projector vision features), rel = `relevance_scores`; norm: per-sample min-max. a = 1 drops the relevance term (no question needed), a = 0 the
    detail term. (B, N) float32.
    """
    normalize = SCORE_NORMALIZATIONS[score_normalization]
    scores = _detail_term(v2_detail_weight, detail_term, vision_features, grid, pixels, patch_size,
                          score_normalization)
    if v2_edge_weight:
        scores = scores + v2_edge_weight * normalize(edge_density(vision_features, grid))
    relevance = _relevance_term(projected, question_embeds, question_mask, 1.0 - v2_detail_weight,
                                score_normalization)
    if relevance is not None:
        scores = scores + relevance
    return scores


def spatial_kmeans(features: torch.Tensor, grid, region_size: int = 4, iterations: int = 4,
                   feature_weight: float = 0.5):
    """Spatial k-means of the token map (SLIC-like), fixed iterations: labels (B, N) int64 and the cluster count G.

    Points z[b, n] = [row / r, col / r, sqrt(lambda) * x[b, n] / ||x[b, n]||]: positions in units of the seed spacing
    r, unit features weighted by lambda = `feature_weight`, so d^2 = |dpos|^2 / r^2 + lambda |dx_hat|^2 (the views of
    a (V, H, W) grid are stacked with a gap of 4 r rows). Seeds
    (deterministic grid initialisation): the means of the points of the r x r regions of `region_labels` (G of
    them). Each of the `iterations` steps assigns every point to its nearest centre (ties: lowest cluster) and moves
    each centre to the mean of its points (an empty cluster keeps its centre); the labels are a final assignment.
    Cost per step O(B N G (D + 2)) as two batched matmuls.
    """
    batch, num, _ = features.shape
    views, height, width = view_shape(grid)
    seeds, num_clusters = region_labels(grid, region_size, features.device)
    # views are stacked vertically with a gap of 4 r rows, farther than any feature distance (|dx_hat|^2 <= 4):
    # no cluster spans two views
    view_rows = torch.arange(views, device=features.device, dtype=torch.float32) * (height + 4 * region_size)
    rows = (view_rows[:, None] + torch.arange(height, device=features.device, dtype=torch.float32)[None, :])
    rows = rows.reshape(-1).repeat_interleave(width)
    cols = torch.arange(width, device=features.device, dtype=torch.float32).repeat(views * height)
    positions = torch.stack([rows, cols], dim=-1) / region_size
    unit = F.normalize(features.float(), dim=-1, eps=1e-6) * math.sqrt(feature_weight)
    points = torch.cat([positions.expand(batch, num, 2), unit], dim=-1)  # (B, N, 2 + D)
    clusters = torch.arange(num_clusters, device=features.device)

    def group_sums(labels):
        one_hot = (labels.unsqueeze(-1) == clusters).to(points.dtype)  # (B, N, G)
        return torch.bmm(one_hot.transpose(1, 2), points), one_hot.sum(dim=1)

    def assign(centres):
        distance = centres.pow(2).sum(-1).unsqueeze(1) - 2 * torch.bmm(points, centres.transpose(1, 2))
        return distance.argmin(dim=-1)  # |z|^2 is the same for every centre

    sums, counts = group_sums(seeds.expand(batch, num))
    centres = sums / counts.unsqueeze(-1)
    for _ in range(iterations):
        sums, counts = group_sums(assign(centres))
        centres = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp(min=1).unsqueeze(-1), centres)
    return assign(centres), num_clusters


def dropped_token_summary(projected: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Summary token of SHIRG-v2: sum[b] = mean_{n not in keep[b]} proj[b, n], (B, 1, E) in projected.dtype.

    Zero when nothing was dropped (K = N). Differentiable w.r.t. `projected`.
    """
    batch, num, _ = projected.shape
    dropped = torch.ones(batch, num, device=projected.device).scatter_(1, indices, 0.0)
    weights = dropped / max(num - indices.shape[1], 1)
    return torch.bmm(weights.unsqueeze(1), projected.float()).to(projected.dtype)


def shirg_v2_select(vision_features, projected, grid, budget, question_embeds=None, question_mask=None, *,
                    v2_detail_weight: float = 0.25, v2_edge_weight: float = 0.15, coverage_region_size: int = 4,
                    v2_kmeans_iterations: int = 4, detail_term: str = "variance",
                    score_normalization: str = "min-max", pixels=None,
                    patch_size: Optional[int] = None) -> TokenSelection:
    """SHIRG-v2: keep = {argmax_{n in C} s[b, n] : every cluster C of spatial_kmeans} ∪ top_rest(s), + summary token.

    s = `shirg_v2_scores`; the clusters come from `spatial_kmeans` of the vision features (seed spacing
    `coverage_region_size`, `v2_kmeans_iterations` steps) per sample; the best K cluster winners are kept when K is
    smaller than the number of non-empty clusters. extra_tokens = `dropped_token_summary` (B, 1, E): the mean of the
    projected tokens that were not kept. Returns indices (B, K) ascending, extra_tokens (B, 1, E), scores (B, N).
    """
    scores = shirg_v2_scores(vision_features, projected, grid, question_embeds, question_mask,
                             v2_detail_weight=v2_detail_weight, v2_edge_weight=v2_edge_weight,
                             detail_term=detail_term, score_normalization=score_normalization, pixels=pixels,
                             patch_size=patch_size)
    labels, num_clusters = spatial_kmeans(vision_features, grid, coverage_region_size, v2_kmeans_iterations)
    winners = top1_per_group(scores, labels, num_clusters)
    indices = select_with_priority(scores, _winners_mask(winners, scores.shape[1]), budget)
    return TokenSelection(indices, dropped_token_summary(projected, indices), scores)


# ----------------------------------------------------------------------------------------------------------------
# SHIRG-X


def distance_aware_selection(scores: torch.Tensor, grid, budget: int, initial_indices: Optional[torch.Tensor] = None,
                             *, rounds: int = 4, radius: int = 1, penalty: float = 0.5) -> torch.Tensor:
    """Distance-aware top-k: s_t[n] = s[n] * (1 - lambda * max_{|dr|,|dc|<=R} P_{t-1}[n + (dr, dc)]), top k_t of s_t.

    P_0 = the mask of `initial_indices` (B, R0) (e.g. the coverage winners), P_t = P_{t-1} ∪ the tokens picked at
    round t; round t = 1..T (T = `rounds`) picks the k_t best unpicked tokens by s_t, the k_t splitting K - R0 evenly.
    The neighbourhood max is a (2R + 1) x (2R + 1) max-pool of the picked mask over each view (R = `radius`), so a
    token next to an already-picked one loses the fraction `penalty` (lambda) of its score: an NMS-like spread in T
    vectorised rounds, no loop over tokens. The penalty is multiplicative so that it only reorders tokens of
    comparable scores: with s >= 0 (SHIRG's normalised scores) a token of score 0 never overtakes a positive one.
    Returns (B, K) distinct indices, ascending.
    """
    batch, num = scores.shape
    views, height, width = view_shape(grid)
    scores = scores.float()
    picked = torch.zeros(batch, num, dtype=torch.bool, device=scores.device)
    if initial_indices is not None:
        picked.scatter_(1, initial_indices, True)
    remaining = budget - (0 if initial_indices is None else initial_indices.shape[1])
    chunks = [remaining // rounds + (1 if t < remaining % rounds else 0) for t in range(rounds)]
    for chunk in chunks:
        if chunk == 0:
            continue
        near = F.max_pool2d(picked.float().reshape(batch * views, 1, height, width), 2 * radius + 1, 1, radius)
        adjusted = (scores * (1 - penalty * near.reshape(batch, num))).masked_fill(picked, float("-inf"))
        new = torch.sort(adjusted, dim=1, descending=True, stable=True).indices[:, :chunk]
        picked = picked.scatter(1, new, True)
    return mask_to_indices(picked, budget)


def low_resolution_scaffold(tokens: torch.Tensor, grid, size: int = 8) -> torch.Tensor:
    """Low-resolution scaffold: the (B, N, C) token map of a (H, W) grid average-pooled to g x g (every output cell
    averages its own block of tokens, the blocks of F.adaptive_avg_pool2d), (B, g*g, C) raster order, tokens.dtype.

    Separable: pooled = rows @ map @ cols^T with the (g, H) and (g, W) 1-D pooling matrices, computed on the
    channels-last tokens.
    """
    batch, num, channels = tokens.shape
    height, width = grid
    rows = _pooling_weights(height, size, tokens.device)  # (g, H)
    cols = _pooling_weights(width, size, tokens.device)  # (g, W)
    grid_map = tokens.float().reshape(batch, height, width, channels)
    pooled = torch.einsum("ih,bhjc->bijc", rows, torch.einsum("jw,bhwc->bhjc", cols, grid_map))
    return pooled.reshape(batch, size * size, channels).to(tokens.dtype)


def _pooling_weights(length: int, size: int, device) -> torch.Tensor:
    """(size, length) matrix of F.adaptive_avg_pool1d from `length` to `size` cells."""
    # channel h = the unit impulse at h, laid along the width
    one_hot = torch.eye(length, device=device).reshape(1, length, 1, length)
    return F.adaptive_avg_pool2d(one_hot, (1, size))[0, :, 0, :].transpose(0, 1)


def grid_coordinates(grid, device=None, view_boxes=None) -> torch.Tensor:
    """Normalised (x, y, h, w) of every cell of a grid, raster order: (N, 4) float32.

    (H, W) grid: x = (col + 0.5) / W and y = (row + 0.5) / H (the cell's centroid in [0, 1]), h = 1 / H, w = 1 / W.
    (V, H, W) grid: view v's cells are placed in its box (x0, y0, bw, bh) of `view_boxes` (V, 4) (default: every
    view covers [0, 1]^2): x = x0 + bw (col + 0.5) / W, y = y0 + bh (row + 0.5) / H, h = bh / H, w = bw / W.
    """
    views, height, width = view_shape(grid)
    rows = torch.arange(height, device=device, dtype=torch.float32).repeat_interleave(width)
    cols = torch.arange(width, device=device, dtype=torch.float32).repeat(height)
    cells = torch.stack([(cols + 0.5) / width, (rows + 0.5) / height,
                         torch.full_like(rows, 1.0 / height), torch.full_like(rows, 1.0 / width)], dim=-1)  # (H W, 4)
    if view_boxes is None:
        return cells.repeat(views, 1)
    boxes = view_boxes.to(device=device, dtype=torch.float32)[:, None, :]  # (V, 1, 4) = x0, y0, bw, bh
    x = boxes[..., 0] + boxes[..., 2] * cells[None, :, 0]
    y = boxes[..., 1] + boxes[..., 3] * cells[None, :, 1]
    h = boxes[..., 3] * cells[None, :, 2]
    w = boxes[..., 2] * cells[None, :, 3]
    return torch.stack([x, y, h, w], dim=-1).reshape(-1, 4)


def token_coordinates(indices: torch.Tensor, grid, view_boxes=None) -> torch.Tensor:
    """Normalised (x, y, h, w) centroid coordinates of the kept tokens: (B, K) indices -> (B, K, 4) float32."""
    return grid_coordinates(grid, indices.device, view_boxes)[indices]


def shirg_x_select(vision_features, projected, grid, budget, question_embeds=None, question_mask=None, *,
                   coverage_region_size: int = 4, relevance_weight: float = 0.7, detail_weight: float = 0.3,
                   x_suppression_rounds: int = 4, x_suppression_radius: int = 1, x_suppression_penalty: float = 0.5,
                   x_scaffold_size: int = 8, detail_term: str = "variance", score_normalization: str = "min-max",
                   pixels=None, patch_size: Optional[int] = None) -> TokenSelection:
    """SHIRG-X: keep = cover(s) ∪ distance_aware_selection(s), + a g x g scaffold of the projected map.

    s = `shirg_fixed_scores` (detail term `detail_term`), cover = the r x r region winners of every sample
    (`region_coverage`), which seed the picked mask of `distance_aware_selection` that fills the budget; K <= region count keeps the K best winners.
    extra_tokens = `low_resolution_scaffold(projected, grid, g)` (B, g*g, E) (None when x_scaffold_size = 0); their
    coordinates are `grid_coordinates((g, g))` and those of the kept tokens `token_coordinates(indices, grid)`, for
    `CoordinateEmbedding`. Returns indices (B, K) ascending, extra_tokens, scores (B, N).
    """
    scores = shirg_fixed_scores(vision_features, projected, question_embeds, question_mask,
                                relevance_weight=relevance_weight, detail_weight=detail_weight,
                                detail_term=detail_term, score_normalization=score_normalization, grid=grid,
                                pixels=pixels, patch_size=patch_size)
    coverage = region_coverage(scores, grid, coverage_region_size)
    _, num_regions = region_labels(grid, coverage_region_size)
    if budget <= num_regions:
        indices = select_with_priority(scores, coverage, budget)
    else:
        indices = distance_aware_selection(scores, grid, budget, mask_to_indices(coverage, num_regions),
                                           rounds=x_suppression_rounds, radius=x_suppression_radius,
                                           penalty=x_suppression_penalty)
    scaffold = low_resolution_scaffold(projected, grid, x_scaffold_size) if x_scaffold_size else None
    return TokenSelection(indices, scaffold, scores)


class CoordinateEmbedding(nn.Module):
    """Learned embedding of (x, y, h, w) token coordinates added to the kept tokens: e = W c + b, W and b zero-init.

    Zero at initialisation, so an untrained model equals SHIRG without it; the gradient w.r.t. W is nonzero
    (dL/dW = dL/de c^T). (B, K, 4) -> (B, K, E) in the module's dtype. A model's weight initialisation calls
    `reset_parameters()` on it (its parameters are its own, so the initialisation reaches this module).
    """

    def __init__(self, hidden_size: int, num_coordinates: int = 4):
        super().__init__()
        # own parameters (not an nn.Linear) so that a model's weight initialisation reaches this module itself
        self.weight = nn.Parameter(torch.zeros(hidden_size, num_coordinates))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def reset_parameters(self):
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, coordinates: torch.Tensor) -> torch.Tensor:
        return F.linear(coordinates.to(self.weight.dtype), self.weight, self.bias)


def budget_statistics(variance: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Patch statistics for `AdaptiveBudgetHead`: [H(p) / log N, mean(s), std(s)] per sample, (B, 3) float32.

    p[b, n] = var[b, n] / sum_n var[b, n] (uniform when all variances are 0), H(p) = -sum_n p log p: 1 when detail is
    spread over the whole view (needs a larger budget), near 0 when it is concentrated; s = the selection scores.
    """
    variance = variance.float().clamp(min=0)
    num = variance.shape[1]
    total = variance.sum(dim=1, keepdim=True)
    p = torch.where(total > 0, variance / torch.where(total > 0, total, torch.ones_like(total)),
                    torch.full_like(variance, 1.0 / num))
    entropy = -torch.special.xlogy(p, p).sum(dim=1) / math.log(max(num, 2))
    scores = scores.float()
    return torch.stack([entropy, scores.mean(dim=1), scores.std(dim=1, correction=0)], dim=-1)


class AdaptiveBudgetHead(nn.Module):
    """Chooses a token budget per sample from patch statistics: logits = MLP(stats), budget = budgets[argmax logits].

    stats = `budget_statistics(token_variance(vision_features), scores)` (B, 3). Initialisation: the last layer has
    zero weight and a bias of 1 on `default_budget`, so the untrained head always picks the default budget (and
    SHIRG behaves as with a fixed K). `choose` returns the budgets as a (B,) int64 tensor, with no host sync.

    Training (not done here): the choice is discrete, so train the logits with a straight-through Gumbel-softmax
    (select at max(budgets), keep `truncate_to_budget(...)` tokens, weight the LM loss by the soft one-hot) plus a
    cost term lambda * E_p[K] / max(budgets), or supervise them with cross-entropy on the best budget per sample
    measured offline. To batch different budgets without a sync: select max(budgets) tokens and mask the tail with
    `truncate_to_budget`; converting the choice to a Python int (one sync) is needed only to shrink the tensors.
    """

    num_statistics = 3

    def __init__(self, budgets, default_budget: Optional[int] = None, hidden_size: int = 32):
        super().__init__()
        self.budgets = tuple(budgets)
        if default_budget is None:
            default_budget = self.budgets[len(self.budgets) // 2]
        self.default_index = self.budgets.index(default_budget)
        self.register_buffer("budget_values", torch.tensor(self.budgets, dtype=torch.long), persistent=False)
        self.hidden = nn.Linear(self.num_statistics, hidden_size)
        # the output layer's own parameters (not an nn.Linear) so that a model's weight initialisation reaches
        # this module and `reset_parameters` sets the default-budget start
        self.output_weight = nn.Parameter(torch.zeros(len(self.budgets), hidden_size))
        self.output_bias = nn.Parameter(torch.zeros(len(self.budgets)))
        self.reset_parameters()

    def reset_parameters(self):
        """Zero output weight and a bias of 1 on the default budget (the hidden layer keeps its own init)."""
        with torch.no_grad():
            self.output_weight.zero_()
            self.output_bias.zero_()
            self.output_bias[self.default_index] = 1.0

    def forward(self, statistics: torch.Tensor) -> torch.Tensor:
        """(B, 3) statistics -> (B, len(budgets)) logits = W_o gelu(W_h s + b_h) + b_o."""
        hidden = F.gelu(self.hidden(statistics.to(self.hidden.weight.dtype)))
        return F.linear(hidden, self.output_weight, self.output_bias)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, len(budgets)) logits -> (B,) int64 budgets (argmax; ties -> the earlier budget). No host sync."""
        return self.budget_values[logits.argmax(dim=-1)]


def truncate_to_budget(indices: torch.Tensor, scores: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Keep mask (B, K) over a selection: keep[b, k] = rank of s[b, indices[b, k]] among the selection < budgets[b].

    For per-sample budgets in one batch without a host sync (select K = max budget, then mask). Ties by position.
    """
    selected = scores.float().gather(1, indices)
    order = torch.sort(selected, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                             .expand_as(order).contiguous())
    return ranks < budgets.to(ranks.device).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------------
# baselines (same interface; the question arguments are accepted and ignored: these methods are text-free)


def _top_by(scores: torch.Tensor, budget: int) -> torch.Tensor:
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :budget]
    return torch.sort(order, dim=1).values


def random_select(vision_features, projected, grid, budget, question_embeds=None, question_mask=None, *,
                  random_seed: int = 0) -> TokenSelection:
    """Random baseline: K tokens uniformly without replacement (seeded torch.Generator on the tokens' device)."""
    batch, num = projected.shape[:2]
    generator = torch.Generator(device=projected.device).manual_seed(random_seed)
    keys = torch.rand(batch, num, generator=generator, device=projected.device)
    return TokenSelection(_top_by(keys, budget), None, keys)


def top_norm_select(vision_features, projected, grid, budget, question_embeds=None,
                    question_mask=None) -> TokenSelection:
    """Top-norm baseline (the plan's text-free fallback): the K projected tokens of largest L2 norm."""
    scores = feature_norm(projected)
    return TokenSelection(_top_by(scores, budget), None, scores)


def visionzip_select(vision_features, projected, grid, budget, question_embeds=None, question_mask=None, *,
                     attention_received: Optional[torch.Tensor] = None,
                     visionzip_contextual_tokens: int = 32) -> TokenSelection:
    """VisionZip-style (Yang et al. 2024): dominant = top-K attention received, + contextual = merged remaining tokens.

    attention_received (B, N): the attention each token receives in the vision tower's last used layer (the caller
    computes it, e.g. mean over heads and queries). The N - K other tokens are merged into
    C = `visionzip_contextual_tokens` centres: C targets taken at a uniform stride among them (raster order), every other token joins the target of
    highest cosine similarity of vision features, and a contextual token is the mean of its group's PROJECTED tokens
    (the caller projected all tokens already). Returns indices (B, K) ascending, extra_tokens (B, C, E) (None for
    C = 0), scores = attention_received (B, N) float32.
    """
    batch, num = projected.shape[:2]
    remaining = num - budget
    scores = attention_received.float()
    dominant = torch.zeros(batch, num, dtype=torch.bool, device=scores.device)
    dominant.scatter_(1, torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :budget], True)
    indices = mask_to_indices(dominant, budget)
    if visionzip_contextual_tokens == 0:
        return TokenSelection(indices, None, scores)
    rest = mask_to_indices(~dominant, remaining)  # (B, M) the other tokens, raster order
    targets = torch.arange(visionzip_contextual_tokens, device=scores.device) * remaining // visionzip_contextual_tokens
    features = F.normalize(gather_tokens(vision_features.float(), rest), dim=-1, eps=1e-6)  # (B, M, D)
    similarity = torch.bmm(features, features[:, targets].transpose(1, 2))  # (B, M, C)
    centres = torch.arange(visionzip_contextual_tokens, device=scores.device)
    is_target = torch.arange(remaining, device=scores.device).unsqueeze(1) == targets  # (M, C)
    similarity = similarity.masked_fill(is_target, float("inf"))  # a target joins its own group
    groups = (similarity.argmax(dim=-1, keepdim=True) == centres).float()  # (B, M, C)
    sums = torch.bmm(groups.transpose(1, 2), gather_tokens(projected.float(), rest))
    contextual = sums / groups.sum(dim=1).clamp(min=1).unsqueeze(-1)
    return TokenSelection(indices, contextual.to(projected.dtype), scores)


def divprune_select(vision_features, projected, grid, budget, question_embeds=None,
                    question_mask=None) -> TokenSelection:
    """DivPrune-style (Alvar et al. 2025): greedy max-min diversity, k_{t+1} = argmax_n min_{m in S_t} (1 - cos(x_n, x_m)).

    S_1 = {the token farthest (cosine) from the mean token}; each of the K - 1 steps is one vectorised update over
    all tokens, on the projected (LM-input) tokens as DivPrune. Returns indices (B, K) ascending; scores None (the
    order of picking is greedy, not a score).
    """
    batch, num = projected.shape[:2]
    unit = F.normalize(projected.float(), dim=-1, eps=1e-6)
    mean = F.normalize(unit.mean(dim=1), dim=-1, eps=1e-6)
    first = torch.bmm(unit, mean.unsqueeze(-1)).squeeze(-1).argmin(dim=1, keepdim=True)  # farthest from the mean
    selected = torch.zeros(batch, num, dtype=torch.bool, device=unit.device).scatter_(1, first, True)

    def distance_to(picked):  # (B, 1) -> (B, N) cosine distance of every token to the picked one
        return 1 - torch.bmm(unit, gather_tokens(unit, picked).transpose(1, 2)).squeeze(-1)

    min_distance = distance_to(first)
    for _ in range(budget - 1):
        picked = min_distance.masked_fill(selected, float("-inf")).argmax(dim=1, keepdim=True)
        selected = selected.scatter(1, picked, True)
        min_distance = torch.minimum(min_distance, distance_to(picked))
    return TokenSelection(mask_to_indices(selected, budget), None, None)


# ----------------------------------------------------------------------------------------------------------------
# registry: what each method gives the LM (count, selection, order), and the module that runs it


class SelectionInputs(NamedTuple):
    """What one selection call sees: I images' high-resolution tokens on one grid (see the module docstring)."""

    vision_features: torch.Tensor  # (I, N, D) before the projector
    projected: torch.Tensor  # (I, N, E) after it
    grid: tuple  # (H, W), or (V, H, W) for anyres views
    view_boxes: Optional[torch.Tensor] = None  # (V, 4) canvas boxes (x0, y0, w, h) of a (V, H, W) grid's views
    question_embeds: Optional[torch.Tensor] = None  # (I, L, E)
    question_mask: Optional[torch.Tensor] = None  # (I, L) bool
    pixels: Optional[torch.Tensor] = None  # (I V, 3, S, S) the views the tokens come from ("pixel-contrast")
    patch_size: Optional[int] = None
    attention_received: Optional[torch.Tensor] = None  # (I, N) VisionZip's attention
    global_view_tokens: Optional[torch.Tensor] = None  # (I, p*p, E) LaViDa's pooled global view (SHIRG-X scaffold)


class SelectionMethod:
    """A method of METHODS: the image tokens it gives the LM under a call's settings (a SelectionSettings or a
    mapping of its fields).

    token_count(image_size, settings) = kept_count + extra_count: the image positions the processor reserves.
    select(inputs, settings): the TokenSelection of its kept_count tokens (under adaptive_budget, for the methods with
    `learned_budget`, max(budget_choices): the positions beyond each image's chosen budget are masked, not removed).
    extra(selection, inputs, settings): the tokens it adds (I, M, E) or None, with the (rows, cols) grid of their
    coordinates for the coordinate embedding (None: no coordinates); `extra_first`: they come before the kept ones.
    """

    function = None  # the selection function of this module (select_tokens dispatches to it)
    learned_budget = False  # adaptive_budget applies: the budget head chooses each image's budget
    needs_attention = False  # select reads inputs.attention_received
    extra_first = False
    kept_coordinates = True  # the kept tokens get the coordinate embedding (with coordinate_embedding)

    def kept_count(self, settings) -> int:
        if self.learned_budget and settings["adaptive_budget"]:
            return max(settings["budget_choices"])
        return settings["selection_budget"]

    def extra_count(self, settings) -> int:
        return 0

    def token_count(self, image_size, settings) -> int:
        return self.kept_count(settings) + self.extra_count(settings)

    def uses_question(self, settings) -> bool:
        return False

    def needs_global_view(self, settings) -> bool:
        return False

    def select(self, inputs: SelectionInputs, settings) -> TokenSelection:
        return self.function(inputs.vision_features, inputs.projected, inputs.grid, self.kept_count(settings))

    def extra(self, selection: TokenSelection, inputs: SelectionInputs, settings):
        return selection.extra_tokens, None


class Pooled(SelectionMethod):
    """LaViDa's own path, nothing selected: every view pooled to p x p, the crops stitched and unpadded with a newline
    token per row (LavidaShirgModel.pooled_image_features); the count is LaViDa's. Single-view layouts ("pad",
    "square"): the view's p x p tokens alone."""

    def token_count(self, image_size, settings) -> int:
        if settings["image_aspect_ratio"] != "anyres":
            return settings["pooled_view_size"] ** 2
        return pooled_image_token_count(image_size, settings["image_grid_pinpoints"], settings["view_size"],
                                        settings["pooled_view_size"])


class Full(SelectionMethod):
    """Every high-resolution token, in raster order (view after view for anyres views), as the projector gives them."""

    kept_coordinates = False

    def token_count(self, image_size, settings) -> int:
        return math.prod(source_grid(image_size, settings))

    def select(self, inputs, settings):
        batch, num = inputs.projected.shape[:2]
        return TokenSelection(torch.arange(num, device=inputs.projected.device).expand(batch, num))


def _score_options(inputs, settings) -> dict:
    """The keyword options of the SHIRG score (detail term and its inputs)."""
    return dict(detail_term=settings["detail_term"], score_normalization=settings["score_normalization"],
                pixels=inputs.pixels, patch_size=inputs.patch_size)


class ShirgFixed(SelectionMethod):
    """SHIRG-Fixed (`shirg_fixed_select`): the K kept tokens in raster order."""

    function = staticmethod(shirg_fixed_select)
    learned_budget = True

    def uses_question(self, settings):
        return settings["relevance_weight"] > 0

    def select(self, inputs, settings):
        return shirg_fixed_select(
            inputs.vision_features, inputs.projected, inputs.grid, self.kept_count(settings), inputs.question_embeds,
            inputs.question_mask, coverage_region_size=settings["coverage_region_size"],
            relevance_weight=settings["relevance_weight"], detail_weight=settings["detail_weight"],
            **_score_options(inputs, settings))


class ShirgV2(SelectionMethod):
    """SHIRG-v2 (`shirg_v2_select`): the K kept tokens in raster order, then the summary of the dropped tokens
    (v2_summary_token)."""

    function = staticmethod(shirg_v2_select)
    learned_budget = True

    def extra_count(self, settings):
        return int(settings["v2_summary_token"])

    def uses_question(self, settings):
        return settings["v2_detail_weight"] < 1

    def select(self, inputs, settings):
        return shirg_v2_select(
            inputs.vision_features, inputs.projected, inputs.grid, self.kept_count(settings), inputs.question_embeds,
            inputs.question_mask, v2_detail_weight=settings["v2_detail_weight"],
            v2_edge_weight=settings["v2_edge_weight"], coverage_region_size=settings["coverage_region_size"],
            v2_kmeans_iterations=settings["v2_kmeans_iterations"], **_score_options(inputs, settings))

    def extra(self, selection, inputs, settings):
        return (selection.extra_tokens if settings["v2_summary_token"] else None), None


class ShirgX(SelectionMethod):
    """SHIRG-X (`shirg_x_select`): the scaffold first, then the K kept tokens in raster order. x_scaffold
    "global-view": the global view's LaViDa tokens (p x p, pooled), "grid": the projected map pooled to g x g
    (g = x_scaffold_size, single view), "none": no scaffold. The scaffold tokens carry their own coordinates."""

    function = staticmethod(shirg_x_select)
    learned_budget = True
    extra_first = True

    def extra_count(self, settings):
        scaffold = settings["x_scaffold"]
        if scaffold == "global-view":
            return settings["pooled_view_size"] ** 2
        return settings["x_scaffold_size"] ** 2 if scaffold == "grid" else 0

    def uses_question(self, settings):
        return settings["relevance_weight"] > 0

    def needs_global_view(self, settings):
        return settings["x_scaffold"] == "global-view"

    def select(self, inputs, settings):
        return shirg_x_select(
            inputs.vision_features, inputs.projected, inputs.grid, self.kept_count(settings), inputs.question_embeds,
            inputs.question_mask, coverage_region_size=settings["coverage_region_size"],
            relevance_weight=settings["relevance_weight"], detail_weight=settings["detail_weight"],
            x_suppression_rounds=settings["x_suppression_rounds"],
            x_suppression_radius=settings["x_suppression_radius"],
            x_suppression_penalty=settings["x_suppression_penalty"],
            x_scaffold_size=settings["x_scaffold_size"] if settings["x_scaffold"] == "grid" else 0,
            **_score_options(inputs, settings))

    def extra(self, selection, inputs, settings):
        if settings["x_scaffold"] == "global-view":
            return inputs.global_view_tokens, (settings["pooled_view_size"],) * 2
        if settings["x_scaffold"] == "grid":
            return selection.extra_tokens, (settings["x_scaffold_size"],) * 2
        return None, None


class Random(SelectionMethod):
    """`random_select` (seed random_seed): the K kept tokens in raster order."""

    function = staticmethod(random_select)

    def select(self, inputs, settings):
        return random_select(inputs.vision_features, inputs.projected, inputs.grid, self.kept_count(settings),
                             random_seed=settings["random_seed"])


class TopNorm(SelectionMethod):
    """`top_norm_select`: the K kept tokens in raster order."""

    function = staticmethod(top_norm_select)


class VisionZip(SelectionMethod):
    """`visionzip_select`: the K - C dominant tokens in raster order, then C = visionzip_contextual_tokens
    contextual tokens (the budget K counts both)."""

    function = staticmethod(visionzip_select)
    needs_attention = True

    def kept_count(self, settings):
        return settings["selection_budget"] - settings["visionzip_contextual_tokens"]

    def extra_count(self, settings):
        return settings["visionzip_contextual_tokens"]

    def select(self, inputs, settings):
        return visionzip_select(inputs.vision_features, inputs.projected, inputs.grid, self.kept_count(settings),
                                attention_received=inputs.attention_received,
                                visionzip_contextual_tokens=settings["visionzip_contextual_tokens"])


class DivPrune(SelectionMethod):
    """`divprune_select`: the K kept tokens in raster order."""

    function = staticmethod(divprune_select)


METHODS = {"pooled": Pooled(), "full": Full(), "shirg-fixed": ShirgFixed(), "shirg-v2": ShirgV2(), "shirg-x": ShirgX(),
           "random": Random(), "top-norm": TopNorm(), "visionzip": VisionZip(), "divprune": DivPrune()}


def image_token_count(image_size, settings) -> int:
    """Image positions the LM receives for one (height, width) image under a call's settings (its method's
    `token_count`)."""
    return METHODS[settings["selection_method"]].token_count(image_size, settings)


def select_tokens(method: str, vision_features, projected, grid, budget, question_embeds=None, question_mask=None,
                  **options) -> TokenSelection:
    """METHODS[method].function(vision_features, projected, grid, budget, question_embeds, question_mask, **options):
    a selection method's function with explicit keyword options (named as the SHIRG settings)."""
    return METHODS[method].function(vision_features, projected, grid, budget, question_embeds, question_mask,
                                    **options)


class TokenSelector(nn.Module):
    """Runs a method of METHODS on a group of images and returns the LM's image tokens; owns the learned parts: the
    coordinate embedding (config.coordinate_embedding) and the adaptive budget head (config.adaptive_budget).

    tokens = the projected tokens of the selected indices (+ CoordinateEmbedding of their (x, y, h, w) with
    coordinate_embedding) and the method's extra tokens (a scaffold with its own coordinates), in the method's order.
    Under adaptive_budget (methods with learned_budget) the head picks each image's budget from
    `budget_statistics(token_variance(x), scores)` and the kept tokens beyond it are invalid (`truncate_to_budget`).
    """

    def __init__(self, config):
        super().__init__()
        self.coordinate_embedding = (CoordinateEmbedding(config.text_config.hidden_size)
                                     if config.coordinate_embedding else None)
        self.budget_head = None
        if config.adaptive_budget:
            default = config.selection_budget if config.selection_budget in config.budget_choices else None
            self.budget_head = AdaptiveBudgetHead(config.budget_choices, default)

    def forward(self, inputs: SelectionInputs, settings):
        """(tokens (I, M, E), valid (I, M) bool, the method's TokenSelection)."""
        method = METHODS[settings["selection_method"]]
        selection = method.select(inputs, settings)
        kept = gather_tokens(inputs.projected, selection.indices)  # (I, K, E)
        if settings["coordinate_embedding"] and method.kept_coordinates:
            coordinates = token_coordinates(selection.indices, inputs.grid, inputs.view_boxes)  # (I, K, 4)
            kept = kept + self.coordinate_embedding(coordinates).to(kept.dtype)
        valid = torch.ones(kept.shape[:2], dtype=torch.bool, device=kept.device)
        if method.learned_budget and settings["adaptive_budget"]:
            statistics = budget_statistics(token_variance(inputs.vision_features), selection.scores)
            chosen = self.budget_head.choose(self.budget_head(statistics))  # (I,)
            valid = truncate_to_budget(selection.indices, selection.scores, chosen)
        extra, extra_grid = method.extra(selection, inputs, settings)
        if extra is None:
            return kept, valid, selection
        if settings["coordinate_embedding"] and extra_grid is not None:
            extra = extra + self.coordinate_embedding(grid_coordinates(extra_grid, extra.device)).to(extra.dtype)
        extra = extra.to(kept.dtype)
        extra_valid = torch.ones(extra.shape[:2], dtype=torch.bool, device=kept.device)
        if method.extra_first:
            return torch.cat((extra, kept), dim=1), torch.cat((extra_valid, valid), dim=1), selection
        return torch.cat((kept, extra), dim=1), torch.cat((valid, extra_valid), dim=1), selection

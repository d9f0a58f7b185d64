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
  boolean-mask indexing or ``nonzero``. The one exception is the explicit check that every sample has a usable
  question token (``check_question_mask``), done when ``validate=True`` (the default), which reads one boolean on
  the host to raise a ``ValueError``; a caller that validated the mask already (e.g. on the tokenizer's CPU mask)
  passes ``validate=False`` and the call is free of host syncs.
* Python-int arguments (budget, grid, region size, ...) are validated with ``ValueError`` naming the argument.
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_BUDGETS = (512, 768, 1024)


class TokenSelection(NamedTuple):
    """The output of every selection method (see the module docstring)."""

    indices: torch.Tensor  # (B, K) int64, distinct, ascending
    extra_tokens: Optional[torch.Tensor] = None  # (B, M, E) in projected.dtype, appended after the kept tokens
    scores: Optional[torch.Tensor] = None  # (B, N) float32, what the method ranked by


# ----------------------------------------------------------------------------------------------------------------
# validation (Python ints and shapes only)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_grid(grid, num_tokens: int):
    """(height, width) of a single-view grid; raise if `grid` is not such a pair matching N."""
    if isinstance(grid, (tuple, list)) and len(grid) == 3:
        raise ValueError(f"this function takes a single-view (height, width) grid, got the multi-view grid {grid!r}")
    _, height, width = _view_grid(grid, num_tokens)
    return height, width


def _view_grid(grid, num_tokens: int):
    """(views, height, width) of a (H, W) or (V, H, W) grid; raise if it is malformed or does not match N."""
    if (not isinstance(grid, (tuple, list)) or len(grid) not in (2, 3) or not all(_is_int(g) and g > 0 for g in grid)):
        raise ValueError(f"grid must be a (height, width) pair or a (views, height, width) triple of positive "
                         f"integers, got {grid!r}")
    views, height, width = (1, *grid) if len(grid) == 2 else grid
    if views * height * width != num_tokens:
        raise ValueError(f"grid {tuple(grid)} has {views * height * width} cells but the tokens have N = {num_tokens}")
    return views, height, width


def _check_tokens(name: str, tokens: torch.Tensor, batch: Optional[int] = None, num: Optional[int] = None):
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or not tokens.is_floating_point():
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{name} must be a floating (B, N, C) tensor, got {shape}")
    if batch is not None and (tokens.shape[0] != batch or tokens.shape[1] != num):
        raise ValueError(f"{name} has (B, N) = {tuple(tokens.shape[:2])}, expected ({batch}, {num})")


def _check_budget(budget, num_tokens: int) -> int:
    if not _is_int(budget) or not 1 <= budget <= num_tokens:
        raise ValueError(f"budget must be an integer in [1, {num_tokens}] (the N tokens of the view), got {budget!r}")
    return budget


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_inputs(vision_features, projected, grid, budget):
    _check_tokens("vision_features", vision_features)
    batch, num = vision_features.shape[:2]
    _check_tokens("projected", projected, batch, num)
    _view_grid(grid, num)
    _check_budget(budget, num)
    return batch, num


def check_question_mask(question_mask: torch.Tensor) -> None:
    """Raise ValueError unless every sample of `question_mask` (B, L) marks at least one usable question token.

    The only host read of this module (one boolean); the selection functions call it when `validate=True`.
    """
    has_question = question_mask.bool().any(dim=1)
    if not bool(has_question.all()):
        missing = (~has_question).nonzero().flatten().tolist()
        raise ValueError(
            f"question_mask marks no usable question token for sample(s) {missing}: relevance needs a question "
            "(select a text-free method such as 'top-norm', or pass text_free=True to replace relevance by the "
            "token norm explicitly)"
        )


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
    views, _, _ = _view_grid(grid, num)
    per_view = features.float().reshape(batch, views, num // views, channels)
    return token_variance((per_view - per_view.mean(dim=2, keepdim=True)).reshape(batch, num, channels))


def edge_density(features: torch.Tensor, grid) -> torch.Tensor:
    """Mean absolute Laplacian of the token map: e[b, n] = mean_d |(x_d * K)[b, n]|, K = [[0,1,0],[1,-4,1],[0,1,0]].

    The (B, N, D) tokens are laid as a (B V, D, H, W) map (one per view), convolved depthwise with the 4-neighbour
    Laplacian kernel after REPLICATE padding of one token on every side (a border token is compared with itself, so
    a constant map has zero edge density everywhere, borders included). (B, N, D) -> (B, N) float32.
    """
    batch, num, channels = features.shape
    views, height, width = _view_grid(grid, num)
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
    _check_positive_int("patch_size", patch_size)
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] != 3:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"pixels must be a (B V, 3, S, S) tensor of the views the tokens come from, got {shape}")
    views, height, width = (1, *grid) if len(grid) == 2 else grid
    rows, cols = pixels.shape[-2] // patch_size, pixels.shape[-1] // patch_size
    if (rows, cols) != (height, width) or pixels.shape[0] % views:
        raise ValueError(f"pixels {tuple(pixels.shape)} with patch_size {patch_size} give {pixels.shape[0]} views of "
                         f"{rows} x {cols} patches, not a multiple of the grid {tuple(grid)}")
    pixels = pixels.float()[:, :, :rows * patch_size, :cols * patch_size]
    luminance = sum(weight * pixels[:, channel] for channel, weight in enumerate(LUMINANCE))  # (B V, S, S)
    blocks = luminance.reshape(-1, rows, patch_size, cols, patch_size)
    contrast = blocks.var(dim=(2, 4), correction=0).sqrt()
    return contrast.reshape(pixels.shape[0] // views, views * rows * cols)


DETAIL_TERMS = ("variance", "centered-variance", "edge-density", "pixel-contrast")


def detail_scores(detail_term: str, vision_features: torch.Tensor, grid=None, pixels=None,
                  patch_size: Optional[int] = None) -> torch.Tensor:
    """SHIRG's detail term d (B, N) float32 by name: "variance" = `token_variance(x)` (the seed's), "centered-variance"
    = `centered_token_variance(x, grid)`, "edge-density" = `edge_density(x, grid)`, "pixel-contrast" =
    `pixel_contrast(pixels, grid, patch_size)` (x: the pre-projector vision features (B, N, D)).

    Raises ValueError naming `detail_term` and DETAIL_TERMS for an unknown name, and for a term whose inputs are missing.
    """
    if detail_term not in DETAIL_TERMS:
        raise ValueError(f"detail_term must be one of {DETAIL_TERMS}, got {detail_term!r}")
    if detail_term == "variance":
        return token_variance(vision_features)
    if grid is None:
        raise ValueError(f"detail_term={detail_term!r} needs the token grid")
    if detail_term == "centered-variance":
        return centered_token_variance(vision_features, grid)
    if detail_term == "edge-density":
        return edge_density(vision_features, grid)
    if pixels is None or patch_size is None:
        raise ValueError("detail_term='pixel-contrast' needs pixels (the views the tokens come from) and patch_size")
    _view_grid(grid, vision_features.shape[1])
    return pixel_contrast(pixels, grid, patch_size)


def _detail_term(weight, detail_term, vision_features, grid, pixels, patch_size):
    """weight * norm(d) of `detail_scores`, or zeros (B, N) when weight = 0 (the term's inputs are then not needed)."""
    if weight == 0:
        return vision_features.new_zeros(vision_features.shape[:2], dtype=torch.float32)
    return weight * normalize_per_sample(detail_scores(detail_term, vision_features, grid, pixels, patch_size))


def relevance_scores(projected: torch.Tensor, question_embeds: torch.Tensor, question_mask: torch.Tensor,
                     *, validate: bool = True) -> torch.Tensor:
    """Text relevance in the LM space: rel[b, n] = max_{l : mask[b, l]} cos(proj[b, n], q[b, l]).

    projected (B, N, E), question_embeds (B, L, E), question_mask (B, L) bool -> (B, N) float32 in [-1, 1].
    With `validate=True` a sample without a usable question token raises ValueError (`check_question_mask`); with
    `validate=False` the caller vouches for the mask (no host read) and such a sample would get relevance 0.
    """
    _check_tokens("projected", projected)
    _check_tokens("question_embeds", question_embeds)
    batch, length, dim = question_embeds.shape
    if question_embeds.shape[0] != projected.shape[0] or dim != projected.shape[2]:
        raise ValueError(
            f"question_embeds {tuple(question_embeds.shape)} must be (B, L, E) matching projected "
            f"{tuple(projected.shape)}"
        )
    if not isinstance(question_mask, torch.Tensor) or tuple(question_mask.shape) != (batch, length):
        shape = tuple(question_mask.shape) if isinstance(question_mask, torch.Tensor) else question_mask
        raise ValueError(f"question_mask must be a (B, L) = ({batch}, {length}) tensor, got {shape}")
    mask = question_mask.bool()
    if validate:
        check_question_mask(mask)
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


def _relevance_term(projected, question_embeds, question_mask, weight, validate, text_free):
    """The normalised relevance term, or the normalised token norm when the caller asked for `text_free`."""
    if text_free:
        if question_embeds is not None or question_mask is not None:
            raise ValueError("text_free=True selects without the question: pass question_embeds=None, question_mask=None")
        return normalize_per_sample(feature_norm(projected))
    if weight == 0:
        return None
    if question_embeds is None:
        raise ValueError(
            "question_embeds is required for a relevance weight > 0 (or pass text_free=True to use the token norm "
            "instead, explicitly)"
        )
    if question_mask is None:
        raise ValueError("question_mask (B, L) is required with question_embeds: mark the usable question tokens")
    return normalize_per_sample(relevance_scores(projected, question_embeds, question_mask, validate=validate))


# ----------------------------------------------------------------------------------------------------------------
# coverage and top-k machinery


def region_labels(grid, region_size: int, device=None):
    """Label of the r x r region of every token, in raster order of regions: (N,) int64 and the region count.

    Regions tile each view from its top-left corner; when H or W is not a multiple of r the last row/column of
    regions is partial and still counts as a region (ceil(H / r) * ceil(W / r) regions per view, V times that for a
    (V, H, W) grid). A view smaller than r x r is one (partial) region.
    """
    views, height, width = (1, *grid) if len(grid) == 2 else grid
    _check_positive_int("region_size", region_size)
    per_row = -(-width // region_size)
    per_view = (-(-height // region_size)) * per_row
    rows = torch.arange(height, device=device) // region_size
    cols = torch.arange(width, device=device) // region_size
    labels = (rows[:, None] * per_row + cols[None, :]).reshape(-1)  # (H W,)
    offsets = torch.arange(views, device=device) * per_view  # (V,)
    return (offsets[:, None] + labels[None, :]).reshape(-1), views * per_view


def top1_per_group(scores: torch.Tensor, labels: torch.Tensor, num_groups: int):
    """Best-scoring token of every group, per sample: winner[b, g] = argmax_{n : label[b, n] = g} s[b, n].

    scores (B, N), labels (N,) or (B, N) int64 in [0, G). Returns winners (B, G) int64 (ties -> lowest index) and
    valid (B, G) bool (False for an empty group, whose winner is N).
    """
    batch, num = scores.shape
    scores = scores.float()
    labels = labels.expand(batch, num)
    group_max = scores.new_full((batch, num_groups), float("-inf")).scatter_reduce(1, labels, scores, "amax")
    is_max = scores == group_max.gather(1, labels)
    positions = torch.arange(num, device=scores.device).expand(batch, num)
    candidates = torch.where(is_max, positions, torch.full_like(positions, num))
    winners = torch.full((batch, num_groups), num, dtype=torch.long, device=scores.device)
    winners = winners.scatter_reduce(1, labels, candidates, "amin")
    return winners, winners < num


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
    winners, _ = top1_per_group(scores, labels, num_regions)
    return _winners_mask(winners, scores.shape[1])


# ----------------------------------------------------------------------------------------------------------------
# SHIRG-Fixed


def shirg_fixed_scores(vision_features, projected, question_embeds=None, question_mask=None, *,
                       relevance_weight: float = 0.7, detail_weight: float = 0.3, validate: bool = True,
                       text_free: bool = False, detail_term: str = "variance", grid=None, pixels=None,
                       patch_size: Optional[int] = None) -> torch.Tensor:
    """SHIRG-Fixed score: s = w_r * norm(rel) + w_v * norm(d), w_r = 0.7, w_v = 0.3 (norm: per-sample min-max).

    rel = `relevance_scores(projected, question)` (or the token norm with `text_free=True`), d = `detail_scores(detail,
    vision_features, grid, pixels, patch_size)`; detail "variance" (d = `token_variance`) is the seed's formula, bit
    for bit. A zero weight skips its term (no question needed with w_r = 0). (B, N) float32.
    """
    relevance_weight = _check_weight("relevance_weight", relevance_weight)
    detail_weight = _check_weight("detail_weight", detail_weight)
    scores = _detail_term(detail_weight, detail_term, vision_features, grid, pixels, patch_size)
    relevance = _relevance_term(projected, question_embeds, question_mask, relevance_weight, validate, text_free)
    if relevance is not None:
        scores = scores + relevance_weight * relevance
    return scores


def shirg_fixed_select(vision_features, projected, grid, budget, question_embeds=None, question_mask=None, *,
                       coverage_region_size: int = 4, relevance_weight: float = 0.7, detail_weight: float = 0.3,
                       validate: bool = True, text_free: bool = False, detail_term: str = "variance", pixels=None,
                       patch_size: Optional[int] = None) -> TokenSelection:
    """SHIRG-Fixed: keep = cover(s) ∪ top_{K - |cover|}(s), cover = {argmax_{n in R} s[b, n] : every r x r region R}.

    s = `shirg_fixed_scores` (detail term `detail_term`; pixels / patch_size for "pixel-contrast"). The coverage
    winners are taken for every sample independently; the global top-k of the
    remaining tokens fills the budget. K smaller than the region count: the K best-scoring region winners are kept
    (coverage cannot be complete; r = 1 then equals plain top-k). Returns indices (B, K) ascending, scores (B, N).
    """
    _check_inputs(vision_features, projected, grid, budget)
    scores = shirg_fixed_scores(vision_features, projected, question_embeds, question_mask,
                                relevance_weight=relevance_weight, detail_weight=detail_weight,
                                validate=validate, text_free=text_free, detail_term=detail_term, grid=grid,
                                pixels=pixels, patch_size=patch_size)
    coverage = region_coverage(scores, grid, coverage_region_size)
    return TokenSelection(select_with_priority(scores, coverage, budget), None, scores)


# ----------------------------------------------------------------------------------------------------------------
# SHIRG-v2


def shirg_v2_scores(vision_features, projected, grid, question_embeds=None, question_mask=None, *,
                    v2_detail_weight: float = 0.25, v2_edge_weight: float = 0.15, validate: bool = True,
                    text_free: bool = False, detail_term: str = "variance", pixels=None,
                    patch_size: Optional[int] = None) -> torch.Tensor:
    """SHIRG-v2 score: s = a * norm(d) + (1 - a) * norm(rel) + b * norm(edge), a = 0.25, b = 0.15.

    d = `detail_scores(detail, ...)` ("variance": `token_variance`, the seed's formula bit for bit), edge =
    `edge_density` (of the pre-projector vision features), rel = `relevance_scores` (or the token norm with
    `text_free=True`); norm: per-sample min-max. a = 1 drops the relevance term (no question needed), a = 0 the
    detail term. (B, N) float32.
    """
    v2_detail_weight = _check_weight("v2_detail_weight", v2_detail_weight)
    v2_edge_weight = _check_weight("v2_edge_weight", v2_edge_weight)
    if v2_detail_weight > 1:
        raise ValueError(f"v2_detail_weight must be in [0, 1] (relevance weight 1 - v2_detail_weight), "
                         f"got {v2_detail_weight}")
    scores = _detail_term(v2_detail_weight, detail_term, vision_features, grid, pixels, patch_size)
    if v2_edge_weight:
        scores = scores + v2_edge_weight * normalize_per_sample(edge_density(vision_features, grid))
    relevance = _relevance_term(projected, question_embeds, question_mask, 1.0 - v2_detail_weight, validate, text_free)
    if relevance is not None:
        scores = scores + (1.0 - v2_detail_weight) * relevance
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
    views, height, width = _view_grid(grid, num)
    _check_positive_int("iterations", iterations, 0)
    feature_weight = _check_weight("feature_weight", feature_weight)
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
                    v2_kmeans_iterations: int = 4,
                    feature_weight: float = 0.5, validate: bool = True, text_free: bool = False,
                    detail_term: str = "variance", pixels=None, patch_size: Optional[int] = None) -> TokenSelection:
    """SHIRG-v2: keep = {argmax_{n in C} s[b, n] : every cluster C of spatial_kmeans} ∪ top_rest(s), + summary token.

    s = `shirg_v2_scores`; the clusters come from `spatial_kmeans` of the vision features (seed spacing
    `coverage_region_size`, `v2_kmeans_iterations` steps) per sample; the best K cluster winners are kept when K is
    smaller than the number of non-empty clusters. extra_tokens = `dropped_token_summary` (B, 1, E): the mean of the projected
    tokens that were not kept. Returns indices (B, K) ascending, extra_tokens (B, 1, E), scores (B, N).
    """
    _check_inputs(vision_features, projected, grid, budget)
    scores = shirg_v2_scores(vision_features, projected, grid, question_embeds, question_mask,
                             v2_detail_weight=v2_detail_weight, v2_edge_weight=v2_edge_weight, validate=validate,
                             text_free=text_free, detail_term=detail_term, pixels=pixels, patch_size=patch_size)
    labels, num_clusters = spatial_kmeans(vision_features, grid, coverage_region_size, v2_kmeans_iterations,
                                          feature_weight)
    winners, _ = top1_per_group(scores, labels, num_clusters)
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
    views, height, width = _view_grid(grid, num)
    _check_budget(budget, num)
    _check_positive_int("rounds", rounds)
    _check_positive_int("radius", radius, 0)
    penalty = _check_weight("penalty", penalty)
    if penalty > 1:
        raise ValueError(f"penalty must be in [0, 1] (the fraction of the score a neighbour loses), got {penalty}")
    scores = scores.float()
    picked = torch.zeros(batch, num, dtype=torch.bool, device=scores.device)
    if initial_indices is not None:
        if initial_indices.shape[0] != batch or initial_indices.shape[1] > budget:
            raise ValueError(
                f"initial_indices {tuple(initial_indices.shape)} must be (B, R0) with B = {batch} and R0 <= budget "
                f"({budget})"
            )
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


def low_resolution_scaffold(tokens: torch.Tensor, grid, size: int = 8, mode: str = "area") -> torch.Tensor:
    """Low-resolution scaffold: the (B, N, C) token map pooled to a g x g grid, (B, g*g, C) raster order, tokens.dtype.

    mode "area" (adaptive average pooling: every output cell averages its own block of tokens, the blocks of
    F.adaptive_avg_pool2d) or "bilinear" (antialiased bilinear resampling, align_corners=False, as F.interpolate).
    """
    batch, num, channels = tokens.shape
    height, width = _check_grid(grid, num)
    _check_positive_int("size", size)
    if mode not in ("area", "bilinear"):
        raise ValueError(f"mode must be 'area' or 'bilinear', got {mode!r}")
    rows = _resize_weights(height, size, mode, tokens.device)  # (g, H)
    cols = _resize_weights(width, size, mode, tokens.device)  # (g, W)
    grid_map = tokens.float().reshape(batch, height, width, channels)
    pooled = torch.einsum("ih,bhjc->bijc", rows, torch.einsum("jw,bhwc->bhjc", cols, grid_map))
    return pooled.reshape(batch, size * size, channels).to(tokens.dtype)


def _resize_weights(length: int, size: int, mode: str, device) -> torch.Tensor:
    """(size, length) matrix of the 1-D resampling of `mode`: both modes are separable, so resizing a (H, W) map is
    rows @ map @ cols^T, computed on the channels-last tokens (equal to the 2-D F.adaptive_avg_pool2d/interpolate)."""
    # channel h = the unit impulse at h, laid along the width (antialiased bilinear mis-weights a (length, 1) map)
    one_hot = torch.eye(length, device=device).reshape(1, length, 1, length)
    if mode == "area":
        weights = F.adaptive_avg_pool2d(one_hot, (1, size))
    else:
        weights = F.interpolate(one_hot, size=(1, size), mode="bilinear", align_corners=False, antialias=True)
    return weights[0, :, 0, :].transpose(0, 1)


def grid_coordinates(grid, device=None, view_boxes=None) -> torch.Tensor:
    """Normalised (x, y, h, w) of every cell of a grid, raster order: (N, 4) float32.

    (H, W) grid: x = (col + 0.5) / W and y = (row + 0.5) / H (the cell's centroid in [0, 1]), h = 1 / H, w = 1 / W.
    (V, H, W) grid: view v's cells are placed in its box (x0, y0, bw, bh) of `view_boxes` (V, 4) (default: every
    view covers [0, 1]^2): x = x0 + bw (col + 0.5) / W, y = y0 + bh (row + 0.5) / H, h = bh / H, w = bw / W.
    """
    views, height, width = (1, *grid) if len(grid) == 2 else grid
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
                   x_scaffold_size: int = 8,
                   scaffold_mode: str = "area", validate: bool = True, text_free: bool = False,
                   detail_term: str = "variance", pixels=None, patch_size: Optional[int] = None) -> TokenSelection:
    """SHIRG-X: keep = cover(s) ∪ distance_aware_selection(s), + a g x g scaffold of the projected map.

    s = `shirg_fixed_scores` (detail term `detail_term`), cover = the r x r region winners of every sample
    (`region_coverage`), which seed the picked mask of `distance_aware_selection` that fills the budget; K <= region count keeps the K best winners.
    extra_tokens = `low_resolution_scaffold(projected, grid, g)` (B, g*g, E) (None when x_scaffold_size = 0); their
    coordinates are `grid_coordinates((g, g))` and those of the kept tokens `token_coordinates(indices, grid)`, for
    `CoordinateEmbedding`. Returns indices (B, K) ascending, extra_tokens, scores (B, N).
    """
    _check_inputs(vision_features, projected, grid, budget)
    _check_positive_int("x_scaffold_size", x_scaffold_size, 0)
    scores = shirg_fixed_scores(vision_features, projected, question_embeds, question_mask,
                                relevance_weight=relevance_weight, detail_weight=detail_weight,
                                validate=validate, text_free=text_free, detail_term=detail_term, grid=grid,
                                pixels=pixels, patch_size=patch_size)
    coverage = region_coverage(scores, grid, coverage_region_size)
    _, num_regions = region_labels(grid, coverage_region_size)
    if budget <= num_regions:
        indices = select_with_priority(scores, coverage, budget)
    else:
        indices = distance_aware_selection(scores, grid, budget, mask_to_indices(coverage, num_regions),
                                           rounds=x_suppression_rounds, radius=x_suppression_radius,
                                           penalty=x_suppression_penalty)
    scaffold = low_resolution_scaffold(projected, grid, x_scaffold_size, scaffold_mode) if x_scaffold_size else None
    return TokenSelection(indices, scaffold, scores)


class CoordinateEmbedding(nn.Module):
    """Learned embedding of (x, y, h, w) token coordinates added to the kept tokens: e = W c + b, W and b zero-init.

    Zero at initialisation, so an untrained model equals SHIRG without it; the gradient w.r.t. W is nonzero
    (dL/dW = dL/de c^T). (B, K, 4) -> (B, K, E) in the module's dtype. A model's weight initialisation calls
    `reset_parameters()` on it (its parameters are its own, so the initialisation reaches this module).
    """

    def __init__(self, hidden_size: int, num_coordinates: int = 4):
        super().__init__()
        _check_positive_int("hidden_size", hidden_size)
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

    def __init__(self, budgets=DEFAULT_BUDGETS, default_budget: Optional[int] = None, hidden_size: int = 32):
        super().__init__()
        if (not isinstance(budgets, (tuple, list)) or not budgets
                or not all(_is_int(b) and b > 0 for b in budgets) or len(set(budgets)) != len(budgets)):
            raise ValueError(f"budgets must be a non-empty list of distinct positive integers, got {budgets!r}")
        self.budgets = tuple(budgets)
        if default_budget is None:
            default_budget = self.budgets[len(self.budgets) // 2]
        if default_budget not in self.budgets:
            raise ValueError(f"default_budget must be one of budgets {self.budgets}, got {default_budget!r}")
        _check_positive_int("hidden_size", hidden_size)
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
    batch, num = _check_inputs(vision_features, projected, grid, budget)
    if not _is_int(random_seed):
        raise ValueError(f"random_seed must be an integer, got {random_seed!r}")
    generator = torch.Generator(device=projected.device).manual_seed(random_seed)
    keys = torch.rand(batch, num, generator=generator, device=projected.device)
    return TokenSelection(_top_by(keys, budget), None, keys)


def top_norm_select(vision_features, projected, grid, budget, question_embeds=None,
                    question_mask=None) -> TokenSelection:
    """Top-norm baseline (the plan's text-free fallback): the K projected tokens of largest L2 norm."""
    _check_inputs(vision_features, projected, grid, budget)
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
    batch, num = _check_inputs(vision_features, projected, grid, budget)
    if (not isinstance(attention_received, torch.Tensor) or tuple(attention_received.shape) != (batch, num)):
        shape = tuple(attention_received.shape) if isinstance(attention_received, torch.Tensor) else attention_received
        raise ValueError(f"attention_received must be a (B, N) = ({batch}, {num}) tensor, got {shape}")
    remaining = num - budget
    if not _is_int(visionzip_contextual_tokens) or not 0 <= visionzip_contextual_tokens <= remaining:
        raise ValueError(f"visionzip_contextual_tokens must be an integer in [0, N - budget = {remaining}], "
                         f"got {visionzip_contextual_tokens!r}")
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


def divprune_select(vision_features, projected, grid, budget, question_embeds=None, question_mask=None, *,
                    features: str = "projected") -> TokenSelection:
    """DivPrune-style (Alvar et al. 2025): greedy max-min diversity, k_{t+1} = argmax_n min_{m in S_t} (1 - cos(x_n, x_m)).

    S_1 = {the token farthest (cosine) from the mean token}; each of the K - 1 steps is one vectorised update over
    all tokens. `features`: "projected" (the LM-input tokens, as DivPrune) or "vision" (cheaper). Returns indices
    (B, K) ascending; scores None (the order of picking is greedy, not a score).
    """
    batch, num = _check_inputs(vision_features, projected, grid, budget)
    if features not in ("projected", "vision"):
        raise ValueError(f"features must be 'projected' or 'vision', got {features!r}")
    unit = F.normalize((projected if features == "projected" else vision_features).float(), dim=-1, eps=1e-6)
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
# registry

METHODS = {
    "shirg-fixed": shirg_fixed_select,
    "shirg-v2": shirg_v2_select,
    "shirg-x": shirg_x_select,
    "random": random_select,
    "top-norm": top_norm_select,
    "visionzip": visionzip_select,
    "divprune": divprune_select,
}


def select_tokens(method: str, vision_features, projected, grid, budget, question_embeds=None, question_mask=None,
                  **options) -> TokenSelection:
    """Dispatch to METHODS[method](vision_features, projected, grid, budget, question_embeds, question_mask, **options).

    Raises ValueError naming `method` and the allowed names for an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; method must be one of {sorted(METHODS)}")
    return METHODS[method](vision_features, projected, grid, budget, question_embeds, question_mask, **options)

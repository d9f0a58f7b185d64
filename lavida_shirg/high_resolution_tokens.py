"""SHIRG's high-resolution tokens inside the model: the selection grid, the call to shirg_selection's methods with
the settings of a call, learned coordinates and budgets, and the tokens each method adds (summary, scaffold).

`HighResolutionTokensMixin` is part of `LavidaShirgModel` (it uses its projector, SigLIP encoding,
coordinate_embedding and budget_head); the functions map a call's settings to shirg_selection's options.
"""

import torch

from .image_layout import SHIRG_METHODS, source_grid
from .pooling import pool_view_features
from .shirg_selection import (
    budget_statistics,
    gather_tokens,
    grid_coordinates,
    select_tokens,
    token_coordinates,
    token_variance,
    truncate_to_budget,
)


class HighResolutionTokensMixin:
    """Selection of high-resolution image tokens for `LavidaShirgModel` (see select_high_resolution_tokens)."""

    def select_high_resolution_tokens(self, features, received, question_embeds, question_mask, pixel_values, views,
                                      settings, record=None, source_pixels=None):
        """(I, M, E) tokens for the LM and their validity (I, M) of I images' high-resolution features (I, N, D).

        Layouts: full = all N tokens in raster order (view after view for anyres-views); shirg-fixed, random,
        top-norm, divprune = the K kept tokens in raster order; shirg-v2 = kept, then the summary of the dropped
        tokens (v2_summary_token); shirg-x = scaffold (the global view's LaViDa tokens, or a g x g pooled grid), then
        kept; visionzip = the K - C dominant tokens in raster order, then C contextual tokens. Kept tokens are the
        projector's outputs of the selected indices (plus the coordinate embedding of their (x, y, h, w) when
        enabled). Under adaptive_budget (SHIRG methods) max(budget_choices) tokens are kept and those beyond each
        image's chosen budget are marked invalid (masked from attention). received: VisionZip's attention (I, N).
        `record`: a dict that receives the grid, view boxes, selected indices (I, K) and scores (I, N) or None.
        source_pixels: the pixels of the views the features come from ((I, 3, S, S) high-resolution views, or one
        image's (V, 3, s, s) anyres views), for the SHIRG detail term "pixel-contrast" (no pass through the tower).
        """
        method = settings["selection_method"]
        projected = self.multi_modal_projector(features)  # (I, N, E)
        if method == "full":
            return projected, torch.ones(projected.shape[:2], dtype=torch.bool, device=projected.device)
        layout = {**self.config.token_layout(), **settings}
        grid, boxes = self.selection_grid(layout, views)
        adaptive = settings["adaptive_budget"] and method in SHIRG_METHODS
        budget = max(settings["budget_choices"]) if adaptive else settings["selection_budget"]
        if method == "visionzip":
            budget -= settings["visionzip_contextual_tokens"]
        selection = select_tokens(method, features, projected, grid, budget, question_embeds, question_mask,
                                  **selection_options(settings, received, source_pixels,
                                                      self.config.vision_config.patch_size))
        if record is not None:
            record.update(grid=grid, view_boxes=boxes, indices=selection.indices, scores=selection.scores)
        kept = gather_tokens(projected, selection.indices)  # (I, K, E)
        if settings["coordinate_embedding"]:
            coordinates = token_coordinates(selection.indices, grid, boxes)
            kept = kept + self.coordinate_embedding(coordinates).to(kept.dtype)
        valid = torch.ones(kept.shape[:2], dtype=torch.bool, device=kept.device)
        if adaptive:
            statistics = budget_statistics(token_variance(features), selection.scores)
            chosen = self.budget_head.choose(self.budget_head(statistics))  # (I,)
            valid = truncate_to_budget(selection.indices, selection.scores, chosen)
        extra = self.extra_tokens(method, selection.extra_tokens, pixel_values, views, settings)
        if extra is None:
            return kept, valid
        extra_valid = torch.ones(extra.shape[:2], dtype=torch.bool, device=kept.device)
        if method == "shirg-x":
            return torch.cat((extra.to(kept.dtype), kept), dim=1), torch.cat((extra_valid, valid), dim=1)
        return torch.cat((kept, extra.to(kept.dtype)), dim=1), torch.cat((valid, extra_valid), dim=1)

    def selection_grid(self, layout, views):
        """The grid a group of images is selected on and, for anyres views, each view's box in the image canvas.

        single-view: (H, W), boxes None. anyres-views (one image): (V, s, s) with boxes (V, 4) = (x0, y0, w, h):
        the global view covers the canvas, crop (r, c) of a rows x cols grid covers (c / cols, r / rows, 1 / cols,
        1 / rows).
        """
        if layout["hires_source"] == "single-view":
            _, rows, cols = source_grid(None, layout)
            return (rows, cols), None
        (rows, cols), _, _ = views[0]
        side = self.config.patches_per_side
        r = torch.arange(rows, dtype=torch.float32).repeat_interleave(cols)
        c = torch.arange(cols, dtype=torch.float32).repeat(rows)
        crops = torch.stack([c / cols, r / rows, torch.full_like(r, 1 / cols), torch.full_like(r, 1 / rows)], dim=-1)
        boxes = torch.cat([torch.tensor([[0.0, 0.0, 1.0, 1.0]]), crops])
        return (1 + rows * cols, side, side), boxes

    def extra_tokens(self, method, selected_extra, pixel_values, views, settings):
        """The tokens a method adds to its kept ones (I, M, E), or None (see `select_high_resolution_tokens`)."""
        if method == "shirg-v2" and not settings["v2_summary_token"]:
            return None
        if method != "shirg-x":
            return selected_extra
        if settings["x_scaffold"] == "none":
            return None
        if settings["x_scaffold"] == "global-view":
            p = self.config.pooled_view_size
            global_views = pixel_values[[start for _, _, start in views]]
            scaffold, scaffold_grid = pool_view_features(self.encode_views(global_views), p), (p, p)
        else:
            scaffold, scaffold_grid = selected_extra, (settings["x_scaffold_size"],) * 2
        if settings["coordinate_embedding"]:
            coordinates = grid_coordinates(scaffold_grid, scaffold.device)  # (g*g, 4)
            scaffold = scaffold + self.coordinate_embedding(coordinates).to(scaffold.dtype)
        return scaffold


def attention_received(layer, hidden_states):
    """Attention each token receives in a SigLIP encoder layer: a[b, n] = mean_{h, q} softmax(q k^T / sqrt(d))[q, n].

    Recomputed from the layer's input `hidden_states` (B, N, D) one head at a time (memory B N^2). Returns (B, N).
    """
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden_states)
    batch, num, _ = normed.shape
    queries = attention.q_proj(normed).view(batch, num, attention.num_heads, -1)
    keys = attention.k_proj(normed).view(batch, num, attention.num_heads, -1)
    received = torch.zeros(batch, num, dtype=torch.float32, device=normed.device)
    for head in range(attention.num_heads):
        scores = torch.bmm(queries[:, :, head].float(), keys[:, :, head].float().transpose(1, 2)) * attention.scale
        received += scores.softmax(dim=-1).mean(dim=1)
    return received / attention.num_heads


def uses_relevance(settings):
    """Whether the call's method weighs question relevance (and so needs a question)."""
    method = settings["selection_method"]
    if method in ("shirg-fixed", "shirg-x"):
        return settings["relevance_weight"] > 0
    return method == "shirg-v2" and settings["v2_detail_weight"] < 1


def selection_options(settings, attention_received_scores, source_pixels=None, patch_size=None):
    """Keyword options of `select_tokens` for the call's method, from the settings' fields (source_pixels /
    patch_size: the views the tokens come from and the tower's patch size, for the detail term "pixel-contrast")."""
    method = settings["selection_method"]
    detail = dict(detail_term=settings["detail_term"], pixels=source_pixels, patch_size=patch_size)
    fixed = dict(coverage_region_size=settings["coverage_region_size"], relevance_weight=settings["relevance_weight"],
                 detail_weight=settings["detail_weight"], validate=False, **detail)
    if method == "shirg-fixed":
        return fixed
    if method == "shirg-v2":
        return dict(v2_detail_weight=settings["v2_detail_weight"], v2_edge_weight=settings["v2_edge_weight"],
                    coverage_region_size=settings["coverage_region_size"],
                    v2_kmeans_iterations=settings["v2_kmeans_iterations"], validate=False, **detail)
    if method == "shirg-x":
        scaffold = settings["x_scaffold_size"] if settings["x_scaffold"] == "grid" else 0
        return dict(fixed, x_suppression_rounds=settings["x_suppression_rounds"],
                    x_suppression_radius=settings["x_suppression_radius"],
                    x_suppression_penalty=settings["x_suppression_penalty"], x_scaffold_size=scaffold)
    if method == "random":
        return dict(random_seed=settings["random_seed"])
    if method == "visionzip":
        return dict(attention_received=attention_received_scores,
                    visionzip_contextual_tokens=settings["visionzip_contextual_tokens"])
    return {}

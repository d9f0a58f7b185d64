"""Geometry of LaViDa's "anyres" image layout, in plain Python (shared by the processor and the model).

All sizes are (height, width) pairs of integers. The best pinpoint is transformers' `select_best_resolution`
(LaViDa's arithmetic exactly); resizing and unpadding mirror LaViDa's `resize_and_pad_image` and `unpad_image`
operation for operation (integer floors), which transformers' LLaVA-NeXT helpers do not (its unpad rounds:
int(round(h s, 7))): a one-pixel difference changes the number of image tokens.
"""

import math

from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution

# LaViDa's image layouts (its `image_aspect_ratio`): "anyres" (a global view + crops of the best pinpoint canvas),
# "pad" (one view: the image centred on a square of the mean colour), "square" (one view: the image resized)
IMAGE_ASPECT_RATIOS = ("anyres", "pad", "square")


def select_best_resolution(image_size, pinpoints):
    """Pick the pinpoint that keeps the most image pixels after an aspect-preserving resize, then wastes the least.

    effective = min(floor(w s) * floor(h s), w h) with s = min(W / w, H / h); wasted = W H - effective.
    Ties keep the earlier pinpoint, so the order of `pinpoints` matters. This is transformers' LLaVA-NeXT
    `select_best_resolution`, the same arithmetic as LaViDa's (test: equal on random sizes); returns (H, W).
    """
    return tuple(hf_select_best_resolution(tuple(image_size), [tuple(pair) for pair in pinpoints]))


def resized_size_in_canvas(image_size, canvas_size):
    """Size of the image after an aspect-preserving resize that fills `canvas_size` along one side.

    The other side is ceil(side * scale), capped at the canvas (LLaVA's resize_and_pad_image).
    """
    height, width = image_size
    canvas_h, canvas_w = canvas_size
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * scale_h), canvas_w)


def anyres_grid(image_size, pinpoints, view_size):
    """(rows, cols) of view-size crops that cover the best pinpoint for this image."""
    canvas_h, canvas_w = select_best_resolution(image_size, pinpoints)
    return canvas_h // view_size, canvas_w // view_size


def unpad_bounds(map_size, image_size):
    """Rows [top, bottom) and columns [left, right) of a stitched feature map that show the image, not padding.

    With s = map_w / w (padding above and below) the kept height is floor(h s) and the border (map_h - kept) // 2
    is cut on both sides, so an odd border keeps one extra row (LLaVA's unpad_image); symmetrically for width.
    """
    map_h, map_w = map_size
    height, width = image_size
    if width / height > map_w / map_h:
        kept = int(height * (map_w / width))
        border = (map_h - kept) // 2
        return border, map_h - border, 0, map_w
    kept = int(width * (map_h / height))
    border = (map_w - kept) // 2
    return 0, map_h, border, map_w - border


def pooled_layout(image_size, pinpoints, view_size, pooled_size):
    """Layout of one image in LaViDa's pooled path: (rows, cols) crop grid and the unpadded bounds of its map."""
    rows, cols = anyres_grid(image_size, pinpoints, view_size)
    bounds = unpad_bounds((rows * pooled_size, cols * pooled_size), image_size)
    return (rows, cols), bounds


def pooled_image_token_count(image_size, pinpoints, view_size, pooled_size):
    """Image tokens of LaViDa's pooled path: pooled^2 (global view) + kept_rows * (kept_cols + 1) (newlines)."""
    _, (top, bottom, left, right) = pooled_layout(image_size, pinpoints, view_size, pooled_size)
    return pooled_size * pooled_size + (bottom - top) * (right - left + 1)


def source_grid(image_size, layout):
    """(views, rows, cols) of the high-resolution tokens of one (height, width) image that a method selects from.

    single-view: one hires_image_size view, floor(hires_image_size / patch_size) tokens per side;
    anyres-views: LaViDa's own views (global + crops) left unpooled, floor(view_size / patch_size) per side.
    """
    if layout["hires_source"] == "single-view":
        side = layout["hires_image_size"] // layout["patch_size"]
        return 1, side, side
    rows, cols = anyres_grid(image_size, layout["image_grid_pinpoints"], layout["view_size"])
    side = layout["view_size"] // layout["patch_size"]
    return 1 + rows * cols, side, side


def fewest_source_tokens(layout):
    """The fewest high-resolution tokens an image can have under `layout`: the budgets must fit every image."""
    if layout["hires_source"] == "single-view":
        return (layout["hires_image_size"] // layout["patch_size"]) ** 2
    fewest_crops = min((h // layout["view_size"]) * (w // layout["view_size"])
                       for h, w in layout["image_grid_pinpoints"])
    return (1 + fewest_crops) * (layout["view_size"] // layout["patch_size"]) ** 2

"""Kept-vs-dropped overlays.

`render_panel` (PIL and numpy only) draws one variant on one image: kept full-resolution patches at full brightness
with an orange outline, dropped ones dimmed to 30%, the coverage regions as thin yellow lines, the SHIRG-X scaffold
(or LaViDa's pooled cells) as cyan lines, the synthetic answer box in green, and a caption. For anyres-views
sources the global view's kept tokens (low resolution) appear as an inset at the top-right corner. `variant_panel`
builds the panel of one variant of a loaded model from its selection diagnostics (the geometry of its tokens, its
pooled cells or its scaffold); eval.py and the Gradio app (app.py) both use it. `contact_sheet` puts the panels of
one sample side by side under a header (the "kept vs dropped" figure).
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shirg_tools.diagnostics import base_view_box, source_views

KEPT_OUTLINE = (255, 140, 0)
REGION_LINE = (255, 230, 0, 110)
SCAFFOLD_LINE = (0, 220, 255, 150)
ANSWER_BOX = (0, 200, 0)
DIM = 0.3
CAPTION_LINE_HEIGHT = 14


def _font():
    return ImageFont.load_default()


def _scale_box(box, scale):
    return tuple(value * scale for value in box)


def _cell_index_map(view, scale, size):
    """For a display of `size` (w, h): per pixel, the raster index of the view cell under it, or -1 outside."""
    width, height = size
    x0, y0, x1, y1 = _scale_box(view.box, scale)
    xs = (np.arange(width) + 0.5 - x0) / (x1 - x0) * view.cols
    ys = (np.arange(height) + 0.5 - y0) / (y1 - y0) * view.rows
    cols = np.where((xs >= 0) & (xs < view.cols), np.floor(xs), -1).astype(np.int64)
    rows = np.where((ys >= 0) & (ys < view.rows), np.floor(ys), -1).astype(np.int64)
    index = rows[:, None] * view.cols + cols[None, :]
    return np.where((rows[:, None] >= 0) & (cols[None, :] >= 0), index, -1)


def kept_pixel_mask(views, kept, scale, size, full_resolution=True):
    """(h, w) int8 display mask over the views of the given resolution: 1 kept, 0 dropped, -1 no such token."""
    mask = np.full((size[1], size[0]), -1, dtype=np.int8)
    offset = 0
    for view in views:
        count = view.rows * view.cols
        if view.full_resolution == full_resolution:
            index = _cell_index_map(view, scale, size)
            inside = index >= 0
            mask[inside] = kept[offset:offset + count][index[inside]]
        offset += count
    return mask


def _shade(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Dim the dropped pixels (mask 0) and outline the kept areas (mask 1 next to a non-kept pixel)."""
    out = pixels.astype(np.float32)
    out[mask == 0] *= DIM
    kept = mask == 1
    edge = np.zeros_like(kept)
    edge[1:, :] |= kept[1:, :] != kept[:-1, :]
    edge[:-1, :] |= kept[1:, :] != kept[:-1, :]
    edge[:, 1:] |= kept[:, 1:] != kept[:, :-1]
    edge[:, :-1] |= kept[:, 1:] != kept[:, :-1]
    out[edge & kept] = KEPT_OUTLINE
    return out.astype(np.uint8)


def _grid_lines(draw, box, rows, cols, step, colour, scale):
    """Lines every `step` cells of a rows x cols grid spanning `box` (image pixels), on the display."""
    x0, y0, x1, y1 = _scale_box(box, scale)
    for col in range(0, cols + 1, step):
        x = x0 + (x1 - x0) * min(col, cols) / cols
        draw.line([(x, y0), (x, y1)], fill=colour, width=1)
    for row in range(0, rows + 1, step):
        y = y0 + (y1 - y0) * min(row, rows) / rows
        draw.line([(x0, y), (x1, y)], fill=colour, width=1)


def render_panel(image: Image.Image, caption: list, display: int = 320, views=None, kept=None, region_size=None,
                 scaffold=None, pooled_grids=None, answer_box=None) -> Image.Image:
    """One variant's overlay on `image`, `display` pixels on its longer side, with `caption` lines below.

    views / kept: the token geometry (diagnostics.source_views) and (N,) bool kept mask of a selection (None for
    pooled). region_size: draw coverage regions every that many cells of full-resolution views. scaffold: a
    (box, rows, cols) grid to draw as the scaffold. pooled_grids: [(box, rows, cols)] pooled cells to draw.
    answer_box: (x0, y0, x1, y1) in image pixels.
    """
    scale = display / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    pixels = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR))
    if kept is not None:
        pixels = _shade(pixels, kept_pixel_mask(views, kept, scale, size))
    panel = Image.fromarray(pixels).convert("RGBA")
    lines = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(lines)
    if kept is not None and region_size:
        for view in views:
            if view.full_resolution:
                _grid_lines(draw, view.box, view.rows, view.cols, region_size, REGION_LINE, scale)
    for box, rows, cols in ([scaffold] if scaffold else []) + (pooled_grids or []):
        _grid_lines(draw, box, rows, cols, 1, SCAFFOLD_LINE, scale)
    panel = Image.alpha_composite(panel, lines).convert("RGB")
    draw = ImageDraw.Draw(panel)
    if answer_box is not None:
        draw.rectangle(_scale_box(answer_box, scale), outline=ANSWER_BOX, width=2)
    if kept is not None and any(not view.full_resolution for view in views):
        panel = _with_global_inset(panel, image, views, kept)
    return _with_caption(panel, caption, size[0])


def _with_global_inset(panel, image, views, kept):
    """Paste a 1/3-size rendering of the low-resolution (global view) tokens' kept mask at the top-right corner."""
    inset_size = (max(1, panel.width // 3), max(1, panel.height // 3))
    scale = inset_size[0] / image.width
    pixels = np.asarray(image.convert("RGB").resize(inset_size, Image.Resampling.BILINEAR))
    inset = Image.fromarray(_shade(pixels, kept_pixel_mask(views, kept, scale, inset_size, full_resolution=False)))
    ImageDraw.Draw(inset).rectangle([0, 0, inset.width - 1, inset.height - 1], outline=(255, 255, 255))
    panel.paste(inset, (panel.width - inset.width, 0))
    return panel


def _with_caption(panel, caption, width):
    """The panel with `caption` lines written on a white band below it."""
    band = CAPTION_LINE_HEIGHT * len(caption) + 6
    out = Image.new("RGB", (max(width, panel.width), panel.height + band), (255, 255, 255))
    out.paste(panel, (0, 0))
    draw = ImageDraw.Draw(out)
    for number, line in enumerate(caption):
        draw.text((3, panel.height + 3 + number * CAPTION_LINE_HEIGHT), line, fill=(0, 0, 0), font=_font())
    return out


def scaffold_grid(layout: dict, size, views):
    """SHIRG-X's scaffold as (box, rows, cols) in image pixels, or None (another method, or x_scaffold "none").
    layout: a token layout with a call's settings; size: the image's (h, w); views: its token geometry."""
    if layout["selection_method"] != "shirg-x" or layout["x_scaffold"] == "none":
        return None
    if layout["x_scaffold"] == "grid":
        return views[0].box, layout["x_scaffold_size"], layout["x_scaffold_size"]
    return base_view_box(size, layout), layout["pooled_view_size"], layout["pooled_view_size"]


def variant_panel(model, image: Image.Image, variant, caption: list, diagnostics: dict,
                  answer_box=None) -> Image.Image:
    """The overlay panel of `variant` (shirg_tools.variants.Variant) of `model` on `image`: `caption` lines, then a
    line of the diagnostics (pooled: the pixels one pooled token averages; a selection: the coverage kept, the
    answer recall when known and whether a scaffold is drawn).

    diagnostics: the image's entry of diagnostics.selection_diagnostics (with its "_kept" mask and "_views"
    geometry), or {} when they were not computed (the token grid is then drawn without a kept mask).
    answer_box: (x0, y0, x1, y1) in image pixels, drawn in green, or None.
    """
    settings = model.selection_settings(variant.method, variant.budget, variant.options)
    size = (image.height, image.width)
    if variant.method == "pooled":
        pooled = settings["pooled_view_size"]
        if settings["image_aspect_ratio"] == "anyres":  # the crops' pooled cells
            grids = [(view.box, pooled, pooled) for view in source_views(size, {**settings,
                                                                                "hires_source": "anyres-views"})[1:]]
        else:  # the single view's
            grids = [(base_view_box(size, settings), pooled, pooled)]
        area = diagnostics.get("token_area_px2", {})
        lines = [*caption, "pooled px2/token: " + ", ".join(f"{name} {value:.0f}" for name, value in area.items())]
        return render_panel(image, lines, pooled_grids=grids, answer_box=answer_box)
    views, kept = diagnostics.get("_views"), diagnostics.get("_kept")
    if views is None:
        views = source_views(size, settings)
    scaffold = scaffold_grid(settings, size, views)
    recall = diagnostics.get("answer_recall")
    lines = [*caption, f"coverage {diagnostics.get('coverage_kept', 1.0):.2f}" +
             ("" if recall is None else f"; answer recall {recall:.2f}") +
             ("; + scaffold (cyan)" if scaffold else "")]
    return render_panel(image, lines, views=views, kept=kept,
                        region_size=settings["coverage_region_size"] if kept is not None else None,
                        scaffold=scaffold, answer_box=answer_box)


def contact_sheet(panels: list, header: list, columns: int = 4) -> Image.Image:
    """Panels side by side in rows of `columns`, under `header` lines (the per-sample kept-vs-dropped figure)."""
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    cell_w = max(panel.width for panel in panels) + 8
    cell_h = max(panel.height for panel in panels) + 8
    top = CAPTION_LINE_HEIGHT * len(header) + 10
    sheet = Image.new("RGB", (cell_w * columns, top + cell_h * rows), (235, 235, 235))
    draw = ImageDraw.Draw(sheet)
    for number, line in enumerate(header):
        draw.text((6, 4 + number * CAPTION_LINE_HEIGHT), line, fill=(0, 0, 0), font=_font())
    for index, panel in enumerate(panels):
        sheet.paste(panel, (4 + (index % columns) * cell_w, top + 4 + (index // columns) * cell_h))
    return sheet

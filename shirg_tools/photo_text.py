"""Photographs with text, for the selection-quality harness: scikit-image's bundled photos (the package ships them;
nothing is downloaded or committed), deterministic from (seed, index).

Two kinds of sample (same dict keys as shirg_tools.synthetic_ocr.generate_sample with `with_ink_mask=True`: image,
question, answer, text_boxes, answer_box, ink_mask):

* composite (`photo_sample`): a random crop of a photo (COMPOSITE_PHOTOS) resized to a square canvas, with one or two
  text strips of 1-2 words pasted on it, 1.5-3 patches tall; the first strip on a sign (a filled light or dark
  panel, text of the other shade), the second drawn straight on the photo (light text where the photo is dark, dark
  where it is light). Ground truth: the glyphs' ink mask (drawn on a separate mask). The question asks for the
  first strip.
* real text (`real_text_sample`): a photo that holds text itself (REAL_TEXT: "page", a photographed printed page,
  and "text", handwriting on ruled paper), at its own size, with boxes drawn by hand around each line or group of
  handwritten symbols (ground truth: the pixels inside the boxes, coarser than ink).

`photo_set(count, canvas, patch, seed)` = the REAL_TEXT samples, then composites up to `count` samples.
"""

import numpy as np
from PIL import Image, ImageDraw

from shirg_tools.synthetic_ocr import WORDS, _font

COMPOSITE_PHOTOS = ("astronaut", "coffee", "rocket", "camera", "brick", "grass", "gravel", "chelsea",
                    "stereo_motorcycle", "hubble_deep_field")
# hand-drawn (x0, y0, x1, y1) boxes in the photo's own pixels, first box = the answer of the question
REAL_TEXT = {
    "page": ("What is the title?", "Region-based segmentation",
             [(5, 12, 293, 36), (5, 49, 377, 65), (5, 66, 377, 84), (5, 84, 377, 101), (5, 98, 377, 117),
              (5, 121, 174, 139), (17, 164, 251, 187), (0, 184, 62, 191)]),
    "text": ("What is written at the top?", "(s) = 1",
             [(149, 0, 240, 18), (240, 24, 300, 56), (310, 45, 448, 78), (390, 80, 430, 98), (100, 27, 205, 70),
              (180, 65, 290, 100), (270, 100, 305, 113), (0, 35, 68, 80), (70, 82, 103, 95), (5, 90, 158, 140),
              (120, 120, 193, 145), (60, 142, 115, 168), (172, 145, 210, 165), (240, 147, 280, 165)]),
}


def load_photo(name: str) -> Image.Image:
    """A scikit-image photo as an RGB PIL image (grey photos repeated on three channels)."""
    import skimage.data

    pixels = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        pixels = pixels[0]  # (left, right, disparity): the left view
    image = Image.fromarray(pixels)
    return image.convert("RGB")


def _luminance(image: Image.Image, box) -> float:
    return float(np.asarray(image.crop(box).convert("L"), dtype=np.float32).mean())


def photo_sample(index: int, canvas: int = 192, patch: int = 6, seed: int = 0) -> dict:
    """Composite `index` (see the module docstring): canvas x canvas pixels, text 1.5-3 patches tall."""
    rng = np.random.default_rng([seed, index])
    photo = load_photo(COMPOSITE_PHOTOS[index % len(COMPOSITE_PHOTOS)])
    side = int(min(photo.size) * rng.uniform(0.5, 1.0))
    left, top = int(rng.integers(0, photo.width - side + 1)), int(rng.integers(0, photo.height - side + 1))
    image = photo.crop((left, top, left + side, top + side)).resize((canvas, canvas), Image.BILINEAR)
    ink = Image.new("L", image.size, 0)
    draw, ink_draw = ImageDraw.Draw(image), ImageDraw.Draw(ink)
    strips = 1 + int(rng.integers(0, 2))
    band = canvas // strips  # one vertical band per strip: the strips never overlap
    boxes, texts = [], []
    for strip in range(strips):
        text = " ".join(WORDS[int(i)] for i in rng.choice(len(WORDS), size=1 + int(rng.integers(0, 2)),
                                                           replace=False))
        height = rng.uniform(1.5, 3.0) * patch  # the text's ink height
        font = _font(max(4, round(height / 0.72)))  # cap + descender height is about 0.72 of the font size
        x0, y0, x1, y1 = font.getbbox(text)
        width, tall = x1 - x0, y1 - y0
        pad = 0 if strip else max(2, patch // 2)
        x = int(rng.integers(pad, max(pad + 1, canvas - width - pad)))
        y = strip * band + int(rng.integers(pad, max(pad + 1, band - tall - pad)))
        box = (x - pad, y - pad, x + width + pad, y + tall + pad)
        if strip == 0:  # a sign: a light or dark panel
            dark_sign = bool(rng.integers(0, 2))
            draw.rectangle(box, fill=(25, 30, 35) if dark_sign else (235, 232, 220))
            fill = (240, 240, 240) if dark_sign else (15, 15, 15)
        else:  # straight on the photo, the shade that stands out
            fill = (15, 15, 15) if _luminance(image, box) > 110 else (245, 245, 245)
        draw.text((x - x0, y - y0), text, font=font, fill=fill)
        ink_draw.text((x - x0, y - y0), text, font=font, fill=255)
        boxes.append([int(v) for v in box])
        texts.append(text)
    return {"image": image, "question": "What is written on the sign?", "answer": texts[0], "text_boxes": boxes,
            "answer_box": 0, "ink_mask": np.asarray(ink) >= 128}


def real_text_sample(name: str) -> dict:
    """The photo `name` of REAL_TEXT at its own size, its hand-drawn boxes as the ground truth mask."""
    question, answer, boxes = REAL_TEXT[name]
    image = load_photo(name)
    mask = np.zeros((image.height, image.width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return {"image": image, "question": question, "answer": answer, "text_boxes": [list(b) for b in boxes],
            "answer_box": 0, "ink_mask": mask}


def photo_set(count: int, canvas: int = 192, patch: int = 6, seed: int = 0) -> list:
    """The REAL_TEXT samples, then composites 0, 1, ... up to `count` samples in all."""
    real = [real_text_sample(name) for name in REAL_TEXT][:count]
    return real + [photo_sample(index, canvas, patch, seed) for index in range(count - len(real))]

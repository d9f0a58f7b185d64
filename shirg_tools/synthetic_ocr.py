"""Synthetic OCR images, generated with PIL alone (no fonts or data to download), deterministic from a seed.

Each sample is a light canvas with small rendered texts at random, non-overlapping places: "key: value" labels,
words or numbers inside coloured boxes, and sometimes a small table. The question asks for one text; answering it
needs reading that text. Every sample also carries the pixel box of every rendered text and which box holds the
answer, so that an evaluation can measure what a token-selection variant keeps.

Public API (also used by eval.py; keep it stable): `SyntheticOCRConfig`, `SYNTHETIC_TASKS` / `synthetic_task(name)`,
`generate_sample(index, config)`, `synthetic_ocr_dataset(num_samples, config)`, `SYNTHETIC_OCR_PROMPT_SUFFIX`.
"""

import dataclasses
import functools

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

QUESTION_TYPES = ("key-value", "coloured-box", "table")

# Appended to every synthetic question by the training script (LaViDa's short-answer instruction).
SYNTHETIC_OCR_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."

KEYS = ("total", "price", "tax", "sum", "cost", "code", "amount", "qty", "year", "day", "unit", "sale")
WORDS = ("coffee", "tea", "milk", "bread", "cheese", "pizza", "water", "juice", "cake", "apple", "book", "cup",
         "open", "closed", "stop", "exit", "shop", "store", "sign", "menu")
BOX_COLOURS = {
    "red": (205, 40, 40), "green": (40, 150, 60), "blue": (45, 80, 210), "orange": (235, 130, 30),
    "purple": (130, 60, 170), "pink": (225, 105, 170), "brown": (125, 80, 40), "gray": (120, 120, 120),
}
TABLE_COLUMNS = ("price", "qty", "code")
INK_COLOURS = ((0, 0, 0), (40, 40, 40), (20, 30, 90), (80, 20, 20))
BOX_CONTENTS = ("words-or-values", "values")
MAX_VALUE_DIGITS = 12
PLACEMENT_ATTEMPTS = 200
MARGIN = 2  # pixels kept free between placed elements


@dataclasses.dataclass(frozen=True)
class SyntheticOCRConfig:
    """What the generator draws.

    canvas_size: (width, height) in pixels. num_texts: standalone texts per image ("key: value" labels and
    coloured-box texts; the target counts as one). box_fraction: probability that a standalone text is drawn in a
    coloured box. table_probability: probability that an image also holds a table (table_rows rows of an item and
    one value column). font_size_range: (min, max) font size in pixels, inclusive, drawn per text (PIL's built-in
    font). question_types: the kinds of question asked (QUESTION_TYPES); a sample asks about one element of a kind
    present in its image. value_digits: 0 draws numbers as an integer in [1, 9999] or a price with two decimals; k > 0
    draws every number as exactly k digits (leading zeros kept, e.g. "042"). box_content: what a coloured box holds,
    one of BOX_CONTENTS ("words-or-values": a word or a number, even odds; "values": a number). seed: with the sample
    index, fixes everything about a sample.
    """

    canvas_size: tuple = (672, 672)
    num_texts: int = 8
    box_fraction: float = 0.3
    table_probability: float = 0.3
    table_rows: tuple = (2, 4)
    font_size_range: tuple = (10, 16)
    question_types: tuple = QUESTION_TYPES
    value_digits: int = 0
    box_content: str = "words-or-values"
    seed: int = 0

    def __post_init__(self):
        width, height = self.canvas_size
        if not (isinstance(width, int) and isinstance(height, int) and width >= 16 and height >= 16):
            raise ValueError(f"canvas_size must be (width, height) integers >= 16, got {self.canvas_size!r}")
        if not isinstance(self.num_texts, int) or not 1 <= self.num_texts <= len(KEYS) + len(BOX_COLOURS):
            raise ValueError(f"num_texts must be an integer in [1, {len(KEYS) + len(BOX_COLOURS)}] (distinct keys and "
                             f"box colours), got {self.num_texts!r}")
        for name in ("box_fraction", "table_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        low, high = self.font_size_range
        if not (isinstance(low, int) and isinstance(high, int) and 4 <= low <= high):
            raise ValueError(f"font_size_range must be (min, max) integers with 4 <= min <= max, got "
                             f"{self.font_size_range!r}")
        rows_low, rows_high = self.table_rows
        if not (isinstance(rows_low, int) and isinstance(rows_high, int) and 1 <= rows_low <= rows_high <= len(WORDS)):
            raise ValueError(f"table_rows must be (min, max) integers with 1 <= min <= max <= {len(WORDS)}, got "
                             f"{self.table_rows!r}")
        unknown = sorted(set(self.question_types) - set(QUESTION_TYPES))
        if not self.question_types or unknown:
            raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES}, got "
                             f"{self.question_types!r}")
        if not isinstance(self.value_digits, int) or not 0 <= self.value_digits <= MAX_VALUE_DIGITS:
            raise ValueError(f"value_digits must be an integer in [0, {MAX_VALUE_DIGITS}] (0: mixed numbers and "
                             f"prices), got {self.value_digits!r}")
        if self.box_content not in BOX_CONTENTS:
            raise ValueError(f"box_content must be one of {BOX_CONTENTS}, got {self.box_content!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")


# Named generator settings. "ocr": the default mixed OCR set (672 px, 8 texts). "reading": the reading demo's task:
# a 64 px canvas with two coloured boxes holding 3-digit numbers, 10-12 px fonts (digits 8-9 px tall, 6-8 px wide),
# the question naming a box's colour; the colour is visible at any resolution, the digits only at 4 px patches.
SYNTHETIC_TASKS = {
    "ocr": SyntheticOCRConfig(),
    "reading": SyntheticOCRConfig(canvas_size=(64, 64), num_texts=2, box_fraction=1.0, table_probability=0.0,
                                  font_size_range=(10, 12), question_types=("coloured-box",), value_digits=3,
                                  box_content="values"),
}


def synthetic_task(name: str, **overrides) -> SyntheticOCRConfig:
    """The config of task `name` (SYNTHETIC_TASKS) with `overrides` (SyntheticOCRConfig fields) applied."""
    if name not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; choose one of {sorted(SYNTHETIC_TASKS)}")
    return dataclasses.replace(SYNTHETIC_TASKS[name], **overrides)


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """PIL's built-in scalable font at `size` pixels (needs Pillow >= 10.1 built with FreeType); loaded once."""
    if not features.check("freetype2"):
        raise RuntimeError("synthetic OCR needs Pillow with FreeType support for ImageFont.load_default(size=...)")
    return ImageFont.load_default(size=size)


def _random_value(rng: np.random.Generator, digits: int = 0) -> str:
    """A short number: with `digits` > 0, exactly that many decimal digits; else an integer in [1, 9999] or a price
    with two decimals (even odds)."""
    if digits:
        return "".join(str(d) for d in rng.integers(0, 10, size=digits))
    if rng.random() < 0.5:
        return str(int(rng.integers(1, 10000)))
    return f"{int(rng.integers(0, 100))}.{int(rng.integers(0, 100)):02d}"


class _Canvas:
    """Places boxes without overlap (rejection sampling from the sample's generator) and records text boxes."""

    def __init__(self, config: SyntheticOCRConfig, rng: np.random.Generator, with_ink_mask: bool = False):
        self.width, self.height = config.canvas_size
        background = tuple(int(c) for c in rng.integers(225, 256, size=3))
        self.image = Image.new("RGB", (self.width, self.height), background)
        self.draw = ImageDraw.Draw(self.image)
        # the same glyphs drawn in white on black (ground truth of where the text's ink is), or None
        self.ink = Image.new("L", (self.width, self.height), 0) if with_ink_mask else None
        self.rng = rng
        self.occupied = []  # [x0, y0, x1, y1] of every placed element, margins included
        self.texts, self.boxes = [], []
        self.char_edges = []  # per text: the x of each character's left edge, then the text's right edge (pen moves)

    def find_place(self, width: int, height: int):
        """Top-left (x, y) of a free width x height area, or None after PLACEMENT_ATTEMPTS tries."""
        if width + 2 * MARGIN > self.width or height + 2 * MARGIN > self.height:
            return None
        for _ in range(PLACEMENT_ATTEMPTS):
            x = int(self.rng.integers(MARGIN, self.width - width - MARGIN + 1))
            y = int(self.rng.integers(MARGIN, self.height - height - MARGIN + 1))
            box = (x - MARGIN, y - MARGIN, x + width + MARGIN, y + height + MARGIN)
            if all(box[2] <= o[0] or o[2] <= box[0] or box[3] <= o[1] or o[3] <= box[1] for o in self.occupied):
                self.occupied.append(box)
                return x, y
        return None

    def write(self, x: int, y: int, text: str, font, fill) -> int:
        """Draw `text` with its ink box's top-left at (x, y); record it; return its index in `texts`."""
        left, top, _, _ = self.draw.textbbox((0, 0), text, font=font)
        self.draw.text((x - left, y - top), text, font=font, fill=fill)
        if self.ink is not None:
            ImageDraw.Draw(self.ink).text((x - left, y - top), text, font=font, fill=255)
        box = [int(v) for v in self.draw.textbbox((x - left, y - top), text, font=font)]
        self.char_edges.append([x - left + font.getlength(text[:end]) for end in range(len(text) + 1)])
        self.texts.append(text)
        self.boxes.append(box)
        return len(self.texts) - 1


def _text_size(text: str, font) -> tuple:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def _place_key_value(canvas: _Canvas, key: str, value: str, font, ink):
    """A "key: value" label; returns (text index, question, answer) or None if it does not fit."""
    text = f"{key}: {value}"
    width, height = _text_size(text, font)
    place = canvas.find_place(width, height)
    if place is None:
        return None
    index = canvas.write(*place, text, font, ink)
    return index, f"What is the {key}?", value


def _place_coloured_box(canvas: _Canvas, colour: str, content: str, font):
    """`content` in white on a filled box of `colour`; returns (text index, question, answer) or None."""
    width, height = _text_size(content, font)
    pad = max(2, height // 3)
    place = canvas.find_place(width + 2 * pad, height + 2 * pad)
    if place is None:
        return None
    x, y = place
    canvas.draw.rectangle((x, y, x + width + 2 * pad - 1, y + height + 2 * pad - 1), fill=BOX_COLOURS[colour])
    index = canvas.write(x + pad, y + pad, content, font, (255, 255, 255))
    return index, f"What is written in the {colour} box?", content


def _place_table(canvas: _Canvas, rng: np.random.Generator, config: SyntheticOCRConfig, font):
    """A bordered table (header "item | column", then rows of item and value); returns the candidate questions
    [(text index, question, answer)] of its rows, or [] if it does not fit."""
    column = TABLE_COLUMNS[int(rng.integers(len(TABLE_COLUMNS)))]
    num_rows = int(rng.integers(config.table_rows[0], config.table_rows[1] + 1))
    items = [WORDS[i] for i in rng.choice(len(WORDS), size=num_rows, replace=False)]
    values = [_random_value(rng, config.value_digits) for _ in items]
    cells = [("item", column)] + list(zip(items, values))
    _, line_height = _text_size("Ag0", font)
    pad = max(2, line_height // 3)
    widths = [max(_text_size(row[c], font)[0] for row in cells) + 2 * pad for c in range(2)]
    row_height = line_height + 2 * pad
    place = canvas.find_place(sum(widths) + 1, row_height * len(cells) + 1)
    if place is None:
        return []
    x, y = place
    questions = []
    for r, (item, value) in enumerate(cells):
        top = y + r * row_height
        canvas.draw.rectangle((x, top, x + widths[0], top + row_height), outline=(60, 60, 60))
        canvas.draw.rectangle((x + widths[0], top, x + sum(widths), top + row_height), outline=(60, 60, 60))
        canvas.write(x + pad, top + pad, item, font, (0, 0, 0))
        value_index = canvas.write(x + widths[0] + pad, top + pad, value, font, (0, 0, 0))
        if r:
            questions.append((value_index, f"What is the {column} of {item} in the table?", value))
    return questions


def generate_sample(index: int, config: SyntheticOCRConfig, with_ink_mask: bool = False) -> dict:
    """Sample `index` of the synthetic OCR set of `config`: a deterministic function of (config, index).

    Returns image (PIL RGB, config.canvas_size), question (str), answers (list[str], the answer first),
    text_boxes (list of [x0, y0, x1, y1] ink boxes in pixels, one per rendered text, x1/y1 exclusive),
    texts (list[str], same order), answer_box (index into text_boxes of the text holding the answer) and
    question_type (one of QUESTION_TYPES). The question's target is placed first, so it is always present.
    With `with_ink_mask`, also ink_mask: (height, width) bool numpy array, True where a text glyph covers at least half
    of the pixel (the texts drawn again, anti-aliased, on a separate mask; the image is unchanged), chars (every
    character of `texts`, in order) and char_map ((height, width) int16: the index in chars of the character each ink
    pixel belongs to, -1 elsewhere; see `_character_map`).
    Raises ValueError if the target cannot be placed (canvas too small for the fonts).
    """
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    rng = np.random.default_rng([config.seed, int(index)])
    canvas = _Canvas(config, rng, with_ink_mask)
    low, high = config.font_size_range

    def font():
        return _font(int(rng.integers(low, high + 1)))

    standalone_types = [t for t in ("key-value", "coloured-box") if t in config.question_types]
    has_table = "table" in config.question_types and (not standalone_types or rng.random() < config.table_probability)
    if has_table and (not standalone_types or rng.random() < 0.5):
        target_type = "table"
    else:
        target_type = standalone_types[int(rng.integers(len(standalone_types)))]
    keys = [KEYS[i] for i in rng.permutation(len(KEYS))]
    colours = [list(BOX_COLOURS)[i] for i in rng.permutation(len(BOX_COLOURS))]
    ink = INK_COLOURS[int(rng.integers(len(INK_COLOURS)))]

    def standalone(kind):
        if kind == "coloured-box":
            word = config.box_content == "words-or-values" and rng.random() < 0.5
            content = WORDS[int(rng.integers(len(WORDS)))] if word else _random_value(rng, config.value_digits)
            return _place_coloured_box(canvas, colours.pop(), content, font())
        return _place_key_value(canvas, keys.pop(), _random_value(rng, config.value_digits), font(), ink)

    if target_type == "table":
        candidates = _place_table(canvas, rng, config, font())
        if not candidates:
            raise ValueError(f"the table does not fit a {config.canvas_size} canvas with font_size_range "
                             f"{config.font_size_range}: enlarge canvas_size or reduce the fonts or table_rows")
        target = candidates[int(rng.integers(len(candidates)))]
        num_standalone = config.num_texts
    else:
        target = standalone(target_type)
        if target is None:
            raise ValueError(f"a {target_type} text does not fit a {config.canvas_size} canvas with "
                             f"font_size_range {config.font_size_range}: enlarge canvas_size or reduce the fonts")
        num_standalone = config.num_texts - 1
        if has_table:
            _place_table(canvas, rng, config, font())
    for _ in range(num_standalone):
        in_box = bool(colours) and "coloured-box" in config.question_types and rng.random() < config.box_fraction
        if not in_box and not keys:
            break
        standalone("coloured-box" if in_box else "key-value")  # distractors that do not fit are left out
    answer_box, question, answer = target
    sample = {
        "image": canvas.image,
        "question": question,
        "answers": [answer],
        "text_boxes": canvas.boxes,
        "texts": canvas.texts,
        "answer_box": answer_box,
        "question_type": target_type,
    }
    if with_ink_mask:
        sample["ink_mask"] = np.asarray(canvas.ink) >= 128
        sample["chars"], sample["char_map"] = _character_map(canvas, sample["ink_mask"])
    return sample


def _character_map(canvas: _Canvas, ink_mask: np.ndarray) -> tuple:
    """(chars, char_map): every character of every text in order (list[str]) and the (height, width) int16 map of
    the character each ink pixel belongs to (index into chars; -1 off the ink). A pixel belongs to the character
    whose advance [pen x before it, pen x after it) holds the pixel's centre, within its text's ink box."""
    char_map = np.full(ink_mask.shape, -1, dtype=np.int16)
    columns = np.arange(ink_mask.shape[1]) + 0.5
    offset = 0
    for text, (x0, y0, x1, y1), edges in zip(canvas.texts, canvas.boxes, canvas.char_edges):
        position = np.clip(np.searchsorted(edges, columns, side="right") - 1, 0, len(text) - 1)  # (width,)
        ink = ink_mask[y0:y1, x0:x1]
        char_map[y0:y1, x0:x1][ink] = np.broadcast_to(offset + position[x0:x1], ink.shape)[ink]
        offset += len(text)
    return [char for text in canvas.texts for char in text], char_map


def synthetic_ocr_dataset(num_samples: int, config: SyntheticOCRConfig) -> datasets.Dataset:
    """Samples 0 .. num_samples - 1 of `generate_sample` as an in-memory `datasets.Dataset` (column `image` of the
    datasets Image feature, the other keys as plain columns)."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    features = datasets.Features({
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answers": datasets.Sequence(datasets.Value("string")),
        "text_boxes": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
        "texts": datasets.Sequence(datasets.Value("string")),
        "answer_box": datasets.Value("int32"),
        "question_type": datasets.Value("string"),
    })
    return datasets.Dataset.from_list([generate_sample(i, config) for i in range(num_samples)], features=features)

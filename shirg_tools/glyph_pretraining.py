"""Stage 0 of the reading recipe: the vision tower alone learns glyphs from dense per-patch labels.

Every high-resolution token gets targets, so each image gives hundreds of targets instead of one answer, as dense
token labels speed up ViT training. Per-patch targets, each a linear head on the same features (`targets` picks
them; glyph always):
  - glyph: the class of the character that covers most of the patch's ink (below);
  - position: that character's place in its text (0 = first), the reading order a reader must follow;
  - colour: the coloured box the patch lies in (the box colour of synthetic_ocr.BOX_COLOURS that most of its pixels
    have exactly, if at least a quarter do: ink covers the rest of a text's patches), NO_BOX when none of its pixels
    has a box colour, IGNORE otherwise (a box's edge).
The glyph label of patch p:

    label(p) = digit d (0..9) or OTHER_GLYPH   if the character c* = argmax_c ink(p, c) has ink(p, c*) >= min_ink
             = BACKGROUND                        if the patch holds no ink
             = IGNORE (-100)                     otherwise (a trace of ink: no target)

where ink(p, c) counts the ink pixels of character c inside patch p (synthetic_ocr's char_map); the position label
follows the glyph label's patches (IGNORE elsewhere). The read-out is a LayerNorm + linear heads on the tower's
features (no post-norm, positions interpolated: exactly the features the VLM's high-resolution path reads), the loss
the sum over targets of the mean cross-entropy over labelled patches.

Per-digit accuracy (the stage's measure) reads each digit where it is: the log-probabilities of the ten digit classes
summed over the patches assigned to that digit, argmax == the digit.
"""

import dataclasses
import time

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction, Trainer

from .synthetic_ocr import BOX_COLOURS, SyntheticOCRConfig, generate_sample

BACKGROUND = 10
OTHER_GLYPH = 11
NUM_CLASSES = 12
IGNORE = -100
MAX_CHARS = 48  # characters per image the per-digit measure tracks (the reading task draws 6)
NUM_POSITIONS = 16  # places in a text the position head tells apart (later places share the last class)
NO_BOX = len(BOX_COLOURS)
HEADS = {"glyph": NUM_CLASSES, "position": NUM_POSITIONS, "colour": len(BOX_COLOURS) + 1}
LABELS = {"glyph": "labels", "position": "position_labels", "colour": "colour_labels"}  # head -> batch key


def patch_glyph_labels(char_map: np.ndarray, chars: list, grid: int, min_ink: int = 2) -> tuple:
    """(labels, char_ids), both (grid, grid) int64, of an image's (H, W) char_map (see the module docstring):
    char_ids holds the index in `chars` of the patch's majority character (-1 where the label is not a glyph).
    H and W must be multiples of `grid`."""
    height, width = char_map.shape
    if height % grid or width % grid:
        raise ValueError(f"the canvas ({width} x {height}) must be a multiple of the {grid} x {grid} token grid")
    codes = np.array([int(c) if c.isdigit() else OTHER_GLYPH for c in chars], dtype=np.int64)
    blocks = char_map.reshape(grid, height // grid, grid, width // grid).transpose(0, 2, 1, 3)  # (g, g, ph, pw)
    blocks = blocks.reshape(grid, grid, -1)
    counts = (blocks[..., None] == np.arange(len(chars))).sum(axis=2)  # (g, g, chars)
    majority = counts.argmax(axis=-1) if len(chars) else np.zeros((grid, grid), dtype=np.int64)
    ink = counts.max(axis=-1) if len(chars) else np.zeros((grid, grid), dtype=np.int64)
    glyph = ink >= min_ink
    labels = np.where(glyph, codes[majority] if len(chars) else 0, np.where(ink == 0, BACKGROUND, IGNORE))
    return labels.astype(np.int64), np.where(glyph, majority, -1).astype(np.int64)


def char_positions(texts: list) -> np.ndarray:
    """The place of every character of `texts` (concatenated, as synthetic_ocr's chars) in its text, capped at
    NUM_POSITIONS - 1."""
    places = [place for text in texts for place in range(len(text))]
    return np.minimum(np.array(places, dtype=np.int64), NUM_POSITIONS - 1)


def patch_colour_labels(image: np.ndarray, grid: int) -> np.ndarray:
    """(grid, grid) int64 box-colour labels of an (H, W, 3) uint8 image (see the module docstring)."""
    height, width, _ = image.shape
    colours = np.array(list(BOX_COLOURS.values()), dtype=np.uint8)  # (K, 3)
    matches = (image[:, :, None, :] == colours).all(axis=-1)  # (H, W, K)
    counts = matches.reshape(grid, height // grid, grid, width // grid, -1).sum(axis=(1, 3))  # (g, g, K)
    majority = counts.argmax(axis=-1)
    quarter = (height // grid) * (width // grid) / 4
    return np.where(counts.max(axis=-1) >= quarter, majority,
                    np.where(counts.sum(axis=-1) == 0, NO_BOX, IGNORE)).astype(np.int64)


class GlyphSamples(torch.utils.data.Dataset):
    """Sample i of the synthetic generator `config` as the tower sees it: hires_pixel_values (3, S, S) from the
    image processor, labels / char_ids (grid * grid,) of `patch_glyph_labels` (raster order, as the tower's tokens),
    position_labels and colour_labels (grid * grid,) (module docstring) and char_digits (MAX_CHARS,): the digit of
    each character, -1 for other characters and padding."""

    def __init__(self, config: SyntheticOCRConfig, num_samples: int, image_processor, hires_size: int,
                 patch_size: int, min_ink: int = 2):
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.config, self.num_samples, self.image_processor = config, num_samples, image_processor
        self.hires_size, self.grid, self.min_ink = hires_size, hires_size // patch_size, min_ink

    def __len__(self):
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        sample = generate_sample(index, self.config, with_ink_mask=True)
        chars = sample["chars"]
        if len(chars) > MAX_CHARS:
            raise ValueError(f"sample {index} has {len(chars)} characters; the glyph measure tracks {MAX_CHARS}")
        labels, char_ids = patch_glyph_labels(sample["char_map"], chars, self.grid, self.min_ink)
        pixels = self.image_processor.preprocess([sample["image"]], hires_size=self.hires_size)["hires_pixel_values"]
        positions = np.where(char_ids >= 0, char_positions(sample["texts"])[np.maximum(char_ids, 0)], IGNORE)
        colours = patch_colour_labels(np.asarray(sample["image"]), self.grid)
        digits = np.full(MAX_CHARS, -1, dtype=np.int64)
        digits[:len(chars)] = [int(c) if c.isdigit() else -1 for c in chars]
        return {"hires_pixel_values": pixels[0], "labels": torch.from_numpy(labels.reshape(-1)),
                "position_labels": torch.from_numpy(positions.reshape(-1)),
                "colour_labels": torch.from_numpy(colours.reshape(-1)),
                "char_ids": torch.from_numpy(char_ids.reshape(-1)), "char_digits": torch.from_numpy(digits)}


def check_targets(targets) -> tuple:
    """The read-out targets in HEADS order; ValueError unless a subset of HEADS holding "glyph"."""
    unknown = sorted(set(targets) - set(HEADS))
    if unknown or "glyph" not in targets:
        raise ValueError(f"targets must be names of {list(HEADS)} including 'glyph', got {list(targets)}")
    return tuple(name for name in HEADS if name in targets)


class GlyphReadout(nn.Module):
    """A VLM's vision tower (shared, not copied) with a per-patch head per target (HEADS):
    h = LayerNorm(SigLIP(x)), logits_t = W_t h + b_t (B, N, HEADS[t]); loss = sum_t mean cross-entropy of target t
    over its labelled patches."""

    def __init__(self, vision_tower: nn.Module, targets=("glyph",)):
        super().__init__()
        self.vision_tower = vision_tower
        width = vision_tower.config.hidden_size
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleDict({name: nn.Linear(width, HEADS[name]) for name in check_targets(targets)})

    def forward(self, hires_pixel_values, labels=None, position_labels=None, colour_labels=None, char_ids=None,
                char_digits=None):
        """Labels of every target (those without a head are unused), or none; char_ids / char_digits ride along for
        `glyph_metrics`. Outputs: loss, then the logits of each head in HEADS order."""
        native = self.vision_tower.config.image_size
        features = self.vision_tower(pixel_values=hires_pixel_values,
                                     interpolate_pos_encoding=hires_pixel_values.shape[-1] != native)
        hidden = self.norm(features.last_hidden_state)  # (B, N, D)
        logits = {f"{name}_logits": head(hidden) for name, head in self.heads.items()}  # (B, N, HEADS[name])
        if labels is None:
            return logits
        targets = {"glyph": labels, "position": position_labels, "colour": colour_labels}
        loss = sum(nn.functional.cross_entropy(logits[f"{name}_logits"].flatten(0, 1).float(),
                                               targets[name].flatten(), ignore_index=IGNORE) for name in self.heads)
        return {"loss": loss, **logits}


def glyph_metrics(prediction: EvalPrediction, targets=("glyph",)) -> dict:
    """Trainer's compute_metrics (bind `targets` with functools.partial): per_digit (each digit read from its
    patches, see the module docstring), patch_accuracy (labelled patches), glyph_patch_accuracy (patches labelled
    with a glyph) and <target>_accuracy of the other targets (their labelled patches). predictions: the logits of
    each target in HEADS order (one array for glyph alone); label_ids: (labels, position_labels, colour_labels,
    char_ids, char_digits), the order of train_tower's label_names."""
    targets = check_targets(targets)
    arrays = prediction.predictions if len(targets) > 1 else (prediction.predictions,)
    predictions = dict(zip(targets, (torch.as_tensor(array).float() for array in arrays)))
    labels, position_labels, colour_labels, char_ids, char_digits = (
        torch.as_tensor(array) for array in prediction.label_ids)
    extra = {}
    for name, target in (("position", position_labels), ("colour", colour_labels)):
        if name in predictions:
            kept = target != IGNORE
            extra[f"{name}_accuracy"] = float((predictions[name].argmax(dim=-1) == target)[kept].float().mean())
    logits = predictions["glyph"]  # (B, N, C)
    digit_scores = logits.log_softmax(dim=-1)[..., :10]  # (B, N, 10)
    tracked = char_ids >= 0
    scores = torch.zeros(logits.shape[0], MAX_CHARS + 1, 10)  # slot MAX_CHARS collects untracked patches
    scores.scatter_add_(1, torch.where(tracked, char_ids, MAX_CHARS)[..., None].expand(-1, -1, 10), digit_scores)
    seen = torch.zeros(logits.shape[0], MAX_CHARS + 1).scatter_add_(1, torch.where(tracked, char_ids, MAX_CHARS),
                                                                     tracked.float())[:, :MAX_CHARS]
    digits = (char_digits >= 0) & (seen > 0)  # digits with at least one labelled patch
    read = scores[:, :MAX_CHARS].argmax(dim=-1) == char_digits
    predicted = logits.argmax(dim=-1)
    labelled, glyph_patch = labels != IGNORE, (labels != IGNORE) & (labels != BACKGROUND)
    return {"per_digit": float(read[digits].float().mean()),
            "digits_without_patch": int(((char_digits >= 0) & (seen == 0)).sum()),
            "patch_accuracy": float((predicted == labels)[labelled].float().mean()),
            "glyph_patch_accuracy": float((predicted == labels)[glyph_patch].float().mean()), **extra}


class GlyphTrainer(Trainer):
    """Trainer whose logs also carry `wall_s`: wall-clock seconds of training so far, summed over resumed runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._clock = None

    def log(self, logs, start_time=None):
        if self._clock is None:
            before = [entry["wall_s"] for entry in self.state.log_history if "wall_s" in entry]
            self._clock = time.time() - (before[-1] if before else 0.0)
        logs["wall_s"] = round(time.time() - self._clock, 1)
        super().log(logs, start_time)


@dataclasses.dataclass
class GlyphCurve:
    """The evaluation entries of a trainer state's log history: step, wall_s and per_digit of each."""

    steps: list
    wall_s: list
    per_digit: list

    @classmethod
    def from_log_history(cls, history: list) -> "GlyphCurve":
        entries = [entry for entry in history if "eval_per_digit" in entry]
        return cls([e["step"] for e in entries], [e.get("wall_s") for e in entries],
                   [e["eval_per_digit"] for e in entries])

    def first_reaching(self, level: float):
        """(step, wall_s) of the first evaluation with per_digit >= level, or None."""
        return next(((s, w) for s, w, p in zip(self.steps, self.wall_s, self.per_digit) if p >= level), None)

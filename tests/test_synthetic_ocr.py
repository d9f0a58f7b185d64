"""Synthetic OCR generator: deterministic samples whose question is answered by one rendered, boxed text."""

import numpy as np
import pytest
from PIL import Image

import hashlib

from lavida_shirg.configuration_lavida_shirg import ShirgConfig
from shirg_tools.synthetic_ocr import (
    BOX_COLOURS,
    QUESTION_TYPES,
    SyntheticOCRConfig,
    generate_sample,
    synthetic_ocr_dataset,
    synthetic_task,
)

SMALL = SyntheticOCRConfig(canvas_size=(96, 96), num_texts=3, font_size_range=(8, 10), seed=3)


def test_samples_are_a_deterministic_function_of_seed_and_index():
    first, again = generate_sample(5, SMALL), generate_sample(5, SMALL)
    assert first["image"].tobytes() == again["image"].tobytes()
    assert {k: v for k, v in first.items() if k != "image"} == {k: v for k, v in again.items() if k != "image"}
    other_index = generate_sample(6, SMALL)
    other_seed = generate_sample(5, SyntheticOCRConfig(canvas_size=(96, 96), num_texts=3, font_size_range=(8, 10),
                                                       seed=4))
    assert other_index["image"].tobytes() != first["image"].tobytes()
    assert other_seed["image"].tobytes() != first["image"].tobytes()


@pytest.mark.parametrize("config", [SMALL, SyntheticOCRConfig()], ids=["96px", "672px-default"])
def test_boxes_hold_distinct_inked_texts_and_the_answer(config):
    for index in range(12):
        sample = generate_sample(index, config)
        image, boxes, texts = sample["image"], sample["text_boxes"], sample["texts"]
        assert image.mode == "RGB" and image.size == config.canvas_size
        assert len(boxes) == len(texts) >= 1 and 0 <= sample["answer_box"] < len(boxes)
        assert sample["question_type"] in QUESTION_TYPES
        answer = sample["answers"][0]
        assert answer and answer in texts[sample["answer_box"]]
        pixels = np.asarray(image).astype(int)
        width, height = config.canvas_size
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            assert y1 - y0 <= config.font_size_range[1] + 1, "texts stay small"
            region = pixels[y0:y1, x0:x1].reshape(-1, 3)
            assert (region.max(axis=0) - region.min(axis=0)).max() > 60, "each box holds contrasting ink"
        for a in range(len(boxes)):  # rendered texts never overlap
            for b in range(a + 1, len(boxes)):
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0


def test_each_question_type_names_its_target():
    config = SyntheticOCRConfig(canvas_size=(192, 192), num_texts=4, font_size_range=(8, 10), seed=0)
    seen = set()
    for index in range(60):
        sample = generate_sample(index, config)
        kind, target = sample["question_type"], sample["texts"][sample["answer_box"]]
        seen.add(kind)
        answer, question = sample["answers"][0], sample["question"]
        if kind == "key-value":
            key = question[len("What is the "):-1]
            assert target == f"{key}: {answer}"
        elif kind == "coloured-box":
            colour = question[len("What is written in the "):-len(" box?")]
            x0, y0, _, _ = sample["text_boxes"][sample["answer_box"]]
            assert sample["image"].getpixel((x0 - 1, y0 - 1)) == BOX_COLOURS[colour] and target == answer
        else:
            item = question.split(" of ")[1].split(" in the table")[0]
            assert sample["texts"][sample["answer_box"] - 1] == item and target == answer
    assert seen == set(QUESTION_TYPES)


def test_dataset_has_image_feature_and_same_samples():
    dataset = synthetic_ocr_dataset(4, SMALL)
    assert dataset.num_rows == 4 and type(dataset.features["image"]).__name__ == "Image"
    row, sample = dataset[2], generate_sample(2, SMALL)
    assert isinstance(row["image"], Image.Image)
    assert np.array_equal(np.asarray(row["image"]), np.asarray(sample["image"]))
    assert row["text_boxes"] == sample["text_boxes"] and row["answer_box"] == sample["answer_box"]
    assert row["answers"] == sample["answers"] and row["texts"] == sample["texts"]


@pytest.mark.parametrize("overrides, message", [
    (dict(canvas_size=(8, 8)), "canvas_size"),
    (dict(num_texts=0), "num_texts"),
    (dict(font_size_range=(12, 10)), "font_size_range"),
    (dict(question_types=("price",)), "question_types"),
    (dict(box_fraction=1.5), "box_fraction"),
    (dict(value_digits=-1), "value_digits"),
    (dict(value_digits=2.0), "value_digits"),
    (dict(box_content="words"), "box_content must be one of"),
])
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        SyntheticOCRConfig(**overrides)


def test_a_target_that_cannot_fit_is_an_error():
    config = SyntheticOCRConfig(canvas_size=(20, 20), font_size_range=(16, 16), question_types=("key-value",))
    with pytest.raises(ValueError, match="does not fit"):
        generate_sample(0, config)


def test_the_default_set_is_unchanged_by_the_new_options():
    """value_digits / box_content at their defaults draw exactly the samples of the set before they existed
    (fingerprint of samples 0-19 of the default config, taken before the options were added)."""
    digest = hashlib.sha256()
    for index in range(20):
        sample = generate_sample(index, SyntheticOCRConfig())
        digest.update(sample["image"].tobytes())
        digest.update(repr((sample["question"], sample["answers"], sample["text_boxes"])).encode())
    assert digest.hexdigest() == "29bf871bb7ba506a22cb2a210f0760b186292d1de68e4bad0fff101c0d039bf9"


def test_value_digits_and_box_content():
    config = SyntheticOCRConfig(canvas_size=(192, 192), num_texts=6, box_fraction=0.5, table_probability=1.0,
                                value_digits=4, box_content="values", seed=1)
    numbers = 0
    for index in range(20):
        sample = generate_sample(index, config)
        for text in sample["texts"]:
            value = text.split(": ")[-1]
            if value.isdigit():
                assert len(value) == 4
                numbers += 1
        answer = sample["answers"][0]
        assert answer.isdigit() and len(answer) == 4, "every question of this config asks a number"
    assert numbers > 40


def test_reading_task_geometry_matches_the_reader_preset():
    """The reading task: two coloured boxes of 3-digit numbers on a 64 px canvas; the question names the target's
    colour. Its digits are shorter than one pooled token of the reader preset and at least two of its
    high-resolution patches tall (the pooled layout cannot resolve them, the high-resolution one can)."""
    config, model = synthetic_task("reading"), ShirgConfig.from_preset("reader")
    vision = model.vision_config
    pooled_token_px = vision.image_size / model.pooled_view_size  # a crop token at the 64 px pinpoint (no resize)
    hires_patch_px = config.canvas_size[0] / model.hires_image_size * vision.patch_size
    heights, two_boxes = [], 0
    for index in range(50):
        sample = generate_sample(index, config)
        assert sample["question_type"] == "coloured-box" and len(sample["texts"]) <= 2
        two_boxes += len(sample["texts"]) == 2
        assert all(len(text) == 3 and text.isdigit() for text in sample["texts"])
        colour = sample["question"][len("What is written in the "):-len(" box?")]
        x0, y0, _, _ = sample["text_boxes"][sample["answer_box"]]
        assert sample["image"].getpixel((x0 - 1, y0 - 1)) == BOX_COLOURS[colour]
        heights += [y1 - y0 for _, y0, _, y1 in sample["text_boxes"]]
    assert two_boxes >= 45, "nearly every image holds a distractor box"
    assert 2 * hires_patch_px <= min(heights) and max(heights) < pooled_token_px, (heights, pooled_token_px)

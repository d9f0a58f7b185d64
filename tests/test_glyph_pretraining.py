"""Stage 0 (train_tower.py): character maps of the generator, dense glyph labels, the read-out, its measure, and the
Trainer run (resume == uninterrupted, the exported VLM carries the trained tower and an untouched LM)."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, EvalPrediction

import train
import train_tower
from lavida_shirg import ShirgConfig
from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion
from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer
from shirg_tools.glyph_pretraining import (
    BACKGROUND,
    HEADS,
    IGNORE,
    MAX_CHARS,
    NO_BOX,
    OTHER_GLYPH,
    GlyphReadout,
    GlyphSamples,
    glyph_metrics,
    patch_colour_labels,
    patch_glyph_labels,
)
from shirg_tools.synthetic_ocr import BOX_COLOURS, SYNTHETIC_TASKS, SyntheticOCRConfig, generate_sample


@pytest.mark.parametrize("config", [SYNTHETIC_TASKS["reading"], SyntheticOCRConfig(canvas_size=(160, 120), seed=3)])
def test_the_character_map_covers_the_ink_in_reading_order(config):
    for index in range(4):
        sample = generate_sample(index, config, with_ink_mask=True)
        plain = generate_sample(index, config)
        assert np.array_equal(np.asarray(sample["image"]), np.asarray(plain["image"]))
        char_map, chars = sample["char_map"], sample["chars"]
        assert chars == list("".join(sample["texts"]))
        assert np.array_equal(char_map >= 0, sample["ink_mask"])
        columns = np.broadcast_to(np.arange(char_map.shape[1]), char_map.shape)
        offset = 0
        for text, (x0, y0, x1, y1) in zip(sample["texts"], sample["text_boxes"]):
            inside = char_map[y0:y1, x0:x1]
            assert set(np.unique(inside[inside >= 0])) <= set(range(offset, offset + len(text)))
            centres = [columns[char_map == offset + k].mean() for k in range(len(text))
                       if (char_map == offset + k).any()]
            assert centres == sorted(centres)  # characters left to right
            offset += len(text)
        assert not set(np.unique(char_map[char_map >= 0])) & {i for i, c in enumerate(chars) if c == " "}


def test_patch_labels_by_majority_ink():
    char_map = np.full((8, 8), -1, dtype=np.int16)
    char_map[0:2, 0:4] = 0  # patch (0, 0): 8 pixels of "7"
    char_map[2, 0] = 1  # and 1 of "a"
    char_map[0, 4] = 1  # patch (0, 1): one pixel of "a" only -> ignored
    char_map[4:8, 4:6] = 1  # patch (1, 1): 8 pixels of "a"
    char_map[4, 7] = 0  # ... and one of "7"
    labels, char_ids = patch_glyph_labels(char_map, ["7", "a"], grid=2)
    assert labels.tolist() == [[7, IGNORE], [BACKGROUND, OTHER_GLYPH]]
    assert char_ids.tolist() == [[0, -1], [-1, 1]]
    labels, _ = patch_glyph_labels(char_map, ["7", "a"], grid=2, min_ink=1)
    assert labels.tolist() == [[7, OTHER_GLYPH], [BACKGROUND, OTHER_GLYPH]]
    with pytest.raises(ValueError, match="multiple of the 3 x 3 token grid"):
        patch_glyph_labels(char_map, ["7", "a"], grid=3)


@pytest.fixture(scope="module")
def reader():
    torch.manual_seed(0)
    model = LavidaShirgForMaskedDiffusion(ShirgConfig.from_preset("reader")).eval()
    return model, LavidaShirgProcessor.from_config(model.config, build_tiny_tokenizer())


def test_the_readout_reads_the_vlms_high_resolution_features(reader):
    model, processor = reader
    data = GlyphSamples(SYNTHETIC_TASKS["reading"], 3, processor.image_processor, 64, 4)
    items = [data[i] for i in range(3)]
    batch = {name: torch.stack([item[name] for item in items]) for name in items[0]}
    sample = generate_sample(1, SYNTHETIC_TASKS["reading"])
    expected_pixels = processor(images=[sample["image"]], text=[processor.build_prompt("q")],
                                selection_method="full")["hires_pixel_values"]
    assert torch.equal(batch["hires_pixel_values"][1], expected_pixels[0])
    assert batch["labels"].shape == (3, 256) and batch["char_digits"].shape == (3, MAX_CHARS)
    digits = [int(c) for c in "".join(sample["texts"])]
    assert batch["char_digits"][1, :len(digits)].tolist() == digits and bool((batch["char_digits"][1, 6:] == -1).all())
    readout = GlyphReadout(model.model.vision_tower, targets=("colour", "glyph", "position"))
    assert list(readout.heads) == list(HEADS)
    with torch.no_grad():
        outputs = readout(**batch)
        features = model.model.vision_features(batch["hires_pixel_values"])[0]
        normed = torch.nn.functional.layer_norm(features, (features.shape[-1],), readout.norm.weight,
                                                readout.norm.bias, readout.norm.eps)
    expected = 0
    assert list(outputs) == ["loss", "glyph_logits", "position_logits", "colour_logits"]
    for name, key, target in (("glyph", "glyph_logits", "labels"), ("position", "position_logits", "position_labels"),
                              ("colour", "colour_logits", "colour_labels")):
        logits = normed @ readout.heads[name].weight.T + readout.heads[name].bias
        torch.testing.assert_close(outputs[key], logits)
        kept = batch[target] != IGNORE
        expected = expected - logits.log_softmax(-1).gather(-1, batch[target].clamp(min=0)[..., None])[..., 0][
            kept].mean()
    torch.testing.assert_close(outputs["loss"], expected)
    assert set(batch["labels"].unique().tolist()) <= set(range(10)) | {BACKGROUND, IGNORE}
    glyph = (batch["labels"] >= 0) & (batch["labels"] < BACKGROUND)
    assert set(batch["position_labels"][glyph].tolist()) == {0, 1, 2}  # 3-digit numbers, first to third
    assert bool((batch["position_labels"][batch["labels"] >= BACKGROUND] == IGNORE).all())
    box = batch["colour_labels"][1].reshape(16, 16)
    x0, y0, x1, y1 = sample["text_boxes"][sample["answer_box"]]
    colour = list(BOX_COLOURS).index(sample["question"].split()[-2])
    assert int(box[(y0 + y1) // 8, (x0 + x1) // 8]) == colour  # the middle of the answer's text, 4 px patches
    assert int(box[0, 0]) == NO_BOX or int(box[15, 15]) == NO_BOX


def test_colour_labels_by_majority_of_exact_box_pixels():
    image = np.full((8, 8, 3), 250, dtype=np.uint8)
    image[0:4, 0:4] = BOX_COLOURS["brown"]  # patch (0, 0): a brown box
    image[0:4, 4:8] = (255, 255, 255)  # patch (0, 1): ink over a red box, a quarter of it red, 3 green pixels
    image[0, 4:8], image[1, 4:7] = BOX_COLOURS["red"], BOX_COLOURS["green"]
    image[4:7, 4] = BOX_COLOURS["blue"]  # patch (1, 1): 3 blue pixels (a box's edge)
    image[0, 0] = (255, 255, 255)  # ink over the box
    assert patch_colour_labels(image, 2).tolist() == [[list(BOX_COLOURS).index("brown"), list(BOX_COLOURS).index("red")],
                                                     [NO_BOX, IGNORE]]


def test_per_digit_reads_each_digit_from_its_patches():
    logits = torch.zeros(1, 4, 12)
    position, position_labels = torch.zeros(1, 4, 16), torch.tensor([[0, 0, 2, IGNORE]])
    position[0, :, 0] = 1.0  # reads place 0 everywhere: 2 of 3 labelled patches right
    colour, colour_labels = torch.zeros(1, 4, 9), torch.tensor([[3, 3, IGNORE, NO_BOX]])
    colour[0, :, 3] = 1.0  # 2 of 3
    logits[0, 0, 3], logits[0, 1, 3], logits[0, 1, 5] = 5.0, 1.0, 2.0  # char 0 (a 3): patches 0 and 1 -> 3
    logits[0, 2, 8] = 4.0  # char 1 (a 9): read as 8
    logits[0, 3, BACKGROUND] = 9.0
    labels = torch.tensor([[3, 3, 9, BACKGROUND]])
    char_ids = torch.tensor([[0, 0, 1, -1]])
    char_digits = torch.full((1, MAX_CHARS), -1)
    char_digits[0, :3] = torch.tensor([3, 9, 4])  # char 2 (a 4) has no labelled patch
    label_ids = (labels.numpy(), position_labels.numpy(), colour_labels.numpy(), char_ids.numpy(), char_digits.numpy())
    metrics = glyph_metrics(EvalPrediction((logits.numpy(), position.numpy(), colour.numpy()), label_ids), HEADS)
    # patches: 0 -> 3 right, 1 -> 5 wrong (summed with patch 0 the char still reads 3), 2 -> 8 wrong, 3 right
    assert metrics == pytest.approx({"per_digit": 0.5, "digits_without_patch": 1, "patch_accuracy": 0.5,
                                     "glyph_patch_accuracy": 1 / 3, "position_accuracy": 2 / 3,
                                     "colour_accuracy": 2 / 3})
    alone = glyph_metrics(EvalPrediction(logits.numpy(), label_ids))  # the glyph head alone: one array
    assert alone == {name: value for name, value in metrics.items() if name not in ("position_accuracy",
                                                                                     "colour_accuracy")}
    with pytest.raises(ValueError, match="targets must be names of"):
        glyph_metrics(EvalPrediction(logits.numpy(), label_ids), ("position",))


def test_tower_training_resumes_exactly_and_exports_the_vlm(tmp_path):
    common = ["--max_steps", "4", "--per_device_train_batch_size", "4", "--heldout_samples", "8", "--eval_steps", "2",
              "--save_steps", "2", "--logging_steps", "1", "--warmup_steps", "1"]
    whole = train_tower.main(["--output_dir", str(tmp_path / "whole"), *common])
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "part" / "checkpoint-2")  # stopped at step 2
    resumed = train_tower.main(["--output_dir", str(tmp_path / "part"), *common, "--resume_from_checkpoint", "last"])
    assert resumed["steps"] == whole["steps"] == 4
    assert resumed["curve"]["per_digit"] == whole["curve"]["per_digit"] and len(whole["curve"]["steps"]) >= 2
    whole_weights = load_file(tmp_path / "whole" / "checkpoint-4" / "model.safetensors")
    part_weights = load_file(tmp_path / "part" / "checkpoint-4" / "model.safetensors")
    for name, tensor in whole_weights.items():
        torch.testing.assert_close(part_weights[name], tensor, rtol=0, atol=1e-6, msg=name)
    exported = AutoModel.from_pretrained(tmp_path / "whole" / "model", trust_remote_code=True)
    untrained, _, _ = train.load_model(train.ModelArguments(preset="reader"), 42)
    for name, tensor in exported.state_dict().items():
        if name.startswith("model.vision_tower."):
            assert torch.equal(tensor, whole_weights[name.removeprefix("model.")]), name
            moved = not torch.equal(tensor, untrained.state_dict()[name])
        else:
            assert torch.equal(tensor, untrained.state_dict()[name]), name  # only the tower trained
    assert moved
    head = load_file(tmp_path / "whole" / "model" / train_tower.HEAD_FILE)
    assert set(head) == {"norm.weight", "norm.bias", "heads.glyph.weight", "heads.glyph.bias"}  # default: glyph
    assert torch.equal(head["heads.glyph.weight"], whole_weights["heads.glyph.weight"])
    with pytest.raises(ValueError, match="--heldout_seed"):
        train_tower.main(["--output_dir", str(tmp_path / "bad"), "--heldout_seed", "0"])
    with pytest.raises(ValueError, match="targets must be names of"):
        train_tower.main(["--output_dir", str(tmp_path / "bad"), "--targets", "glyph,shape"])
    # a later stage 0 continues from the exported folder: its tower and glyph head, a fresh colour head
    trainer, _, _ = train_tower.build_trainer(["--output_dir", str(tmp_path / "more"), "--model_name_or_path",
                                               str(tmp_path / "whole" / "model"), "--targets", "glyph,colour"])
    continued = trainer.model.state_dict()
    assert set(continued) == set(whole_weights) | {"heads.colour.weight", "heads.colour.bias"}
    for name, tensor in whole_weights.items():
        assert torch.equal(continued[name], tensor), name

"""predict.py (LaViDa's predict.py / predict_fim.py as one command) run as a user runs it, in a fresh process, on saved
tiny folders of both backbones: its answer and step history equal the in-process generate call; a FIM draft's fixed
text is kept; bad input is one error line."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, build_tiny_model, save_tiny_dream_folder
from PIL import Image

from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer

QUESTION = "What is written?"


def run_predict(*arguments):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), *map(str, arguments)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    llada = build_tiny_model(seed=3)
    llada.save_pretrained(root / "llada")
    LavidaShirgProcessor.from_config(llada.config, build_tiny_tokenizer()).save_pretrained(root / "llada")
    dream = save_tiny_dream_folder(root / "dream", seed=4)
    image = root / "image.png"
    Image.new("RGB", (70, 50), "white").save(image)
    return root, {"llada": llada, "dream": dream}, image


def expected(model, folder, image, draft=None, **settings):
    processor = LavidaShirgProcessor.from_pretrained(folder, trust_remote_code=True)
    extra = {} if draft is None else {"draft": draft}
    inputs = processor(images=[Image.open(image).convert("RGB")], text=[processor.build_prompt(QUESTION)], **extra)
    output = model.generate(**inputs, **settings, generator=torch.Generator().manual_seed(0),
                            return_dict_in_generate=True, output_history=True)
    answer = output.sequences[:, inputs["input_ids"].shape[1]:]
    return processor, answer, output.history


@pytest.mark.parametrize("backbone", ["llada", "dream"])
def test_answer_and_history_equal_generate(folders, backbone):
    root, models, image = folders
    done = run_predict(root / backbone, image, QUESTION, "--max-new-tokens", 8, "--steps", 4, "--history")
    assert done.returncode == 0, done.stderr[-3000:]
    processor, answer, history = expected(models[backbone], root / backbone, image, max_new_tokens=8, steps=4)
    lines = done.stdout.strip().splitlines()
    assert len(history) == 4 and len(lines) == 5
    mask = processor.tokenizer.convert_ids_to_tokens(models[backbone].config.mask_token_id)
    for step, canvas in enumerate(history):
        assert lines[step] == f"step {step}: " + processor.batch_decode(canvas, skip_special_tokens=False)[0].replace(
            mask, "*")
    assert lines[0].count("*") > lines[3].count("*") == 0, "the canvas fills step by step"
    assert lines[-1] == processor.batch_decode(answer, skip_special_tokens=True)[0].strip()


def test_a_fim_draft_keeps_its_text(folders, tmp_path):
    root, models, image = folders
    draft = "Total: <|mdm_mask|><|mdm_mask|><|mdm_mask|><|reserved_token_1|> done"
    (tmp_path / "draft.txt").write_text(draft)
    done = run_predict(root / "llada", image, QUESTION, "--draft-file", tmp_path / "draft.txt", "--max-new-tokens", 16,
                       "--block-length", 8, "--steps", 8, "--schedule", "shift")
    assert done.returncode == 0, done.stderr[-3000:]
    processor, answer, _ = expected(models["llada"], root / "llada", image, draft=draft, max_new_tokens=16,
                                    block_length=8, steps=8, schedule="shift")
    draft_ids = processor(images=[Image.open(image).convert("RGB")], text=[processor.build_prompt(QUESTION)],
                          draft=draft)["draft_ids"][0]
    fixed = draft_ids != models["llada"].config.mask_token_id
    assert torch.equal(answer[0, : len(draft_ids)][fixed], draft_ids[fixed]), "the draft's fixed ids are kept"
    assert done.stdout.strip() == processor.batch_decode(answer, skip_special_tokens=True)[0].strip()
    assert done.stdout.startswith("Total:") and "reserved_token" not in done.stdout


@pytest.mark.parametrize("arguments, message", [
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),  # before the weights load
    (["--steps", "3", "--max-new-tokens", "8", "--block-length", "4"], "steps must be a positive multiple"),
    (["--selection-budget", "100000", "--selection-method", "shirg-fixed"], "selection_budget"),
    (["--alg", "topk_margin"], "alg='topk_margin' is Dream's sampler"),
])
def test_bad_input_is_one_error_line(folders, arguments, message):
    root, _, image = folders
    done = run_predict(root / "llada", image, QUESTION, *arguments)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].startswith("predict.py: error: ") and message in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unreadable_image_is_named(folders, tmp_path):
    root, _, _ = folders
    (tmp_path / "broken.png").write_bytes(b"not an image")
    done = run_predict(root / "llada", tmp_path / "broken.png", QUESTION)
    assert done.returncode == 2 and "broken.png' cannot be read as an image" in done.stderr


def test_sampler_settings_are_checked_before_the_weights_load(folders):
    root, _, image = folders
    done = run_predict(root / "llada", image, QUESTION, "--schedule", "cosine")
    assert done.returncode == 2 and "schedule must be one of ('uniform', 'shift')" in done.stderr
    assert "Loading weights" not in done.stderr

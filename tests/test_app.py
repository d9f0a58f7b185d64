"""The Gradio app (app.py) served by `python app.py` on 127.0.0.1 from a random reader-preset folder: driven with
gradio_client (answers, token counts and overlay PNGs of two variants; every bad input gets a message and the app
keeps serving) and with headless Chromium through selenium (pick an example, run, the page shows the answers)."""

import os

import numpy as np
import pytest
import torch
from conftest import ROOT, save_tiny_dream_folder, served_app
from gradio_client import Client, handle_file
from PIL import Image

import app
from lavida_shirg import ShirgConfig
from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion
from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer
from shirg_tools.demo_examples import demo_examples
from shirg_tools.overlays import ANSWER_BOX, CAPTION_LINE_HEIGHT, DIM

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = os.path.join(ROOT, "runs", "app", "screenshot.png")
PANEL_SIZE = (320, 320 + 3 * CAPTION_LINE_HEIGHT + 6)  # a 64 px image shown at 320 px, three caption lines


@pytest.fixture(scope="module")
def reader_folder(tmp_path_factory):
    """A reader-preset model with random weights (seed 2: its answers are non-empty text) and its processor."""
    folder = tmp_path_factory.mktemp("reader")
    torch.manual_seed(2)
    model = LavidaShirgForMaskedDiffusion(ShirgConfig.from_preset("reader"))
    processor = LavidaShirgProcessor.from_config(model.config, build_tiny_tokenizer())
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, processor


@pytest.fixture(scope="module")
def server(reader_folder, tmp_path_factory):
    """`python app.py --model FOLDER --port P` running until the module's tests end: (URL, process)."""
    work = tmp_path_factory.mktemp("app")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(work / "gradio")}
    with served_app([os.path.join(ROOT, "app.py"), "--model", str(reader_folder[0]), "--device", "cpu"], work,
                    env) as served:
        yield served


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return Client(server[0], verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The first built-in example, and its image as a PNG file (what the page holds after a click on it)."""
    sample = demo_examples(1)[0]
    path = tmp_path_factory.mktemp("example") / "example.png"
    sample["image"].save(path)
    return sample, str(path)


def run(client, image, question, variants, budget=48):
    """(table rows, gallery, status) of one query."""
    table, gallery, status = client.predict(image, question, variants, budget, api_name="/run")
    assert table["headers"] == app.TABLE_HEADERS
    return table["data"], gallery, status


def image_part(path) -> np.ndarray:
    """The RGB pixels of a panel above its caption band."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    return pixels[: PANEL_SIZE[0]]


def test_two_variants_return_answers_token_counts_and_overlays(client, reader_folder, example):
    sample, path = example
    _, processor = reader_folder
    rows, gallery, status = run(client, handle_file(path), sample["question"], ["pooled", "shirg-fixed"])
    assert status.startswith("Ran 2 variant(s) on a 64 x 64 image.")
    assert [row[0] for row in rows] == ["pooled", "shirg-fixed@48"]
    assert [row[2] for row in rows] == [processor.image_token_count((64, 64), "pooled"),
                                        processor.image_token_count((64, 64), "shirg-fixed", 48)] == [24, 48]
    for label, answer, _, latency_ms, kv_mb in rows:
        assert isinstance(answer, str) and answer.strip(), f"{label}: the random reader answers with text"
        assert latency_ms > 0 and kv_mb > 0
    assert rows[0][4] < rows[1][4], "the KV cache grows with the image tokens (24 vs 48)"
    assert [item["caption"] for item in gallery] == ["pooled", "shirg-fixed@48"]
    for item in gallery:
        with Image.open(item["image"]) as panel:
            assert (panel.format, panel.size) == ("PNG", PANEL_SIZE)
    pooled, selected = (image_part(item["image"]) for item in gallery)
    dim_limit = 255 * DIM + 1
    assert (pooled.max(axis=-1) < dim_limit).mean() < 0.05, "pooled drops no patch"
    assert (selected.max(axis=-1) < dim_limit).mean() > 0.5, "48 of 256 tokens kept: most of the image is dimmed"
    assert (np.abs(selected.astype(int) - ANSWER_BOX).sum(-1) == 0).any(), "the example's answer box is drawn"


def test_an_uploaded_image_has_no_answer_box(client, example):
    sample, path = example
    rows, gallery, _ = run(client, handle_file(path), "Which number is in the box?", ["shirg-fixed"])
    assert len(rows) == 1 and rows[0][2] == 48
    panel = image_part(gallery[0]["image"])
    assert not (np.abs(panel.astype(int) - ANSWER_BOX).sum(-1) == 0).any(), "another question: no known answer"


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    Image.fromarray(np.zeros((40, 50), np.float32)).save(folder / "float.tiff")  # PIL mode F
    Image.fromarray(np.full((40, 50), 70000, np.int32)).save(folder / "int32.tiff")  # PIL mode I
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.mark.parametrize("image, question, variants, budget, message", [
    (None, "What is written?", ["pooled"], 48, "no image: upload one or pick an example"),
    ("float.tiff", "What is written?", ["pooled"], 48, "`images`[0] has PIL mode 'F' (32-bit float pixels), whose "
     "value range is ambiguous: convert it to 8 bits first"),
    ("int32.tiff", "What is written?", ["shirg-fixed"], 48, "`images`[0] has PIL mode 'I' (32-bit integer pixels)"),
    ("notes.txt", "What is written?", ["pooled"], 48, "the upload 'notes.txt' is not an image PIL can read"),
    ("example", "   ", ["pooled"], 48, "the question is empty: type a question about the image"),
    ("example", "What is written?", ["pooled", "shirg-fixed"], 1000, "variant 'shirg-fixed@1000': selection_budget "
     "must be a positive integer at most the 256 high-resolution tokens, got 1000"),
    ("example", "What is written?", [], 48, "no variant chosen: tick at least one variant"),
], ids=["no-image", "mode-F", "mode-I", "not-an-image", "empty-question", "budget-above-tokens", "no-variant"])
def test_bad_input_gets_a_message_and_the_app_keeps_serving(client, server, example, bad_files, image, question,
                                                            variants, budget, message):
    path = example[1] if image == "example" else None if image is None else str(bad_files / image)
    rows, gallery, status = run(client, None if path is None else handle_file(path), question, variants, budget)
    assert status.startswith(f"**Cannot run:** {message}"), status
    assert rows == [] and gallery == []
    assert server[1].poll() is None, "the app is still running"
    rows, gallery, status = run(client, handle_file(example[1]), "What is written?", ["pooled"])
    assert status.startswith("Ran 1 variant(s)") and len(rows) == len(gallery) == 1 and rows[0][2] == 24


def page_rows(driver) -> list:
    """(variant, answer, image tokens) of every row of the results table as the page shows it."""
    from selenium.webdriver.common.by import By

    lines = driver.find_element(By.ID, "results").text.splitlines()
    cells = lines[lines.index(app.TABLE_HEADERS[-1]) + 1:]
    return [(cells[i], cells[i + 1], int(cells[i + 2])) for i in range(0, len(cells), len(app.TABLE_HEADERS))]


def test_a_browser_runs_an_example_and_shows_the_answers(client, server, example):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(f"this test drives Chromium ({CHROMIUM}, {CHROMEDRIVER}): install them with "
                    "`apt-get install chromium chromium-driver` (Debian; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    sample, path = example
    rows, _, _ = run(client, handle_file(path), sample["question"], app.DEFAULT_METHODS, 64)
    expected = [(label, " ".join(answer.split()), tokens) for label, answer, tokens, _, _ in rows]
    assert [label for label, _, _ in expected] == ["pooled", "full", "shirg-fixed@64", "shirg-v2@64", "shirg-x@64"]
    assert all(answer for _, answer, _ in expected), "the answers to find in the page are non-empty"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,2000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(server[0])
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '#examples [data-testid="dataset-cell-0-0"]')).click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#question textarea").get_attribute("value")
                   == sample["question"])
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("Ran 5 variant(s)"))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#overlays img")) >= 5)
        shown = page_rows(driver)
        os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
        assert driver.save_screenshot(SCREENSHOT)
    finally:
        driver.quit()
    assert shown == expected
    with Image.open(SCREENSHOT) as screenshot:
        assert screenshot.format == "PNG" and screenshot.width >= 1000


def test_the_backend_runs_a_dream_folder_with_lavidas_dream_sampler(tmp_path):
    """The app's backend on a saved tiny LaViDa-Dream folder: the "dream" chat format, and per variant the answer of
    LaViDa's Dream evaluation (topk_margin, top_k 50, one step per token, prefix cache), its token count and cache."""
    from shirg_tools.demo_backend import TASK, DemoBackend

    save_tiny_dream_folder(tmp_path / "dream", seed=1)
    backend = DemoBackend.from_folder(tmp_path / "dream", "cpu", "float32")
    sample = demo_examples(1)[0]
    jobs = backend.prepare(sample["image"], sample["question"], backend.variants(["pooled", "shirg-fixed"], 40))
    im_start = backend.processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert backend.processor.chat_format == "dream" and jobs[0].inputs["input_ids"][0, 0] == im_start
    answers = []
    for job in jobs:
        result = backend.run(job)
        length = job.inputs["input_ids"].shape[1]
        expected = backend.model.generate(**job.inputs, max_new_tokens=TASK.gen_length, steps=TASK.gen_length,
                                          alg="topk_margin", top_k=50, use_cache=True)[:, length:]
        assert result.answer == backend.processor.decode_answers(expected)[0]
        assert result.image_tokens == job.image_tokens and result.latency_ms > 0 and result.kv_mb > 0
        answers.append(result.answer)
    assert jobs[1].image_tokens == 40 and jobs[0].image_tokens > 40


def test_cli_errors_name_the_model_argument(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(app, "DEFAULT_MODEL", tmp_path / "reader_model")
    assert app.main([]) == 2
    assert capsys.readouterr().err == (f"error: no --model given and no {tmp_path / 'reader_model'} folder; pass "
                                       "--model FOLDER (`python demo.py` trains one into runs/demo/train)\n")
    assert app.main(["--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: --model {str(tmp_path)!r} is not a model folder (no config.json)\n"

"""The README's tested code block runs, as a user would run it, on a tiny model folder in a fresh process."""

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import build_tiny_model
from PIL import Image

from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- tested: tests/test_readme.py"


def readme_blocks_under_test() -> list:
    """The python blocks that follow the README's 'tested' markers."""
    text = README.read_text()
    return [match.group(1) for match in re.finditer(re.escape(MARKER) + r"[^\n]*\n```python\n(.*?)```", text, re.S)]


def test_readme_usage_block_runs_on_a_tiny_folder(tmp_path):
    blocks = readme_blocks_under_test()
    assert len(blocks) == 1 and "model.generate(" in blocks[0] and "pipeline(" in blocks[0]
    folder = tmp_path / "model"
    model = build_tiny_model(seed=2)
    model.save_pretrained(folder)
    LavidaShirgProcessor.from_config(model.config, build_tiny_tokenizer()).save_pretrained(folder)
    Image.new("RGB", (90, 60), (230, 230, 230)).save(tmp_path / "sign.jpg")
    # the tiny preset's sizes: its high-resolution view has 256 tokens, so the README's budget 768 becomes 64
    code = blocks[0].replace('"./lavida-shirg-llada"', repr(str(folder))).replace('"sign.jpg"', repr(
        str(tmp_path / "sign.jpg"))).replace("selection_budget=768", "selection_budget=64")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", code], env=environment, cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "32 denoising steps" in lines, lines  # max_new_tokens=32, one token per step by default

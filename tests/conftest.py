import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lavida_shirg import ShirgConfig
from lavida_shirg.image_layout import anyres_grid, pooled_image_token_count
from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion


# the start of a script run as `python -c SCRIPT FOLDER INPUTS OUTPUTS`: the folder loaded by AutoModel through its
# remote code, the saved inputs (torch.save of tensors) run through forward; a test appends what it saves
LOAD_MODEL_IN_A_FRESH_PROCESS = """
import sys, torch
from transformers import AutoModel
folder, inputs_path, outputs_path = sys.argv[1:]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
inputs = torch.load(inputs_path, weights_only=True)
with torch.no_grad():
    logits = model(**inputs).logits
"""


def run_in_a_fresh_process(script, folder, inputs: dict, tmp_path) -> dict:
    """Run `script` (LOAD_MODEL_IN_A_FRESH_PROCESS + what it saves) offline in a new interpreter on `folder` and the
    saved `inputs`, with its own remote-code module cache; return what it saved."""
    torch.save(inputs, tmp_path / "inputs.pt")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")],
                   check=True, env=environment, cwd=tmp_path)
    return torch.load(tmp_path / "outputs.pt", weights_only=True)


def build_tiny_model(seed=0, std=0.2, preset="tiny", **overrides):
    """A tiny preset with weights drawn N(0, std) (norm weights near 1), so outputs are far from uniform."""
    torch.manual_seed(seed)
    model = LavidaShirgForMaskedDiffusion(ShirgConfig.from_preset(preset, **overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.copy_(std * torch.randn_like(parameter))
    return model.eval()


def tiny_dream_tokenizer():
    """The tiny tokenizer with Dream's ChatML tokens: `<|im_start|>` 513, `<|im_end|>` 514."""
    from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer("dream")


def save_tiny_dream_folder(folder, seed=0, **overrides):
    """A saved tiny LaViDa-Dream folder as the converter writes one (model, Dream's generation config, processor
    on the "dream" chat format, `<|im_end|>` closing a turn); returns the model."""
    from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor

    model = build_tiny_model(seed=seed, preset="tiny-dream", **overrides)
    model.save_pretrained(folder)
    LavidaShirgProcessor.from_config(model.config, tiny_dream_tokenizer()).save_pretrained(folder)
    return model


def lavida_shift_counts(masked, steps, shift=3):
    """LaViDa's get_num_transfer_tokens_sch(schedule="shift") for one row, restated: min(steps, masked) steps;
    sigma(t) = a t / (1 + (a - 1) t) on a float32 linspace; int64(sigma * masked) differences clamped at 1; the excess
    taken back cyclically from the entries above 1, starting at the first; flipped. Returns a list of ints."""
    steps = min(steps, masked)
    t = torch.linspace(0, 1, steps + 1)
    sigma = shift * t / (1 + (shift - 1) * t)
    cumulative = (sigma * torch.tensor([masked])).to(torch.int64)
    counts = torch.clamp(cumulative[1:] - cumulative[:-1], min=1)
    excess, position = int(counts.sum()) - masked, 0
    while excess > 0:
        position %= steps
        if counts[position] > 1:
            counts[position] -= 1
            excess -= 1
        position += 1
    return counts.flip(0).tolist()


def image_batch(config, image_sizes, seed=0):
    """Random pixel_values for the anyres views of images of the given (height, width), and their token counts."""
    generator = torch.Generator().manual_seed(seed)
    view = config.vision_config.image_size
    views = sum(1 + r * c for r, c in (anyres_grid(s, config.image_grid_pinpoints, view) for s in image_sizes))
    pixel_values = torch.rand(views, 3, view, view, generator=generator) * 2 - 1
    counts = [pooled_image_token_count(s, config.image_grid_pinpoints, view, config.pooled_view_size) for s in image_sizes]
    return pixel_values, torch.tensor(image_sizes), counts


def prompt_ids(config, image_token_counts, text_lengths, seed=0, pad_left=True):
    """Prompts [bos, text, image tokens, text]; padded on the left with pad ids (attention 0). (B, T) each."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for count, length in zip(image_token_counts, text_lengths):
        text = torch.randint(10, config.text_config.vocab_size, (length,), generator=generator).tolist()
        rows.append([config.bos_token_id] + text[: length // 2] + [config.image_token_id] * count + text[length // 2 :])
    width = max(map(len, rows))
    pad = config.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r if pad_left else r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) if pad_left else [1] * len(r) + [0] * (width - len(r))
                         for r in rows])
    return input_ids, mask


def tokenizer_without_image_token():
    """The tiny tokenizer with `<image>` removed (512 tokens), like a tokenizer that never had one (LLaDA's)."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer

    spec = json.loads(build_tiny_tokenizer().backend_tokenizer.to_str())
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["content"] != "<image>"]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<|startoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>", mask_token="<|mdm_mask|>",
                                   extra_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served_app(arguments: list, cwd, env: dict, timeout: float = 120):
    """Run `python app.py ARGUMENTS --port P` (arguments: app.py's path, then its options) in `cwd` until the block
    ends; yields (URL, process) once the page answers 200. Its output goes to cwd/app.log, shown if it fails."""
    port = free_port()
    log_path = os.path.join(cwd, "app.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, *arguments, "--port", str(port)], cwd=cwd, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + timeout
        try:
            while True:
                assert process.poll() is None, f"app.py exited ({process.returncode}):\n{open(log_path).read()}"
                assert time.monotonic() < deadline, f"app.py did not serve {url} in {timeout} s:\n" \
                                                    f"{open(log_path).read()}"
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError):
                    time.sleep(0.5)
            yield url, process
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_model()


@pytest.fixture
def unwritable(tmp_path):
    """A folder in which this process cannot create anything: a read-only folder, or for root (whom file modes do
    not stop) a path under sysfs."""
    from pathlib import Path

    if os.geteuid() == 0:
        return Path("/sys/lavida-shirg-unwritable")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder

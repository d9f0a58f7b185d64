"""Hub publication, offline: the folder loads in a fresh process, the card's demo runs as written, the upload
goes through the real huggingface_hub client to a small Hub stand-in on 127.0.0.1, and the Space folder (--space)
serves the Gradio app from its own files."""

import base64
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, build_tiny_model, save_tiny_dream_folder, served_app
from PIL import Image

import publish
from shirg_tools.output_folder import OutputFolderError
from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    model = build_tiny_model(seed=11)
    model.save_pretrained(folder)
    LavidaShirgProcessor.from_config(model.config, build_tiny_tokenizer()).save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def hub_folder(saved_model, tmp_path_factory):
    results = tmp_path_factory.mktemp("eval") / "summary.md"
    results.write_text("# SHIRG evaluation\n\n| task | variant | score |\n| --- | --- | --- |\n"
                       "| synthetic-ocr | shirg-fixed@64 | 0.0 |\n")
    out = tmp_path_factory.mktemp("hub") / "folder"
    publish.export_model(saved_model[0], out, "someone/lavida-shirg-tiny", results=str(results),
                         base_model="jacklishufan/lavida-llada-v1.0-instruct", datasets=["lmms-lab/textvqa"],
                         max_shard_size="200KB")
    return out


def run_python(code, cwd, **environment):
    """Run `code` in a fresh interpreter, offline, without the repository on the path; return its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", **environment}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_folder_has_everything_a_hub_repo_needs(hub_folder):
    files = set(os.listdir(hub_folder))
    assert {"config.json", "README.md", "model.safetensors.index.json", "modeling_lavida_shirg.py",
            "configuration_lavida_shirg.py", "shirg_selection.py", "image_layout.py", "masked_diffusion.py",
            "prefix_cache.py", "processing_lavida_shirg.py", "processor_config.json", "tokenizer.json",
            "chat_template.jinja"} <= files
    shards = [name for name in files if name.endswith(".safetensors")]
    assert len(shards) > 1, "sharded above max_shard_size"
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    card = (hub_folder / "README.md").read_text()
    header = card.split("---")[1]
    for line in ("library_name: transformers", "pipeline_tag: image-text-to-text", "- custom_code", "- shirg",
                 "- token-pruning", "base_model: jacklishufan/lavida-llada-v1.0-instruct", "license: apache-2.0",
                 "- lmms-lab/textvqa"):
        assert line in header, line
    assert "| synthetic-ocr | shirg-fixed@64 | 0.0 |" in card


def test_card_sections(hub_folder):
    body = (hub_folder / "README.md").read_text().split("---", 2)[2]
    headings = [line for line in body.splitlines() if line.startswith("#")]
    assert headings == ["# lavida-shirg-tiny", "## Usage", "## Variants and budgets", "## Selection quality",
                        "## Results", "### SHIRG evaluation", "## Intended use and limitations",
                        "## Training data and procedure", "## Citation"], headings
    for key in ("@inproceedings{li2025lavida", "@article{nie2025llada", "@inproceedings{zhai2023siglip"):
        assert key in body
    # a randomly initialised folder with no record: the card claims no origin
    assert "This folder carries no record of where its weights came from" in body
    assert "Weights converted" not in body and "Mixed-budget" not in body
    # the model's detail term, and the measurements that chose it
    assert "detail term (the luminance contrast of a token's own pixel patch)" in body
    assert "| shirg-fixed, seed formula (0.7 relevance + 0.3 variance) | 0.510 | 0.447 |" in body
    assert '"max_new_tokens": 32' in body and '"schedule_shift": 3.0' in body


def test_card_of_a_converted_folder_names_the_source(saved_model, tmp_path):
    folder = tmp_path / "converted"
    shutil.copytree(saved_model[0], folder)
    (folder / "shirg_conversion.json").write_text(json.dumps({
        "converted_from": "lavida-llada-v1.0-instruct", "dtype": "bfloat16", "converter": "convert_lavida_checkpoint.py"}))
    publish.export_model(folder, tmp_path / "hub", "someone/converted")
    body = (tmp_path / "hub" / "README.md").read_text()
    assert ("Weights converted with `convert_lavida_checkpoint.py` from LaViDa's checkpoint "
            "`lavida-llada-v1.0-instruct`") in body and "no record of where" not in body


@pytest.mark.parametrize("record, expected", [
    ({"fim": True}, "LaViDa's text-infilling (FIM) checkpoint: pass a draft to the processor (`draft=`)"),
    ({"stage1": {"base_lm": "LLaDA-8B-Instruct", "vision_tower": "siglip-so400m-patch14-384", "image_newline_seed": 3}},
     "from LaViDa's stage-1 checkpoint `lavida-llada-1.0-stage1` (its projector), the language model "
     "`LLaDA-8B-Instruct` and the vision tower `siglip-so400m-patch14-384` (its last layer removed), with a random "
     "`image_newline` (seed 3), stored in bfloat16: LaViDa's stage-2 starting point, not fine-tuned"),
])
def test_card_of_a_fim_or_stage1_conversion_says_what_it_holds(saved_model, tmp_path, record, expected):
    folder = tmp_path / "converted"
    shutil.copytree(saved_model[0], folder)
    source = "lavida-llada-1.0-stage1" if "stage1" in record else "lavida-llada-1.0-fim"
    (folder / "shirg_conversion.json").write_text(json.dumps({
        "converted_from": source, "dtype": "bfloat16", "converter": "convert_lavida_checkpoint.py", **record}))
    publish.export_model(folder, tmp_path / "hub", "someone/converted")
    body = (tmp_path / "hub" / "README.md").read_text()
    assert expected in body
    assert ("LaViDa's stage-2 starting point" in body) == ("stage1" in record)


def test_card_names_the_backbone(hub_folder, tmp_path):
    save_tiny_dream_folder(tmp_path / "dream")
    publish.export_model(tmp_path / "dream", tmp_path / "hub", "someone/dream")
    body = (tmp_path / "hub" / "README.md").read_text()
    assert "LaViDa-Dream (SigLIP-so400m + 2-layer MLP projector + Dream-7B masked-diffusion LM)" in body
    assert "LLaDA" not in body
    llada = (hub_folder / "README.md").read_text()
    assert "LaViDa-LLaDA (SigLIP-so400m + 2-layer MLP projector + LLaDA-8B masked-diffusion LM)" in llada


def test_folder_loads_in_a_fresh_process_with_identical_outputs(hub_folder, saved_model, tmp_path):
    _, model = saved_model
    processor = LavidaShirgProcessor.from_config(model.config, build_tiny_tokenizer())
    image = Image.new("RGB", (70, 50), "white")
    inputs = processor(images=[image], text=[processor.build_prompt("What is written?")])
    expected = model.diffusion_generate(**inputs, gen_length=8, steps=4)
    code = f"""
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained({str(hub_folder)!r}, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained({str(hub_folder)!r}, trust_remote_code=True)
inputs = processor(images=[Image.new("RGB", (70, 50), "white")], text=[processor.build_prompt("What is written?")])
print(model.diffusion_generate(**inputs, gen_length=8, steps=4).tolist())
"""
    assert json.loads(run_python(code, tmp_path).strip().splitlines()[-1]) == expected.tolist()


def test_card_demo_runs_as_written(hub_folder, tmp_path):
    card = (hub_folder / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert 'pipeline("image-text-to-text"' in snippet and "model.generate(" in snippet
    runnable = snippet.replace("someone/lavida-shirg-tiny", str(hub_folder))
    assert runnable != snippet
    printed = run_python(runnable + '\nprint("demo finished")\n', tmp_path)  # the untrained model's words, then this
    assert printed.splitlines()[-1] == "demo finished"


def test_adapter_publication(saved_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    folder, _ = saved_model
    peft_model = get_peft_model(build_tiny_model(seed=11), LoraConfig(r=4, target_modules=["multi_modal_projector.linear_1"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    record = {"data": {"data_format": "synthetic-ocr", "data_path": None}, "shirg": {"selection_method": "shirg-fixed"},
              "resolved": {"budgets": ["32", "64", "pooled"], "lora_plan": {"projector_rank": 4}},
              "training": {"seed": 7, "world_size": 1, "per_device_train_batch_size": 8,
                           "gradient_accumulation_steps": 2}}
    (tmp_path / "adapter" / "shirg_run.json").write_text(json.dumps(record))
    out = publish.export_adapter(tmp_path / "adapter", tmp_path / "hub-adapter", "someone/shirg-lora",
                                 base_model=str(folder))
    card = (out / "README.md").read_text()
    assert "base_model_relation: adapter" in card and "library_name: peft" in card
    assert "| token budgets per step | 32, 64, pooled |" in card and "| batch per device x accumulation x processes " \
        "| 8 x 2 x 1 |" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("someone/shirg-lora", str(out))
    run_python(snippet + "\nprint(type(model).__name__)\n", tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_output_modes_follow_the_umask(saved_model, tmp_path, umask):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in publish.ADAPTER_FILES:
        (adapter / name).write_text("{}")
        (adapter / name).chmod(0o600)  # a private source file: the published copy still gets the umask's mode
    previous = os.umask(umask)
    try:
        publish.export_model(saved_model[0], tmp_path / "model", "someone/m")
        publish.export_adapter(adapter, tmp_path / "hub-adapter", "someone/a", base_model="someone/m")
    finally:
        os.umask(previous)
    for out in (tmp_path / "model", tmp_path / "hub-adapter"):
        paths = [out, *out.rglob("*")]
        assert len(paths) > 3
        assert {str(path): stat.S_IMODE(path.stat().st_mode) for path in paths} == {
            str(path): 0o777 & ~umask if path.is_dir() else 0o666 & ~umask for path in paths}


def test_bad_publication_inputs(saved_model, tmp_path):
    folder, _ = saved_model
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="exists and is not empty; pass --overwrite"):
        publish.export_model(folder, tmp_path / "busy", "a/b")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(publish.PublishError, match="not a valid repository id"):
        publish.check_repo_id("bad repo//name")
    no_auto_map = tmp_path / "plain"
    no_auto_map.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config.pop("auto_map")
    (no_auto_map / "config.json").write_text(json.dumps(config))
    with pytest.raises(publish.PublishError, match="lacks auto_map"):
        publish.export_model(no_auto_map, tmp_path / "out", "a/b")
    assert not (tmp_path / "out").exists()
    assert publish.main(["--model", str(folder), str(tmp_path / "x"), "--push_to_hub", "not a repo"]) == 2
    assert not (tmp_path / "x").exists()


def test_two_publications_into_one_folder_never_both_succeed(saved_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hub"
    build_card, second = publish.build_card, []

    def another_publication_meanwhile(*args, **kwargs):
        if not second:
            second.append(publish.main(["--model", str(saved_model[0]), str(out)]))
        return build_card(*args, **kwargs)

    monkeypatch.setattr(publish, "build_card", another_publication_meanwhile)
    assert publish.main(["--model", str(saved_model[0]), str(out)]) == 0 and second == [2]
    printed = capsys.readouterr()
    assert printed.err.endswith(f"\nerror: OUT {str(out)!r} is being written by another process (pid {os.getpid()}): "
                                "wait for it to end or choose another OUT\n") and "Traceback" not in printed.err
    assert printed.out.count("wrote ") == 1 and (out / "README.md").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["hub"], "no lock, staging or set-aside folder left"


def test_a_kill_while_replacing_a_folder_never_loses_it(saved_model, tmp_path, monkeypatch):
    out = tmp_path / "hub"
    publish.export_model(saved_model[0], out, "a/b")
    new = sorted(os.listdir(out))
    (out / "old.txt").write_text("the old folder")

    def killed(*args):
        raise KeyboardInterrupt("killed at a rename")

    monkeypatch.setattr(os, "rename", killed)
    try:
        publish.export_model(saved_model[0], out, "a/b", overwrite=True)
    except KeyboardInterrupt:
        pass
    assert (out / "old.txt").is_file() or sorted(os.listdir(out)) == new, "the old folder or the whole new one"


def test_unwritable_folders_and_truncated_weights_are_one_error_line(saved_model, unwritable, tmp_path, capsys):
    folder = saved_model[0]
    assert publish.main(["--model", str(folder), str(unwritable / "hub")]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot write OUT {str(unwritable / 'hub')!r}: [Errno ")
    assert publish.main(["--model", str(folder), "--space", str(unwritable / "space")]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot write --space {str(unwritable / 'space')!r}: [Errno ")
    cut = tmp_path / "cut"
    shutil.copytree(folder, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert publish.main(["--model", str(cut), str(tmp_path / "hub")]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: --model {str(cut)!r}: model.safetensors is not a complete safetensors file (")
    assert not (tmp_path / "hub").exists()


class FakeHub:
    """The few Hub API routes huggingface_hub's create_repo + upload_folder use, on 127.0.0.1."""

    def __init__(self, refuse=False):
        self.repos, self.files, self.refuse = set(), {}, refuse
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, payload):
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if hub.refuse:
                    return self.reply(403, {"error": "You don't have the rights to create a model under this namespace"})
                if self.path == "/api/validate-yaml":  # the client checks the model card's metadata
                    return self.reply(200, {"errors": [], "warnings": []})
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    repo = f"{request['organization']}/{request['name']}"
                    hub.repos.add(repo)
                    return self.reply(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/?]+)(\?.*)?", self.path)
                if not match or match.group(1) not in hub.repos:
                    return self.reply(404, {"error": f"unknown route {self.path}"})
                if match.group(2) == "preupload":
                    files = json.loads(body)["files"]
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                return self.reply(200, {"commitUrl": f"http://{self.headers['Host']}/{match.group(1)}/commit/1",
                                        "commitOid": "1" * 40})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def push_in_subprocess(folder, endpoint, cwd, token="hf_fake_token"):
    code = f"""
import sys
import publish
from shirg_tools.output_folder import OutputFolderError
sys.exit(publish.main(["--model", {str(folder)!r}, {str(cwd / "pushed-folder")!r}, "--push_to_hub", "someone/tiny"]))
"""
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(cwd / "hf-home"),
           "HF_HUB_DISABLE_XET": "1", "PYTHONPATH": ROOT}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_push_through_the_real_client_to_a_local_hub(saved_model, tmp_path):
    hub = FakeHub()
    try:
        done = push_in_subprocess(saved_model[0], hub.endpoint, tmp_path)
    finally:
        hub.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "someone/tiny" in hub.repos
    received = tmp_path / "received"
    received.mkdir()
    for path, content in hub.files.items():
        (received / path).write_bytes(content)
    assert "README.md" in hub.files and "modeling_lavida_shirg.py" in hub.files
    code = f"""
from transformers import AutoModel
model = AutoModel.from_pretrained({str(received)!r}, trust_remote_code=True)
print(sum(p.numel() for p in model.parameters()))
"""
    total = int(run_python(code, tmp_path).strip().splitlines()[-1])
    assert total == sum(p.numel() for p in saved_model[1].parameters())


def test_push_errors_leave_the_folder_intact(saved_model, tmp_path):
    no_token = push_in_subprocess(saved_model[0], "http://127.0.0.1:9", tmp_path, token=None)
    assert no_token.returncode == 2 and "no Hugging Face token found" in no_token.stderr
    assert (tmp_path / "pushed-folder" / "config.json").is_file()
    (tmp_path / "again").mkdir()
    hub = FakeHub(refuse=True)
    try:
        refused = push_in_subprocess(saved_model[0], hub.endpoint, tmp_path / "again")
    finally:
        hub.close()
    assert refused.returncode == 2 and "the Hub refused the push" in refused.stderr
    assert (tmp_path / "again" / "pushed-folder" / "README.md").is_file()


# ---- Space folder ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def space_folder(saved_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("space") / "folder"
    assert publish.main(["--model", str(saved_model[0]), "--space", str(out)]) == 0
    return out


def python_files(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*.py") if "__pycache__" not in path.parts)


def test_space_folder_declares_a_gradio_space(space_folder):
    from importlib.metadata import version

    assert sorted(os.listdir(space_folder)) == ["README.md", "app.py", "lavida_shirg", "reader_model",
                                                "requirements.txt", "shirg_tools"]
    assert (space_folder / "app.py").read_bytes() == open(os.path.join(ROOT, "app.py"), "rb").read()
    for package in ("lavida_shirg", "shirg_tools"):
        assert python_files(space_folder / package) == python_files(Path(ROOT) / package)
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
            "modeling_lavida_shirg.py"} <= set(os.listdir(space_folder / "reader_model"))
    _, header, body = (space_folder / "README.md").read_text().split("---", 2)
    front = yaml.safe_load(header)
    assert {key: front[key] for key in ("sdk", "sdk_version", "app_file", "python_version")} == {
        "sdk": "gradio", "sdk_version": version("gradio"), "app_file": "app.py",
        "python_version": f"{sys.version_info.major}.{sys.version_info.minor}"}
    assert front["title"] and front["short_description"] and "`reader_model/`" in body
    requirements = (space_folder / "requirements.txt").read_text().splitlines()
    assert "torch>=2.4" in requirements and "transformers>=5.17,<6" in requirements
    assert not any(line.startswith("gradio") for line in requirements), "the Space's SDK installs Gradio"


def test_space_app_serves_from_its_own_files(space_folder, saved_model, tmp_path):
    from gradio_client import Client, handle_file

    code = """
import sys
import app
names = ("lavida_shirg", "shirg_tools", "app")
print("\\n".join(module.__file__ for name, module in list(sys.modules.items()) if name.split(".")[0] in names))
"""
    files = run_python(code, space_folder).split()
    assert len(files) > 10 and all(file.startswith(str(space_folder)) for file in files), files
    processor = LavidaShirgProcessor.from_config(saved_model[1].config, build_tiny_tokenizer())
    Image.new("RGB", (70, 50), "white").save(tmp_path / "page.png")
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    with served_app(["app.py", "--device", "cpu"], space_folder, env) as (url, _):  # its default model folder
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        table, gallery, status = client.predict(handle_file(str(tmp_path / "page.png")), "What is written?",
                                                ["pooled"], 64, api_name="/run")
    assert status.startswith("Ran 1 variant(s) on a 70 x 50 image")
    label, answer, tokens = table["data"][0][:3]
    assert (label, tokens) == ("pooled", processor.image_token_count((50, 70), "pooled"))
    assert isinstance(answer, str) and len(gallery) == 1


def test_space_needs_a_model(saved_model, tmp_path, capsys):
    assert publish.main(["--adapter", str(saved_model[0]), "--base_model", "a/b", "--space", str(tmp_path / "s")]) == 2
    assert "--space runs the app on a model: pass --model FOLDER" in capsys.readouterr().err
    assert publish.main(["--model", str(saved_model[0])]) == 2
    assert "give OUT (the Hub folder to write) or --space FOLDER" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()

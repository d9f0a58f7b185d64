"""save_pretrained output loads in a fresh process through AutoModel + trust_remote_code and gives identical outputs."""

import json
import os
import subprocess
import sys

import torch
from conftest import image_batch, prompt_ids

LOAD_AND_RUN = """
import sys, torch
from transformers import AutoModel
folder, inputs_path, outputs_path = sys.argv[1:]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
inputs = torch.load(inputs_path, weights_only=True)
with torch.no_grad():
    logits = model(**inputs).logits
answer = model.diffusion_generate(**inputs, gen_length=8, steps=4)
torch.save({"logits": logits, "answer": answer, "class": type(model).__module__}, outputs_path)
"""


def test_save_pretrained_loads_with_automodel_in_a_fresh_process(tiny_model, tmp_path):
    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "modeling_lavida_shirg.py", "configuration_lavida_shirg.py",
            "image_layout.py", "masked_diffusion.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_lavida_shirg.ShirgConfig",
        "AutoModel": "modeling_lavida_shirg.LavidaShirgForMaskedDiffusion",
    }
    assert config["model_type"] == "lavida_shirg"

    pixel_values, image_sizes, counts = image_batch(tiny_model.config, [(40, 70), (20, 50)])
    input_ids, padding = prompt_ids(tiny_model.config, counts, [4, 7])
    inputs = dict(input_ids=input_ids, attention_mask=padding, pixel_values=pixel_values, image_sizes=image_sizes)
    torch.save(inputs, tmp_path / "inputs.pt")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(folder), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "outputs.pt")], check=True, env=environment, cwd=tmp_path)
    outputs = torch.load(tmp_path / "outputs.pt", weights_only=True)
    assert outputs["class"].startswith("transformers_modules"), "loaded from the folder's remote code"
    with torch.no_grad():
        torch.testing.assert_close(outputs["logits"], tiny_model(**inputs).logits, atol=0, rtol=0)
    assert torch.equal(outputs["answer"], tiny_model.diffusion_generate(**inputs, gen_length=8, steps=4))

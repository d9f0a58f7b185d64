"""save_pretrained output loads in a fresh process through AutoModel + trust_remote_code and gives identical outputs."""

import json
import os
import subprocess
import sys

import torch
from conftest import LOAD_MODEL_IN_A_FRESH_PROCESS, run_in_a_fresh_process, build_tiny_model, image_batch, prompt_ids

from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer

LOAD_AND_RUN = LOAD_MODEL_IN_A_FRESH_PROCESS + """
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
        "AutoModelForImageTextToText": "modeling_lavida_shirg.LavidaShirgForMaskedDiffusion",
    }
    assert json.loads((folder / "generation_config.json").read_text())["schedule_shift"] == 3.0
    assert config["model_type"] == "lavida_shirg"

    pixel_values, image_sizes, counts = image_batch(tiny_model.config, [(40, 70), (20, 50)])
    input_ids, padding = prompt_ids(tiny_model.config, counts, [4, 7])
    inputs = dict(input_ids=input_ids, attention_mask=padding, pixel_values=pixel_values, image_sizes=image_sizes)
    outputs = run_in_a_fresh_process(LOAD_AND_RUN, folder, inputs, tmp_path)
    assert outputs["class"].startswith("transformers_modules"), "loaded from the folder's remote code"
    with torch.no_grad():
        torch.testing.assert_close(outputs["logits"], tiny_model(**inputs).logits, atol=0, rtol=0)
    assert torch.equal(outputs["answer"], tiny_model.diffusion_generate(**inputs, gen_length=8, steps=4))


PIPELINE = """
import json, sys, time, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
folder, out_path = sys.argv[1:]
image = Image.new("RGB", (40, 30), (200, 10, 10))
messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
reader = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
calls = []
generate = reader.model.generate
def recording_generate(**kwargs):
    calls.append({"image_tokens": int((kwargs["input_ids"] == reader.model.config.image_token_id).sum()),
                  "budget": kwargs["selection"]["selection_budget"], "do_sample": kwargs.get("do_sample"),
                  "temperature": kwargs.get("temperature")})
    return generate(**kwargs)
reader.model.generate = recording_generate
plain = reader(text=messages, max_new_tokens=8, return_full_text=False)
torch.manual_seed(0)
sampled = reader(text=messages, selection_method="shirg-fixed", selection_budget=40, max_new_tokens=8,
                 generate_kwargs={"do_sample": True, "temperature": 0.7}, return_full_text=False)
top_level = reader(text=messages, selection_method="shirg-fixed", selection_budget=40, max_new_tokens=8,
                   do_sample=True, temperature=0.7, return_full_text=False)
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
pooled = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
shirg = dict(selection_method="shirg-fixed", selection_budget=40)
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt", processor_kwargs=shirg)
direct = model.generate(**pooled, max_new_tokens=8)
torch.manual_seed(0)
direct_sampled = model.generate(**inputs, **shirg, max_new_tokens=8, do_sample=True, temperature=0.7)
direct_greedy = model.generate(**inputs, max_new_tokens=8)
decode = lambda ids, prompt: processor.batch_decode(ids[:, prompt["input_ids"].shape[1]:], skip_special_tokens=True)[0]
url = [{"role": "user", "content": [{"type": "image", "url": "https://example.com/sign.jpg"},
                                     {"type": "text", "text": "Colour?"}]}]
start = time.perf_counter()
try:
    reader(text=url, max_new_tokens=8)
    url_error = None
except ValueError as error:
    url_error = str(error)
json.dump({"plain": plain[0]["generated_text"], "direct": decode(direct, pooled), "calls": calls,
           "sampled": sampled[0]["generated_text"], "direct_sampled": decode(direct_sampled, inputs),
           "top_level": top_level[0]["generated_text"], "direct_greedy": decode(direct_greedy, inputs),
           "shirg": shirg, "url_error": url_error, "url_seconds": time.perf_counter() - start,
           "can_generate": model.can_generate(), "class": type(model).__name__,
           "generation": type(model.generation_config).__name__}, open(out_path, "w"))
"""


def test_image_text_to_text_pipeline_in_a_fresh_process(tmp_path):
    """pipeline("image-text-to-text") in a fresh process answers chat messages with an image as model.generate does.
    Top-level SHIRG settings (pipe(messages, selection_method=..., selection_budget=..., max_new_tokens=...)) reach
    the processor (40 image positions) and the model through the inputs' `selection`; sampling settings reach
    generate through generate_kwargs (transformers' image-text-to-text pipeline hands other top-level keyword
    arguments, do_sample and temperature included, to the processor, which ignores them: that call answers
    greedily); `processor_kwargs=shirg` leaves `shirg` usable for generate; an image URL in offline mode fails at
    once, naming the URL."""
    model = build_tiny_model(seed=4)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    LavidaShirgProcessor.from_config(model.config, build_tiny_tokenizer()).save_pretrained(folder)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", PIPELINE, str(folder), str(tmp_path / "out.json")], check=True,
                   env=environment, cwd=tmp_path)
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["class"] == "LavidaShirgForMaskedDiffusion" and result["can_generate"]
    assert result["generation"] == "LavidaShirgGenerationConfig"
    assert result["plain"] == result["direct"] and len(result["direct"]) > 0
    pooled_tokens = LavidaShirgProcessor.from_config(model.config, build_tiny_tokenizer()).image_token_count((30, 40))
    assert result["calls"] == [{"image_tokens": pooled_tokens, "budget": 64, "do_sample": None, "temperature": None},
                               {"image_tokens": 40, "budget": 40, "do_sample": True, "temperature": 0.7},
                               {"image_tokens": 40, "budget": 40, "do_sample": None, "temperature": None}]
    assert result["sampled"] == result["direct_sampled"] and result["top_level"] == result["direct_greedy"]
    assert result["shirg"] == {"selection_method": "shirg-fixed", "selection_budget": 40}
    assert "https://example.com/sign.jpg" in result["url_error"] and "offline mode" in result["url_error"]
    assert result["url_seconds"] < 5

"""convert_lavida_checkpoint.py on a synthetic LaViDa-Dream checkpoint written from the tiny Dream model.

Our tiny Dream's state dict is renamed to LaViDa-Dream's names (LlavaDreamModel = LLaVA's vision tower / projector +
Dream's DreamBaseModel; the inverse mapping is written here, independently of the converter), LaViDa's extra tensors
are added, and the converted folder is loaded with AutoModel(trust_remote_code=True) in a fresh process.
"""

import json
import os

import pytest
import torch
from conftest import LOAD_MODEL_IN_A_FRESH_PROCESS, run_in_a_fresh_process, build_tiny_model, image_batch, prompt_ids
from test_converter import TINY_VISION, VISION, lavida_config, write_lavida_checkpoint

import convert_lavida_checkpoint as converter
from lavida_shirg import DreamTextConfig, ShirgConfig
from lavida_shirg.configuration_lavida_shirg import PRESETS

MM_FIELDS = {key: value for key, value in lavida_config().items() if key.startswith(("mm_", "image_"))}
# the tiny tokenizer (<image> = 512) with Dream's ChatML tokens added (513, 514): an LM of 520 rows holds them
DREAM_TEXT = PRESETS["tiny-dream"]["text_config"]


def dream_tokenizer():
    from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
                                 replace_extra_special_tokens=False)
    return tokenizer


def dream_name(ours: str) -> str:
    """LaViDa-Dream's name of one of our tensors."""
    if ours.startswith("model.vision_tower."):
        return VISION + ours[len("model.vision_tower."):]
    if ours.startswith("model.multi_modal_projector.linear_"):
        index = {"1": "0", "2": "2"}[ours[len("model.multi_modal_projector.linear_")]]
        return f"model.mm_projector.{index}.{ours.rsplit('.', 1)[1]}"
    if ours.startswith("model.language_model."):
        return "model." + ours[len("model.language_model."):]
    return ours  # model.image_newline, lm_head.weight


def dream_config(**changes):
    """A LaViDa-Dream config.json (DreamConfig's fields + LLaVA's multimodal ones) for the tiny Dream sizes."""
    text = DREAM_TEXT
    config = {
        "architectures": ["LlavaDreamForMaskedDiffusion"], "model_type": "llava_dream",
        **{name: text[name] for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads", "max_position_embeddings")},
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": None, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": False,
        "mask_token_id": 2, "pad_token_id": 0, "eos_token_id": 0, "bos_token_id": 1,
        **MM_FIELDS,
    }
    config.update(changes)
    return config


def dream_tensors(model):
    tensors = {dream_name(name): tensor.detach().clone() for name, tensor in model.state_dict().items()}
    generator = torch.Generator().manual_seed(7)
    tensors[VISION + "post_layernorm.weight"] = torch.randn(32, generator=generator)
    tensors[VISION + "post_layernorm.bias"] = torch.randn(32, generator=generator)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8, generator=generator)
    return tensors


@pytest.fixture(scope="module")
def original():
    return build_tiny_model(seed=4, text_config=dict(DREAM_TEXT), image_token_id=512, start_header_token_id=513,
                            end_header_token_id=204, eot_token_id=514)


def write_dream_checkpoint(folder, tensors, config, num_shards=3):
    folder = write_lavida_checkpoint(folder, tensors, config, num_shards=num_shards, tokenizer=False)
    dream_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def source(original, tmp_path_factory):
    return write_dream_checkpoint(tmp_path_factory.mktemp("lavida") / "src", dream_tensors(original), dream_config())


LOAD_AND_RUN = LOAD_MODEL_IN_A_FRESH_PROCESS + """
answer = model.generate(**inputs, max_new_tokens=8)
torch.save({"logits": logits, "answer": answer, "lm": type(model.model.language_model).__name__,
            "alg": model.generation_config.alg, "top_k": model.generation_config.top_k}, outputs_path)
"""


def test_convert_and_load_in_a_fresh_process(original, source, tmp_path):
    out = tmp_path / "out"
    report = converter.convert_checkpoint(source, out, vision_config=TINY_VISION)
    assert any("inv_freq" in key for key, _ in report.dropped)
    assert any("post_layernorm" in key for key, _ in report.dropped)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["model_type"] == DreamTextConfig.model_type
    assert "modeling_dream.py" in os.listdir(out)
    for name in ("image_token_id", "start_header_token_id", "end_header_token_id", "eot_token_id", "bos_token_id"):
        assert config[name] == getattr(original.config, name), name  # Dream's tokens found by their text
    assert json.loads((out / "processor_config.json").read_text())["chat_format"] == "dream"
    pixel_values, image_sizes, counts = image_batch(original.config, [(40, 70)])
    input_ids, padding = prompt_ids(original.config, counts, [6])
    inputs = dict(input_ids=input_ids, attention_mask=padding, pixel_values=pixel_values, image_sizes=image_sizes)
    outputs = run_in_a_fresh_process(LOAD_AND_RUN, out, inputs, tmp_path)
    assert (outputs["lm"], outputs["alg"], outputs["top_k"]) == ("DreamModel", "topk_margin", 50)
    with torch.no_grad():
        torch.testing.assert_close(outputs["logits"], original(**inputs).logits, atol=0, rtol=0)
    assert torch.equal(outputs["answer"], original.generate(**inputs, max_new_tokens=8))


def test_dream_key_plan():
    assert converter.rename_key("model.layers.3.self_attn.q_proj.bias", 26, "llava_dream") == (
        "model.language_model.layers.3.self_attn.q_proj.bias", None)
    assert converter.rename_key("model.embed_tokens.weight", 26, "llava_dream")[0] == (
        "model.language_model.embed_tokens.weight")
    assert converter.rename_key("lm_head.weight", 26, "llava_dream")[0] == "lm_head.weight"
    assert converter.rename_key("model.mm_projector.2.bias", 26, "llava_dream")[0] == (
        "model.multi_modal_projector.linear_2.bias")
    # LLaDA's names mean nothing in a Dream checkpoint and the other way round
    assert converter.rename_key("model.transformer.wte.weight", 26, "llava_dream") == (None, None)
    assert converter.rename_key("model.layers.0.mlp.up_proj.weight", 26) == (None, None)


def test_a_missing_layer_and_tied_embeddings(original, tmp_path):
    tensors = dream_tensors(original)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    broken = write_dream_checkpoint(tmp_path / "broken", tensors, dream_config(), num_shards=1)
    with pytest.raises(converter.ConversionError, match=r"missing.*\n.*layers\.1\.self_attn\.k_proj\.bias"):
        converter.convert_checkpoint(broken, tmp_path / "out", vision_config=TINY_VISION)
    tensors = dream_tensors(original)
    del tensors["lm_head.weight"]
    tied = write_dream_checkpoint(tmp_path / "tied", tensors, dream_config(tie_word_embeddings=True), num_shards=2)
    converter.convert_checkpoint(tied, tmp_path / "tied-out", vision_config=TINY_VISION)
    from safetensors.torch import load_file

    weights = {}
    for name in os.listdir(tmp_path / "tied-out"):
        if name.endswith(".safetensors"):
            weights.update(load_file(str(tmp_path / "tied-out" / name)))
    assert torch.equal(weights["lm_head.weight"], weights["model.language_model.embed_tokens.weight"])


def test_unsupported_rope_scaling_is_named(source, tmp_path):
    config = dream_config(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(converter.ConversionError, match="rope_scaling="):
        converter.build_config(config, TINY_VISION)


def test_real_sizes_config_without_allocating():
    """LaViDa-Dream's real config.json fields (Dream-v0-7B sizes) give the 'lavida-dream' preset."""
    real = dream_config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                        mask_token_id=151666, pad_token_id=151643, eos_token_id=151643, bos_token_id=151665,
                        mm_hidden_size=1152,
                        image_grid_pinpoints=[[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]])
    ids = {"start_header_token_id": 151644, "end_header_token_id": 198, "eot_token_id": 151645}
    config, _ = converter.build_config(real, token_ids=ids)
    preset = ShirgConfig.from_preset("lavida-dream")
    for name in ("image_grid_pinpoints", "pooled_view_size", "mask_token_id", "eos_token_id", "pad_token_id",
                 "bos_token_id", "eot_token_id", "image_token_id", "start_header_token_id"):
        assert getattr(config, name) == getattr(preset, name), name
    assert config.text_config.to_dict() == preset.text_config.to_dict()
    expected = converter.expected_state(config)
    assert expected["lm_head.weight"] == (152064, 3584)
    assert expected["model.language_model.layers.27.self_attn.k_proj.bias"] == (512,)
    language = sum(torch.Size(shape).numel() for name, shape in expected.items()
                   if name.startswith(("model.language_model.", "lm_head.")))
    assert language == 7_615_616_512  # Qwen2.5-7B's parameter count (Dream-v0-7B's decoder)

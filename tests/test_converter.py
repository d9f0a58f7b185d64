"""convert_lavida_checkpoint.py on a synthetic LaViDa checkpoint written from the tiny preset.

The tiny model's state dict is renamed to LaViDa's tensor names (the inverse mapping is written here, independently
of the converter), LaViDa's extra tensors are added (SigLIP post_layernorm, one more vision encoder layer), and the
result is written as 3 safetensors shards + index with a LaViDa-style config.json and the tiny tokenizer. The
converted folder is then loaded with AutoModel(trust_remote_code=True) in a fresh process.
"""

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, image_batch, prompt_ids
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert_lavida_checkpoint as converter
from lavida_shirg.configuration_lavida_shirg import PRESETS

TINY_VISION = dict(PRESETS["tiny"]["vision_config"])
VISION = "model.vision_tower.vision_tower.vision_model."
LLADA_BLOCK = {  # our name inside language_model.layers.N -> LLaDA's name inside model.transformer.blocks.N
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "q_proj.weight",
    "self_attn.k_proj.weight": "k_proj.weight",
    "self_attn.v_proj.weight": "v_proj.weight",
    "self_attn.o_proj.weight": "attn_out.weight",
    "post_attention_layernorm.weight": "ff_norm.weight",
    "mlp.gate_proj.weight": "ff_proj.weight",
    "mlp.up_proj.weight": "up_proj.weight",
    "mlp.down_proj.weight": "ff_out.weight",
}


def lavida_name(ours: str) -> str:
    """The LaViDa checkpoint name of one of our tensors."""
    if ours.startswith("model.vision_tower."):
        return VISION + ours[len("model.vision_tower."):]
    if ours.startswith("model.multi_modal_projector.linear_"):
        index = {"1": "0", "2": "2"}[ours[len("model.multi_modal_projector.linear_")]]
        return f"model.mm_projector.{index}.{ours.rsplit('.', 1)[1]}"
    if ours.startswith("model.language_model.layers."):
        _, _, _, layer, rest = ours.split(".", 4)
        return f"model.transformer.blocks.{layer}.{LLADA_BLOCK[rest]}"
    return {
        "model.image_newline": "model.image_newline",
        "model.language_model.embed_tokens.weight": "model.transformer.wte.weight",
        "model.language_model.norm.weight": "model.transformer.ln_f.weight",
        "lm_head.weight": "model.transformer.ff_out.weight",
    }[ours]


def lavida_config(**changes):
    """A LaViDa config.json for the tiny sizes, with LLaDA's field names and LaViDa's multimodal fields."""
    config = {
        "architectures": ["LlavaLladaForMaskedDiffusion"], "model_type": "llava_llada",
        "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "mlp_hidden_size": 128, "mlp_ratio": 4,
        "vocab_size": 512, "embedding_size": 512, "max_sequence_length": 2048, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "mask_token_id": 2, "eos_token_id": 0, "pad_token_id": 0, "weight_tying": False,
        "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True, "alibi": False,
        "block_group_size": 1, "include_bias": False, "include_qkv_bias": False, "bias_for_layer_norm": False,
        "layer_norm_with_affine": True, "attention_layer_norm": False, "scale_logits": False, "input_emb_norm": False,
        "rope_full_precision": True, "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0,
        "init_std": 0.02, "use_cache": False,
        "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres",
        # (width, height), LaViDa's order: (1w x 2h), (2w x 1h), (2 x 2), (3w x 1h), (1w x 3h) views of 32 px
        "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]],
        "mm_spatial_pool_mode": "bilinear", "mm_spatial_pool_stride": 2, "mm_use_im_start_end": False,
        "use_mm_proj": True,
    }
    config.update(changes)
    return config


def lavida_tensors(model):
    """The model's weights under LaViDa's names, plus the tensors LaViDa has and we do not use."""
    tensors = {lavida_name(name): tensor.detach().clone() for name, tensor in model.state_dict().items()}
    generator = torch.Generator().manual_seed(7)
    tensors[VISION + "post_layernorm.weight"] = torch.randn(32, generator=generator)
    tensors[VISION + "post_layernorm.bias"] = torch.randn(32, generator=generator)
    for name, tensor in list(tensors.items()):  # one more SigLIP encoder layer (SigLIP's 27th, dropped by LaViDa)
        if name.startswith(VISION + "encoder.layers.1."):
            extra = name.replace("encoder.layers.1.", "encoder.layers.2.")
            tensors[extra] = torch.randn(tensor.shape, generator=generator)
    return tensors


def write_lavida_checkpoint(folder, tensors, config=None, num_shards=3, tokenizer=True):
    """Write tensors as `num_shards` safetensors shards + index, config.json and (optionally) the tiny tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map, total = {}, 0
    for shard in range(num_shards):
        file_name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {name: tensors[name].contiguous() for name in names[shard::num_shards]}
        save_file(part, str(folder / file_name), metadata={"format": "pt"})
        for name, tensor in part.items():
            weight_map[name] = file_name
            total += tensor.numel() * tensor.element_size()
    with open(folder / "model.safetensors.index.json", "w") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle)
    with open(folder / "config.json", "w") as handle:
        json.dump(lavida_config() if config is None else config, handle)
    if tokenizer:
        from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer

        build_tiny_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def original():
    return build_tiny_model(seed=3)


@pytest.fixture(scope="module")
def source(original, tmp_path_factory):
    return write_lavida_checkpoint(tmp_path_factory.mktemp("lavida") / "src", lavida_tensors(original))


def convert(src, out, **kwargs):
    kwargs.setdefault("vision_config", TINY_VISION)
    return converter.convert_checkpoint(src, out, **kwargs)


def config_auto_map_includes_pipeline(folder: Path) -> bool:
    """config.json maps AutoModelForImageTextToText (the image-text-to-text pipeline) to the generating class."""
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    return auto_map.get("AutoModelForImageTextToText") == "modeling_lavida_shirg.LavidaShirgForMaskedDiffusion"


def leftovers(parent: Path, name: str):
    """Temporary siblings the converter may have left next to OUT."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ----------------------------------------------------------------------------------------------------------------
# End to end


CHILD = textwrap.dedent(
    """
    import os, sys, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel
    out, inputs_path, result_path = sys.argv[1:4]
    torch.set_num_threads(1)
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    assert "lavida_shirg" not in sys.modules, "the repository package leaked into the fresh process"
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = load_file(inputs_path)
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).logits
    if os.path.isfile(os.path.join(out, "processor_config.json")):
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
        assert processor.image_token_id == model.config.image_token_id, processor.image_token_id
    result = {"logits": logits.contiguous()}
    result.update({"state." + k: v.contiguous() for k, v in model.state_dict().items()})
    save_file(result, result_path)
    print(type(model).__name__, model.dtype)
    """
)


def test_convert_cli_and_load_in_fresh_process(original, source, tmp_path, capsys):
    out = tmp_path / "converted"
    vision_file = tmp_path / "vision.json"
    vision_file.write_text(json.dumps(TINY_VISION))
    assert converter.main([str(source), str(out), "--vision-config", str(vision_file)]) == 0
    report = capsys.readouterr().out
    assert f"tensors converted: {len(original.state_dict())} " in report
    assert "3 input shard(s) -> 3 output shard(s)" in report
    assert "post_layernorm.weight" in report and "encoder.layers.2.mlp.fc1.weight" in report
    assert f"parameters total:  {sum(p.numel() for p in original.parameters()):,}" in report

    files = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "modeling_lavida_shirg.py",
            "configuration_lavida_shirg.py", "image_layout.py", "masked_diffusion.py", "modeling_llada.py",
            "generation_lavida_shirg.py", "shirg_selection.py", "pooling.py"} <= files
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["max_new_tokens"], generation["do_sample"], generation["schedule"], generation["steps"]) == (
        32, False, "uniform", None)
    assert config_auto_map_includes_pipeline(out)
    # the provenance publish.py's card states
    assert json.loads((out / "shirg_conversion.json").read_text()) == {
        "converted_from": source.name, "dtype": "float32", "converter": "convert_lavida_checkpoint.py", "fim": False}
    assert not leftovers(tmp_path, "converted")
    config = json.loads((out / "config.json").read_text())
    assert {name: config["auto_map"][name] for name in ("AutoConfig", "AutoModel")} == {
        "AutoConfig": "configuration_lavida_shirg.ShirgConfig",
        "AutoModel": "modeling_lavida_shirg.LavidaShirgForMaskedDiffusion"}
    assert config["image_grid_pinpoints"] == [[64, 32], [32, 64], [64, 64], [32, 96], [96, 32]]  # (h, w), same order
    assert config["image_grid_pinpoints"] == original.config.image_grid_pinpoints
    assert config["pooled_view_size"] == 4 and config["text_config"]["rope_theta"] == 500000.0
    assert config["text_config"]["num_key_value_heads"] == 2 and config["vision_config"]["num_hidden_layers"] == 2
    for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "start_header_token_id",
                 "end_header_token_id", "eot_token_id", "image_token_id"):
        assert config[name] == getattr(original.config, name), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    written = sum(os.path.getsize(out / f) for f in set(index["weight_map"].values()))
    assert 0 < index["metadata"]["total_size"] <= written

    # inputs with an image, so the tower, the projector and image_newline all take part
    pixel_values, image_sizes, counts = image_batch(original.config, [(40, 24)], seed=1)
    input_ids, attention_mask = prompt_ids(original.config, counts, [9], seed=1)
    inputs_path, result_path = tmp_path / "inputs.safetensors", tmp_path / "result.safetensors"
    save_file({"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
               "image_sizes": image_sizes}, str(inputs_path))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    child = subprocess.run([sys.executable, "-c", CHILD, str(out), str(inputs_path), str(result_path)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-4000:]
    result = load_file(str(result_path))

    state = original.state_dict()
    loaded = {k[len("state."):]: v for k, v in result.items() if k.startswith("state.")}
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            expected = original(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                image_sizes=image_sizes).logits
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(result["logits"], expected)


def test_bfloat16_output_and_single_shard(original, tmp_path):
    tensors = {k: v.to(torch.bfloat16) for k, v in lavida_tensors(original).items()}
    tensors["model.image_newline"] = tensors["model.image_newline"].float()  # a float32 straggler is kept as is
    src = write_lavida_checkpoint(tmp_path / "src", tensors, num_shards=1)
    report = convert(src, tmp_path / "keep")
    assert report.dtype == "bfloat16" and report.output_shards == 1
    assert any("mixed dtypes" in note for note in report.notes)
    assert json.loads((tmp_path / "keep" / "config.json").read_text())["dtype"] == "bfloat16"
    kept = load_file(str(tmp_path / "keep" / "model.safetensors"))
    assert kept["model.image_newline"].dtype == torch.float32
    for name, tensor in original.state_dict().items():
        assert torch.equal(kept[name], tensor.to(kept[name].dtype).to(torch.bfloat16).to(kept[name].dtype)), name

    report = convert(src, tmp_path / "f32", dtype="float32")
    assert report.dtype == "float32" and not any("mixed dtypes" in note for note in report.notes)
    assert report.output_bytes == sum(t.numel() * 4 for t in kept.values())
    widened = load_file(str(tmp_path / "f32" / "model.safetensors"))
    assert all(widened[k].dtype == torch.float32 and torch.equal(widened[k], kept[k].float()) for k in kept)


def test_weight_tying_copies_the_embedding(original, tmp_path):
    tensors = lavida_tensors(original)
    del tensors["model.transformer.ff_out.weight"]
    src = write_lavida_checkpoint(tmp_path / "src", tensors, config=lavida_config(weight_tying=True))
    convert(src, tmp_path / "out")
    weights = {}
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    for file_name in set(index["weight_map"].values()):
        weights.update(load_file(str(tmp_path / "out" / file_name)))
    embedding = original.state_dict()["model.language_model.embed_tokens.weight"]
    assert torch.equal(weights["lm_head.weight"], embedding)
    assert torch.equal(weights["model.language_model.embed_tokens.weight"], embedding)


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_tensor_errors_list_every_key(original, tmp_path):
    tensors = lavida_tensors(original)
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    del tensors["model.mm_projector.2.bias"]
    tensors["model.transformer.blocks.0.extra_norm.weight"] = torch.ones(64)
    tensors["model.vision_resampler.weight"] = torch.ones(3)
    tensors["model.image_newline"] = torch.zeros(65)
    tensors["model.transformer.blocks.0.q_proj.weight"] = torch.zeros(64, 63)
    src = write_lavida_checkpoint(tmp_path / "src", tensors)
    out = tmp_path / "out"
    with pytest.raises(converter.ConversionError) as raised:
        convert(src, out)
    message = str(raised.value)
    for key in ("model.language_model.layers.1.mlp.up_proj.weight", "model.multi_modal_projector.linear_2.bias",  # missing
                "model.transformer.blocks.0.extra_norm.weight", "model.vision_resampler.weight",  # unexpected
                "model.image_newline -> model.image_newline: checkpoint [65], model [64]",  # shapes
                "model.transformer.blocks.0.q_proj.weight"):
        assert key in message, key
    assert "missing (model parameters without a tensor): 2" in message
    assert "unexpected (tensors the model has no place for): 2" in message
    assert "shape mismatches: 2" in message
    assert not out.exists() and not leftovers(tmp_path, "out")


def test_extra_llada_block_is_reported(original, tmp_path):
    tensors = lavida_tensors(original)
    for name in [k for k in tensors if k.startswith("model.transformer.blocks.1.")]:
        tensors[name.replace("blocks.1.", "blocks.2.")] = tensors[name].clone()
    src = write_lavida_checkpoint(tmp_path / "src", tensors)
    with pytest.raises(converter.ConversionError, match=r"LLaDA blocks 0-2 but config.json has n_layers=2"):
        convert(src, tmp_path / "out")


def test_too_few_vision_layers_hint(original, tmp_path, source):
    with pytest.raises(converter.ConversionError) as raised:  # 5: more than LaViDa's deletion of one layer explains
        convert(source, tmp_path / "out", vision_config=dict(TINY_VISION, num_hidden_layers=5))
    assert "model.vision_tower.encoder.layers.3.mlp.fc2.bias" in str(raised.value)
    assert "SigLIP encoder layers 0-2 but vision_config.num_hidden_layers=5" in str(raised.value)


def test_plain_siglip_config_gets_lavidas_layer_deletion(original, tmp_path, capsys):
    # as LaViDa's checkpoints: the tower's layers without SigLIP's last one (here 2 of 3, for so400m 26 of 27)
    tensors = {name: tensor for name, tensor in lavida_tensors(original).items()
               if not name.startswith(VISION + "encoder.layers.2.")}
    src = write_lavida_checkpoint(tmp_path / "src", tensors)
    siglip = tmp_path / "siglip-config.json"  # SigLIP's own config.json: the full tower, before LaViDa's deletion
    siglip.write_text(json.dumps({"architectures": ["SiglipModel"], "model_type": "siglip",
                                  "vision_config": dict(TINY_VISION, num_hidden_layers=3)}))
    out = tmp_path / "out"
    assert converter.main([str(src), str(out), "--vision-config", str(siglip)]) == 0
    assert ("--vision-config has 3 SigLIP encoder layers and the checkpoint holds 2: LaViDa deletes SigLIP's last "
            "layer, so the converted tower has 2") in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["vision_config"]["num_hidden_layers"] == 2
    weights = {}
    for file_name in set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()):
        weights.update(load_file(str(out / file_name)))
    assert weights.keys() == original.state_dict().keys()
    assert all(torch.equal(weights[name], tensor) for name, tensor in original.state_dict().items())


def test_a_token_id_outside_the_vocabulary_names_the_flag_that_sets_it(source, tmp_path, capsys):
    with pytest.raises(converter.ConversionError) as raised:  # a tokenizer without LLaDA's <|startoftext|>
        converter.build_config(lavida_config(), TINY_VISION, {"mask_token_id": 2})
    assert str(raised.value) == (
        "the configuration built from SRC is invalid: bos_token_id (126080) must be a token of the LM vocabulary "
        "[0, 512); pass --config-overrides '{\"bos_token_id\": ID}' with the right id, or --tokenizer PATH with the "
        "LLaDA tokenizer (its <|startoftext|> sets bos_token_id)")
    arguments = [str(source), str(tmp_path / "out"), "--vision-config", json.dumps(TINY_VISION)]
    assert converter.main(arguments + ["--config-overrides", '{"eos_token_id": 600}']) == 2
    assert capsys.readouterr().err == (
        "error: the configuration built from SRC is invalid: eos_token_id (600) must be a token of the LM vocabulary "
        "[0, 512); pass --config-overrides '{\"eos_token_id\": ID}' with the right id\n")


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_output_modes_follow_the_umask(source, tmp_path, umask):
    previous = os.umask(umask)
    try:
        convert(source, tmp_path / "out")
    finally:
        os.umask(previous)
    paths = [tmp_path / "out", *(tmp_path / "out").rglob("*")]
    assert len(paths) > 10
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in paths} == {
        path.name: 0o777 & ~umask if path.is_dir() else 0o666 & ~umask for path in paths}


@pytest.mark.parametrize(
    "changes, expected",
    [
        (dict(block_type="sequential"), "block_type='sequential'"),
        (dict(layer_norm_type="default", include_bias=True), "layer_norm_type='default'"),
        (dict(mm_projector_type="linear"), "mm_projector_type='linear'"),
        (dict(mm_patch_merge_type="flat"), "mm_patch_merge_type='flat'"),
        (dict(mm_hidden_size=1152), "mm_hidden_size=1152 differs from the vision tower's hidden_size=32"),
        (dict(mm_vision_tower="openai/clip-vit-large-patch14"), "is not a SigLIP tower"),
    ],
)
def test_unsupported_settings(original, tmp_path, changes, expected):
    src = write_lavida_checkpoint(tmp_path / "src", lavida_tensors(original), config=lavida_config(**changes))
    with pytest.raises(converter.ConversionError, match="does not implement") as raised:
        convert(src, tmp_path / "out")
    assert expected in str(raised.value)
    if "include_bias" in changes:
        assert "include_bias=True" in str(raised.value)  # every problem, not the first
    assert not (tmp_path / "out").exists()


def test_not_a_lavida_folder(tmp_path, source):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(converter.ConversionError, match=r"SRC .*has no config.json"):
        convert(empty, tmp_path / "out")
    with pytest.raises(converter.ConversionError, match=r"SRC .*is not a directory"):
        convert(tmp_path / "nowhere", tmp_path / "out")
    llada = tmp_path / "llada"
    llada.mkdir()
    (llada / "config.json").write_text(json.dumps({"model_type": "llada", "architectures": ["LLaDAModelLM"]}))
    with pytest.raises(converter.ConversionError, match=r"not a LaViDa checkpoint.*model_type='llada'.*llava_dream"):
        convert(llada, tmp_path / "out")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(lavida_config()))
    with pytest.raises(converter.ConversionError, match="has neither model.safetensors.index.json nor"):
        convert(no_weights, tmp_path / "out")
    assert converter.main([str(empty), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_pickle_only_folder_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(lavida_config()))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(converter.ConversionError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors"):
        convert(folder, tmp_path / "out")


def test_missing_shard_file(original, tmp_path):
    src = write_lavida_checkpoint(tmp_path / "src", lavida_tensors(original))
    (src / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(converter.ConversionError, match="model-00002-of-00003.safetensors"):
        convert(src, tmp_path / "out")


def test_existing_output(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(converter.ConversionError, match="exists and is not empty; pass --overwrite"):
        convert(source, out)
    assert os.listdir(out) == ["keep.txt"]

    # a failing conversion with --overwrite leaves the old folder as it was
    with pytest.raises(converter.ConversionError):
        convert(source, out, overwrite=True, vision_config=dict(TINY_VISION, hidden_size=48))
    assert os.listdir(out) == ["keep.txt"] and not leftovers(tmp_path, "out")

    convert(source, out, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and "config.json" in os.listdir(out)
    assert not leftovers(tmp_path, "out")

    with pytest.raises(converter.ConversionError, match="must be outside SRC"):
        convert(source, source, overwrite=True)
    with pytest.raises(converter.ConversionError, match="must be outside SRC"):
        convert(source, source / "inside", overwrite=True)


def test_two_conversions_into_one_folder_never_both_succeed(source, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    arguments = [str(source), str(out), "--vision-config", json.dumps(TINY_VISION)]
    write_weights, second = converter.write_weights, []

    def another_conversion_meanwhile(*args, **kwargs):
        if not second:  # the first conversion writes its weights: a second one starts into the same OUT
            second.append(converter.main(arguments))
        return write_weights(*args, **kwargs)

    monkeypatch.setattr(converter, "write_weights", another_conversion_meanwhile)
    assert converter.main(arguments) == 0
    assert second == [2]
    printed = capsys.readouterr()
    assert printed.err == (f"error: OUT {str(out)!r} is being written by another process (pid {os.getpid()}): wait "
                           "for it to end or choose another OUT\n")
    assert printed.out.count("Converted LaViDa checkpoint") == 1
    assert (out / "config.json").is_file() and not leftovers(tmp_path, "out")


def test_a_conversion_finding_out_written_after_its_first_check_is_refused(source, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    check_output, finished = converter._check_output, []

    def another_conversion_finishes_first(*args):
        check_output(*args)  # OUT was still empty here
        if not finished:
            finished.append(out)
            convert(source, out)

    monkeypatch.setattr(converter, "_check_output", another_conversion_finishes_first)
    assert converter.main([str(source), str(out), "--vision-config", json.dumps(TINY_VISION)]) == 2
    assert capsys.readouterr().err == (f"error: OUT {str(out)!r} exists and is not empty; pass --overwrite to "
                                       "replace it\n")
    assert len(finished) == 1 and (out / "config.json").is_file(), "the first conversion's folder stays"
    assert not leftovers(tmp_path, "out")


def test_an_unwritable_out_is_one_error_line(source, unwritable, capsys):
    out = unwritable / "out"
    assert converter.main([str(source), str(out), "--vision-config", json.dumps(TINY_VISION)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot write OUT {str(out)!r}: [Errno ") and "Traceback" not in error
    assert not out.exists()


def test_a_truncated_weight_file_is_named(original, tmp_path):
    src = write_lavida_checkpoint(tmp_path / "src", lavida_tensors(original), num_shards=1)
    (src / "model.safetensors.index.json").unlink()
    weights = (src / "model-00001-of-00001.safetensors").rename(src / "model.safetensors")
    weights.write_bytes(weights.read_bytes()[:-100])  # a cut download
    named = r"cannot read safetensors file model.safetensors: .*incomplete"
    with pytest.raises(converter.ConversionError, match=named):
        convert(src, tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer / processor step


def test_tokenizer_required_when_source_has_none(original, tmp_path, source):
    src = write_lavida_checkpoint(tmp_path / "src", lavida_tensors(original), tokenizer=False)
    with pytest.raises(converter.ConversionError, match="has no tokenizer files.*--tokenizer PATH"):
        convert(src, tmp_path / "out")
    with pytest.raises(converter.ConversionError, match="--tokenizer .* is not a folder with tokenizer files"):
        convert(src, tmp_path / "out", tokenizer=tmp_path)
    report = convert(src, tmp_path / "out", tokenizer=source)
    assert report.tensors_converted == len(original.state_dict())


def test_a_tokenizer_without_image_token_gets_one(original, tmp_path):
    """LLaDA's tokenizer has no <image>: the converter registers it (first free id = image_token_id), so tokens
    added later never take the image id; the weights and every other token are unchanged."""
    from conftest import tokenizer_without_image_token

    src = write_lavida_checkpoint(tmp_path / "src", lavida_tensors(original), tokenizer=False)
    tokenizer_without_image_token().save_pretrained(str(src))
    report = convert(src, tmp_path / "out")
    assert any("registered <image> as a special token of the tokenizer, id 512" in note for note in report.notes)
    from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor

    processor = LavidaShirgProcessor.from_pretrained(str(tmp_path / "out"), trust_remote_code=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id == config[
        "image_token_id"] == 512
    assert "<image>" in processor.tokenizer.all_special_tokens
    original_vocab = tokenizer_without_image_token().get_vocab()
    assert {token: index for token, index in processor.tokenizer.get_vocab().items() if token != "<image>"} == (
        original_vocab)
    processor.tokenizer.add_tokens(["zebra"])
    assert processor.tokenizer.convert_tokens_to_ids("zebra") == 513


def test_save_processor_step(tmp_path, source):
    from lavida_shirg.tiny_tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    ids = converter.special_token_ids(tokenizer)
    assert ids == {"bos_token_id": 1, "start_header_token_id": 3, "end_header_token_id": 4, "eot_token_id": 5,
                   "image_token_id": 512, "mask_token_id": 2, "fim_token_id": 192, "fill_token_id": 193}
    config, _ = converter.build_config(lavida_config(), TINY_VISION, ids)
    saved = converter.save_processor(tmp_path, config, tokenizer)
    from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor

    assert saved.startswith("processor LavidaShirgProcessor")
    processor = LavidaShirgProcessor.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert processor.image_token_id == config.image_token_id == 512
    assert processor.pooled_view_size == config.pooled_view_size
    reloaded = processor.tokenizer
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert all(reloaded.convert_tokens_to_ids(t) == i for t, i in SPECIAL_TOKENS.items())


def test_mask_token_disagreement(tmp_path):
    message = "<\\|mdm_mask\\|> has id 2 but SRC config.json has mask_token_id=7"
    with pytest.raises(converter.ConversionError, match=message):
        converter.build_config(lavida_config(mask_token_id=7), TINY_VISION, {"mask_token_id": 2})


# ----------------------------------------------------------------------------------------------------------------
# Pieces


def test_rename_key():
    rename = converter.rename_key
    kept = rename(VISION + "encoder.layers.25.mlp.fc1.weight", 26)
    assert kept == ("model.vision_tower.encoder.layers.25.mlp.fc1.weight", None)
    assert rename(VISION + "encoder.layers.26.mlp.fc1.weight", 26)[0] is None
    assert rename(VISION + "post_layernorm.bias", 26)[1] is not None
    assert rename(VISION + "head.probe", 26)[1] is not None
    gate, down = "model.language_model.layers.31.mlp.gate_proj.weight", "model.language_model.layers.3.mlp.down_proj.weight"
    assert rename("model.transformer.blocks.31.ff_proj.weight", 26) == (gate, None)
    assert rename("model.transformer.blocks.3.ff_out.weight", 26) == (down, None)
    assert rename("model.transformer.ff_out.weight", 26) == ("lm_head.weight", None)
    assert rename("model.transformer.blocks.3.att_proj.weight", 26) == (None, None)
    assert rename("lm_head.weight", 26) == (None, None)


def test_pinpoints_keep_order_and_swap_to_height_width():
    pairs = [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]
    expected = [[768, 384], [384, 768], [768, 768], [384, 1152], [1152, 384]]
    assert converter.pinpoints_from_lavida(pairs, 384) == expected
    assert converter.pinpoints_from_lavida(str([tuple(p) for p in pairs]), 384) == expected
    assert converter.pinpoints_from_lavida("(1x1),(2x3)", 384)[:4] == [[384, 384], [768, 384], [1152, 384], [384, 768]]


def test_real_sizes_config_without_allocating():
    """The real LaViDa config.json fields give the 'lavida-llada' preset; shapes come from a meta-device model."""
    from lavida_shirg import ShirgConfig

    real = lavida_config(
        d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
        embedding_size=126464, max_sequence_length=4096, mask_token_id=126336, eos_token_id=126081,
        pad_token_id=126081, mm_hidden_size=1152,
        image_grid_pinpoints=[[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]],
    )
    config, notes = converter.build_config(real)
    preset = ShirgConfig.from_preset("lavida-llada")
    for name in ("image_grid_pinpoints", "pooled_view_size", "mask_token_id", "eos_token_id", "pad_token_id",
                 "bos_token_id", "eot_token_id", "image_token_id"):
        assert getattr(config, name) == getattr(preset, name), name
    assert config.text_config.to_dict() == preset.text_config.to_dict()
    assert config.vision_config.to_dict() == preset.vision_config.to_dict()
    expected = converter.expected_state(config)
    assert sum(torch.Size(shape).numel() for shape in expected.values()) == 8_434_834_720
    assert expected["lm_head.weight"] == (126464, 4096)


def test_cli_dtype_bfloat16(source, tmp_path, capsys):
    out = tmp_path / "out"
    arguments = [str(source), str(out), "--vision-config", json.dumps(TINY_VISION)]
    assert converter.main(arguments + ["--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert "dropped known-unused keys (18)" in printed and "dtype bfloat16" in printed
    with safe_open(str(out / "model-00001-of-00003.safetensors"), framework="pt") as handle:
        assert all(handle.get_slice(k).get_dtype() == "BF16" for k in handle.keys())
    assert converter.main(arguments) == 2
    assert "pass --overwrite" in capsys.readouterr().err

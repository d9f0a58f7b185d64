"""convert_lavida_checkpoint.py on every LaViDa release besides the two instruct ones (test_converter.py,
test_converter_dream.py): the FIM and reason checkpoints (LLaDA's layout), the low-resolution one (single view,
unpooled) and the stage-1 checkpoints of both backbones (the projector alone, joined with the LM and SigLIP folders into
LaViDa's stage-2 starting point).

The synthetic folders are written from tiny models with LaViDa's names (the inverse mappings of test_converter and
test_converter_dream), LLaDA's and Dream's own LM folders and a SigLIP folder with SiglipModel's names.
"""

import json
import math
import os

import pytest
import torch
import numpy as np
from conftest import LOAD_MODEL_IN_A_FRESH_PROCESS, build_tiny_model, run_in_a_fresh_process
from PIL import Image
from safetensors.torch import load_file, save_file
from test_converter import (TINY_VISION, VISION, lavida_config, lavida_name, lavida_tensors,
                            write_lavida_checkpoint)
from test_converter_dream import dream_config, dream_name, dream_tokenizer

import convert_lavida_checkpoint as converter
from lavida_shirg import ShirgConfig
from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion
from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer


def converted_weights(folder) -> dict:
    weights = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            weights.update(load_file(str(folder / name)))
    return weights


@pytest.fixture(scope="module")
def llada():
    return build_tiny_model(seed=5)


@pytest.fixture(scope="module")
def dream():
    return build_tiny_model(seed=6, preset="tiny-dream")


# ----------------------------------------------------------------------------------------------------------------
# FIM and reason: LaViDa-LLaDA's class and layout; the FIM folder is recorded as such


@pytest.mark.parametrize("release, fim", [("lavida-llada-1.0-fim", True), ("lavida-llada-hd-fim", True),
                                          ("lavida-llada-reason", False), ("lavida-llada-v1.0-instruct", False)])
def test_llada_layout_releases(llada, tmp_path, release, fim):
    src = write_lavida_checkpoint(tmp_path / release, lavida_tensors(llada), tokenizer=False)
    # the tokenizer holds the FIM marker <|reserved_token_1|> and filler <|reserved_token_2|>, as LLaDA's does
    build_tiny_tokenizer().save_pretrained(str(src))
    out = tmp_path / "out"
    report = converter.convert_checkpoint(src, out, vision_config=TINY_VISION)
    assert report.tensors_converted == len(llada.state_dict())
    weights = converted_weights(out)
    assert weights.keys() == llada.state_dict().keys()
    assert all(torch.equal(weights[name], tensor) for name, tensor in llada.state_dict().items())
    record = json.loads((out / "shirg_conversion.json").read_text())
    assert record == {"converted_from": release, "dtype": "float32", "converter": "convert_lavida_checkpoint.py",
                      "fim": fim}
    marker_notes = [note for note in report.notes if "FIM marker" in note]
    assert marker_notes == (["LaViDa's FIM checkpoint: recorded as fim=true in shirg_conversion.json; its FIM "
                             "marker <|reserved_token_1|> is token 192 of the tokenizer"] if fim else [])
    config = json.loads((out / "config.json").read_text())
    for name in ("mask_token_id", "eos_token_id", "bos_token_id", "start_header_token_id", "eot_token_id",
                 "image_token_id", "image_grid_pinpoints", "pooled_view_size", "fim_token_id", "fill_token_id"):
        assert config[name] == getattr(llada.config, name), name
    assert (config["fim_token_id"], config["fill_token_id"]) == (192, 193)
    assert json.loads((out / "processor_config.json").read_text())["chat_format"] == "llada"


def test_fim_flag_marks_any_folder(llada, tmp_path, capsys):
    src = write_lavida_checkpoint(tmp_path / "my-infiller", lavida_tensors(llada), num_shards=1)
    out = tmp_path / "out"
    assert converter.main([str(src), str(out), "--vision-config", json.dumps(TINY_VISION), "--fim"]) == 0
    assert json.loads((out / "shirg_conversion.json").read_text())["fim"] is True
    assert "its FIM marker <|reserved_token_1|> is token 192 of the tokenizer" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert (config["fim_token_id"], config["fill_token_id"]) == (192, 193)


# ----------------------------------------------------------------------------------------------------------------
# lowres: LaViDa's single-view layout (pad / square), unpooled; the lowres release by name: unpooled whatever its layout

LOAD_AND_GENERATE = LOAD_MODEL_IN_A_FRESH_PROCESS + """
answer = model.generate(**inputs, max_new_tokens=6)
torch.save({"logits": logits, "answer": answer, "layout": model.config.image_aspect_ratio,
            "pooled": model.config.pooled_view_size}, outputs_path)
"""


@pytest.mark.parametrize("name, layout", [("lavida-llada-1.0-lowres", "pad"), ("lavida-llada-lowres", "square"),
                                          ("my-single-view", "pad"), ("lavida-llada-1.0-lowres", "anyres")])
def test_lowres_release_converts_unpooled_and_generates(llada, tmp_path, name, layout):
    """LaViDa's 4-D image path (pad / square) never pools: any folder with that layout converts to our single-view
    layout with pooled_view_size = the patches per side; the lowres release, which LaViDa's eval runs with
    NOT_ALWASY_DO_2DPOOL, is unpooled even with an anyres config.json. Every tensor placed, none left over; loads
    with AutoModel in a fresh process and generates as the same weights do in this one."""
    config = lavida_config(image_aspect_ratio=layout)
    if layout != "anyres":
        config["mm_patch_merge_type"] = "flat"  # not read by the single-view path
        del config["image_grid_pinpoints"]
    src = write_lavida_checkpoint(tmp_path / name, lavida_tensors(llada), config=config)
    out = tmp_path / "out"
    report = converter.convert_checkpoint(src, out, vision_config=TINY_VISION)
    weights = converted_weights(out)
    assert report.tensors_converted == len(llada.state_dict()) and weights.keys() == llada.state_dict().keys()
    assert all(torch.equal(weights[key], tensor) for key, tensor in llada.state_dict().items())
    assert sorted(key for key, _ in report.dropped) == sorted(set(lavida_tensors(llada)) - {
        lavida_name(key) for key in llada.state_dict()})  # SigLIP's post-norm and last layer, as for every release
    side = TINY_VISION["image_size"] // TINY_VISION["patch_size"]
    written = json.loads((out / "config.json").read_text())
    assert (written["image_aspect_ratio"], written["pooled_view_size"]) == (layout, side)
    if layout == "anyres":
        assert written["image_grid_pinpoints"] == llada.config.image_grid_pinpoints
        assert any("NOT_ALWASY_DO_2DPOOL" in note for note in report.notes)
    else:
        assert "mm_patch_merge_type='flat' is not read by LaViDa's single-view image path" in report.notes
    processor = LavidaShirgProcessor.from_pretrained(str(out), trust_remote_code=True)
    assert processor.image_processor.image_aspect_ratio == layout
    ours = LavidaShirgForMaskedDiffusion(ShirgConfig.from_preset("tiny", image_aspect_ratio=layout,
                                                                 pooled_view_size=side)).eval()
    ours.load_state_dict(llada.state_dict())
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 44, 3), dtype=np.uint8))
    inputs = dict(processor(images=[image], text=[processor.build_prompt("What is written?")]))
    del inputs["selection"], inputs["question_mask"]
    assert int((inputs["input_ids"] == llada.config.image_token_id).sum()) == ours.image_token_count((20, 44))
    if layout != "anyres":
        assert inputs["pixel_values"].shape[0] == 1 and ours.image_token_count((20, 44)) == side * side
    outputs = run_in_a_fresh_process(LOAD_AND_GENERATE, out, inputs, tmp_path)
    assert (outputs["layout"], outputs["pooled"]) == (layout, side)
    with torch.no_grad():
        torch.testing.assert_close(outputs["logits"], ours(**inputs).logits, atol=0, rtol=0)
    answer = ours.generate(**inputs, max_new_tokens=6)
    assert answer.shape == (1, inputs["input_ids"].shape[1] + 6) and torch.equal(outputs["answer"], answer)


def test_lowres_real_sizes_plan():
    """LaViDa's lowres config.json at the real sizes (pad layout): the lavida-llada preset's tensors and sizes, one
    unpooled 384 px view of 27 x 27 = 729 tokens per image."""
    real = lavida_config(
        d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
        embedding_size=126464, max_sequence_length=4096, mask_token_id=126336, eos_token_id=126081,
        pad_token_id=126081, mm_hidden_size=1152, image_aspect_ratio="pad", image_grid_pinpoints=None)
    config, notes = converter.build_config(real, unpooled=True)
    preset = ShirgConfig.from_preset("lavida-llada")
    assert (config.image_aspect_ratio, config.pooled_view_size) == ("pad", preset.patches_per_side)
    assert config.vision_config.to_dict() == preset.vision_config.to_dict()
    assert config.text_config.to_dict() == preset.text_config.to_dict()
    assert converter.expected_state(config) == converter.expected_state(preset)
    assert config.selection_settings().image_aspect_ratio == "pad"
    from lavida_shirg.shirg_selection import image_token_count

    assert image_token_count((480, 640), config.selection_settings()) == 27 * 27


@pytest.mark.parametrize("layout", ["crop_split", "highres"])
def test_other_layouts_are_refused(llada, tmp_path, layout):
    src = write_lavida_checkpoint(tmp_path / "src", lavida_tensors(llada), config=lavida_config(image_aspect_ratio=layout))
    with pytest.raises(converter.ConversionError) as raised:
        converter.convert_checkpoint(src, tmp_path / "out", vision_config=TINY_VISION)
    assert (f"image_aspect_ratio={layout!r} (our model implements image_aspect_ratio in ('anyres', 'pad', 'square'))"
            in str(raised.value))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# stage 1: the projector alone + the LM + SigLIP -> LaViDa's stage-2 starting point

SIGLIP_TEXT = {"text_model.embeddings.token_embedding.weight": (20, 8), "text_model.final_layer_norm.weight": (8,),
               "logit_scale": (1,), "logit_bias": (1,)}


def llada_base_config():
    """LLaDA-8B-Instruct's config.json fields (LLaDAModelLM), at the tiny sizes."""
    config = {name: value for name, value in lavida_config().items() if not name.startswith(("mm_", "image_"))}
    return {**config, "model_type": "llada", "architectures": ["LLaDAModelLM"], "use_mm_proj": None}


def dream_base_config():
    config = {name: value for name, value in dream_config().items() if not name.startswith(("mm_", "image_"))}
    return {**config, "model_type": "Dream", "architectures": ["DreamModel"]}


BACKBONES = {  # stage-1 model_type -> (model fixture, LaViDa's name of one of our tensors, base config, tokenizer)
    "llava_llada": ("llada", lavida_name, llada_base_config, None),
    "llava_dream": ("dream", dream_name, dream_base_config, dream_tokenizer),
}


def write_folder(folder, tensors, config, tokenizer=None):
    folder.mkdir(parents=True)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def write_stage1_sources(model, model_type, tmp_path, projector="safetensors"):
    """(stage-1 folder, LM folder, SigLIP folder) holding `model`'s weights as LaViDa's training left them."""
    _, name_of, base_config, tokenizer = BACKBONES[model_type]
    lavida = {name_of(name): tensor for name, tensor in model.state_dict().items()}
    lm = {name: tensor for name, tensor in lavida.items() if not name.startswith(("model.vision_tower.",
                                                                                  "model.mm_projector.",
                                                                                  "model.image_newline"))}
    if tokenizer is None:
        tokenizer = build_tiny_tokenizer
    base = write_folder(tmp_path / "base-lm", lm, base_config(), tokenizer())

    generator = torch.Generator().manual_seed(11)
    siglip = {"vision_model." + name[len(VISION):]: tensor for name, tensor in lavida.items()
              if name.startswith(VISION)}
    for name, tensor in list(siglip.items()):  # SigLIP's last layer, which LaViDa deletes
        if name.startswith("vision_model.encoder.layers.1."):
            siglip[name.replace("layers.1.", "layers.2.")] = torch.randn(tensor.shape, generator=generator)
    for name in ("post_layernorm.weight", "post_layernorm.bias", "head.probe"):
        siglip["vision_model." + name] = torch.randn(32, generator=generator)
    siglip.update({name: torch.randn(shape, generator=generator) for name, shape in SIGLIP_TEXT.items()})
    tower_config = {"model_type": "siglip", "architectures": ["SiglipModel"],
                    "vision_config": dict(TINY_VISION, num_hidden_layers=3), "text_config": {"hidden_size": 8}}
    tower = write_folder(tmp_path / "siglip", siglip, tower_config)

    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    stage1_config = {**base_config(), "model_type": model_type,  # LaViDa's config class, the base LM's architectures
                     "mm_vision_tower": "/path/to/google/siglip-so400m-patch14-384", "mm_hidden_size": 32,
                     "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_patch_merge_type": "flat",
                     "image_aspect_ratio": "square", "image_grid_pinpoints": None, "mm_use_im_start_end": False,
                     "use_mm_proj": True, "tune_mm_mlp_adapter": False, "mm_tunable_parts": "mm_mlp_adapter"}
    (stage1 / "config.json").write_text(json.dumps(stage1_config))
    projector_tensors = {name: tensor.contiguous() for name, tensor in lavida.items()
                         if name.startswith("model.mm_projector.")}
    if projector == "safetensors":
        save_file(projector_tensors, str(stage1 / converter.STAGE1_PROJECTOR))
    else:
        (stage1 / converter.STAGE1_PICKLE).write_bytes(b"a pickle, never loaded")
    return stage1, base, tower


@pytest.mark.parametrize("model_type", ["llava_llada", "llava_dream"])
def test_stage1_joins_projector_lm_and_siglip(request, tmp_path, model_type, capsys):
    model = request.getfixturevalue(BACKBONES[model_type][0])
    stage1, base, tower = write_stage1_sources(model, model_type, tmp_path)
    out = tmp_path / "out"
    assert converter.main([str(stage1), str(out), "--base-lm", str(base), "--vision-tower", str(tower),
                           "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    dropped = [line.split()[0] for line in printed.splitlines() if line.startswith("    ") and "[" in line]
    last_layer = [VISION + "encoder.layers.2." + name.split("encoder.layers.1.")[1] for name in model.state_dict()
                  if name.startswith("model.vision_tower.encoder.layers.1.")]  # SigLIP's last, deleted by LaViDa
    assert sorted(dropped) == sorted([*SIGLIP_TEXT, *last_layer, *(VISION + name for name in (
        "head.probe", "post_layernorm.bias", "post_layernorm.weight"))])
    assert "image_newline drawn as LaViDa's stage 2 draws it: randn(64) / sqrt(64), seed 3" in printed
    assert "the folder is LaViDa's stage-2 starting point" in printed

    loaded = LavidaShirgForMaskedDiffusion.from_pretrained(str(out))
    state = loaded.state_dict()
    assert state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        if name != "model.image_newline":
            assert torch.equal(state[name], tensor), name
    newline = torch.randn(64, generator=torch.Generator().manual_seed(3)) / math.sqrt(64)
    assert torch.equal(state["model.image_newline"], newline)
    text = [{k: v for k, v in m.config.to_dict()["text_config"].items() if k != "dtype"} for m in (loaded, model)]
    assert text[0] == text[1]
    for name in ("image_grid_pinpoints", "pooled_view_size", "mask_token_id", "eos_token_id", "image_token_id",
                 "start_header_token_id", "eot_token_id"):
        assert getattr(loaded.config, name) == getattr(model.config, name), name
    assert loaded.config.vision_config.num_hidden_layers == 2
    chat_format = "dream" if model_type == "llava_dream" else "llada"
    assert json.loads((out / "processor_config.json").read_text())["chat_format"] == chat_format
    assert json.loads((out / "shirg_conversion.json").read_text()) == {
        "converted_from": "stage1", "dtype": "float32", "converter": "convert_lavida_checkpoint.py", "fim": False,
        "stage1": {"base_lm": "base-lm", "vision_tower": "siglip", "image_newline_seed": 3}}


def test_stage1_errors(llada, dream, tmp_path):
    stage1, base, tower = write_stage1_sources(llada, "llava_llada", tmp_path / "llada")
    convert = converter.convert_checkpoint
    with pytest.raises(converter.ConversionError, match=r"stage-1 checkpoint \(the projector alone\): pass --base-lm "
                                                        r"and --vision-tower \(the LLaDAModelLM LM folder"):
        convert(stage1, tmp_path / "out")
    with pytest.raises(converter.ConversionError, match="pass --vision-tower"):
        convert(stage1, tmp_path / "out", base_lm=base)
    with pytest.raises(converter.ConversionError, match="--vision-config does not apply to a stage-1 SRC"):
        convert(stage1, tmp_path / "out", base_lm=base, vision_tower=tower, vision_config=TINY_VISION)
    _, dream_base, _ = write_stage1_sources(dream, "llava_dream", tmp_path / "dream")
    with pytest.raises(converter.ConversionError, match=r"--base-lm .* is not a LLaDAModelLM folder .*'DreamModel'"):
        convert(stage1, tmp_path / "out", base_lm=dream_base, vision_tower=tower)
    config = json.loads((stage1 / "config.json").read_text())
    (stage1 / "config.json").write_text(json.dumps({**config, "n_layers": 3}))
    with pytest.raises(converter.ConversionError, match=r"disagree on the LM sizes.*\n  n_layers: SRC 3, --base-lm 2"):
        convert(stage1, tmp_path / "out", base_lm=base, vision_tower=tower)
    (stage1 / "config.json").write_text(json.dumps(config))
    os.remove(stage1 / converter.STAGE1_PROJECTOR)
    save_file({"model.mm_projector.0.weight": torch.zeros(64, 32)}, str(stage1 / converter.STAGE1_PROJECTOR))
    with pytest.raises(converter.ConversionError, match=r"missing .*: 3\n.*linear_1.bias"):
        convert(stage1, tmp_path / "out", base_lm=base, vision_tower=tower)
    full = write_lavida_checkpoint(tmp_path / "full", lavida_tensors(llada))
    with pytest.raises(converter.ConversionError, match="--base-lm and --vision-tower are for LaViDa's stage-1"):
        convert(full, tmp_path / "out", base_lm=base, vision_tower=tower)
    assert not (tmp_path / "out").exists()


def test_stage1_pickle_projector_is_refused_by_name(llada, tmp_path, capsys):
    stage1, base, tower = write_stage1_sources(llada, "llava_llada", tmp_path, projector="pickle")
    assert converter.main([str(stage1), str(tmp_path / "out"), "--base-lm", str(base), "--vision-tower",
                           str(tower)]) == 2
    error = capsys.readouterr().err
    assert "is a LaViDa stage-1 checkpoint whose projector is a pickle (mm_projector.bin)" in error
    assert "Save its four tensors (model.mm_projector.0/2 weight and bias) as mm_projector.safetensors" in error


def test_stage1_real_sizes_give_the_lavida_presets():
    """LLaDA-8B-Instruct's / Dream-v0-Instruct-7B's config.json + the stage-1 fields + SigLIP-so400m's 27 layers
    give the lavida-llada / lavida-dream presets, hence the instruct checkpoints' key plans."""
    stage1_fields = {"mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": 1152,
                     "mm_projector_type": "mlp2x_gelu", "mm_patch_merge_type": "flat", "image_aspect_ratio": "square"}
    llada_base = {**llada_base_config(), "d_model": 4096, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32,
                  "mlp_hidden_size": 12288, "vocab_size": 126464, "embedding_size": 126464,
                  "max_sequence_length": 4096, "mask_token_id": 126336, "eos_token_id": 126081,
                  "pad_token_id": 126081}
    dream_base = {**dream_base_config(), "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                  "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                  "max_position_embeddings": 131072, "mask_token_id": 151666, "pad_token_id": 151643,
                  "eos_token_id": 151643, "bos_token_id": 151665}
    siglip = {"model_type": "siglip", "vision_config": {"hidden_size": 1152, "intermediate_size": 4304,
                                                        "num_hidden_layers": 27, "num_attention_heads": 16,
                                                        "image_size": 384, "patch_size": 14}}
    dream_ids = {"start_header_token_id": 151644, "end_header_token_id": 198, "eot_token_id": 151645}
    for model_type, base, preset, ids in (("llava_llada", llada_base, "lavida-llada", None),
                                          ("llava_dream", dream_base, "lavida-dream", dream_ids)):
        lavida = converter.stage1_lavida_config({**base, **stage1_fields, "model_type": model_type}, base, 384)
        vision = converter.vision_config_dict(siglip)
        vision["num_hidden_layers"] -= 1  # as read_stage1_sources
        config, _ = converter.build_config(lavida, vision, ids)
        expected = ShirgConfig.from_preset(preset)
        assert config.text_config.to_dict() == expected.text_config.to_dict()
        assert config.vision_config.to_dict() == expected.vision_config.to_dict()
        for name in ("image_grid_pinpoints", "pooled_view_size", "mask_token_id", "eos_token_id", "image_token_id"):
            assert getattr(config, name) == getattr(expected, name), (preset, name)

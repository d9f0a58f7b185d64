"""ShirgConfig: presets, serialisation, validation."""

import pytest

from lavida_shirg import ShirgConfig


def test_real_preset_matches_lavida():
    config = ShirgConfig.from_preset("lavida-llada")
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size,
            vision.patch_size, vision.image_size) == (1152, 26, 16, 4304, 14, 384)
    assert config.patches_per_side == 27 and config.pooled_view_size == 14
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size, text.rope_theta, text.rms_norm_eps,
            text.max_position_embeddings) == (4096, 32, 32, 32, 12288, 126464, 500000.0, 1e-5, 4096)
    assert (config.mask_token_id, config.eos_token_id, config.pad_token_id, config.bos_token_id,
            config.start_header_token_id, config.end_header_token_id, config.eot_token_id) == (
        126336, 126081, 126081, 126080, 126346, 126347, 126348)
    # LaViDa's pinpoints (w, h) = (384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152), as (h, w)
    assert config.image_grid_pinpoints == [[768, 384], [384, 768], [768, 768], [384, 1152], [1152, 384]]
    assert config.image_token_id == 126464


def test_round_trip(tmp_path):
    config = ShirgConfig.from_preset("tiny", loss_weighting="inverse_probability")
    config.save_pretrained(tmp_path)
    loaded = ShirgConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert type(loaded.text_config).__name__ == "LladaTextConfig"
    assert type(loaded.vision_config).__name__ == "SiglipVisionConfig"


@pytest.mark.parametrize("overrides,match", [
    (dict(pooled_view_size=0), "pooled_view_size"),
    (dict(image_grid_pinpoints=[[32, 50]]), "image_grid_pinpoints"),
    (dict(image_grid_pinpoints=[]), "image_grid_pinpoints"),
    (dict(mask_token_id=512), "mask_token_id"),
    (dict(image_token_id=3), "image_token_id"),
    (dict(loss_weighting="sum"), "loss_weighting"),
    (dict(min_mask_probability=0.0), "min_mask_probability"),
    (dict(projector_hidden_act="relu"), "projector_hidden_act"),
    (dict(text_config=dict(hidden_size=30, num_attention_heads=4)), "hidden_size"),
    (dict(text_config=dict(num_attention_heads=4, num_key_value_heads=3, hidden_size=64)), "num_key_value_heads"),
    (dict(text_config=dict(hidden_act="gelu")), "hidden_act"),
    (dict(pooled_view=3), "unknown ShirgConfig fields \\['pooled_view'\\]"),
])
def test_inconsistent_values_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        ShirgConfig.from_preset("tiny", **overrides)


def test_unknown_preset():
    message = "unknown preset 'llava'; choose one of \\['lavida-dream', 'lavida-llada', 'reader', 'tiny', 'tiny-dream'\\]"
    with pytest.raises(ValueError, match=message):
        ShirgConfig.from_preset("llava")


@pytest.mark.parametrize("field,value,message", [
    ("relevance_weight", float("nan"), "relevance_weight must be a finite non-negative number"),
    ("detail_weight", float("inf"), "detail_weight must be a finite non-negative number"),
    ("v2_edge_weight", float("nan"), "v2_edge_weight must be a finite"),
    ("hires_image_size", 66, r"hires_image_size must be a positive integer multiple of the patch size \(4\), got 66"),
    ("hires_image_size", 64.0, "hires_image_size must be a positive integer multiple .* got 64.0"),
    ("hires_image_size", "64", "hires_image_size must be a positive integer multiple .* got '64'"),
    ("image_token_id", 2, r"image_token_id must be a non-negative integer other than the special ids"),
])
def test_bad_values_are_rejected_at_construction(field, value, message):
    with pytest.raises(ValueError, match=message):
        ShirgConfig.from_preset("tiny", **{field: value})


def test_real_hires_size_must_be_a_multiple_of_the_patch():
    assert ShirgConfig.from_preset("lavida-llada").hires_image_size == 672  # 48 x 14
    with pytest.raises(ValueError, match=r"multiple of the patch size \(14\), got 670"):
        ShirgConfig.from_preset("lavida-llada", hires_image_size=670)
    with pytest.raises(ValueError, match="got 670"):
        ShirgConfig.from_preset("lavida-llada").selection_settings("shirg-fixed", 512, {"hires_image_size": 670})


def test_from_pretrained_overrides_are_validated(tmp_path):
    ShirgConfig.from_preset("tiny").save_pretrained(tmp_path)
    assert ShirgConfig.from_pretrained(tmp_path, selection_budget=32).selection_budget == 32
    with pytest.raises(ValueError, match="selection_method must be one of"):
        ShirgConfig.from_pretrained(tmp_path, selection_method="nope")
    with pytest.raises(ValueError, match="selection_budget must be a positive integer"):
        ShirgConfig.from_pretrained(tmp_path, selection_budget=-5)


def test_model_from_pretrained_overrides_are_validated(tmp_path):
    from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion

    LavidaShirgForMaskedDiffusion(ShirgConfig.from_preset("tiny")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="selection_method must be one of"):
        LavidaShirgForMaskedDiffusion.from_pretrained(tmp_path, selection_method="nope")
    with pytest.raises(ValueError, match="hires_image_size must be a positive integer multiple"):
        LavidaShirgForMaskedDiffusion.from_pretrained(tmp_path, hires_image_size=66)


def test_text_config_carries_the_special_ids_for_trainer():
    config = ShirgConfig.from_preset("tiny")
    text = config.get_text_config()
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (1, 0, 0)
    with pytest.raises(ValueError, match=r"text_config.eos_token_id \(7\) must equal eos_token_id \(0\)"):
        ShirgConfig.from_preset("tiny", text_config={**config.text_config.to_dict(), "eos_token_id": 7})


def test_selection_settings_are_one_typed_frozen_object():
    import dataclasses

    from lavida_shirg.configuration_lavida_shirg import LAYOUT_FIELDS, SELECTION_FIELDS, SelectionSettings

    config = ShirgConfig.from_preset("tiny")
    settings = config.selection_settings("shirg-x", 32, {"x_suppression_rounds": 2})
    assert isinstance(settings, SelectionSettings)
    assert (settings.selection_method, settings.selection_budget, settings.x_suppression_rounds) == ("shirg-x", 32, 2)
    assert settings["hires_image_size"] == settings.hires_image_size == 64
    assert tuple(settings) == LAYOUT_FIELDS + SELECTION_FIELDS
    assert dict(settings)["relevance_weight"] == config.relevance_weight
    # the settings carry the image geometry: they count image tokens with no other input
    assert (settings.pooled_view_size, settings.view_size, settings.patch_size) == (4, 32, 4)
    assert settings.image_grid_pinpoints == config.image_grid_pinpoints
    fields = {field.name: field.type for field in dataclasses.fields(SelectionSettings)}
    assert fields["selection_budget"] == ShirgConfig.__annotations__["selection_budget"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.selection_budget = 64
    with pytest.raises(KeyError):
        settings["vision_config"]
    assert settings == config.selection_settings("shirg-x", 32, {"x_suppression_rounds": 2})

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
    with pytest.raises(ValueError, match="unknown preset 'llava'; choose one of \\['lavida-llada', 'tiny'\\]"):
        ShirgConfig.from_preset("llava")

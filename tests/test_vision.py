"""Vision side: SigLIP surgery, position-embedding interpolation, pooling, anyres layout, image-token checks."""

import pytest
import torch
import torch.nn.functional as F
from conftest import image_batch, prompt_ids

from lavida_shirg import ShirgConfig
from lavida_shirg.image_layout import anyres_grid, unpad_bounds
from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion
from lavida_shirg.pooling import pool_view_features


def test_real_preset_has_lavidas_parameter_count():
    """Built on the meta device: SigLIP (26 layers) + projector + LLaDA-8B = about 8.43B parameters."""
    with torch.device("meta"):
        model = LavidaShirgForMaskedDiffusion(ShirgConfig.from_preset("lavida-llada"))
    total = sum(p.numel() for p in model.parameters())
    assert 8.42e9 < total < 8.44e9, total
    assert len(model.vision_tower.encoder.layers) == 26
    assert isinstance(model.vision_tower.post_layernorm, torch.nn.Identity)
    assert not hasattr(model.vision_tower, "head")
    assert model.multi_modal_projector.linear_1.weight.shape == (4096, 1152)
    assert model.lm_head.weight.shape == (126464, 4096)


def test_view_features_skip_post_layernorm_and_interpolate_positions(tiny_model):
    """A 2x-size view gives (2s)^2 tokens = the encoder output (no post-norm) of interpolated position embeddings."""
    config = tiny_model.config
    size = 2 * config.vision_config.image_size
    pixels = torch.rand(2, 3, size, size) * 2 - 1
    features = tiny_model.model.encode_views(pixels)
    side = size // config.vision_config.patch_size
    assert features.shape == (2, side * side, config.text_config.hidden_size)
    tower = tiny_model.vision_tower
    embedded = tower.embeddings(pixels, interpolate_pos_encoding=True)
    expected = tiny_model.multi_modal_projector(tower.encoder(inputs_embeds=embedded).last_hidden_state)
    torch.testing.assert_close(features, expected)
    native = tiny_model.model.encode_views(pixels[:, :, : size // 2, : size // 2])
    assert native.shape[1] == (side // 2) ** 2


def test_projector_is_linear_erf_gelu_linear(tiny_model):
    projector = tiny_model.multi_modal_projector
    x = torch.randn(5, tiny_model.config.vision_config.hidden_size)
    hidden = x @ projector.linear_1.weight.T + projector.linear_1.bias
    expected = 0.5 * hidden * (1 + torch.erf(hidden / 2**0.5)) @ projector.linear_2.weight.T + projector.linear_2.bias
    torch.testing.assert_close(projector(x), expected)


def test_pooling_is_bilinear_without_corner_alignment():
    features = torch.randn(3, 27 * 27, 5)
    pooled = pool_view_features(features, 14)
    grid = features.view(3, 27, 27, 5).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(14, 14), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(pooled, expected.reshape(3, 196, 5))


SIZES = [(40, 70), (64, 30), (20, 20), (1, 1), (3, 400), (96, 32)]


def test_image_feature_counts_match_the_layout(tiny_model):
    pixel_values, image_sizes, counts = image_batch(tiny_model.config, SIZES)
    features, valid, _ = tiny_model.get_image_features(pixel_values, image_sizes)
    assert valid.all()
    assert features.shape == (sum(counts), tiny_model.config.text_config.hidden_size)


def test_anyres_layout_values(tiny_model):
    """Global view first, then crops stitched row-major, unpadded, each row ended by image_newline."""
    config = tiny_model.config
    p = config.pooled_view_size
    for size in [(40, 70), (64, 30), (30, 90)]:
        pixel_values, image_sizes, counts = image_batch(config, [size], seed=1)
        features, valid, _ = tiny_model.get_image_features(pixel_values, image_sizes)
        assert valid.all()
        pooled = pool_view_features(tiny_model.model.encode_views(pixel_values), p)  # (V, p*p, E)
        rows, cols = anyres_grid(size, config.image_grid_pinpoints, config.vision_config.image_size)
        stitched = torch.zeros(rows * p, cols * p, pooled.shape[-1])
        for r in range(rows):
            for c in range(cols):
                stitched[r * p : (r + 1) * p, c * p : (c + 1) * p] = pooled[1 + r * cols + c].view(p, p, -1)
        top, bottom, left, right = unpad_bounds((rows * p, cols * p), size)
        expected = [pooled[0]]
        for row in stitched[top:bottom, left:right]:
            expected += [row, tiny_model.model.image_newline[None]]
        torch.testing.assert_close(features, torch.cat(expected))


def test_image_positions_receive_the_features_in_order(tiny_model):
    config = tiny_model.config
    pixel_values, image_sizes, counts = image_batch(config, [(40, 70), (64, 30)])
    input_ids, padding = prompt_ids(config, counts, [5, 8])
    embeds, mask, _ = tiny_model.model.embed_inputs(input_ids, padding, pixel_values, image_sizes)
    assert torch.equal(mask, padding)
    features, valid, _ = tiny_model.get_image_features(pixel_values, image_sizes)
    assert valid.all()
    is_image = input_ids == config.image_token_id
    torch.testing.assert_close(embeds[is_image], features)
    torch.testing.assert_close(embeds[~is_image], tiny_model.language_model.embed_tokens(input_ids[~is_image]))


def test_image_token_errors(tiny_model):
    config = tiny_model.config
    pixel_values, image_sizes, counts = image_batch(config, [(40, 70)])
    input_ids, padding = prompt_ids(config, [counts[0] - 1], [5])
    with pytest.raises(ValueError, match=f"input_ids hold \\[{counts[0] - 1}\\] image tokens per sample but the images need \\[{counts[0]}\\]"):
        tiny_model(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes)
    input_ids, _ = prompt_ids(config, counts, [5])
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny_model(input_ids=input_ids)
    with pytest.raises(ValueError, match="image_sizes"):
        tiny_model(input_ids=input_ids, pixel_values=pixel_values)
    with pytest.raises(ValueError, match="views"):
        tiny_model(input_ids=input_ids, pixel_values=pixel_values[:-1], image_sizes=image_sizes)


def test_sequences_beyond_the_maximum_length_are_refused():
    from conftest import build_tiny_model

    model = build_tiny_model(text_config=dict(ShirgConfig.from_preset("tiny").text_config.to_dict(),
                                              max_position_embeddings=64))
    input_ids = torch.randint(10, 400, (1, 60))
    model(input_ids=input_ids)
    with pytest.raises(ValueError, match="60 prompt\\+image tokens \\+ 8 answer tokens = 68 positions"):
        model.diffusion_generate(input_ids, gen_length=8, steps=8)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(input_ids=torch.randint(10, 400, (1, 65)))

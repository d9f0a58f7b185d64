"""LaViDa's single-view image layouts (image_aspect_ratio "pad" / "square", lavida-llada-1.0-lowres) against
restatements of LaViDa's code: llava/mm_utils.py process_images ("pad": expand2square with the colour
int(255 mean), then SigLIP's preprocessing), and llava/model/llava_arch.py prepare_inputs_labels_for_multimodal on a
4-D image tensor (what its lmms-eval model passes for these layouts): encode_images alone, no pooling, no
image_newline, the features written in place of the prompt's one image placeholder. SHIRG's high-resolution
selection on that layout, and the boundary errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model
from PIL import Image
from test_language_model import reference_llada
from transformers import SiglipVisionModel
from transformers.image_transforms import normalize, rescale, resize
from transformers.image_utils import ChannelDimension, PILImageResampling

from lavida_shirg import ShirgConfig
from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer

SIDE = ShirgConfig.from_preset("tiny").patches_per_side  # unpooled: every SigLIP token of the view
METHODS = ["full", "shirg-fixed", "shirg-v2", "shirg-x", "random", "top-norm", "visionzip", "divprune"]
# image sizes (width, height): wide and tall with odd and even borders, square, tiny
SIZES = [(60, 20), (21, 50), (37, 37), (3, 8)]


def noise_image(width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def lavida_expand2square(image, background):
    """llava/mm_utils.py expand2square: the image pasted centred (floor offsets) on a square of its longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def lavida_process_images(images, layout, view_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """process_images for "pad" / "square", then LaViDa's SigLipImageProcessor.preprocess (transformers' resize to
    view x view bicubic, rescale 1/255, normalize, channels first): (I, 3, S, S)."""
    views = []
    for image in images:
        if layout == "pad":
            image = lavida_expand2square(image, tuple(int(x * 255) for x in mean))
        array = resize(np.asarray(image.convert("RGB")), size=(view_size, view_size), resample=PILImageResampling.BICUBIC,
                       data_format=ChannelDimension.FIRST)
        array = rescale(array, scale=1 / 255, data_format=ChannelDimension.FIRST)
        views.append(normalize(array, mean=mean, std=std, data_format=ChannelDimension.FIRST))
    return torch.from_numpy(np.stack(views)).float()


def lavida_encode_images(model, images):
    """llava_arch.py encode_images: LaViDa's SigLIP tower (its last kept layer's hidden state, hidden_states[-1], so
    no post-layernorm) then mm_projector (Linear, erf GELU, Linear). A plain transformers SigLIP holding our tower's
    weights: (I, N, E)."""
    tower = SiglipVisionModel(model.config.vision_config).eval()
    missing = tower.load_state_dict(model.model.vision_tower.state_dict(), strict=False).missing_keys
    assert all("post_layernorm" in name for name in missing), missing
    features = tower(pixel_values=images, output_hidden_states=True).hidden_states[-1]
    projector = model.model.multi_modal_projector
    hidden = F.linear(features, projector.linear_1.weight, projector.linear_1.bias)
    return F.linear(F.gelu(hidden), projector.linear_2.weight, projector.linear_2.bias)


def lavida_splice(model, text_ids, image_features):
    """prepare_inputs_labels_for_multimodal for samples [text before, <image>, text after] of equal length: the text
    embedded by embed_tokens, the image's features in place of its placeholder. (B, L, E)."""
    embed = model.model.language_model.embed_tokens
    return torch.stack([torch.cat((embed(torch.tensor(before)), features, embed(torch.tensor(after))))
                        for (before, after), features in zip(text_ids, image_features)])


def single_view_model(layout="pad", **overrides):
    return build_tiny_model(image_aspect_ratio=layout, pooled_view_size=SIDE, **overrides)


@pytest.fixture(scope="module")
def pad_model():
    return single_view_model()


@pytest.fixture(scope="module")
def pad_processor(pad_model):
    return LavidaShirgProcessor.from_config(pad_model.config, build_tiny_tokenizer())


# ------------------------------------------------------------------------------------------------- pixel values


@pytest.mark.parametrize("layout", ["pad", "square"])
def test_pixel_values_equal_lavidas_process_images(layout):
    config = ShirgConfig.from_preset("tiny", image_aspect_ratio=layout, pooled_view_size=SIDE)
    processor = LavidaShirgProcessor.from_config(config, build_tiny_tokenizer())
    images = [noise_image(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    out = processor.image_processor(images)
    view = config.vision_config.image_size
    assert out["pixel_values"].shape == (len(SIZES), 3, view, view)  # one view per image
    assert out["image_sizes"].tolist() == [[h, w] for w, h in SIZES]
    torch.testing.assert_close(out["pixel_values"], lavida_process_images(images, layout, view), atol=1e-6, rtol=0)


def test_pad_colour_is_the_truncated_mean():
    """expand2square fills with int(0.5 * 255) = 127 (not round: 128): (127 / 255 - 0.5) / 0.5 after normalising."""
    config = ShirgConfig.from_preset("tiny", image_aspect_ratio="pad", pooled_view_size=SIDE)
    processor = LavidaShirgProcessor.from_config(config, build_tiny_tokenizer())
    pixels = processor.image_processor(noise_image(64, 16, 0))["pixel_values"][0]  # (3, 32, 32), image rows 12..19
    border = (127 / 255 - 0.5) / 0.5
    torch.testing.assert_close(pixels[:, :9], torch.full_like(pixels[:, :9], border), atol=1e-6, rtol=0)
    torch.testing.assert_close(pixels[:, -9:], torch.full_like(pixels[:, -9:], border), atol=1e-6, rtol=0)
    assert pixels[:, 13:19].std() > 0.1  # the (downscaled) noise image in the middle


# ------------------------------------------------------------------------------------- features, embeddings, logits


def test_image_features_are_lavidas_encode_images(pad_model):
    """LaViDa's 4-D path: every image's (S / patch)^2 projected tokens, unpooled, no image_newline, in order."""
    config = pad_model.config
    view = config.vision_config.image_size
    images = [noise_image(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    pixel_values = lavida_process_images(images, "pad", view)
    image_sizes = torch.tensor([[h, w] for w, h in SIZES])
    with torch.no_grad():
        features, valid, kept = pad_model.get_image_features(pixel_values, image_sizes)
        expected = lavida_encode_images(pad_model, pixel_values)  # (I, N, E)
    assert expected.shape[1] == SIDE * SIDE == pad_model.image_token_count((20, 60))
    assert features.shape == (len(SIZES) * SIDE * SIDE, config.text_config.hidden_size) and valid.all() and kept == ()
    torch.testing.assert_close(features, expected.flatten(0, 1), atol=1e-5, rtol=1e-5)


def test_embeddings_and_logits_equal_lavidas_multimodal_forward(pad_model, pad_processor):
    """Processor + model on two prompts against LaViDa's process_images, encode_images, splice and the LLaDA
    reference (test_language_model.reference_llada, fed the spliced embeddings as its embedding table)."""
    config = pad_model.config
    images = [noise_image(60, 20, 0), noise_image(21, 50, 1)]
    prompts = [pad_processor.build_prompt("What is written?")] * 2  # equal lengths: LaViDa's splice pads nothing
    inputs = pad_processor(images=images, text=prompts)
    ids = inputs["input_ids"]
    assert inputs["attention_mask"].all() and (ids == config.image_token_id).sum(1).tolist() == [SIDE * SIDE] * 2
    text_ids = []
    for prompt in prompts:
        before, after = prompt.split("<image>")
        text_ids.append((pad_processor.tokenizer(before).input_ids, pad_processor.tokenizer(after).input_ids))
    pixel_values = lavida_process_images(images, "pad", config.vision_config.image_size)
    torch.testing.assert_close(inputs["pixel_values"], pixel_values, atol=1e-6, rtol=0)
    with torch.no_grad():
        reference = lavida_splice(pad_model, text_ids, lavida_encode_images(pad_model, pixel_values))  # (B, L, E)
        embeds, mask, _ = pad_model.model.embed_inputs(ids, inputs["attention_mask"], inputs["pixel_values"],
                                                       inputs["image_sizes"])
        logits = pad_model(**inputs).logits
        state = dict(pad_model.state_dict())
        state["model.language_model.embed_tokens.weight"] = reference.flatten(0, 1)
        positions = torch.arange(reference.shape[0] * reference.shape[1]).view(reference.shape[:2])
        expected = reference_llada(state, config, positions, torch.ones_like(positions))
    assert embeds.shape == reference.shape and mask.all()
    torch.testing.assert_close(embeds, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.double(), expected, atol=2e-4, rtol=1e-4)


def test_square_layout_resizes_without_padding():
    model = single_view_model("square")
    image = noise_image(60, 20, 3)
    pixel_values = lavida_process_images([image], "square", model.config.vision_config.image_size)
    with torch.no_grad():
        features, _, _ = model.get_image_features(pixel_values, torch.tensor([[20, 60]]))
        torch.testing.assert_close(features, lavida_encode_images(model, pixel_values)[0], atol=1e-5, rtol=1e-5)


def test_pooled_single_view_follows_pooled_view_size():
    """pooled_view_size below the patches per side pools the one view bilinearly, as the anyres views are."""
    model = build_tiny_model(image_aspect_ratio="pad")
    p = model.config.pooled_view_size
    assert p < SIDE and model.image_token_count((20, 60)) == p * p
    pixel_values = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        features, _, _ = model.get_image_features(pixel_values, torch.tensor([[20, 60], [50, 21]]))
        encoded = lavida_encode_images(model, pixel_values).transpose(1, 2).reshape(2, -1, SIDE, SIDE)
    pooled = F.interpolate(encoded, size=(p, p), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(features, pooled.flatten(0, 1), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- SHIRG selection


def image_embeds(model, inputs):
    """The embeddings at the image positions of a processor batch, (B, N, E) (every sample holds one image)."""
    names = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "hires_pixel_values", "question_mask")
    embeds = model.model.embed_inputs(*(inputs[name] for name in names), inputs["selection"])[0]
    is_image = inputs["input_ids"] == model.config.image_token_id
    return embeds[is_image].view(is_image.shape[0], -1, embeds.shape[-1])


@pytest.mark.parametrize("method", METHODS)
def test_high_resolution_selection_does_not_depend_on_the_base_layout(pad_model, pad_processor, method):
    """hires_source 'single-view' reads its own view (the whole image at hires_image_size): the same weights select
    the same tokens under "pad" and "anyres"; SHIRG-X's global-view scaffold is the layout's own (unpooled) view."""
    anyres_model = build_tiny_model(pooled_view_size=SIDE)
    anyres_processor = LavidaShirgProcessor.from_config(anyres_model.config, build_tiny_tokenizer())
    images = [noise_image(60, 20, 0), noise_image(21, 50, 1)]
    prompts = [pad_processor.build_prompt("What is written?"), pad_processor.build_prompt("Who is it?")]
    pad_inputs = pad_processor(images=images, text=prompts, selection_method=method, selection_budget=40)
    anyres_inputs = anyres_processor(images=images, text=prompts, selection_method=method, selection_budget=40)
    torch.testing.assert_close(pad_inputs["hires_pixel_values"], anyres_inputs["hires_pixel_values"])
    with torch.no_grad():
        logits = pad_model(**pad_inputs).logits
        answer = pad_model.diffusion_generate(**pad_inputs, gen_length=4, steps=4)
        ours, theirs = image_embeds(pad_model, pad_inputs), image_embeds(anyres_model, anyres_inputs)
        own_view = lavida_encode_images(pad_model, pad_inputs["pixel_values"])  # (2, SIDE^2, E)
    assert torch.isfinite(logits).all() and answer.shape == (2, 4)
    scaffold = SIDE * SIDE if method == "shirg-x" else 0  # SHIRG-X: the scaffold first, then the kept tokens
    assert ours.shape[1] == pad_model.image_token_count((20, 60), method, 40) == theirs.shape[1]
    torch.testing.assert_close(ours[:, :scaffold], own_view[:, :scaffold], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[:, scaffold:], theirs[:, scaffold:])


def test_anyres_views_source_is_refused_on_a_single_view_layout(pad_model, pad_processor):
    message = r"hires_source='anyres-views' selects among the anyres views, which image_aspect_ratio='pad' does not"
    with pytest.raises(ValueError, match=message):
        ShirgConfig.from_preset("tiny", image_aspect_ratio="pad", hires_source="anyres-views")
    with pytest.raises(ValueError, match=message):
        pad_processor(images=[noise_image(60, 20, 0)], text=[pad_processor.build_prompt("What?")],
                      selection_method="full", selection_options={"hires_source": "anyres-views"})
    with pytest.raises(ValueError, match=message):
        pad_model.image_token_count((20, 60), "full", options={"hires_source": "anyres-views"})


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match=r"image_aspect_ratio must be one of \('anyres', 'pad', 'square'\), got 'crop'"):
        ShirgConfig.from_preset("tiny", image_aspect_ratio="crop")
    from lavida_shirg.image_processing_lavida_shirg import LavidaShirgImageProcessor

    with pytest.raises(ValueError, match=r"image_aspect_ratio must be one of .*got 'highres'"):
        LavidaShirgImageProcessor(32, [[32, 64]], image_aspect_ratio="highres")


def test_processor_round_trip_keeps_the_layout(pad_processor, tmp_path):
    pad_processor.save_pretrained(tmp_path)
    loaded = LavidaShirgProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert loaded.image_processor.image_aspect_ratio == "pad"
    assert loaded.image_token_count((20, 60)) == SIDE * SIDE
    image = noise_image(21, 50, 2)
    torch.testing.assert_close(loaded.image_processor(image)["pixel_values"],
                               pad_processor.image_processor(image)["pixel_values"])

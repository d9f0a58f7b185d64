"""SHIRG wired into the model: every variant from one loaded model, layouts, counts, gradients, learned parts."""

import numpy as np
import pytest
import torch
from conftest import build_tiny_model
from PIL import Image

from lavida_shirg import ShirgConfig
from lavida_shirg.pooling import pool_view_features
from lavida_shirg.prefix_cache import PrefixCache
from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from lavida_shirg.shirg_selection import gather_tokens, image_token_count, select_tokens
from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer

METHODS = ["full", "shirg-fixed", "shirg-v2", "shirg-x", "random", "top-norm", "visionzip", "divprune"]


def page(width, height, seed):
    """A white canvas with dark rectangles ("text") at random places."""
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    for _ in range(6):
        top, left = rng.integers(0, height - 6), rng.integers(0, width - 12)
        pixels[top : top + 4, left : left + 10] = rng.integers(0, 80, 3)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def processor():
    return LavidaShirgProcessor.from_config(ShirgConfig.from_preset("tiny"), build_tiny_tokenizer())


@pytest.fixture(scope="module")
def batch_parts(processor):
    prompts = [processor.build_prompt("What is the price of the red box?"), processor.build_prompt("Who wrote it?")]
    images = [page(90, 60, 0), page(50, 80, 1)]
    return images, prompts


def inputs_for(processor, batch_parts, method, budget=None, options=None, answers=None):
    images, prompts = batch_parts
    return processor(images=images, text=prompts, answers=answers, selection_method=method, selection_budget=budget,
                     selection_options=options)


def call_args(method, budget=None, options=None):
    return dict(selection_method=method, selection_budget=budget, selection_options=options)


def embed(model, inputs, settings):
    """model.model.embed_inputs on a processor batch: (embeds (B, L, D), attention mask (B, L))."""
    return model.model.embed_inputs(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                    inputs["image_sizes"], inputs.get("hires_pixel_values"), inputs["question_mask"],
                                    settings)[:2]


@pytest.mark.parametrize("method", METHODS)
def test_every_variant_runs_from_one_model(tiny_model, processor, batch_parts, method):
    inputs = inputs_for(processor, batch_parts, method, 40)
    expected = image_token_count((60, 90), processor.selection(method, 40))
    assert expected == tiny_model.image_token_count((60, 90), method, 40)
    assert int((inputs["input_ids"][0] == tiny_model.config.image_token_id).sum()) == expected
    logits = tiny_model(**inputs, **call_args(method, 40)).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
    answer = tiny_model.diffusion_generate(**inputs, **call_args(method, 40), gen_length=4, steps=4)
    assert answer.shape == (2, 4)


def test_kept_tokens_are_projected_tokens_in_raster_order(tiny_model, processor, batch_parts):
    inputs = inputs_for(processor, batch_parts, "shirg-fixed", 40)
    embeds, _ = embed(tiny_model, inputs, tiny_model.selection_settings("shirg-fixed", 40))
    features, _ = tiny_model.model.vision_features(inputs["hires_pixel_values"])
    projected = tiny_model.multi_modal_projector(features)
    question_embeds = tiny_model.language_model.embed_tokens(inputs["input_ids"].masked_fill(
        inputs["input_ids"] == tiny_model.config.image_token_id, 0))
    selection = select_tokens("shirg-fixed", features, projected, (16, 16), 40, question_embeds,
                              inputs["question_mask"], coverage_region_size=4, detail_term=tiny_model.config.detail_term,
                              pixels=inputs["hires_pixel_values"], patch_size=tiny_model.config.vision_config.patch_size)
    assert torch.equal(selection.indices, selection.indices.sort(dim=1).values)
    is_image = inputs["input_ids"] == tiny_model.config.image_token_id
    for sample in range(2):
        torch.testing.assert_close(embeds[sample][is_image[sample]], gather_tokens(projected, selection.indices)[sample])


def test_selection_follows_each_samples_question(tiny_model, processor):
    """The same image with two questions: relevance (weight 1, one-token regions) picks per-sample tokens."""
    image = page(64, 64, 3)
    prompts = [processor.build_prompt("red price total"), processor.build_prompt("Who wrote the title?")]
    options = dict(relevance_weight=1.0, detail_weight=0.0, coverage_region_size=16)
    inputs = processor(images=[image, image], text=prompts, selection_method="shirg-fixed", selection_budget=20,
                       selection_options=options)
    settings = tiny_model.selection_settings("shirg-fixed", 20, options)
    embeds, _ = embed(tiny_model, inputs, settings)
    is_image = inputs["input_ids"] == tiny_model.config.image_token_id
    assert not torch.allclose(embeds[0][is_image[0]], embeds[1][is_image[1]])
    single = processor(images=[image], text=prompts[1:], selection_method="shirg-fixed", selection_budget=20,
                       selection_options=options)
    alone, _, _ = tiny_model.model.embed_inputs(single["input_ids"], single["attention_mask"], single["pixel_values"],
                                       single["image_sizes"], single["hires_pixel_values"], single["question_mask"],
                                       settings)
    torch.testing.assert_close(alone[0][single["input_ids"][0] == tiny_model.config.image_token_id],
                               embeds[1][is_image[1]])


def test_shirg_x_layout_starts_with_lavidas_global_view(tiny_model, processor, batch_parts):
    inputs = inputs_for(processor, batch_parts, "shirg-x", 40)
    settings = tiny_model.selection_settings("shirg-x", 40)
    embeds, _ = embed(tiny_model, inputs, settings)
    p = tiny_model.config.pooled_view_size
    global_view = pool_view_features(tiny_model.model.encode_views(inputs["pixel_values"][:1]), p)[0]
    first_image = embeds[0][inputs["input_ids"][0] == tiny_model.config.image_token_id]
    torch.testing.assert_close(first_image[: p * p], global_view)


def test_shirg_v2_ends_with_the_summary_of_dropped_tokens(tiny_model, processor, batch_parts):
    inputs = inputs_for(processor, batch_parts, "shirg-v2", 40)
    settings = tiny_model.selection_settings("shirg-v2", 40)
    embeds, _ = embed(tiny_model, inputs, settings)
    features, _ = tiny_model.model.vision_features(inputs["hires_pixel_values"])
    projected = tiny_model.multi_modal_projector(features)[0]  # (N, E)
    image = embeds[0][inputs["input_ids"][0] == tiny_model.config.image_token_id]  # (K + 1, E)
    kept = (image[:-1, None, :] == projected[None]).all(-1).any(0)  # (N,) which projected tokens were kept
    assert int(kept.sum()) == 40
    torch.testing.assert_close(image[-1], projected[~kept].mean(0))


def test_visionzip_attention_equals_eager_siglip_attention(tiny_model, processor, batch_parts):
    from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion

    inputs = inputs_for(processor, batch_parts, "visionzip", 40)
    _, received = tiny_model.model.vision_features(inputs["hires_pixel_values"], with_attention=True)
    eager = LavidaShirgForMaskedDiffusion(tiny_model.config).eval()
    eager.load_state_dict(tiny_model.state_dict())
    eager.vision_tower.set_attn_implementation("eager")
    outputs = eager.vision_tower(inputs["hires_pixel_values"], interpolate_pos_encoding=True, output_attentions=True)
    expected = outputs.attentions[-1].mean(dim=(1, 2))  # (I, N): mean over heads and queries
    torch.testing.assert_close(received, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(received.sum(1), torch.ones(2), atol=1e-5, rtol=0)


def test_gradients_reach_projector_through_kept_tokens():
    model = build_tiny_model(seed=2, coordinate_embedding=True).train()
    processor = LavidaShirgProcessor.from_config(model.config, build_tiny_tokenizer())
    inputs = processor(images=[page(70, 50, 4)], text=[processor.build_prompt("What is the price?")],
                       answers=["12 dollars"], selection_method="shirg-x", selection_budget=40)
    loss = model(**inputs, selection_method="shirg-x", selection_budget=40,
                 generator=torch.Generator().manual_seed(0)).loss
    loss.backward()
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert model.model.token_selector.coordinate_embedding.weight.grad.abs().sum() > 0
    assert model.vision_tower.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_coordinate_embedding_starts_at_zero(processor, batch_parts):
    plain = build_tiny_model(seed=5)
    with_coordinates = build_tiny_model(seed=5, coordinate_embedding=True)
    missing, unexpected = with_coordinates.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["model.token_selector.coordinate_embedding.bias",
                              "model.token_selector.coordinate_embedding.weight"] and not unexpected
    with torch.no_grad():
        # the test helper randomised every parameter
        with_coordinates.model.token_selector.coordinate_embedding.reset_parameters()
    inputs = inputs_for(processor, batch_parts, "shirg-x", 40)
    torch.testing.assert_close(with_coordinates(**inputs, **call_args("shirg-x", 40)).logits,
                               plain(**inputs, **call_args("shirg-x", 40)).logits)
    fresh = ShirgConfig.from_preset("tiny", coordinate_embedding=True, adaptive_budget=True)
    from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion

    model = LavidaShirgForMaskedDiffusion(fresh)
    selector = model.model.token_selector
    assert selector.coordinate_embedding.weight.abs().sum() == 0, "post_init keeps the zero initialisation"
    assert selector.budget_head.output_bias.argmax() == 1, "the untrained head picks the default budget (64)"


def test_adaptive_budget_masks_the_positions_beyond_each_images_budget(processor, batch_parts):
    from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion

    model = LavidaShirgForMaskedDiffusion(ShirgConfig.from_preset("tiny", adaptive_budget=True)).eval()
    inputs = inputs_for(processor, batch_parts, "shirg-fixed", options=dict(adaptive_budget=True))
    assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == 96, "max(budget_choices) positions"
    _, mask = embed(model, inputs, model.selection_settings("shirg-fixed", options=dict(adaptive_budget=True)))
    is_image = inputs["input_ids"] == model.config.image_token_id
    assert (mask.bool() & is_image).sum(1).tolist() == [64, 64]  # the untrained head's default budget
    assert torch.equal(mask.bool() & ~is_image, inputs["attention_mask"].bool() & ~is_image)
    answer = model.diffusion_generate(**inputs, selection_method="shirg-fixed",
                                      selection_options=dict(adaptive_budget=True), gen_length=4, steps=4)
    assert answer.shape == (2, 4)


def test_mismatched_processor_and_model_settings_raise(tiny_model, processor, batch_parts):
    inputs = inputs_for(processor, batch_parts, "shirg-fixed", 40)
    with pytest.raises(ValueError, match=r"the inputs were built for \{'selection_budget': 40\} \(the processor's "
                                         r"`selection`\) but this call asks for \{'selection_budget': 48\}"):
        tiny_model(**inputs, **call_args("shirg-fixed", 48))
    inputs.pop("selection")  # inputs built by hand: the model's settings are checked against the image positions
    with pytest.raises(ValueError, match="image tokens per sample but the images need"):
        tiny_model(**inputs, **call_args("shirg-fixed", 48))
    pooled = inputs_for(processor, batch_parts, "pooled")
    with pytest.raises(ValueError, match="needs hires_pixel_values of shape \\(2, 3, 64, 64\\)"):
        tiny_model(**{k: v for k, v in inputs.items() if k != "hires_pixel_values"}, **call_args("shirg-fixed", 40))
    assert pooled["input_ids"].shape != inputs["input_ids"].shape


def test_text_conditioned_methods_need_a_question(tiny_model, processor, batch_parts):
    inputs = inputs_for(processor, batch_parts, "shirg-fixed", 40)
    without = {k: v for k, v in inputs.items() if k != "question_mask"}
    with pytest.raises(ValueError, match="pass question_mask"):
        tiny_model(**without, **call_args("shirg-fixed", 40))
    empty = dict(inputs, question_mask=torch.zeros_like(inputs["question_mask"]))
    with pytest.raises(ValueError, match="question_mask marks no usable question token"):
        tiny_model(**empty, **call_args("shirg-fixed", 40))
    text_free = dict(relevance_weight=0.0)
    inputs = inputs_for(processor, batch_parts, "shirg-fixed", 40, text_free)
    tiny_model(**{k: v for k, v in inputs.items() if k != "question_mask"}, **call_args("shirg-fixed", 40, text_free))


def test_bad_selection_arguments(tiny_model, processor, batch_parts):
    inputs = inputs_for(processor, batch_parts, "pooled")
    inputs.pop("selection")  # the call's own settings are validated
    for kwargs, match in [
        (call_args("best"), "selection_method must be one of"),
        (call_args("shirg-fixed", 0), "selection_budget must be a positive integer at most the 256"),
        (call_args("shirg-fixed", 257), "at most the 256"),
        (call_args("shirg-fixed", 40, dict(budget_choices=[0, 64])), "budget_choices"),
        (call_args("shirg-x", 40, dict(coordinate_embedding=True)), "coordinate_embedding=True needs a model"),
        (call_args("visionzip", 8), "visionzip_contextual_tokens \\(8\\) must be smaller"),
        (call_args("shirg-v2", 40, dict(v2_detail_weight=2.0)), "v2_detail_weight must be in \\[0, 1\\]"),
        (call_args("shirg-v2", 40, dict(alpha=0.1)), "unknown selection options \\['alpha'\\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            tiny_model(**inputs, **kwargs)


def test_real_size_high_resolution_counts():
    config = ShirgConfig.from_preset("lavida-llada")
    layout = {**config.token_layout()}
    for method, budget, expected in [("full", 768, 2304), ("shirg-fixed", 768, 768), ("shirg-v2", 512, 513),
                                     ("shirg-x", 768, 768 + 196), ("visionzip", 1024, 1024)]:
        layout.update(selection_method=method, selection_budget=budget)
        assert image_token_count((480, 640), layout) == expected
    layout.update(selection_method="pooled")
    assert image_token_count((480, 640), layout) == 834


def test_learned_parts_start_neutral_when_added_to_a_converted_checkpoint(tiny_model, tmp_path):
    """A LaViDa checkpoint has no SHIRG weights: loading it with the learned parts on initialises them neutrally."""
    from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion

    tiny_model.save_pretrained(tmp_path)
    model = LavidaShirgForMaskedDiffusion.from_pretrained(tmp_path, coordinate_embedding=True, adaptive_budget=True)
    selector = model.model.token_selector
    assert selector.coordinate_embedding.weight.abs().sum() == 0 and selector.coordinate_embedding.bias.abs().sum() == 0
    assert selector.budget_head.output_weight.abs().sum() == 0
    assert selector.budget_head.output_bias.tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(model.lm_head.weight, tiny_model.lm_head.weight)


ANYRES = dict(hires_source="anyres-views")


@pytest.mark.parametrize("method", ["full", "shirg-fixed", "shirg-v2", "shirg-x", "visionzip", "divprune"])
def test_anyres_views_source(tiny_model, processor, batch_parts, method):
    """LaViDa's own views left unpooled: V x P tokens per image, no hires_pixel_values, one selection per image."""
    inputs = inputs_for(processor, batch_parts, method, 40, ANYRES)
    assert "hires_pixel_values" not in inputs
    full = [5 * 64, 5 * 64]  # both images take the 2 x 2 pinpoint: global + 4 crops of 8 x 8 tokens
    expected = {"full": full, "shirg-v2": [41, 41], "shirg-x": [56, 56]}.get(method, [40, 40])
    assert (inputs["input_ids"] == tiny_model.config.image_token_id).sum(1).tolist() == expected
    logits = tiny_model(**inputs, **call_args(method, 40, ANYRES)).logits
    assert torch.isfinite(logits).all()


def test_anyres_coverage_keeps_every_view(tiny_model, processor, batch_parts):
    """With the budget equal to the region count, every region of every view keeps exactly one token."""
    options = dict(ANYRES, coverage_region_size=4, relevance_weight=0.0, detail_weight=1.0)
    inputs = inputs_for(processor, batch_parts, "shirg-fixed", 20, options)
    embeds, _, _ = tiny_model.model.embed_inputs(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                        inputs["image_sizes"], None, inputs["question_mask"],
                                        tiny_model.selection_settings("shirg-fixed", 20, options))
    projected = tiny_model.model.encode_views(inputs["pixel_values"][:5]).flatten(0, 1)  # first image: 5 views x 64
    kept = embeds[0][inputs["input_ids"][0] == tiny_model.config.image_token_id]  # (20, E)
    indices = (kept[:, None, :] == projected[None]).all(-1).float().argmax(1)
    region = (indices // 64) * 4 + ((indices % 64) // 8 // 4) * 2 + (indices % 8) // 4
    assert sorted(region.tolist()) == list(range(20))


def test_anyres_budget_must_fit_every_image(tiny_model, processor, batch_parts):
    """The budget is checked once, with the settings: it must fit the image with the fewest views (global + 2 crops
    of 8 x 8 tokens in the tiny preset's pinpoints), whatever the images of a call."""
    wide = ([page(96, 30, 5)], [processor.build_prompt("What?")])  # 1 x 3 crops: 4 views x 64 = 256 tokens
    for budget in (193, 300):
        with pytest.raises(ValueError, match="selection_budget must be a positive integer at most the 192 high-"
                                             f"resolution tokens of the image with the fewest anyres views, "
                                             f"got {budget}"):
            inputs_for(processor, wide, "shirg-fixed", budget, ANYRES)
    inputs = inputs_for(processor, wide, "shirg-fixed", 192, ANYRES)
    assert int((inputs["input_ids"] == tiny_model.config.image_token_id).sum()) == 192
    with pytest.raises(ValueError, match="x_scaffold='grid' pools a single high-resolution view"):
        tiny_model.selection_settings("shirg-x", 40, dict(ANYRES, x_scaffold="grid"))


@pytest.mark.parametrize("options", [None, ANYRES])
def test_several_images_per_sample_use_their_samples_question(tiny_model, processor, options):
    images = [page(90, 60, 0), page(64, 64, 1), page(50, 80, 2)]
    prompts = [processor.build_prompt("Compare the two prices.", num_images=2), processor.build_prompt("Who?")]
    settings = tiny_model.selection_settings("shirg-fixed", 24, options)
    both = processor(images=images, text=prompts, selection_method="shirg-fixed", selection_budget=24,
                     selection_options=options)
    alone = processor(images=images[2:], text=prompts[1:], selection_method="shirg-fixed", selection_budget=24,
                      selection_options=options)
    image_id = tiny_model.config.image_token_id
    results = []
    for inputs in (both, alone):
        embeds, _ = embed(tiny_model, inputs, settings)
        results.append(embeds[-1][inputs["input_ids"][-1] == image_id])
    assert (both["input_ids"] == image_id).sum(1).tolist() == [48, 24]
    torch.testing.assert_close(results[0], results[1])


def test_inspect_selection_reports_what_is_kept(tiny_model, processor, batch_parts):
    inputs = inputs_for(processor, batch_parts, "shirg-fixed", 40)
    (entry,) = tiny_model.inspect_selection(**inputs, selection_method="shirg-fixed", selection_budget=40)
    assert entry["images"] == [0, 1] and entry["grid"] == (16, 16) and entry["view_boxes"] is None
    assert entry["indices"].shape == (2, 40) and entry["scores"].shape == (2, 256)
    anyres = inputs_for(processor, batch_parts, "shirg-fixed", 40, ANYRES)
    entries = tiny_model.inspect_selection(**anyres, selection_method="shirg-fixed", selection_budget=40,
                                           selection_options=ANYRES)
    assert [e["images"] for e in entries] == [[0], [1]] and entries[0]["grid"] == (5, 8, 8)
    assert entries[0]["view_boxes"].shape == (5, 4)
    assert tiny_model.inspect_selection(**inputs_for(processor, batch_parts, "pooled")) == []



def test_forward_returns_what_the_selection_kept(tiny_model, processor, batch_parts):
    """The selection diagnostics come back in the output (as LLaVA-NeXT's image_hidden_states), equal to
    inspect_selection's, for every sample of the batch."""
    inputs = inputs_for(processor, batch_parts, "shirg-fixed", 40)
    (kept,) = tiny_model(**inputs).image_selections
    (inspected,) = tiny_model.inspect_selection(**inputs)
    assert kept["images"] == [0, 1] and torch.equal(kept["indices"], inspected["indices"])
    torch.testing.assert_close(kept["scores"], inspected["scores"])
    assert tiny_model(**inputs_for(processor, batch_parts, "pooled")).image_selections == ()


@pytest.mark.parametrize("storage,byte_ratio,tolerance", [("bfloat16", 0.5, 0.02), ("float16", 0.5, 0.005),
                                                          ("float8_e4m3fn", 0.25, 0.25)])
def test_kv_cache_storage_dtypes(tiny_model, processor, batch_parts, storage, byte_ratio, tolerance):
    """Smaller storage of the prefix cache: bytes shrink by the dtype ratio, first-step logits move a bounded amount."""
    inputs = inputs_for(processor, batch_parts, "pooled")
    embeds, mask, _ = tiny_model.model.embed_inputs(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                           inputs["image_sizes"])
    full, small = (tiny_model.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True,
                                    past_key_values=PrefixCache(kv_dtype)).past_key_values for kv_dtype in (None, storage))
    scales = 0 if storage != "float8_e4m3fn" else sum(s.numel() * 4 for pair in small.layers for _, s in pair)
    assert small.nbytes() - scales == full.nbytes() * byte_ratio
    canvas = torch.full((2, 8), tiny_model.config.mask_token_id)
    answer = tiny_model.language_model.embed_tokens(canvas)
    full_mask = torch.cat((mask, torch.ones(2, 8, dtype=mask.dtype)), 1)
    logits = [tiny_model(inputs_embeds=answer, attention_mask=full_mask, past_key_values=cache).logits
              for cache in (full, small)]
    change = (logits[1] - logits[0]).abs().amax() / logits[0].abs().amax()
    assert 0 < change < tolerance
    with pytest.raises(ValueError, match="kv_cache_dtype must be None or one of"):
        PrefixCache("int4")


def test_generation_with_a_smaller_kv_cache(tiny_model, processor, batch_parts):
    inputs = inputs_for(processor, batch_parts, "pooled")
    exact = tiny_model.diffusion_generate(**inputs, gen_length=8, steps=8)
    half = tiny_model.diffusion_generate(**inputs, gen_length=8, steps=8, kv_cache_dtype="float16")
    assert half.shape == exact.shape and (half == exact).float().mean() > 0.5
    with pytest.raises(ValueError, match="kv_cache_dtype stores the prefix cache: it needs use_prefix_cache=True"):
        tiny_model.diffusion_generate(**inputs, gen_length=8, steps=8, kv_cache_dtype="float16", use_prefix_cache=False)

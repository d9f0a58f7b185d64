"""LaViDa-LLaDA, HF-native: SigLIP vision tower -> 2-layer MLP projector -> bidirectional LLaDA masked-diffusion LM.

Data flow (shapes for the real checkpoint):
    pixel_values (V, 3, 384, 384) -> SigLIP, 26 layers, no post-norm -> (V, 729, 1152)
    -> projector -> (V, 729, 4096) -> bilinear pool 27x27 -> 14x14 -> (V, 196, 4096)
    -> anyres layout (global view, then stitched crops, unpadded, with a newline token per row)
    -> written into the image positions of the token embeddings -> LLaDA -> logits over the vocabulary.
Token selection (SHIRG) plugs in between the vision features and the projector's output (shirg_selection).

Classes, on transformers' composite template (LlavaModel / LlavaForConditionalGeneration):
    LavidaShirgModel: vision tower, selection, projector, LLaDA -> hidden states.
    LavidaShirgForMaskedDiffusion: the model + lm_head, LaViDa's diffusion loss, generate() / diffusion_generate().
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, SiglipVisionModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import ModelOutput

from .configuration_lavida_shirg import ShirgConfig
from .generation_lavida_shirg import LavidaShirgGenerationConfig, LavidaShirgGenerationMixin
from .image_layout import pooled_layout, source_grid
from .likelihood import LikelihoodMixin
from .masked_diffusion import sample_complementary_masks
from .modeling_dream import DreamModel
from .modeling_llada import LladaModel, check_sequence_length, positions_from_mask
from .pooling import pool_view_features
from .prefix_cache import PrefixCache
from .shirg_selection import (METHODS, AdaptiveBudgetHead, CoordinateEmbedding, SelectionInputs, TokenSelector,
                              image_token_count)

IGNORE_INDEX = -100  # label of positions that are not diffusion targets (prompt, image, template)
# text_config.model_type -> the language model class built for it
LANGUAGE_MODELS = {model.config_class.model_type: model for model in (LladaModel, DreamModel)}


class LavidaMultiModalProjector(nn.Module):
    """LaViDa's mlp2x_gelu: y = W2 gelu(W1 x + b1) + b2 (exact erf GELU)."""

    def __init__(self, config: ShirgConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, features):
        return self.linear_2(self.act(self.linear_1(features)))


def attention_received(layer, hidden_states):
    """Attention each token receives in a SigLIP encoder layer: a[b, n] = mean_{h, q} softmax(q k^T / sqrt(d))[q, n].

    Recomputed from the layer's input `hidden_states` (B, N, D) one head at a time (memory B N^2). Returns (B, N).
    """
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden_states)
    batch, num, _ = normed.shape
    queries = attention.q_proj(normed).view(batch, num, attention.num_heads, -1)
    keys = attention.k_proj(normed).view(batch, num, attention.num_heads, -1)
    received = torch.zeros(batch, num, dtype=torch.float32, device=normed.device)
    for head in range(attention.num_heads):
        scores = torch.bmm(queries[:, :, head].float(), keys[:, :, head].float().transpose(1, 2)) * attention.scale
        received += scores.softmax(dim=-1).mean(dim=1)
    return received / attention.num_heads


def anyres_view_boxes(rows, cols):
    """Canvas boxes (x0, y0, w, h) of one image's anyres views (1 + rows cols, 4): the global view covers the canvas,
    crop (r, c) covers (c / cols, r / rows, 1 / cols, 1 / rows)."""
    r = torch.arange(rows, dtype=torch.float32).repeat_interleave(cols)
    c = torch.arange(cols, dtype=torch.float32).repeat(rows)
    crops = torch.stack([c / cols, r / rows, torch.full_like(r, 1 / cols), torch.full_like(r, 1 / rows)], dim=-1)
    return torch.cat([torch.tensor([[0.0, 0.0, 1.0, 1.0]]), crops])


@dataclass
class LavidaShirgModelOutput(ModelOutput):
    """last_hidden_state: the LM's final hidden states (B, T, E); past_key_values: the PrefixCache a use_cache call
    filled (the name transformers 5.17 uses; our own field, so no rename warning under later versions);
    hidden_states: with output_hidden_states, the (num_layers + 1) hidden states (B, T, E); image_selections: what
    each selection call kept (dicts of images, grid, view_boxes, indices, scores; empty for pooled), as LLaVA-NeXT
    returns its image hidden states."""

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: PrefixCache | None = None
    hidden_states: tuple | None = None
    image_selections: tuple | None = None


@dataclass
class MaskedDiffusionOutput(ModelOutput):
    """loss: the diffusion loss (with labels); logits: (B, T, V) of the sequence as given (without labels), or with
    labels and output_logits=True, (2B, T, V) of its two complementary masked copies (`diffusion_masks` (2B, T)
    marks the masked targets of each copy); hidden_states: with output_hidden_states, the LM's (num_layers + 1)
    hidden states (B, T, E) of the sequence as given; past_key_values: the PrefixCache a use_cache call filled;
    image_selections: what each selection call kept (see LavidaShirgModelOutput)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: PrefixCache | None = None
    hidden_states: tuple | None = None
    diffusion_masks: torch.BoolTensor | None = None
    image_selections: tuple | None = None


class LavidaShirgPreTrainedModel(PreTrainedModel):
    config_class = ShirgConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LladaDecoderLayer", "DreamDecoderLayer", "SiglipEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LavidaShirgModel):
            init.normal_(module.image_newline, mean=0.0, std=module.config.text_config.hidden_size**-0.5)
        elif isinstance(module, (CoordinateEmbedding, AdaptiveBudgetHead)):
            module.reset_parameters()  # zero coordinate embedding / default-budget head (after their Linear layers)


class LavidaShirgModel(LavidaShirgPreTrainedModel):
    """Vision tower + token selection + projector + LLaDA: input ids and images -> the LM's hidden states.

    Image positions in `input_ids` hold `config.image_token_id` (one per image token, as the processor writes them);
    the image tokens of the call's selection settings are written there in order.
    """

    def __init__(self, config: ShirgConfig):
        super().__init__(config)
        self.vision_tower = SiglipVisionModel(config.vision_config)
        # LaViDa reads the last kept encoder layer directly: no post-layernorm, no pooling head.
        self.vision_tower.post_layernorm = nn.Identity()
        self.multi_modal_projector = LavidaMultiModalProjector(config)
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))
        self.language_model = LANGUAGE_MODELS[config.text_config.model_type](config.text_config)
        self.token_selector = TokenSelector(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.embed_tokens = value

    def vision_features(self, pixel_values, with_attention=False):
        """SigLIP features (V, N, D) of views (V, 3, S, S), N = (S / patch)^2, without post-norm; position embeddings
        interpolated (transformers' interpolate_pos_encoding) when S is not the native size. With `with_attention`,
        also the attention each token receives in the last layer: mean over heads and queries (V, N)."""
        native = self.config.vision_config.image_size
        outputs = self.vision_tower(
            pixel_values=pixel_values.to(self.vision_tower.dtype),
            interpolate_pos_encoding=pixel_values.shape[-1] != native or pixel_values.shape[-2] != native,
            output_hidden_states=with_attention,
        )
        received = None
        if with_attention:
            received = attention_received(self.vision_tower.encoder.layers[-1], outputs.hidden_states[-2])
        return outputs.last_hidden_state, received

    def encode_views(self, pixel_values):
        """SigLIP features of each view, projected to the LM width: (V, 3, S, S) -> (V, (S/patch)^2, E)."""
        return self.multi_modal_projector(self.vision_features(pixel_values)[0])

    def selection_settings(self, method=None, budget=None, options=None, selection=None):
        """The SHIRG settings of a call, validated against the learned modules this model has: `selection` (the
        settings the processor built the inputs for, carried by its output), else the config's; `method`, `budget`
        and `options` override the config's and, with `selection`, must agree with it."""
        if selection is None:
            settings = self.config.selection_settings(method, budget, options)
        else:
            settings = selection
            asked = {**(options or {}), "selection_method": method, "selection_budget": budget}
            differing = {name: value for name, value in asked.items()
                         if value is not None and (name not in settings or settings[name] != value)}
            if differing:
                built = {name: settings[name] if name in settings else "unknown" for name in differing}
                raise ValueError(f"the inputs were built for {built} (the processor's `selection`) but this call asks "
                                 f"for {differing}: give the settings once, to the processor")
        selector = self.token_selector
        for name, module in (("coordinate_embedding", selector.coordinate_embedding),
                             ("adaptive_budget", selector.budget_head)):
            if settings[name] and module is None:
                raise ValueError(f"{name}=True needs a model built with config.{name}=True (it has no such module)")
        if settings.adaptive_budget and tuple(settings.budget_choices) != selector.budget_head.budgets:
            raise ValueError(f"budget_choices must be the budget head's {list(selector.budget_head.budgets)} under "
                             f"adaptive_budget, got {settings.budget_choices}")
        return settings

    def image_token_count(self, image_size, method=None, budget=None, options=None) -> int:
        """Image tokens the LM receives for one (height, width) image under the given selection settings."""
        return image_token_count(image_size, self.selection_settings(method, budget, options))

    def get_image_features(self, pixel_values, image_sizes, hires_pixel_values=None, question_embeds=None,
                           question_mask=None, settings=None):
        """Image tokens of every image, concatenated: features (sum_i N_i, E), a validity mask (sum_i N_i,) and what
        each selection call kept (a tuple of dicts: images, grid, view_boxes, indices, scores; empty for pooled).

        pooled (default): LaViDa's layout. Other methods select among high-resolution tokens (shirg_selection.METHODS,
        run by `token_selector`): hires_source 'single-view': the view `hires_pixel_values` (I, 3, S, S) through
        SigLIP (interpolated positions), all images in one batched selection; 'anyres-views': each image's own anyres
        views left unpooled (V x P tokens, coverage per view), one selection per image (their token counts differ).
        question_embeds (I, L, E) / question_mask (I, L): the question of each image's sample.
        image_sizes: (I, 2), a tensor or its rows as lists (see `views_of_images`).
        """
        settings = self.selection_settings() if settings is None else settings
        views = self.views_of_images(pixel_values, image_sizes)
        if settings.selection_method == "pooled":
            features = self.pooled_image_features(pixel_values, views)
            return features, torch.ones(features.shape[0], dtype=torch.bool, device=features.device), ()
        method = METHODS[settings.selection_method]
        expected = (len(views), 3, settings.hires_image_size, settings.hires_image_size)
        single_view = settings.hires_source == "single-view"
        if single_view and (hires_pixel_values is None or tuple(hires_pixel_values.shape) != expected):
            shape = None if hires_pixel_values is None else tuple(hires_pixel_values.shape)
            raise ValueError(f"selection_method={settings.selection_method!r} needs hires_pixel_values of shape "
                             f"{expected} (the processor's, called with the same method), got {shape}")
        if method.uses_question(settings):
            if question_mask is None:
                raise ValueError(f"selection_method={settings.selection_method!r} is text-conditioned: pass "
                                 "question_mask (the processor's) or set relevance_weight=0 (v2: v2_detail_weight=1)")
            has_question = question_mask.bool().any(dim=1)
            if not bool(has_question.all()):  # host read: relevance needs a question in every sample
                raise ValueError(f"question_mask marks no usable question token for sample(s) "
                                 f"{(~has_question).nonzero().flatten().tolist()}: relevance needs a question "
                                 "(select a text-free method such as 'top-norm', or set relevance_weight=0)")
        features, received = self.vision_features(hires_pixel_values if single_view else pixel_values,
                                                  method.needs_attention)  # (V, P, D), (V, P)
        groups = []  # (images, vision features, attention received, source views' pixels, grid, view boxes)
        if single_view:
            groups.append((list(range(len(views))), features, received, hires_pixel_values,
                           source_grid(None, settings)[1:], None))
        else:
            side = self.config.patches_per_side
            for image, ((rows, cols), _, start) in enumerate(views):
                group = slice(start, start + 1 + rows * cols)
                groups.append(([image], features[group].flatten(0, 1)[None],
                               None if received is None else received[group].flatten()[None], pixel_values[group],
                               (1 + rows * cols, side, side), anyres_view_boxes(rows, cols)))
        tokens, valid, selections = [], [], []
        for images, group_features, group_received, pixels, grid, boxes in groups:
            global_view = None
            if method.needs_global_view(settings):  # SHIRG-X's scaffold: the images' pooled LaViDa global views
                global_views = pixel_values[[views[i][2] for i in images]]
                global_view = pool_view_features(self.encode_views(global_views), self.config.pooled_view_size)
            question = (None, None) if question_mask is None else (question_embeds[images], question_mask[images])
            inputs = SelectionInputs(group_features, self.multi_modal_projector(group_features), grid, boxes,
                                     *question, pixels, self.config.vision_config.patch_size, group_received,
                                     global_view)
            group_tokens, group_valid, selection = self.token_selector(inputs, settings)
            selections.append(dict(images=images, grid=grid, view_boxes=boxes, indices=selection.indices,
                                   scores=selection.scores))
            tokens.append(group_tokens.flatten(0, 1))
            valid.append(group_valid.flatten())
        return torch.cat(tokens), torch.cat(valid), tuple(selections)

    def views_of_images(self, pixel_values, image_sizes):
        """Per image: ((rows, cols), unpad bounds, index of its global view); checks pixel_values' view count.
        Single-view layouts ("pad", "square"): ((0, 0), None, image index), the view alone.
        image_sizes: (I, 2) tensor, or its rows already read as [height, width] lists (`embed_inputs`)."""
        config = self.config
        p, view_size = config.pooled_view_size, config.vision_config.image_size
        layouts, start = [], 0
        if config.image_aspect_ratio != "anyres":
            layouts, start = [((0, 0), None, index) for index in range(len(image_sizes))], len(image_sizes)
        else:  # host read (unless done already): each image's crop grid, bounds and view count depend on its size
            for size in image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes:
                (rows, cols), bounds = pooled_layout(size, config.image_grid_pinpoints, view_size, p)
                layouts.append(((rows, cols), bounds, start))
                start += 1 + rows * cols
        if start != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} views but image_sizes implies {start}: pass the "
                "processor's pixel_values and image_sizes together"
            )
        return layouts

    def pooled_image_features(self, pixel_values, views):
        """LaViDa's pooled image tokens of every image, concatenated: (sum_i N_i, E).

        anyres, per image (views [global, crops row-major]): global p x p tokens, then the crops stitched into a
        (rows p, cols p) map, unpadded to the image's aspect ratio, with `image_newline` after every row.
        Single-view layouts: the view's p x p tokens, no newline (LaViDa's 4-D image path: encode_images alone).
        """
        p = self.config.pooled_view_size
        pooled = pool_view_features(self.encode_views(pixel_values), p)  # (V, p*p, E)
        dim = pooled.shape[-1]
        if self.config.image_aspect_ratio != "anyres":
            return pooled.reshape(-1, dim)  # (I p*p, E)
        tokens = []
        for (rows, cols), (top, bottom, left, right), start in views:
            crops = pooled[start + 1 : start + 1 + rows * cols]
            crops = crops.reshape(rows, cols, p, p, dim).permute(0, 2, 1, 3, 4).reshape(rows * p, cols * p, dim)
            crops = crops[top:bottom, left:right]  # (h, w, E)
            newline = self.image_newline.to(crops.dtype).expand(crops.shape[0], 1, dim)
            tokens += [pooled[start], torch.cat((crops, newline), dim=1).flatten(0, 1)]
        return torch.cat(tokens)

    def image_samples(self, is_image, image_sizes, settings, positions=None):
        """Index of the sample each image belongs to (images fill samples in order); checks the per-sample counts.
        image_sizes: (I, 2) tensor or its rows as lists; positions: the image tokens of each sample when already
        read to the host (`embed_inputs`), else read here from is_image (B, T)."""
        # host reads (unless done already): the image tokens of each sample are checked against its images' counts
        sizes = image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes
        positions = is_image.sum(dim=1).tolist() if positions is None else positions
        counts = [image_token_count(size, settings) for size in sizes]
        owners, remaining, sample = [], list(positions), 0
        for count in counts:
            while sample < len(remaining) and remaining[sample] == 0:
                sample += 1
            if sample == len(remaining) or remaining[sample] < count:
                break
            owners.append(sample)
            remaining[sample] -= count
        if len(owners) != len(counts) or any(remaining):
            raise ValueError(
                f"input_ids hold {positions} image tokens per sample but the images need {counts} tokens each under "
                f"selection_method={settings['selection_method']!r}: build input_ids and pixel_values with the same "
                "processor call and selection settings"
            )
        return torch.tensor(owners, dtype=torch.long, device=is_image.device)

    def embed_inputs(self, input_ids, attention_mask, pixel_values=None, image_sizes=None, hires_pixel_values=None,
                     question_mask=None, settings=None):
        """Token embeddings with the image features written into the image positions (B, T, E), the attention
        mask (B, T) with the image positions an adaptive budget drops set to 0, and what the selection kept (see
        get_image_features)."""
        is_image = input_ids == self.config.image_token_id  # (B, T)
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))
        if pixel_values is None:
            if bool(is_image.any()):  # host read: image tokens without images are a ValueError
                raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens but no pixel_values were given")
            return embeds, attention_mask, ()
        if image_sizes is None:
            raise ValueError("image_sizes (the (height, width) of every image) is required with pixel_values")
        settings = self.selection_settings() if settings is None else settings
        # the one host read of the layout, before any image work: each image's layout depends on its size, and the
        # image tokens of every sample are checked against its images' counts
        host = torch.cat((image_sizes.to(is_image.device).flatten(), is_image.sum(dim=1))).tolist()
        sizes = [host[2 * i : 2 * i + 2] for i in range(image_sizes.shape[0])]
        owners = self.image_samples(is_image, sizes, settings, positions=host[2 * len(sizes):])
        image_question_mask = None if question_mask is None else question_mask.bool()[owners]
        features, valid, selections = self.get_image_features(
            pixel_values, sizes, hires_pixel_values, embeds[owners], image_question_mask, settings
        )
        embeds = embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))
        dropped = torch.zeros_like(is_image).masked_scatter(is_image, ~valid)  # (B, T)
        return embeds, attention_mask.masked_fill(dropped, 0), selections

    @torch.no_grad()
    def inspect_selection(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None,
                          hires_pixel_values=None, question_mask=None, selection_method=None, selection_budget=None,
                          selection_options=None, selection=None, **unused_inputs):
        """What a selection method keeps, for diagnostics and overlays (no LM run).

        Returns one dict per selection call (single-view: one for the whole batch; anyres-views: one per image):
        images (their indices), grid ((H, W) or (V, H, W)), view_boxes ((V, 4) canvas boxes or None), indices
        (I, K) kept token indices in raster order (full: all of them), scores (I, N) float32 or None. pooled returns
        [].
        """
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        settings = self.selection_settings(selection_method, selection_budget, selection_options, selection)
        return list(self.embed_inputs(input_ids, attention_mask, pixel_values, image_sizes, hires_pixel_values,
                                      question_mask, settings)[2])

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_sizes=None,
                hires_pixel_values=None, question_mask=None, selection=None, selection_method=None,
                selection_budget=None, selection_options=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, prefix_lengths=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None):
        """The LM's final hidden states (B, T, E) of the sequence with the image tokens written in.

        past_key_values: a PrefixCache. Empty with use_cache=True, this call is the prefill: the cache keeps the
        sequence's keys/values (in its storage dtype) and comes back in the output. Filled, the T positions attend
        to the cached prefix and themselves; attention_mask then covers prefix + T positions. position_ids (B, T)
        default to the attended positions counted by attention_mask. prefix_lengths (B,): Prefix-DLM attention
        (positions before it never see the ones after it). Other arguments as LavidaShirgForMaskedDiffusion.forward.
        """
        if output_attentions:
            raise ValueError("output_attentions is not supported: attention runs in sdpa/flash kernels that return "
                             "no weights (inspect_selection shows what the selection keeps)")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cached = 0 if past_key_values is None else past_key_values.get_seq_length()
        if use_cache and cached:
            raise ValueError("past_key_values already holds a prefix, which is read and never extended: pass "
                             "use_cache=False with it")
        image_selections = None
        if inputs_embeds is None:
            inputs_embeds, attention_mask, image_selections = self.inputs_and_mask(
                input_ids, attention_mask, pixel_values, image_sizes, hires_pixel_values, question_mask, selection,
                selection_method, selection_budget, selection_options)
        batch, length = inputs_embeds.shape[:2]
        check_sequence_length(cached + length, 0, self.config.text_config.max_position_embeddings)
        if attention_mask is None:
            attention_mask = torch.ones(batch, cached + length, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, cached:]
        bias = self.language_model.attention_bias(attention_mask, length, inputs_embeds.dtype, prefix_lengths)
        outputs = self.language_model(inputs_embeds, bias, position_ids, past_key_values if cached else None,
                                      output_hidden_states=bool(output_hidden_states))
        if use_cache:
            past_key_values = (PrefixCache() if past_key_values is None else past_key_values).store(outputs.key_values)
        output = LavidaShirgModelOutput(last_hidden_state=outputs.last_hidden_state, past_key_values=past_key_values,
                                        hidden_states=outputs.hidden_states, image_selections=image_selections)
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()

    def inputs_and_mask(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None,
                        hires_pixel_values=None, question_mask=None, selection=None, selection_method=None,
                        selection_budget=None, selection_options=None):
        """(inputs_embeds (B, T, E), attention_mask (B, T), image selections): the embedded ids with the image tokens
        of the call's selection settings written in (the positions an adaptive budget drops masked out), and what
        each selection kept (see get_image_features)."""
        settings = self.selection_settings(selection_method, selection_budget, selection_options, selection)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.embed_inputs(input_ids, attention_mask, pixel_values, image_sizes, hires_pixel_values,
                                 question_mask, settings)


class LavidaShirgForMaskedDiffusion(LavidaShirgGenerationMixin, LikelihoodMixin, LavidaShirgPreTrainedModel):
    """LaViDa (LLaDA or Dream backbone) with a diffusion loss (`forward(labels=...)`), a masked-diffusion sampler
    (`generate`, `diffusion_generate`) and answer scoring (`log_likelihood`): LavidaShirgModel + lm_head."""

    accepts_loss_kwargs = True  # forward takes Trainer's num_items_in_batch (unknown keyword arguments are errors)
    generation_config_class = LavidaShirgGenerationConfig  # built by PreTrainedModel.__init__ (from_model_config)

    def __init__(self, config: ShirgConfig):
        super().__init__(config)
        self.model = LavidaShirgModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        # the image-text-to-text pipeline loads AutoModelForImageTextToText: the class that generates, as AutoModel
        # (register_for_auto_class records one auto class; save_pretrained adds it to this auto_map)
        module = type(self).__module__.rsplit(".", 1)[-1]
        config.auto_map = {**(getattr(config, "auto_map", None) or {}),
                           "AutoModelForImageTextToText": f"{module}.{type(self).__name__}"}
        self.post_init()

    def get_input_embeddings(self):
        return self.model.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.language_model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    @property
    def vision_tower(self):
        return self.model.vision_tower

    @property
    def multi_modal_projector(self):
        return self.model.multi_modal_projector

    @property
    def language_model(self):
        return self.model.language_model

    def get_image_features(self, pixel_values, image_sizes, **kwargs):
        """The image tokens of every image (see LavidaShirgModel.get_image_features)."""
        return self.model.get_image_features(pixel_values, image_sizes, **kwargs)

    def selection_settings(self, method=None, budget=None, options=None, selection=None):
        """The SHIRG settings of a call (see LavidaShirgModel.selection_settings)."""
        return self.model.selection_settings(method, budget, options, selection)

    def image_token_count(self, image_size, method=None, budget=None, options=None) -> int:
        """Image tokens the LM receives for one (height, width) image under the given selection settings."""
        return self.model.image_token_count(image_size, method, budget, options)

    def inspect_selection(self, **inputs):
        """What a selection method keeps (see LavidaShirgModel.inspect_selection)."""
        return self.model.inspect_selection(**inputs)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        image_sizes=None,
        labels=None,
        hires_pixel_values=None,
        question_mask=None,
        selection=None,
        selection_method=None,
        selection_budget=None,
        selection_options=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        prefix_lengths=None,
        use_cache=None,
        logits_to_keep=0,
        num_items_in_batch=None,
        generator=None,
        output_attentions=None,
        output_hidden_states=None,
        output_logits=None,
        return_dict=None,
    ):
        """With `labels`: the masked-diffusion loss. Without: logits (B, T, V) of the sequence as given.

        labels: (B, T), -100 where the position is not a target (prompt, image, template), the token id where it is
        (the processor builds them with `answers=`); causal-LM labels (a copy of input_ids) are refused.
        selection: the SHIRG settings the processor built the inputs for (its output carries them); without it,
        the config's, overridden by selection_method / selection_budget / selection_options.
        past_key_values / use_cache / position_ids / prefix_lengths: see LavidaShirgModel.forward (the sampler's
        prefix cache); logits_to_keep: logits of the last N positions only (0: all).
        generator: draws the masks of the loss (reproducible losses); num_items_in_batch: the loss denominator
        Trainer passes under gradient accumulation. output_hidden_states: the LM's hidden states of the sequence
        as given; output_logits with labels: the logits of the two masked copies (see MaskedDiffusionOutput);
        return_dict=False: a tuple.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if labels is None:
            if output_logits is False:
                raise ValueError("output_logits=False without labels leaves nothing to return")
            outputs = self.model(input_ids, attention_mask, pixel_values, image_sizes, hires_pixel_values, question_mask,
                                 selection, selection_method, selection_budget, selection_options, position_ids,
                                 past_key_values, inputs_embeds, prefix_lengths, use_cache, output_attentions,
                                 output_hidden_states, return_dict=True)
            hidden = outputs.last_hidden_state[:, -logits_to_keep:]  # logits_to_keep=0 keeps every position
            output = MaskedDiffusionOutput(logits=self.lm_head(hidden), hidden_states=outputs.hidden_states,
                                           past_key_values=outputs.past_key_values,
                                           image_selections=outputs.image_selections)
            return output if return_dict else output.to_tuple()
        if past_key_values is not None or use_cache:
            raise ValueError("the diffusion loss runs whole sequences: past_key_values / use_cache are for generation")
        image_selections = None
        if inputs_embeds is None:
            inputs_embeds, attention_mask, image_selections = self.model.inputs_and_mask(
                input_ids, attention_mask, pixel_values, image_sizes, hires_pixel_values, question_mask, selection,
                selection_method, selection_budget, selection_options)
        elif attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        check_diffusion_labels(labels, input_ids, inputs_embeds, self.config)
        loss, logits, masks = self.diffusion_loss(inputs_embeds, attention_mask, labels, num_items_in_batch,
                                                  generator, bool(output_logits))
        hidden_states = None
        if output_hidden_states:
            hidden_states = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                       output_hidden_states=True, return_dict=True).hidden_states
        output = MaskedDiffusionOutput(loss=loss, logits=logits, hidden_states=hidden_states, diffusion_masks=masks,
                                       image_selections=image_selections)
        return output if return_dict else output.to_tuple()

    def diffusion_loss(self, inputs_embeds, attention_mask, labels, num_items_in_batch=None, generator=None,
                       output_logits=False):
        """LaViDa's loss with complementary masking: (loss, logits, masks).

        Targets: the positions whose label is neither -100 nor the FIM marker (`fim_token_id`, which stays unmasked in
        both copies and is never predicted, as in LaViDa's FIM training; filler tokens are ordinary targets).
        Each target is masked in exactly one of two copies (mask probability p, then its complement); masked
        positions get the mask-token embedding; both copies share the image features.
        loss = sum_masked w * CE(logits, label) / n with n = the number of targets (or Trainer's num_items_in_batch),
        w = 1 ("mean", LaViDa) or 1 / p_copy ("inverse_probability", LLaDA's estimator; p_copy = p or 1 - p); a Dream
        backbone reads the logits of the position before each target (its causal-LM loss in LaViDa).
        Logits are computed only at the masked targets, unless `output_logits`: then (2B, T, V) of both copies are
        returned with their masks (2B, T); otherwise logits and masks are None.
        """
        config = self.config
        answer = labels != IGNORE_INDEX  # (B, T)
        # LaViDa's FIM marker (fim_token_id) stays visible in both copies and is never predicted; fillers are targets
        targets = answer if config.fim_token_id is None else answer & (labels != config.fim_token_id)
        masked, complement, p = sample_complementary_masks(targets, config.min_mask_probability, generator)
        copies = torch.cat((masked, complement))  # (2B, T)
        mask_embedding = self.get_input_embeddings().weight[config.mask_token_id].to(inputs_embeds.dtype)  # (E,)
        embeds = torch.where(copies[..., None], mask_embedding, inputs_embeds.repeat(2, 1, 1))  # (2B, T, E)
        padding = attention_mask.repeat(2, 1)
        prefix_lengths = None
        if config.prefix_lm_training:
            prefix_lengths = answer.int().argmax(dim=1).repeat(2)  # first answer position = end of the prefix
        hidden = self.model(inputs_embeds=embeds, attention_mask=padding, prefix_lengths=prefix_lengths,
                            return_dict=True).last_hidden_state  # (2B, T, E)
        all_logits = self.lm_head(hidden) if output_logits else None  # (2B, T, V)
        # Dream predicts the token at j from position j - 1 (transformers' causal-LM loss in LaViDa): a target at
        # position 0 has no prediction there
        shift = int(config.text_config.model_type == DreamModel.config_class.model_type)
        predicted = copies[:, shift:]  # (2B, T - shift): the masked targets, read from the positions before them
        source = (all_logits if output_logits else hidden)[:, : copies.shape[1] - shift][predicted]
        logits = (source if output_logits else self.lm_head(source)).float()  # (M, V)
        token_loss = F.cross_entropy(logits, labels.repeat(2, 1)[:, shift:][predicted], reduction="none")  # (M,)
        if config.loss_weighting == "inverse_probability":
            copy_probability = torch.cat((p, (1 - p).clamp_min(config.min_mask_probability)))  # (2B,)
            token_loss = token_loss / copy_probability[:, None].expand_as(predicted)[predicted]
        denominator = targets.sum() if num_items_in_batch is None else num_items_in_batch
        loss = token_loss.sum() / torch.as_tensor(denominator, device=token_loss.device).clamp_min(1)
        return loss, all_logits, copies if output_logits else None


def check_diffusion_labels(labels, input_ids, inputs_embeds, config):
    """Diffusion labels: (B, T) like the inputs, -100 at every image position, token ids of the LM vocabulary
    elsewhere. A copy of input_ids (the causal-LM habit) fails here, with what diffusion labels are."""
    explanation = ("diffusion labels hold the answer's token ids at the answer positions and -100 everywhere else "
                   "(prompt, image tokens, template): build them with processor(..., answers=[...])")
    if labels.shape != inputs_embeds.shape[:2]:
        raise ValueError(f"labels must have the inputs' shape {tuple(inputs_embeds.shape[:2])}, got "
                         f"{tuple(labels.shape)}; {explanation}")
    targets = labels != IGNORE_INDEX
    out_of_vocabulary = targets & ((labels < 0) | (labels >= config.text_config.vocab_size))
    on_images = torch.zeros_like(targets) if input_ids is None else targets & (input_ids == config.image_token_id)
    if bool((out_of_vocabulary | on_images).any()):  # one host sync per training step, before the loss
        raise ValueError(f"labels mark {int(on_images.sum())} image positions and {int(out_of_vocabulary.sum())} "
                         f"ids outside the vocabulary [0, {config.text_config.vocab_size}) as targets; {explanation}")


LavidaShirgModel.register_for_auto_class("AutoModel")
LavidaShirgForMaskedDiffusion.register_for_auto_class("AutoModel")

"""LaViDa-LLaDA, HF-native: SigLIP vision tower -> 2-layer MLP projector -> bidirectional LLaDA masked-diffusion LM.

Data flow (shapes for the real checkpoint):
    pixel_values (V, 3, 384, 384) -> SigLIP, 26 layers, no post-norm -> (V, 729, 1152)
    -> projector -> (V, 729, 4096) -> bilinear pool 27x27 -> 14x14 -> (V, 196, 4096)
    -> anyres layout (global view, then stitched crops, unpadded, with a newline token per row)
    -> written into the image positions of the token embeddings -> LLaDA -> logits over the vocabulary.
Token selection (SHIRG) plugs in between the vision features and the projector's output.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, SiglipVisionModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, eager_attention_forward, rotate_half

from .configuration_lavida_shirg import LladaTextConfig, ShirgConfig
from .image_layout import SHIRG_METHODS, image_token_count, pooled_layout, source_grid
from .generation_lavida_shirg import (
    GENERATION_ARGUMENTS,
    LavidaShirgGenerationConfig,
    MaskedDiffusionGenerateOutput,
    generation_config_of_call,
    logits_warpers,
    run_sampler,
)
from .masked_diffusion import resolve_sampler_arguments, sample_complementary_masks
from .prefix_cache import PrefixCache
from .shirg_selection import (
    AdaptiveBudgetHead,
    CoordinateEmbedding,
    budget_statistics,
    check_question_mask,
    gather_tokens,
    grid_coordinates,
    select_tokens,
    token_coordinates,
    token_variance,
    truncate_to_budget,
)


# ----------------------------------------------------------------------------------------------------------------
# LLaDA language model


class LladaRotaryEmbedding(nn.Module):
    """cos/sin of RoPE in float32: angle(p, i) = p / theta^(2i / d), duplicated over both halves (rotate_half)."""

    def __init__(self, config: LladaTextConfig):
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids):
        angles = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, d/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, d)
        return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """x' = x cos + rotate_half(x) sin, in float32 then cast back. x: (B, H, T, d); cos, sin: (B, T, d)."""
    x32 = x.float()
    rotated = x32 * cos[:, None] + rotate_half(x32) * sin[:, None]
    return rotated.to(x.dtype)


class LladaAttention(nn.Module):
    """Bidirectional multi-head attention; keys/values of a cached prefix are prepended when given."""

    is_causal = False

    def __init__(self, config: LladaTextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, rotary, attention_mask, prefix_key_value=None):
        batch, length, _ = hidden_states.shape
        cos, sin = rotary
        query = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        key = self.k_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        value = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        present = (key, value)
        if prefix_key_value is not None:
            key = torch.cat((prefix_key_value[0].to(key.dtype), key), dim=2)  # (B, Hkv, P + T, d)
            value = torch.cat((prefix_key_value[1].to(value.dtype), value), dim=2)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, _ = attention(
            self, query, key, value, attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0, scaling=self.scaling, is_causal=False,
        )
        return self.o_proj(output.reshape(batch, length, -1)), present


class LladaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LladaTextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LladaDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: h = x + attn(norm(x)); y = h + mlp(norm(h))."""

    def __init__(self, config: LladaTextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LladaAttention(config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LladaMLP(config)

    def forward(self, hidden_states, rotary, attention_mask, prefix_key_value=None):
        attended, present = self.self_attn(self.input_layernorm(hidden_states), rotary, attention_mask, prefix_key_value)
        hidden_states = hidden_states + attended
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, present


def attention_bias(key_padding_mask, query_length, dtype, attn_implementation, prefix_lengths=None):
    """Attention mask in the form the attention implementation expects.

    visible(b, q, k) = key_padding_mask[b, k] and (prefix_lengths is None or k < P_b or q >= P_b),
    with queries aligned to the last `query_length` keys. Flash kernels take the (B, K) padding mask itself;
    eager/sdpa take an additive (B, 1, Q, K) bias (0 where visible, the dtype's minimum elsewhere), or None when
    every key is visible.
    """
    if attn_implementation.startswith("flash"):
        if prefix_lengths is not None:
            raise ValueError(
                f"attn_implementation={attn_implementation!r} cannot express the Prefix-DLM mask (prefix queries "
                "blind to the answer); use 'sdpa' or 'eager' with prefix_lm_training or prefix_lm_mask"
            )
        return key_padding_mask.to(torch.int32)
    visible = key_padding_mask[:, None, None, :].bool()  # (B, 1, 1, K)
    if prefix_lengths is not None:
        key_length = key_padding_mask.shape[1]
        device = key_padding_mask.device
        key_index = torch.arange(key_length, device=device)  # (K,)
        query_index = torch.arange(key_length - query_length, key_length, device=device)  # (Q,)
        lengths = prefix_lengths[:, None, None, None]  # (B, 1, 1, 1)
        visible = visible & ((key_index < lengths) | (query_index[:, None] >= lengths))  # (B, 1, Q, K)
    elif bool(visible.all()):
        return None
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return bias.masked_fill(~visible, torch.finfo(dtype).min).expand(-1, -1, query_length, -1)


class LladaPreTrainedModel(PreTrainedModel):
    config_class = LladaTextConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LladaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LladaRotaryEmbedding):
            dim = self.config.head_dim
            inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            init.copy_(module.inv_freq, inv_freq)


class LladaModel(LladaPreTrainedModel):
    """LLaDA backbone: token embedding, bidirectional decoder layers, final RMSNorm."""

    def __init__(self, config: LladaTextConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LladaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LladaRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def attention_bias(self, key_padding_mask, query_length, dtype, prefix_lengths=None):
        """The mask for this model's attention implementation (see `attention_bias`)."""
        return attention_bias(key_padding_mask, query_length, dtype, self.config._attn_implementation, prefix_lengths)

    def forward(self, inputs_embeds, bias, position_ids, prefix_key_values=None):
        """Run the layers on `inputs_embeds` (B, T, E).

        bias: from `attention_bias` over the keys [cached prefix, inputs]; position_ids: (B, T).
        prefix_key_values: per layer (key, value) of a cached prefix, each (B, Hkv, P, d), or None.
        Returns hidden states (B, T, E) and the per-layer (key, value) of the inputs.
        """
        rotary = self.rotary_emb(position_ids)
        hidden_states, presents = inputs_embeds, []
        for index, layer in enumerate(self.layers):
            prefix = None if prefix_key_values is None else prefix_key_values[index]
            hidden_states, present = layer(hidden_states, rotary, bias, prefix)
            presents.append(present)
        return self.norm(hidden_states), tuple(presents)


# ----------------------------------------------------------------------------------------------------------------
# Vision side


class LavidaMultiModalProjector(nn.Module):
    """LaViDa's mlp2x_gelu: y = W2 gelu(W1 x + b1) + b2 (exact erf GELU)."""

    def __init__(self, config: ShirgConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, features):
        return self.linear_2(self.act(self.linear_1(features)))


def pool_view_features(features, pooled_size):
    """Bilinear resize (align_corners=False) of each view's s x s token map to pooled_size x pooled_size.

    features: (V, s*s, E) -> (V, pooled_size^2, E).
    """
    views, tokens, dim = features.shape
    side = int(round(tokens**0.5))
    grid = features.transpose(1, 2).reshape(views, dim, side, side)  # (V, E, s, s)
    pooled = F.interpolate(grid, size=(pooled_size, pooled_size), mode="bilinear", align_corners=False)
    return pooled.flatten(2).transpose(1, 2)  # (V, p*p, E)


@dataclass
class MaskedDiffusionOutput(ModelOutput):
    """loss: the diffusion loss (when labels are given); logits: (B, T, V) (when no labels are given)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


class LavidaShirgPreTrainedModel(PreTrainedModel):
    config_class = ShirgConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LladaDecoderLayer", "SiglipEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LavidaShirgForMaskedDiffusion):
            init.normal_(module.image_newline, mean=0.0, std=module.config.text_config.hidden_size**-0.5)
        elif isinstance(module, (CoordinateEmbedding, AdaptiveBudgetHead)):
            module.reset_parameters()  # zero coordinate embedding / default-budget head (after their Linear layers)


class LavidaShirgForMaskedDiffusion(LavidaShirgPreTrainedModel):
    """LaViDa-LLaDA with a diffusion loss (`forward(labels=...)`) and a masked-diffusion sampler (`diffusion_generate`).

    Image positions in `input_ids` hold `config.image_token_id` (one per image token, as the processor writes them);
    the image features are written there in order.
    """

    accepts_loss_kwargs = True  # forward takes Trainer's num_items_in_batch (unknown keyword arguments are errors)
    generation_config_class = LavidaShirgGenerationConfig  # built by PreTrainedModel.__init__ (from_model_config)

    def __init__(self, config: ShirgConfig):
        super().__init__(config)
        self.vision_tower = SiglipVisionModel(config.vision_config)
        # LaViDa reads the last kept encoder layer directly: no post-layernorm, no pooling head.
        self.vision_tower.post_layernorm = nn.Identity()
        self.multi_modal_projector = LavidaMultiModalProjector(config)
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))
        self.language_model = LladaModel(config.text_config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        hidden = config.text_config.hidden_size
        self.coordinate_embedding = CoordinateEmbedding(hidden) if config.coordinate_embedding else None
        default_budget = config.selection_budget if config.selection_budget in config.budget_choices else None
        self.budget_head = AdaptiveBudgetHead(config.budget_choices, default_budget) if config.adaptive_budget else None
        # configs written before generation_config.json kept the sampler defaults; PreTrainedModel.__init__ folded
        # them into self.generation_config (LavidaShirgGenerationConfig.from_model_config): saved from there on
        vars(config).pop("sampler_defaults", None)
        # the image-text-to-text pipeline loads AutoModelForImageTextToText: the class that generates, as AutoModel
        # (register_for_auto_class records one auto class; save_pretrained adds it to this auto_map)
        module = type(self).__module__.rsplit(".", 1)[-1]
        config.auto_map = {**(getattr(config, "auto_map", None) or {}),
                           "AutoModelForImageTextToText": f"{module}.{type(self).__name__}"}
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    # ---- vision ---------------------------------------------------------------------------------------------------

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

    def selection_settings(self, method=None, budget=None, options=None):
        """The SHIRG settings of a call (config defaults overridden by `method`, `budget`, `options`), validated
        against the learned modules this model has."""
        settings = self.config.selection_settings(method, budget, options)
        for name, module in (("coordinate_embedding", self.coordinate_embedding), ("adaptive_budget", self.budget_head)):
            if settings[name] and module is None:
                raise ValueError(f"{name}=True needs a model built with config.{name}=True (it has no such module)")
        if settings["adaptive_budget"] and tuple(settings["budget_choices"]) != self.budget_head.budgets:
            raise ValueError(f"budget_choices must be the budget head's {list(self.budget_head.budgets)} under "
                             f"adaptive_budget, got {settings['budget_choices']}")
        return settings

    def image_token_count(self, image_size, method=None, budget=None, options=None) -> int:
        """Image tokens the LM receives for one (height, width) image under the given selection settings."""
        settings = self.selection_settings(method, budget, options)
        return image_token_count(image_size, {**self.config.token_layout(), **settings})

    def get_image_features(self, pixel_values, image_sizes, hires_pixel_values=None, question_embeds=None,
                           question_mask=None, settings=None, record=None):
        """Image tokens of every image, concatenated: features (sum_i N_i, E) and a validity mask (sum_i N_i,).

        pooled (default): LaViDa's layout. Other methods select among high-resolution tokens: hires_source
        'single-view': the view `hires_pixel_values` (I, 3, S, S) through SigLIP (interpolated positions), all images
        in one batched selection; 'anyres-views': each image's own anyres views left unpooled (V x P tokens, coverage
        per view), one selection per image (their token counts differ). See `select_high_resolution_tokens`.
        question_embeds (I, L, E) / question_mask (I, L): the question of each image's sample. `record`: a list that
        receives, per selection call, a dict (images, grid, view_boxes, indices, scores) for diagnostics.
        """
        settings = self.selection_settings() if settings is None else settings
        views = self.views_of_images(pixel_values, image_sizes)
        if settings["selection_method"] == "pooled":
            features = self.pooled_image_features(pixel_values, views)
            return features, torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
        expected = (len(views), 3, settings["hires_image_size"], settings["hires_image_size"])
        single_view = settings["hires_source"] == "single-view"
        if single_view and (hires_pixel_values is None or tuple(hires_pixel_values.shape) != expected):
            shape = None if hires_pixel_values is None else tuple(hires_pixel_values.shape)
            raise ValueError(f"selection_method={settings['selection_method']!r} needs hires_pixel_values of shape "
                             f"{expected} (the processor's, called with the same method), got {shape}")
        if uses_relevance(settings):
            if question_mask is None:
                raise ValueError(f"selection_method={settings['selection_method']!r} is text-conditioned: pass "
                                 "question_mask (the processor's) or set relevance_weight=0 (v2: v2_alpha=1)")
            check_question_mask(question_mask)
        with_attention = settings["selection_method"] == "visionzip"
        groups = []  # (vision features, attention received, images, their source views' pixels) of each selection
        if single_view:
            features, received = self.vision_features(hires_pixel_values, with_attention)
            groups.append((features, received, list(range(len(views))), hires_pixel_values))
        else:
            features, received = self.vision_features(pixel_values, with_attention)  # (V_all, P, D)
            for image, ((rows, cols), _, start) in enumerate(views):
                group = slice(start, start + 1 + rows * cols)
                groups.append((features[group].flatten(0, 1)[None],
                               None if received is None else received[group].flatten()[None], [image],
                               pixel_values[group]))
        tokens, valid = [], []
        for features, received, images, source_pixels in groups:
            question = (None, None) if question_mask is None else (question_embeds[images], question_mask[images])
            entry = {"images": images}
            group_tokens, group_valid = self.select_high_resolution_tokens(
                features, received, *question, pixel_values, [views[i] for i in images], settings, entry,
                source_pixels=source_pixels,
            )
            if record is not None:
                record.append(entry)
            tokens.append(group_tokens.flatten(0, 1))
            valid.append(group_valid.flatten())
        return torch.cat(tokens), torch.cat(valid)

    def views_of_images(self, pixel_values, image_sizes):
        """Per image: ((rows, cols), unpad bounds, index of its global view); checks pixel_values' view count."""
        config = self.config
        p, view_size = config.pooled_view_size, config.vision_config.image_size
        layouts, start = [], 0
        for size in image_sizes.tolist():
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
        """LaViDa's pooled anyres image tokens of every image, concatenated: (sum_i N_i, E).

        Per image (views [global, crops row-major]): global p x p tokens, then the crops stitched into a
        (rows p, cols p) map, unpadded to the image's aspect ratio, with `image_newline` after every row.
        """
        p = self.config.pooled_view_size
        pooled = pool_view_features(self.encode_views(pixel_values), p)  # (V, p*p, E)
        dim = pooled.shape[-1]
        tokens = []
        for (rows, cols), (top, bottom, left, right), start in views:
            crops = pooled[start + 1 : start + 1 + rows * cols]
            crops = crops.reshape(rows, cols, p, p, dim).permute(0, 2, 1, 3, 4).reshape(rows * p, cols * p, dim)
            crops = crops[top:bottom, left:right]  # (h, w, E)
            newline = self.image_newline.to(crops.dtype).expand(crops.shape[0], 1, dim)
            tokens += [pooled[start], torch.cat((crops, newline), dim=1).flatten(0, 1)]
        return torch.cat(tokens)

    def select_high_resolution_tokens(self, features, received, question_embeds, question_mask, pixel_values, views,
                                      settings, record=None, source_pixels=None):
        """(I, M, E) tokens for the LM and their validity (I, M) of I images' high-resolution features (I, N, D).

        Layouts: full = all N tokens in raster order (view after view for anyres-views); shirg-fixed, random,
        top-norm, divprune = the K kept tokens in raster order; shirg-v2 = kept, then the summary of the dropped
        tokens (v2_summary_token); shirg-x = scaffold (the global view's LaViDa tokens, or a g x g pooled grid), then
        kept; visionzip = the K - C dominant tokens in raster order, then C contextual tokens. Kept tokens are the
        projector's outputs of the selected indices (plus the coordinate embedding of their (x, y, h, w) when
        enabled). Under adaptive_budget (SHIRG methods) max(budget_choices) tokens are kept and those beyond each
        image's chosen budget are marked invalid (masked from attention). received: VisionZip's attention (I, N).
        `record`: a dict that receives the grid, view boxes, selected indices (I, K) and scores (I, N) or None.
        source_pixels: the pixels of the views the features come from ((I, 3, S, S) high-resolution views, or one
        image's (V, 3, s, s) anyres views), for the SHIRG detail term "pixel-contrast" (no pass through the tower).
        """
        method = settings["selection_method"]
        projected = self.multi_modal_projector(features)  # (I, N, E)
        if method == "full":
            return projected, torch.ones(projected.shape[:2], dtype=torch.bool, device=projected.device)
        layout = {**self.config.token_layout(), **settings}
        grid, boxes = self.selection_grid(layout, views)
        adaptive = settings["adaptive_budget"] and method in SHIRG_METHODS
        budget = max(settings["budget_choices"]) if adaptive else settings["selection_budget"]
        if method == "visionzip":
            budget -= settings["visionzip_contextual_tokens"]
        selection = select_tokens(method, features, projected, grid, budget, question_embeds, question_mask,
                                  **selection_options(settings, received, source_pixels,
                                                      self.config.vision_config.patch_size))
        if record is not None:
            record.update(grid=grid, view_boxes=boxes, indices=selection.indices, scores=selection.scores)
        kept = gather_tokens(projected, selection.indices)  # (I, K, E)
        if settings["coordinate_embedding"]:
            coordinates = token_coordinates(selection.indices, grid, boxes)
            kept = kept + self.coordinate_embedding(coordinates).to(kept.dtype)
        valid = torch.ones(kept.shape[:2], dtype=torch.bool, device=kept.device)
        if adaptive:
            statistics = budget_statistics(token_variance(features), selection.scores)
            chosen = self.budget_head.choose(self.budget_head(statistics))  # (I,)
            valid = truncate_to_budget(selection.indices, selection.scores, chosen)
        extra = self.extra_tokens(method, selection.extra_tokens, pixel_values, views, settings)
        if extra is None:
            return kept, valid
        extra_valid = torch.ones(extra.shape[:2], dtype=torch.bool, device=kept.device)
        if method == "shirg-x":
            return torch.cat((extra.to(kept.dtype), kept), dim=1), torch.cat((extra_valid, valid), dim=1)
        return torch.cat((kept, extra.to(kept.dtype)), dim=1), torch.cat((valid, extra_valid), dim=1)

    def selection_grid(self, layout, views):
        """The grid a group of images is selected on and, for anyres views, each view's box in the image canvas.

        single-view: (H, W), boxes None. anyres-views (one image): (V, s, s) with boxes (V, 4) = (x0, y0, w, h):
        the global view covers the canvas, crop (r, c) of a rows x cols grid covers (c / cols, r / rows, 1 / cols,
        1 / rows).
        """
        if layout["hires_source"] == "single-view":
            _, rows, cols = source_grid(None, layout)
            return (rows, cols), None
        (rows, cols), _, _ = views[0]
        side = self.config.patches_per_side
        r = torch.arange(rows, dtype=torch.float32).repeat_interleave(cols)
        c = torch.arange(cols, dtype=torch.float32).repeat(rows)
        crops = torch.stack([c / cols, r / rows, torch.full_like(r, 1 / cols), torch.full_like(r, 1 / rows)], dim=-1)
        boxes = torch.cat([torch.tensor([[0.0, 0.0, 1.0, 1.0]]), crops])
        return (1 + rows * cols, side, side), boxes

    def extra_tokens(self, method, selected_extra, pixel_values, views, settings):
        """The tokens a method adds to its kept ones (I, M, E), or None (see `select_high_resolution_tokens`)."""
        if method == "shirg-v2" and not settings["v2_summary_token"]:
            return None
        if method != "shirg-x":
            return selected_extra
        if settings["x_scaffold"] == "none":
            return None
        if settings["x_scaffold"] == "global-view":
            p = self.config.pooled_view_size
            global_views = pixel_values[[start for _, _, start in views]]
            scaffold, scaffold_grid = pool_view_features(self.encode_views(global_views), p), (p, p)
        else:
            scaffold, scaffold_grid = selected_extra, (settings["x_scaffold_size"],) * 2
        if settings["coordinate_embedding"]:
            coordinates = grid_coordinates(scaffold_grid, scaffold.device)  # (g*g, 4)
            scaffold = scaffold + self.coordinate_embedding(coordinates).to(scaffold.dtype)
        return scaffold

    def image_samples(self, is_image, image_sizes, settings):
        """Index of the sample each image belongs to (images fill samples in order); checks the per-sample counts."""
        layout = {**self.config.token_layout(), **settings}
        counts = [image_token_count(size, layout) for size in image_sizes.tolist()]
        positions = is_image.sum(dim=1).tolist()
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
                     question_mask=None, settings=None, record=None):
        """Token embeddings with the image features written into the image positions (B, T, E), and the attention
        mask (B, T) with the image positions an adaptive budget drops set to 0."""
        is_image = input_ids == self.config.image_token_id  # (B, T)
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))
        if pixel_values is None:
            if bool(is_image.any()):
                raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens but no pixel_values were given")
            return embeds, attention_mask
        if image_sizes is None:
            raise ValueError("image_sizes (the (height, width) of every image) is required with pixel_values")
        settings = self.selection_settings() if settings is None else settings
        owners = self.image_samples(is_image, image_sizes, settings)
        image_question_mask = None if question_mask is None else question_mask.bool()[owners]
        features, valid = self.get_image_features(
            pixel_values, image_sizes, hires_pixel_values, embeds[owners], image_question_mask, settings, record
        )
        embeds = embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))
        dropped = torch.zeros_like(is_image).masked_scatter(is_image, ~valid)  # (B, T)
        return embeds, attention_mask.masked_fill(dropped, 0)

    @torch.no_grad()
    def inspect_selection(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None,
                          hires_pixel_values=None, question_mask=None, selection_method=None, selection_budget=None,
                          selection_options=None, **unused_inputs):
        """What a selection method keeps, for diagnostics and overlays (no LM run).

        Returns one dict per selection call (single-view: one for the whole batch; anyres-views: one per image):
        images (their indices), grid ((H, W) or (V, H, W)), view_boxes ((V, 4) canvas boxes or None), indices
        (I, K) kept token indices in raster order, scores (I, N) float32 or None. pooled and full return [].
        """
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        settings = self.selection_settings(selection_method, selection_budget, selection_options)
        record = []
        self.embed_inputs(input_ids, attention_mask, pixel_values, image_sizes, hires_pixel_values, question_mask,
                          settings, record)
        return [entry for entry in record if "indices" in entry]

    # ---- language model -----------------------------------------------------------------------------------------

    def run_language_model(self, inputs_embeds, attention_mask, prefix_lengths=None):
        """Hidden states (B, T, E) of a whole sequence with padding mask (B, T) and optional Prefix-DLM lengths."""
        bias = self.language_model.attention_bias(attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype, prefix_lengths)
        hidden, _ = self.language_model(inputs_embeds, bias, positions_from_mask(attention_mask))
        return hidden

    def mask_embedding(self, dtype):
        """Embedding of the mask token, (E,)."""
        return self.language_model.embed_tokens.weight[self.config.mask_token_id].to(dtype)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        image_sizes=None,
        labels=None,
        hires_pixel_values=None,
        question_mask=None,
        selection_method=None,
        selection_budget=None,
        selection_options=None,
        inputs_embeds=None,
        num_items_in_batch=None,
        generator=None,
    ):
        """With `labels`: the masked-diffusion loss. Without: logits (B, T, V) of the sequence as given.

        labels: (B, T), -100 where the position is not a target (prompt, image, template), the token id where it is.
        selection_method / selection_budget / selection_options: this call's SHIRG settings (default: the config's);
        hires_pixel_values and question_mask come from the processor called with the same settings.
        generator: draws the masks of the loss (reproducible losses); num_items_in_batch: the loss denominator
        Trainer passes under gradient accumulation.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            settings = self.selection_settings(selection_method, selection_budget, selection_options)
            inputs_embeds, attention_mask = self.embed_inputs(
                input_ids, attention_mask, pixel_values, image_sizes, hires_pixel_values, question_mask, settings
            )
        check_sequence_length(inputs_embeds.shape[1], 0, self.config.text_config.max_position_embeddings)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        if labels is None:
            return MaskedDiffusionOutput(logits=self.lm_head(self.run_language_model(inputs_embeds, attention_mask)))
        loss = self.diffusion_loss(inputs_embeds, attention_mask, labels, num_items_in_batch, generator)
        return MaskedDiffusionOutput(loss=loss)

    def diffusion_loss(self, inputs_embeds, attention_mask, labels, num_items_in_batch=None, generator=None):
        """LaViDa's loss with complementary masking.

        Each target is masked in exactly one of two copies (mask probability p, then its complement); masked
        positions get the mask-token embedding; both copies share the image features.
        loss = sum_masked w * CE(logits, label) / n with n = the number of targets (or Trainer's num_items_in_batch),
        w = 1 ("mean", LaViDa) or 1 / p_copy ("inverse_probability", LLaDA's estimator; p_copy = p or 1 - p).
        """
        config = self.config
        targets = labels != -100  # (B, T)
        masked, complement, p = sample_complementary_masks(targets, config.min_mask_probability, generator)
        copies = torch.cat((masked, complement))  # (2B, T)
        mask_embedding = self.mask_embedding(inputs_embeds.dtype)
        embeds = torch.where(copies[..., None], mask_embedding, inputs_embeds.repeat(2, 1, 1))  # (2B, T, E)
        padding = attention_mask.repeat(2, 1)
        prefix_lengths = None
        if config.prefix_lm_training:
            prefix_lengths = targets.int().argmax(dim=1).repeat(2)  # first target = end of the prefix
        hidden = self.run_language_model(embeds, padding, prefix_lengths)
        logits = self.lm_head(hidden[copies]).float()  # (M, V): only the masked targets
        token_loss = F.cross_entropy(logits, labels.repeat(2, 1)[copies], reduction="none")  # (M,)
        if config.loss_weighting == "inverse_probability":
            copy_probability = torch.cat((p, (1 - p).clamp_min(config.min_mask_probability)))  # (2B,)
            token_loss = token_loss / copy_probability[:, None].expand_as(copies)[copies]
        denominator = targets.sum() if num_items_in_batch is None else num_items_in_batch
        return token_loss.sum() / torch.as_tensor(denominator, device=token_loss.device).clamp_min(1)

    # ---- sampling -------------------------------------------------------------------------------------------------

    def build_prefix_cache(self, prefix_embeds, prefix_mask, kv_cache_dtype=None):
        """Run the prefix (image + prompt) once: a PrefixCache of per-layer (key, value), each (B, Hkv, P, d),
        stored in `kv_cache_dtype` (None, "bfloat16", "float16" or "float8_e4m3fn"; see prefix_cache)."""
        bias = self.language_model.attention_bias(prefix_mask, prefix_embeds.shape[1], prefix_embeds.dtype)
        _, key_values = self.language_model(prefix_embeds, bias, positions_from_mask(prefix_mask))
        return PrefixCache(key_values, kv_cache_dtype)

    @classmethod
    def can_generate(cls) -> bool:
        """`generate()` runs the masked-diffusion sampler (transformers' GenerationMixin is autoregressive)."""
        return True

    def adjust_generation_fn(self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path,
                             cache_dir, force_download, proxies, local_files_only, token, revision, subfolder,
                             trust_remote_code, **kwargs):
        """from_pretrained's hook: the folder's generation_config.json read as a LavidaShirgGenerationConfig through
        transformers' loader (a folder without one keeps the config derived in __init__, which folds in the
        `sampler_defaults` that configs written before generation_config.json held)."""
        if generation_config is not None:
            self.generation_config = generation_config_of_call(self.generation_config, generation_config)
            return
        try:
            self.generation_config = LavidaShirgGenerationConfig.from_pretrained(
                pretrained_model_name_or_path, cache_dir=cache_dir, force_download=force_download, proxies=proxies,
                local_files_only=local_files_only, token=token, revision=revision, subfolder=subfolder,
            )
        except OSError:  # transformers' "no generation_config.json in this folder"
            pass

    def _prepare_generation_config(self, generation_config=None, use_model_defaults=None, **kwargs):
        """transformers' hook, called by pipelines of transformers < 5.24: the call's LavidaShirgGenerationConfig
        (the given one, else the model's, updated with the generation settings in kwargs) and the other kwargs."""
        settings = {key: value for key, value in kwargs.items() if key in GENERATION_ARGUMENTS}
        prepared = generation_config_of_call(self.generation_config, generation_config, **settings)
        return prepared, {key: value for key, value in kwargs.items() if key not in settings}

    def prefix_and_answer_logits(self, input_ids, attention_mask, pixel_values, image_sizes, hires_pixel_values,
                                 question_mask, selection, settings, sequences_per_prompt=1, on_prefix_cache=None):
        """Embed and (with the prefix cache) run the prompt + image prefix once, each prompt's prefix repeated
        `sequences_per_prompt` times. Returns `answer_logits(canvas (B', G)) -> (B', G, V)`."""
        gen_length = settings["gen_length"]
        check_sequence_length(input_ids.shape[1], gen_length, self.config.text_config.max_position_embeddings)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prefix_embeds, attention_mask = self.embed_inputs(
            input_ids, attention_mask, pixel_values, image_sizes, hires_pixel_values, question_mask, selection
        )  # (B, P, E), (B, P)
        prefix_embeds = prefix_embeds.repeat_interleave(sequences_per_prompt, dim=0)
        attention_mask = attention_mask.repeat_interleave(sequences_per_prompt, dim=0)
        batch, prefix_length = attention_mask.shape
        device = input_ids.device
        answer_mask = torch.ones(batch, gen_length, dtype=attention_mask.dtype, device=device)
        full_mask = torch.cat((attention_mask, answer_mask), dim=1)  # (B, P + G)
        answer_positions = attention_mask.sum(dim=1, keepdim=True) + torch.arange(gen_length, device=device)
        language_model, dtype = self.language_model, prefix_embeds.dtype
        if settings["kv_cache_dtype"] is not None and not settings["use_prefix_cache"]:
            raise ValueError("kv_cache_dtype stores the prefix cache: it needs use_prefix_cache=True")
        if settings["use_prefix_cache"]:
            prefix_key_values = self.build_prefix_cache(prefix_embeds, attention_mask, settings["kv_cache_dtype"])
            if on_prefix_cache is not None:
                on_prefix_cache(prefix_key_values)
            bias = language_model.attention_bias(full_mask, gen_length, dtype)
        else:
            prefix_lengths = torch.full((batch,), prefix_length, device=device) if settings["prefix_lm_mask"] else None
            bias = language_model.attention_bias(full_mask, prefix_length + gen_length, dtype, prefix_lengths)
            full_positions = positions_from_mask(full_mask)

        def answer_logits(canvas):
            answer_embeds = language_model.embed_tokens(canvas)  # (B, G, E)
            if settings["use_prefix_cache"]:
                hidden, _ = language_model(answer_embeds, bias, answer_positions, prefix_key_values)
            else:
                hidden, _ = language_model(torch.cat((prefix_embeds, answer_embeds), dim=1), bias, full_positions)
                hidden = hidden[:, prefix_length:]
            return self.lm_head(hidden)  # (B, G, V)

        return answer_logits

    @torch.no_grad()
    def generate(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        image_sizes=None,
        hires_pixel_values=None,
        question_mask=None,
        generation_config=None,
        selection_method=None,
        selection_budget=None,
        selection_options=None,
        generator=None,
        on_prefix_cache=None,
        **kwargs,
    ):
        """Masked-diffusion generation on transformers' conventions: prompt + answer ids (B * n, P + G).

        Settings: `generation_config` (default: the model's `generation_config`, see LavidaShirgGenerationConfig)
        updated with `kwargs` (max_new_tokens, block_length, steps / steps_per_block, do_sample, temperature, top_k,
        top_p, remasking, schedule, schedule_shift, use_prefix_cache (or use_cache), prefix_lm_mask,
        kv_cache_dtype, num_return_sequences n, return_dict_in_generate, output_history). Autoregressive-only
        settings (beams, penalties, max_length, stop strings) raise a ValueError. With return_dict_in_generate: a
        MaskedDiffusionGenerateOutput (sequences, and the answer canvas after every step with output_history).
        The image and selection arguments are those of `forward`; `generator` seeds sampling; `on_prefix_cache(cache)`
        is called once the prefix cache is built.
        """
        if input_ids is None:
            raise ValueError("generate needs input_ids (the processor's output)")
        settings = generation_config_of_call(self.generation_config, generation_config, **kwargs)
        sampler = settings.sampler_arguments()
        n = settings.num_return_sequences
        answer_logits = self.prefix_and_answer_logits(
            input_ids, attention_mask, pixel_values, image_sizes, hires_pixel_values, question_mask,
            self.selection_settings(selection_method, selection_budget, selection_options),
            {**sampler, **{name: getattr(settings, name) for name in PREFIX_SETTINGS}}, n, on_prefix_cache,
        )
        history = [] if settings.output_history else None
        answers = run_sampler(answer_logits, input_ids.shape[0] * n, sampler, self.config.mask_token_id,
                              input_ids.device, logits_warpers(settings), generator, history)
        sequences = torch.cat((input_ids.repeat_interleave(n, dim=0), answers), dim=1)
        if not settings.return_dict_in_generate:
            return sequences
        return MaskedDiffusionGenerateOutput(sequences=sequences, history=None if history is None else tuple(history))

    @torch.no_grad()
    def diffusion_generate(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_sizes=None,
        hires_pixel_values=None,
        question_mask=None,
        selection_method=None,
        selection_budget=None,
        selection_options=None,
        gen_length=None,
        block_length=None,
        steps=None,
        temperature=None,
        remasking=None,
        schedule=None,
        schedule_shift=None,
        use_prefix_cache=True,
        prefix_lm_mask=False,
        kv_cache_dtype=None,
        generator=None,
        on_prefix_cache=None,
    ):
        """LaViDa's sampler with LaViDa's argument names, returning the answer ids only (B, gen_length).

        The same sampler as `generate` (identical answers for identical settings): the answer canvas starts as mask
        tokens and is decoded block by block (`block_length`, default gen_length); each block takes
        steps / num_blocks steps; each step predicts every masked position and commits the most confident
        predictions of the current block (counts from `schedule`: "uniform" or LaViDa's "shift" with
        `schedule_shift`); temperature > 0 samples by Gumbel-max. With `use_prefix_cache` the prefix runs once and
        each step runs only the answer against its cached keys/values (Prefix-DLM); without it, prefix and answer
        run together with full bidirectional attention, or with the prefix blind to the answer if
        `prefix_lm_mask`. `kv_cache_dtype` stores the cached prefix in a smaller dtype (see prefix_cache).
        Sampler arguments left None take the model's generation_config (max_new_tokens is gen_length; block_length
        and steps left None there: gen_length; steps_per_block: steps = steps_per_block x blocks). Prompts are
        left-padded.
        """
        given = dict(gen_length=gen_length, block_length=block_length, steps=steps, temperature=temperature,
                     remasking=remasking, schedule=schedule, schedule_shift=schedule_shift)
        sampler = resolve_sampler_arguments(given, self.generation_config.sampler_defaults(gen_length, block_length))
        answer_logits = self.prefix_and_answer_logits(
            input_ids, attention_mask, pixel_values, image_sizes, hires_pixel_values, question_mask,
            self.selection_settings(selection_method, selection_budget, selection_options),
            dict(sampler, use_prefix_cache=use_prefix_cache, prefix_lm_mask=prefix_lm_mask,
                 kv_cache_dtype=kv_cache_dtype), on_prefix_cache=on_prefix_cache,
        )
        return run_sampler(answer_logits, input_ids.shape[0], sampler, self.config.mask_token_id, input_ids.device,
                           generator=generator)


PREFIX_SETTINGS = ("use_prefix_cache", "prefix_lm_mask", "kv_cache_dtype")


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


def uses_relevance(settings):
    """Whether the call's method weighs question relevance (and so needs a question)."""
    method = settings["selection_method"]
    if method in ("shirg-fixed", "shirg-x"):
        return settings["relevance_weight"] > 0
    return method == "shirg-v2" and settings["v2_alpha"] < 1


def selection_options(settings, attention_received_scores, source_pixels=None, patch_size=None):
    """Keyword options of `select_tokens` for the call's method, from the settings' fields (source_pixels /
    patch_size: the views the tokens come from and the tower's patch size, for the detail term "pixel-contrast")."""
    method = settings["selection_method"]
    detail = dict(detail=settings["detail_term"], pixels=source_pixels, patch_size=patch_size)
    fixed = dict(region_size=settings["coverage_region_size"], relevance_weight=settings["relevance_weight"],
                 variance_weight=settings["variance_weight"], validate=False, **detail)
    if method == "shirg-fixed":
        return fixed
    if method == "shirg-v2":
        return dict(alpha=settings["v2_alpha"], beta=settings["v2_beta"], region_size=settings["coverage_region_size"],
                    kmeans_iterations=settings["v2_kmeans_iterations"], validate=False, **detail)
    if method == "shirg-x":
        scaffold = settings["x_scaffold_size"] if settings["x_scaffold"] == "grid" else 0
        return dict(fixed, rounds=settings["x_suppression_rounds"], radius=settings["x_suppression_radius"],
                    penalty=settings["x_suppression_penalty"], scaffold_size=scaffold)
    if method == "random":
        return dict(seed=settings["random_seed"])
    if method == "visionzip":
        return dict(attention_received=attention_received_scores,
                    num_contextual=settings["visionzip_contextual_tokens"])
    return {}


def positions_from_mask(attention_mask):
    """RoPE positions counting only attended tokens: p_t = (sum_{s<=t} m_s) - 1, clamped at 0. (B, T)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)


def check_sequence_length(prefix_length, gen_length, max_length):
    """The LM was trained on at most `max_length` positions: longer inputs are refused, with the counts."""
    if prefix_length + gen_length > max_length:
        raise ValueError(
            f"the sequence needs {prefix_length} prompt+image tokens + {gen_length} answer tokens = "
            f"{prefix_length + gen_length} positions, more than max_position_embeddings={max_length}"
        )


LavidaShirgForMaskedDiffusion.register_for_auto_class("AutoModel")

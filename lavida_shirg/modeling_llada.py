"""LLaDA, the masked-diffusion language model of LaViDa: a bidirectional Llama-style decoder (RMSNorm, RoPE, SwiGLU).

Attention goes through transformers' ALL_ATTENTION_FUNCTIONS (eager, sdpa, flash); a read-only prefix cache
(prefix_cache.PrefixCache) can stand in for the prompt's keys and values.
"""

from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, eager_attention_forward, rotate_half

from .configuration_lavida_shirg import LladaTextConfig


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
    qkv_bias = False  # LLaDA's projections have none (Dream's have)

    def __init__(self, config: LladaTextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=self.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=self.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=self.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def rotate(self, query, key, rotary):
        """RoPE of LLaDA: in float32 (apply_rotary), cast back."""
        cos, sin = rotary
        return apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)

    def forward(self, hidden_states, rotary, attention_mask, prefix_key_value=None):
        """Returns (output (B, T, E), own (key, value) (B, Hkv, T, d) each, for a prefix cache)."""
        batch, length, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        key = self.k_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        value = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        query, key = self.rotate(query, key, rotary)
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

    attention_class = LladaAttention

    def __init__(self, config: LladaTextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self.attention_class(config, layer_idx)
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
    eager/sdpa take an additive (B, 1, Q, K) bias (0 where visible, the dtype's minimum elsewhere), always a tensor:
    whether every key is visible is never read back to the host.
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
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return bias.masked_fill(~visible, torch.finfo(dtype).min).expand(-1, -1, query_length, -1)


class LladaOutput(NamedTuple):
    """LladaModel's output: last_hidden_state (B, T, E), key_values per layer, hidden_states (or None)."""

    last_hidden_state: torch.Tensor
    key_values: tuple
    hidden_states: tuple | None


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

    decoder_layer_class = LladaDecoderLayer

    def __init__(self, config: LladaTextConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.decoder_layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LladaRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def attention_bias(self, key_padding_mask, query_length, dtype, prefix_lengths=None):
        """The mask for this model's attention implementation (see `attention_bias`)."""
        return attention_bias(key_padding_mask, query_length, dtype, self.config._attn_implementation, prefix_lengths)

    def forward(self, inputs_embeds, bias, position_ids, prefix_key_values=None, output_hidden_states=False):
        """Run the layers on `inputs_embeds` (B, T, E).

        bias: from `attention_bias` over the keys [cached prefix, inputs]; position_ids: (B, T).
        prefix_key_values: per layer (key, value) of a cached prefix, each (B, Hkv, P, d), or None.
        Returns LladaOutput: the final-normed hidden states (B, T, E), the per-layer (key, value) of the inputs and,
        with `output_hidden_states`, the input of every layer and the normed output (num_layers + 1 of (B, T, E)).
        """
        rotary = self.rotary_emb(position_ids)
        hidden_states, presents, all_hidden = inputs_embeds, [], []
        for index, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(hidden_states)
            prefix = None if prefix_key_values is None else prefix_key_values[index]
            hidden_states, present = layer(hidden_states, rotary, bias, prefix)
            presents.append(present)
        hidden_states = self.norm(hidden_states)
        return LladaOutput(hidden_states, tuple(presents), (*all_hidden, hidden_states) if output_hidden_states else None)


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

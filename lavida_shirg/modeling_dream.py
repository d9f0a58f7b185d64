"""Dream, LaViDa's second masked-diffusion language model: a bidirectional Qwen2-style decoder.

It differs from LLaDA (modeling_llada) in its layer only: the query/key/value projections carry a bias and RoPE is
applied in the compute dtype (cos/sin cast to it, as Qwen2 does). Everything around the layers (embedding, final norm,
rotary angles, attention masks, the read-only prefix cache) is LladaModel's, so DreamModel has its interface.
Its logits are read shifted by the sampler (token j from position j - 1: generation_lavida_shirg).
"""

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, apply_rotary_pos_emb, eager_attention_forward

from .configuration_lavida_shirg import DreamTextConfig
from .modeling_llada import LladaModel


class DreamAttention(nn.Module):
    """Bidirectional grouped-query attention with biased q/k/v; keys/values of a cached prefix are prepended."""

    is_causal = False

    def __init__(self, config: DreamTextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(config.hidden_size, heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, rotary, attention_mask, prefix_key_value=None):
        """q, k, v = W x + b per head; q, k rotated (cos, sin (B, T, d) cast to the compute dtype); attention over
        [prefix keys, own keys] with the additive `attention_mask`. Returns (output (B, T, E), own (key, value))."""
        batch, length, _ = hidden_states.shape
        cos, sin = (part.to(hidden_states.dtype) for part in rotary)
        query = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        key = self.k_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        value = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
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


class DreamDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: h = x + attn(norm(x)); y = h + mlp(norm(h)), mlp = down(silu(gate(h)) * up(h))."""

    def __init__(self, config: DreamTextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DreamAttention(config, layer_idx)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(self, hidden_states, rotary, attention_mask, prefix_key_value=None):
        attended, present = self.self_attn(self.input_layernorm(hidden_states), rotary, attention_mask, prefix_key_value)
        hidden_states = hidden_states + attended
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, present


class DreamModel(LladaModel):
    """Dream backbone: token embedding, bidirectional Dream decoder layers, final RMSNorm (LladaModel's interface)."""

    config_class = DreamTextConfig
    _no_split_modules = ["DreamDecoderLayer"]
    decoder_layer_class = DreamDecoderLayer

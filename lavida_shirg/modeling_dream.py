"""Dream, LaViDa's second masked-diffusion language model: a bidirectional Qwen2-style decoder.

It differs from LLaDA (modeling_llada) in its layer only: the query/key/value projections carry a bias and RoPE is
applied in the compute dtype (cos/sin cast to it, as Qwen2 does). Everything around the layers (embedding, final norm,
rotary angles, attention masks, the read-only prefix cache) is LladaModel's, so DreamModel has its interface.
Its logits are read shifted by the sampler (token j from position j - 1: generation_lavida_shirg).
"""

from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from .configuration_lavida_shirg import DreamTextConfig
from .modeling_llada import LladaAttention, LladaDecoderLayer, LladaModel


class DreamAttention(LladaAttention):
    """LLaDA's attention with biased q/k/v projections and RoPE in the compute dtype (cos, sin cast to it, Qwen2's
    apply_rotary_pos_emb)."""

    qkv_bias = True

    def rotate(self, query, key, rotary):
        cos, sin = (part.to(query.dtype) for part in rotary)
        return apply_rotary_pos_emb(query, key, cos, sin)


class DreamDecoderLayer(LladaDecoderLayer):
    """LLaDA's pre-norm block (the same RMSNorm and SwiGLU MLP as Qwen2's) with Dream's attention."""

    attention_class = DreamAttention


class DreamModel(LladaModel):
    """Dream backbone: token embedding, bidirectional Dream decoder layers, final RMSNorm (LladaModel's interface)."""

    config_class = DreamTextConfig
    _no_split_modules = ["DreamDecoderLayer"]
    decoder_layer_class = DreamDecoderLayer

"""The LLaDA decoder against an independent plain-torch reference of LLaDA's math, and attention backends."""

import math

import pytest
import torch
from conftest import build_tiny_model


def reference_llada(state, config, input_ids, padding):
    """LLaDA forward written from the equations, reading raw weights (names of our state dict).

    RMSNorm: w * x / sqrt(mean x^2 + eps); RoPE (rotate-half, positions counted over unpadded tokens, theta);
    attention: softmax(q k^T / sqrt(d) + pad) v over all (bidirectional) keys; MLP: W_down(silu(W_gate x) * W_up x).
    """
    text = config.text_config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    d = text.hidden_size // heads

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + text.rms_norm_eps))

    positions = (padding.cumsum(1) - 1).clamp(min=0).double()  # (B, T)
    freqs = 1.0 / (text.rope_theta ** (torch.arange(0, d, 2).double() / d))
    angle = positions[..., None] * freqs  # (B, T, d/2)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # (B, 1, T, d/2)

    def rope(x):  # x: (B, H, T, d), halves [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    x = state["model.language_model.embed_tokens.weight"][input_ids].double()
    batch, length, _ = x.shape
    key_bias = torch.where(padding.bool(), 0.0, -1e30).double()[:, None, None, :]  # (B, 1, 1, T)
    for i in range(text.num_hidden_layers):
        p = f"model.language_model.layers.{i}."
        h = rms(x, state[p + "input_layernorm.weight"].double())
        q = (h @ state[p + "self_attn.q_proj.weight"].double().T).view(batch, length, heads, d).transpose(1, 2)
        k = (h @ state[p + "self_attn.k_proj.weight"].double().T).view(batch, length, kv_heads, d).transpose(1, 2)
        v = (h @ state[p + "self_attn.v_proj.weight"].double().T).view(batch, length, kv_heads, d).transpose(1, 2)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(d) + key_bias
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)
        x = x + attended @ state[p + "self_attn.o_proj.weight"].double().T
        h = rms(x, state[p + "post_attention_layernorm.weight"].double())
        gate = h @ state[p + "mlp.gate_proj.weight"].double().T
        up = h @ state[p + "mlp.up_proj.weight"].double().T
        x = x + (torch.nn.functional.silu(gate) * up) @ state[p + "mlp.down_proj.weight"].double().T
    x = rms(x, state["model.language_model.norm.weight"].double())
    return x @ state["lm_head.weight"].double().T


def text_batch(config, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.text_config.vocab_size, (3, 11), generator=generator)
    padding = torch.ones_like(input_ids)
    padding[1, :4] = 0  # left padding
    padding[2, -3:] = 0  # right padding
    return input_ids, padding


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_language_model_matches_reference_math(attn_implementation):
    model = build_tiny_model(seed=1)
    model.set_attn_implementation(attn_implementation)
    input_ids, padding = text_batch(model.config)
    logits = model(input_ids=input_ids, attention_mask=padding).logits
    expected = reference_llada(model.state_dict(), model.config, input_ids, padding)
    valid = padding.bool()
    assert logits.shape == (3, 11, model.config.text_config.vocab_size)
    torch.testing.assert_close(logits[valid].double(), expected[valid], atol=1e-5, rtol=1e-5)


def test_sdpa_equals_eager(tiny_model):
    input_ids, padding = text_batch(tiny_model.config, seed=3)
    tiny_model.set_attn_implementation("sdpa")
    sdpa = tiny_model(input_ids=input_ids, attention_mask=padding).logits
    tiny_model.set_attn_implementation("eager")
    eager = tiny_model(input_ids=input_ids, attention_mask=padding).logits
    tiny_model.set_attn_implementation("sdpa")
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_padding_is_invisible(tiny_model):
    """Changing the ids under padding changes no unpadded output; a sample alone equals it inside a batch."""
    input_ids, padding = text_batch(tiny_model.config, seed=4)
    logits = tiny_model(input_ids=input_ids, attention_mask=padding).logits
    scrambled = input_ids.masked_fill(~padding.bool(), 7)
    logits_scrambled = tiny_model(input_ids=scrambled, attention_mask=padding).logits
    valid = padding.bool()
    torch.testing.assert_close(logits[valid], logits_scrambled[valid], atol=1e-6, rtol=1e-6)
    alone = tiny_model(input_ids=input_ids[1:2, 4:]).logits[0]
    torch.testing.assert_close(logits[1, 4:], alone, atol=1e-5, rtol=1e-5)


def test_attention_is_bidirectional(tiny_model):
    """Changing the last token changes the logits at the first position (a causal model would not)."""
    input_ids, _ = text_batch(tiny_model.config, seed=5)
    changed = input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % tiny_model.config.text_config.vocab_size
    first = tiny_model(input_ids=input_ids).logits[:, 0]
    first_changed = tiny_model(input_ids=changed).logits[:, 0]
    assert (first - first_changed).abs().amax() > 1e-3


def test_rope_uses_float32_under_bfloat16():
    """In a bf16 model, cos/sin and the rotation are computed in float32 before the cast (LLaDA's full-precision RoPE)."""
    from lavida_shirg.modeling_llada import apply_rotary

    model = build_tiny_model(seed=2).to(torch.bfloat16)
    positions = torch.arange(3000)[None]
    cos, sin = model.language_model.rotary_emb(positions)
    assert cos.dtype == torch.float32
    x = torch.randn(1, 1, 3000, model.config.text_config.head_dim).to(torch.bfloat16)
    expected = apply_rotary(x.float(), cos, sin).to(torch.bfloat16)
    torch.testing.assert_close(apply_rotary(x, cos, sin), expected, atol=0, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = build_tiny_model(seed=6).train()
    input_ids, padding = text_batch(model.config, seed=6)
    labels = input_ids.masked_fill(torch.arange(11) < 6, -100)

    def gradients():
        model.zero_grad()
        loss = model(input_ids=input_ids, attention_mask=padding, labels=labels,
                     generator=torch.Generator().manual_seed(0)).loss
        loss.backward()
        return loss.detach(), model.language_model.layers[0].mlp.up_proj.weight.grad.clone()

    loss, grad = gradients()
    model.gradient_checkpointing_enable()
    loss_ckpt, grad_ckpt = gradients()
    torch.testing.assert_close(loss, loss_ckpt)
    torch.testing.assert_close(grad, grad_ckpt, atol=1e-6, rtol=1e-5)

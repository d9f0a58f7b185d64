"""The Dream backbone: its decoder against an independent plain-torch statement of Dream's math, the prefix-cache
path, SHIRG on it, and save/load through remote code in a fresh process."""

import math
import os

import pytest
import torch
from conftest import LOAD_MODEL_IN_A_FRESH_PROCESS, run_in_a_fresh_process, build_tiny_model, image_batch, prompt_ids

from lavida_shirg import DreamTextConfig, ShirgConfig
from lavida_shirg.configuration_lavida_shirg import PRESETS
from lavida_shirg.modeling_dream import DreamModel
from lavida_shirg.prefix_cache import PrefixCache

DREAM_TEXT = {**PRESETS["tiny-dream"]["text_config"]}


def build_tiny_dream(seed=0, **overrides):
    return build_tiny_model(seed=seed, text_config=dict(DREAM_TEXT), **overrides)


@pytest.fixture(scope="module")
def dream():
    return build_tiny_dream(seed=1)


def reference_dream(state, text, input_ids, padding):
    """Dream's forward written from its equations in float64, reading the raw weights of our state dict.

    RMSNorm w * x / sqrt(mean x^2 + eps); q, k, v = W x + b; RoPE (rotate-half, theta, positions counted over the
    attended tokens); softmax(q k^T / sqrt(d) + pad) v over every attended key (no causal mask), kv heads shared by
    groups of query heads; MLP W_down(silu(W_gate x) * W_up x); final norm; logits = W_head x (unshifted).
    """
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    d = text.hidden_size // heads

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + text.rms_norm_eps))

    def linear(x, name, bias=False):
        out = x @ state[name + ".weight"].double().T
        return out + state[name + ".bias"].double() if bias else out

    positions = (padding.cumsum(1) - 1).clamp(min=0).double()
    freqs = 1.0 / (text.rope_theta ** (torch.arange(0, d, 2).double() / d))
    angle = positions[..., None] * freqs
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]

    def rope(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    x = state["model.language_model.embed_tokens.weight"][input_ids].double()
    batch, length, _ = x.shape
    key_bias = torch.where(padding.bool(), 0.0, -1e30).double()[:, None, None, :]
    for i in range(text.num_hidden_layers):
        p = f"model.language_model.layers.{i}."
        h = rms(x, state[p + "input_layernorm.weight"].double())
        q = linear(h, p + "self_attn.q_proj", True).view(batch, length, heads, d).transpose(1, 2)
        k = linear(h, p + "self_attn.k_proj", True).view(batch, length, kv_heads, d).transpose(1, 2)
        v = linear(h, p + "self_attn.v_proj", True).view(batch, length, kv_heads, d).transpose(1, 2)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(d) + key_bias
        x = x + linear((scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1), p + "self_attn.o_proj")
        h = rms(x, state[p + "post_attention_layernorm.weight"].double())
        x = x + linear(torch.nn.functional.silu(linear(h, p + "mlp.gate_proj")) * linear(h, p + "mlp.up_proj"),
                       p + "mlp.down_proj")
    return rms(x, state["model.language_model.norm.weight"].double()) @ state["lm_head.weight"].double().T


def test_presets_select_the_dream_decoder():
    real = ShirgConfig.from_preset("lavida-dream")
    assert isinstance(real.text_config, DreamTextConfig)
    text = real.text_config
    assert (text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers,
            text.num_attention_heads, text.num_key_value_heads) == (152064, 3584, 18944, 28, 28, 4)
    assert (text.rope_theta, text.rms_norm_eps) == (1e6, 1e-6)
    assert (real.mask_token_id, real.eos_token_id, real.image_token_id) == (151666, 151643, 152064)
    assert ShirgConfig.from_preset("tiny-dream").text_config.model_type == "lavida_shirg_dream_text"
    assert ShirgConfig.from_preset("tiny").text_config.model_type == "lavida_shirg_text"
    with pytest.raises(ValueError, match="text_config.model_type must be one of"):
        ShirgConfig.from_preset("tiny", text_config={"model_type": "qwen2"})


def test_config_round_trips_through_a_dict():
    config = ShirgConfig.from_preset("tiny-dream")
    again = ShirgConfig.from_dict(config.to_dict())
    assert isinstance(again.text_config, DreamTextConfig)
    assert again.text_config.to_dict() == config.text_config.to_dict()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_dream_matches_reference_math(dream, attn_implementation):
    assert isinstance(dream.model.language_model, DreamModel)
    dream.set_attn_implementation(attn_implementation)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, DREAM_TEXT["vocab_size"], (3, 11), generator=generator)
    padding = torch.ones_like(input_ids)
    padding[1, :4] = 0
    padding[2, -3:] = 0
    with torch.no_grad():
        logits = dream(input_ids=input_ids, attention_mask=padding).logits
    expected = reference_dream(dream.state_dict(), dream.config.text_config, input_ids, padding)
    valid = padding.bool()
    assert logits.shape == (3, 11, DREAM_TEXT["vocab_size"])
    torch.testing.assert_close(logits[valid].double(), expected[valid], atol=1e-5, rtol=1e-5)
    dream.set_attn_implementation("sdpa")


def test_the_q_k_v_bias_matters(dream):
    """The reference reads the biases: zeroing them changes the logits (they are not silently dropped)."""
    input_ids = torch.randint(0, DREAM_TEXT["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in dream.state_dict().items()}
    with torch.no_grad():
        before = dream(input_ids=input_ids).logits
        for layer in dream.model.language_model.layers:
            layer.self_attn.k_proj.bias.zero_()
        after = dream(input_ids=input_ids).logits
        dream.load_state_dict(state)
    assert (before - after).abs().max() > 1e-3


def test_prefix_cache_path_equals_the_full_sequence(dream):
    """A prefill of the prefix into a PrefixCache, then the answer against it: the answer's hidden states equal those
    of the whole sequence run under the Prefix-DLM mask (prefix blind to the answer), left padding included."""
    pixel_values, image_sizes, counts = image_batch(dream.config, [(40, 70), (20, 50)])
    input_ids, padding = prompt_ids(dream.config, counts, [4, 7])
    answer = torch.randint(10, DREAM_TEXT["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        embeds, mask, _ = dream.model.inputs_and_mask(input_ids, padding, pixel_values, image_sizes)
        full_mask = torch.cat((mask, torch.ones_like(answer)), dim=1)
        cache = dream.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True,
                            past_key_values=PrefixCache(), return_dict=True).past_key_values
        cached = dream.model(inputs_embeds=dream.get_input_embeddings()(answer), attention_mask=full_mask,
                             past_key_values=cache, return_dict=True).last_hidden_state
        whole = dream.model(inputs_embeds=torch.cat((embeds, dream.get_input_embeddings()(answer)), dim=1),
                            attention_mask=full_mask, prefix_lengths=torch.full((2,), embeds.shape[1]),
                            return_dict=True).last_hidden_state
    assert cache.get_seq_length() == embeds.shape[1]
    torch.testing.assert_close(cached, whole[:, embeds.shape[1]:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["shirg-fixed", "visionzip"])
def test_selection_methods_run_on_dream(method):
    model = build_tiny_dream(seed=2, selection_method=method, selection_budget=32)
    config = model.config
    pixel_values, image_sizes, _ = image_batch(config, [(40, 70)])
    hires = torch.rand(1, 3, config.hires_image_size, config.hires_image_size) * 2 - 1
    input_ids, padding = prompt_ids(config, [32], [6])
    question_mask = (input_ids != config.image_token_id) & (input_ids != config.bos_token_id)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=padding, pixel_values=pixel_values,
                       image_sizes=image_sizes, hires_pixel_values=hires, question_mask=question_mask).logits
    assert logits.shape == (1, input_ids.shape[1], DREAM_TEXT["vocab_size"]) and torch.isfinite(logits).all()


LOAD_AND_RUN = LOAD_MODEL_IN_A_FRESH_PROCESS + """
torch.save({"logits": logits, "lm": type(model.model.language_model).__name__,
            "module": type(model).__module__}, outputs_path)
"""


def test_save_pretrained_loads_with_automodel_in_a_fresh_process(dream, tmp_path):
    folder = tmp_path / "model"
    dream.save_pretrained(folder)
    assert "modeling_dream.py" in os.listdir(folder)
    pixel_values, image_sizes, counts = image_batch(dream.config, [(40, 70), (20, 50)])
    input_ids, padding = prompt_ids(dream.config, counts, [4, 7])
    inputs = dict(input_ids=input_ids, attention_mask=padding, pixel_values=pixel_values, image_sizes=image_sizes)
    outputs = run_in_a_fresh_process(LOAD_AND_RUN, folder, inputs, tmp_path)
    assert outputs["module"].startswith("transformers_modules") and outputs["lm"] == "DreamModel"
    with torch.no_grad():
        torch.testing.assert_close(outputs["logits"], dream(**inputs).logits, atol=0, rtol=0)


@pytest.mark.parametrize("weighting", ["mean", "inverse_probability"])
def test_dream_loss_reads_the_position_before_each_target(weighting):
    """LaViDa's Dream loss is transformers' causal-LM loss over the masked copies: target j from logits j - 1."""
    import torch.nn.functional as F

    from lavida_shirg.masked_diffusion import sample_complementary_masks

    model = build_tiny_dream(seed=3, loss_weighting=weighting)
    config = model.config
    pixel_values, image_sizes, counts = image_batch(config, [(40, 70), (64, 30)], seed=2)
    input_ids, padding = prompt_ids(config, counts, [6, 9], seed=2, pad_left=False)
    answer = torch.tensor([[21, 22, 23, config.eot_token_id], [31, 32, config.eot_token_id, config.eos_token_id]])
    input_ids = torch.cat((input_ids, answer), dim=1)
    padding = torch.cat((padding, torch.ones_like(answer)), dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -answer.shape[1]:] = answer
    batch = dict(input_ids=input_ids, attention_mask=padding, pixel_values=pixel_values, image_sizes=image_sizes)
    with torch.no_grad():
        loss = model(**batch, labels=labels, generator=torch.Generator().manual_seed(7)).loss
        targets = labels != -100
        masked, complement, p = sample_complementary_masks(targets, 1e-3, torch.Generator().manual_seed(7))
        total = 0.0
        for copy, probability in ((masked, p), (complement, 1 - p)):
            logits = model(**{**batch, "input_ids": input_ids.masked_fill(copy, config.mask_token_id)}).logits
            ce = F.cross_entropy(logits[:, :-1][copy[:, 1:]], labels[:, 1:][copy[:, 1:]], reduction="none")
            if weighting == "inverse_probability":
                ce = ce / probability.clamp_min(1e-3)[:, None].expand_as(copy[:, 1:])[copy[:, 1:]]
            total = total + ce.sum()
    torch.testing.assert_close(loss, total / targets.sum(), atol=1e-5, rtol=1e-5)


def dream_processor():
    """A processor on LaViDa's "dream" chat format: the tiny tokenizer with Dream's ChatML tokens added."""
    from lavida_shirg.image_processing_lavida_shirg import LavidaShirgImageProcessor
    from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
    from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
                                 replace_extra_special_tokens=False)
    config = ShirgConfig.from_preset("tiny-dream")
    image_processor = LavidaShirgImageProcessor(view_size=32, image_grid_pinpoints=config.image_grid_pinpoints)
    return LavidaShirgProcessor(image_processor, tokenizer, image_token_id=512, pooled_view_size=4,
                                model_max_length=2048, eos_token_id=0, pad_token_id=0,
                                eot_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), chat_format="dream")


def test_dream_chat_format(tmp_path):
    from PIL import Image

    from lavida_shirg.processing_lavida_shirg import DEFAULT_SYSTEM_PROMPT, LavidaShirgProcessor

    processor = dream_processor()
    prompt = processor.build_prompt("What is written?")
    assert prompt == (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<image>\n"
                      "What is written?<|im_end|>\n<|im_start|>assistant\n")
    assert processor.question_text(prompt) == "What is written?"
    start, end = processor.question_span(prompt)
    assert prompt[start:end] == "What is written?"
    inputs = processor(images=[Image.new("RGB", (40, 30))], text=[prompt])
    ids = inputs["input_ids"][0].tolist()
    im_start, im_end = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2 and ids[0] == im_start
    question = processor.tokenizer.decode([i for i, m in zip(ids, inputs["question_mask"][0].tolist()) if m])
    assert question.strip() == "What is written?"
    processor.save_pretrained(tmp_path)
    assert LavidaShirgProcessor.from_pretrained(tmp_path, trust_remote_code=True).chat_format == "dream"
    with pytest.raises(ValueError, match="chat_format must be one of"):
        LavidaShirgProcessor(processor.image_processor, processor.tokenizer, 512, 4, 2048, 0, 0, 514,
                             chat_format="chatml")
    with pytest.raises(ValueError, match="eot_token_id"):  # LLaDA's format wants <|eot_id|>
        LavidaShirgProcessor(processor.image_processor, processor.tokenizer, 512, 4, 2048, 0, 0, 514)


LAVIDA_DREAM_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                       "that the user provides, and assist the user with a variety of tasks using natural language.")


def lavida_dream_prompt(turns: list) -> str:
    """LaViDa's `dream` conversation (llava/conversation.py: LLAMA_3 style, so Dream's tokenizer renders it) for
    `turns` [(role, text)], restated: its system message, then each turn, then the open assistant turn, in Qwen2's
    ChatML ("<|im_start|>" role newline text "<|im_end|>" newline). Its lmms-eval model puts "<image>" and a newline in
    front of the question."""
    messages = [("system", LAVIDA_DREAM_SYSTEM), *turns]
    return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in messages) + "<|im_start|>assistant\n"


def test_dream_prompts_equal_lavidas_dream_conversation():
    from PIL import Image

    processor = dream_processor()
    for question in ["What is written?", "Line one\nline two: 3 + 4 = ?", "  spaced  "]:
        assert processor.build_prompt(question) == lavida_dream_prompt([("user", "<image>\n" + question)])
        for images in (2, 3):  # LaViDa's lmms-eval: " ".join(["<image>"] * n) + "\n" + question
            assert processor.build_prompt(question, num_images=images) == lavida_dream_prompt(
                [("user", " ".join(["<image>"] * images) + "\n" + question)])
    image = Image.new("RGB", (40, 30))
    conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Who?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                    {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]}]
    rendered = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered == lavida_dream_prompt([("user", "<image>\nWho?"), ("assistant", "A cat."),
                                            ("user", "And its colour?")])
    # tokenized: the ChatML markers are the tokenizer's special tokens (no bos in front, as Qwen2's ChatML)
    ids = processor(images=[image], text=[rendered])["input_ids"][0].tolist()
    im_start, im_end = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert ids.count(im_start) == 5 and ids.count(im_end) == 4 and ids[0] == im_start


def test_dream_token_ids_are_qwen2s_chatml_ids():
    """The real preset's ids: Qwen2's <|endoftext|> 151643 (eos, pad), <|im_start|> 151644, <|im_end|> 151645 (the end
    of a turn), its newline 198 (a ChatML header's end), Dream's <|beginoftext|> 151665 and <|mask|> 151666."""
    real = ShirgConfig.from_preset("lavida-dream")
    assert (real.eos_token_id, real.pad_token_id, real.start_header_token_id, real.eot_token_id,
            real.end_header_token_id, real.bos_token_id, real.mask_token_id) == (
        151643, 151643, 151644, 151645, 198, 151665, 151666)

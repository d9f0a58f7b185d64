"""log_likelihood against a restatement of LLaDA's get_log_likelihood (llada/log_likelyhood.py) under the same
random draws, an exact case, and its checks."""

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model, image_batch, prompt_ids



@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request):
    return build_tiny_model(seed=2, preset="tiny" if request.param == "llada" else "tiny-dream")


@pytest.fixture(scope="module")
def inputs(model):
    pixel_values, image_sizes, counts = image_batch(model.config, [(40, 70)])
    input_ids, padding = prompt_ids(model.config, counts, [6])
    return dict(input_ids=input_ids, attention_mask=padding, pixel_values=pixel_values, image_sizes=image_sizes)


def reference_log_likelihood(model, embeds, answer, mc_num, batch_size, cfg_scale, generator, shift):
    """LLaDA's get_log_likelihood for one prompt, restated: per iteration k = randint(1, l + 1), counts
    round(linspace(k, k + (b - 1) l / b, b)) wrapped into [1, l], each row's masked positions in a random order (here
    the argsort of uniform draws, the order the model draws them), loss = sum CE / p_mask / b, -mean over iterations;
    cfg: the prompt masked entirely in the unconditional copy. Token j reads position j - shift's logits."""
    mask_id = model.config.mask_token_id
    length = answer.shape[1]
    embed = model.get_input_embeddings()
    losses = []
    for _ in range(mc_num // batch_size):
        k = torch.randint(1, length + 1, (1,), generator=generator)[0]
        x = torch.round(torch.linspace(float(k), k + (batch_size - 1) * (length / batch_size), steps=batch_size)).long()
        x = ((x - 1) % length) + 1
        order = torch.rand((batch_size, length), generator=generator).argsort(dim=1)
        is_mask = torch.arange(length).repeat(batch_size, 1) < x[:, None]
        is_mask = torch.stack([is_mask[i][order[i]] for i in range(batch_size)])
        noisy = torch.where(is_mask, mask_id, answer.repeat(batch_size, 1))
        sequence = torch.cat((embeds.repeat(batch_size, 1, 1), embed(noisy)), dim=1)
        logits = model(inputs_embeds=sequence).logits
        if cfg_scale > 0:
            unconditional = sequence.clone()
            unconditional[:, : embeds.shape[1]] = embed.weight[mask_id]
            un_logits = model(inputs_embeds=unconditional).logits
            logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
        logits = logits[:, embeds.shape[1] - shift: logits.shape[1] - shift]
        p_mask = (x / length)[:, None].repeat(1, length)
        loss = F.cross_entropy(logits[is_mask], answer.repeat(batch_size, 1)[is_mask], reduction="none")
        losses.append((loss / p_mask[is_mask]).sum() / batch_size)
    return -sum(losses) / len(losses)


@pytest.mark.parametrize("cfg_scale", [0.0, 0.5])
def test_equals_the_restated_llada_estimator(model, inputs, cfg_scale):
    answer = torch.tensor([[11, 57, 300, 42, 9]])
    ours = model.log_likelihood(answer, **inputs, mc_num=8, batch_size=4, cfg_scale=cfg_scale,
                                generator=torch.Generator().manual_seed(3))
    shift = int(model.config.text_config.model_type == "lavida_shirg_dream_text")
    with torch.no_grad():
        embeds = model.model.inputs_and_mask(**inputs)[0]
        expected = reference_log_likelihood(model, embeds, answer, 8, 4, cfg_scale, torch.Generator().manual_seed(3),
                                            shift)
    assert ours.shape == (1,)
    torch.testing.assert_close(ours[0].double(), expected.double(), atol=1e-4, rtol=1e-5)


def test_a_one_token_answer_is_exact(model, inputs):
    """L = 1: every row masks the token with p = 1, so the estimate is log softmax at its prediction position."""
    answer = torch.tensor([[77]])
    estimate = model.log_likelihood(answer, **inputs, mc_num=4, batch_size=2)
    shift = int(model.config.text_config.model_type == "lavida_shirg_dream_text")
    with torch.no_grad():
        embeds = model.model.inputs_and_mask(**inputs)[0]
        sequence = torch.cat((embeds, model.get_input_embeddings()(torch.tensor([[model.config.mask_token_id]]))), 1)
        logits = model(inputs_embeds=sequence).logits[0, -1 - shift]
    torch.testing.assert_close(estimate[0], logits.float().log_softmax(-1)[77], atol=1e-5, rtol=1e-5)


def test_batched_prompts_are_scored_each(model):
    pixel_values, image_sizes, counts = image_batch(model.config, [(40, 70), (20, 50)])
    input_ids, padding = prompt_ids(model.config, counts, [4, 9])
    answers = torch.tensor([[5, 6], [7, 8]])
    batched = model.log_likelihood(answers, input_ids, padding, pixel_values, image_sizes, mc_num=4, batch_size=4,
                                   generator=torch.Generator().manual_seed(0))
    assert batched.shape == (2,) and torch.isfinite(batched).all() and (batched < 0).all()
    again = model.log_likelihood(answers, input_ids, padding, pixel_values, image_sizes, mc_num=4, batch_size=4,
                                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(batched, again)


@pytest.mark.parametrize("kwargs,message", [
    (dict(mc_num=6, batch_size=4), "must be a multiple of batch_size"),
    (dict(mc_num=0), "mc_num must be a positive integer"),
    (dict(cfg_scale=-1.0), "cfg_scale must be a finite number"),
])
def test_bad_arguments_are_named(model, inputs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.log_likelihood(torch.tensor([[5]]), **inputs, **kwargs)

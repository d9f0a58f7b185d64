"""Log-likelihood of an answer under the masked-diffusion LM: LLaDA's Monte Carlo estimate (llada/log_likelyhood.py).

    log p(a | image, prompt) ~ -1/I sum_iterations 1/R sum_rows sum_{j masked} -log p_theta(a_j | x_noisy) / (x_r / L)

Per iteration, for each prompt, k ~ U{1..L} and its R rows mask x_r = ((round(k + r L / R) - 1) mod L) + 1 of the L
answer tokens (counts spread evenly over the rows), at positions drawn uniformly per row; image + prompt stay
unmasked and attend to the (partly masked) answer bidirectionally, as LaViDa runs the whole sequence. With
cfg_scale > 0 the logits are l_u + (s + 1)(l - l_u), l_u those of the sequence with the whole prefix masked.
A Dream backbone reads token j from position j - 1's logits (as its sampler and loss do).
"""

import numbers

import torch
import torch.nn.functional as F

from .configuration_lavida_shirg import DreamTextConfig


def masked_counts(k, rows, length):
    """x (B, R): LLaDA's per-row mask counts ((round(k_b + r L / R) - 1) mod L) + 1 for the draws k (B,)."""
    spread = k[:, None].double() + torch.arange(rows, device=k.device, dtype=torch.float64) * (length / rows)
    return (torch.round(spread).long() - 1) % length + 1


class LikelihoodMixin:
    """`log_likelihood` of LavidaShirgForMaskedDiffusion."""

    @torch.no_grad()
    def log_likelihood(self, answer_ids, input_ids, attention_mask=None, pixel_values=None, image_sizes=None,
                       hires_pixel_values=None, question_mask=None, selection=None, mc_num=128, batch_size=16,
                       cfg_scale=0.0, generator=None):
        """Monte Carlo estimate of log p(answer | image, prompt) for each of B prompts: (B,) float32.

        answer_ids: (B, L) the answer tokens after each prompt (the processor's prompt ids, left-padded, with their
        images and selection as for `generate`). mc_num rows per prompt in mc_num / batch_size forwards of
        batch_size rows each (mc_num a multiple of batch_size); cfg_scale: LLaDA's unsupervised classifier-free
        guidance; generator: the random draws (k per prompt, then one uniform per answer position and row that
        orders the masked positions).
        """
        for name, value in (("mc_num", mc_num), ("batch_size", batch_size)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if mc_num % batch_size:
            raise ValueError(f"mc_num ({mc_num}) must be a multiple of batch_size ({batch_size})")
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, numbers.Real) or not 0 <= cfg_scale < float("inf"):
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale!r}")
        if answer_ids.dim() != 2 or answer_ids.shape[0] != input_ids.shape[0] or answer_ids.shape[1] < 1:
            raise ValueError(f"answer_ids must be (B, L) with L >= 1 and B = {input_ids.shape[0]} prompts, got "
                             f"{tuple(answer_ids.shape)}")
        vocab_size = self.get_output_embeddings().weight.shape[0]
        if bool(((answer_ids < 0) | (answer_ids >= vocab_size)).any()):
            raise ValueError(f"answer_ids must be token ids of the LM vocabulary [0, {vocab_size})")
        prefix_embeds, prefix_mask, _ = self.model.inputs_and_mask(
            input_ids, attention_mask, pixel_values, image_sizes, hires_pixel_values, question_mask, selection)
        batch, length = answer_ids.shape
        shift = int(self.config.text_config.model_type == DreamTextConfig.model_type)
        prefix_embeds = prefix_embeds.repeat_interleave(batch_size, dim=0)  # (N, P, E), N = B R
        full_mask = torch.cat((prefix_mask, torch.ones_like(answer_ids)), dim=1).repeat_interleave(batch_size, dim=0)
        answers = answer_ids.repeat_interleave(batch_size, dim=0)  # (N, L)
        embed = self.get_input_embeddings()
        if cfg_scale > 0:  # the unconditional rows: every prefix position masked
            mask_embedding = embed.weight[self.config.mask_token_id].to(prefix_embeds.dtype)
            prefix_embeds = torch.cat((prefix_embeds, mask_embedding.expand_as(prefix_embeds)))
            full_mask = full_mask.repeat(2, 1)
        device = answer_ids.device
        total = torch.zeros(batch, dtype=torch.float32, device=device)
        for _ in range(mc_num // batch_size):
            k = torch.randint(1, length + 1, (batch,), device=device, generator=generator)
            counts = masked_counts(k, batch_size, length).flatten()  # (N,)
            order = torch.rand(answers.shape, device=device, generator=generator).argsort(dim=1)  # (N, L)
            masked = order < counts[:, None]  # (N, L): x_r positions of each row
            noisy = answers.masked_fill(masked, self.config.mask_token_id)
            noisy_embeds = embed(noisy)
            if cfg_scale > 0:
                noisy_embeds = noisy_embeds.repeat(2, 1, 1)
            sequence = torch.cat((prefix_embeds, noisy_embeds), dim=1)  # (N or 2N, P + L, E)
            logits = self(inputs_embeds=sequence, attention_mask=full_mask, logits_to_keep=length + shift,
                          return_dict=True).logits[:, :length].float()  # (N or 2N, L, V)
            if cfg_scale > 0:
                conditional, unconditional = logits.chunk(2)
                logits = unconditional + (cfg_scale + 1) * (conditional - unconditional)
            token_loss = F.cross_entropy(logits.transpose(1, 2), answers, reduction="none")  # (N, L)
            row_loss = (token_loss * masked).sum(dim=1) / (counts / length)  # (N,)
            total += row_loss.view(batch, batch_size).sum(dim=1) / batch_size
        return -total / (mc_num // batch_size)

"""Every use of the model by the Gradio app (app.py), in one place: loading a model folder, and for one image and
question, running each chosen variant once and measuring it. A change of the processor or generate API touches
this file only.

Questions are asked as the synthetic OCR task asks them (eval.py's "synthetic-ocr": the question + LaViDa's
short-answer instruction, answers of 16 tokens) with LaViDa's sampling of the folder's backbone
(shirg_tools.inference.generation_settings: one token per step; LLaDA: the "shift" schedule, Dream: its own
timesteps and the folder's Dream sampler). Per variant: the answer (processor.decode_answers), the image-token
count (processor.image_token_count), the latency of one call (prefill + every diffusion step, prefix cache on,
shirg_tools.timing), the prefix KV cache's size, and the kept/dropped overlay (shirg_tools.overlays.variant_panel).
Bad inputs raise ValueError with a message for the user (the processor's own, or one naming the field).
"""

import dataclasses
from pathlib import Path

import torch
from PIL import Image

from shirg_tools.diagnostics import variant_diagnostics
from shirg_tools.eval_tasks import TASKS, EvalSample
from shirg_tools.inference import (check_device, check_variant, denoising_steps, generation_settings,
                                   high_resolution_tokens, is_dream, load_pretrained, model_folder, resolve_dtype)
from shirg_tools.overlays import variant_panel
from shirg_tools.timing import timed_generate
from shirg_tools.variants import UNBUDGETED_METHODS, Variant, parse_variant

TASK = TASKS["synthetic-ocr"]  # the prompt suffix and answer length of the app's questions
CAPTION_WIDTH = 48  # characters of a caption line that fit a panel


@dataclasses.dataclass
class VariantResult:
    """What one variant did with the query: its label, answer text, image tokens the LM received, latency of the
    call in milliseconds, prefix KV-cache size in MiB, and the overlay panel."""

    label: str
    answer: str
    image_tokens: int
    latency_ms: float
    kv_mb: float
    panel: Image.Image


@dataclasses.dataclass
class Job:
    """One variant of a query, checked and ready to run: the image, the question, and the processor's outputs on
    the model's device with the image-token count they hold."""

    variant: Variant
    image: Image.Image
    question: str
    inputs: dict
    image_tokens: int


class DemoBackend:
    """One loaded model and processor, and what the app asks of them."""

    def __init__(self, model, processor, label: str):
        self.model, self.processor, self.label = model, processor, label

    @classmethod
    def from_folder(cls, folder: Path, device: str = "cpu", dtype: str = "auto") -> "DemoBackend":
        """The model of a lavida_shirg folder (shirg_tools.inference.model_folder rules: the folder, or the merged
        model of a training run) on `device` ("cpu", "cuda", "cuda:N") in `dtype` (inference.DTYPES); ValueError
        naming --model, --device or --dtype otherwise."""
        found = model_folder(Path(folder), "--model")
        target = check_device(device, "--device")
        resolved = resolve_dtype(dtype, target, "--dtype")
        model, processor = load_pretrained(found, resolved, target)
        return cls(model, processor, f"{found} ({target.type}, {resolved})")

    @property
    def full_tokens(self) -> int:
        """High-resolution tokens of one image: what `full` keeps and the largest budget."""
        return high_resolution_tokens(self.model)

    @property
    def default_budget(self) -> int:
        """The model config's selection_budget."""
        return self.model.config.selection_budget

    def variants(self, methods: list, budget) -> list:
        """[Variant] of the chosen selection methods (config SELECTION_METHODS), the selecting ones at `budget`
        tokens. ValueError when none is chosen, a method is unknown or the budget is not a whole number >= 1 (the
        model's own check, `prepare`, refuses budgets above its token count)."""
        if not methods:
            raise ValueError("no variant chosen: tick at least one variant")
        if any(method not in UNBUDGETED_METHODS for method in methods):
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not float(budget).is_integer() \
                    or budget < 1:
                raise ValueError(f"the budget must be a whole number of tokens from 1 to {self.full_tokens}, "
                                 f"got {budget!r}")
        return [parse_variant(method if method in UNBUDGETED_METHODS else f"{method}@{int(budget)}")
                for method in methods]

    def prepare(self, image: Image.Image, question: str, variants: list) -> list:
        """One Job per variant: its settings checked against the model (check_variant), the image and the prompt
        through the processor. ValueError with the processor's or the model's message for an image, question or
        budget they refuse."""
        if not question.strip():
            raise ValueError("the question is empty: type a question about the image")
        prompt = self.processor.build_prompt(TASK.prompt(question.strip()))
        jobs = []
        for variant in variants:
            check_variant(self.model, self.processor, variant)
            inputs = self.processor(images=[image], text=[prompt], **variant.call_settings())
            tokens = self.processor.image_token_count((image.height, image.width), variant.method, variant.budget,
                                                      variant.options)
            jobs.append(Job(variant, image, question, inputs.to(self.model.device), tokens))
        return jobs

    @torch.no_grad()
    def run(self, job: Job, answer_box=None) -> VariantResult:
        """Run one prepared variant once (see the module docstring); `answer_box` ((x0, y0, x1, y1) pixels, or
        None) is drawn on the overlay and gives its answer recall."""
        generation = generation_settings(TASK.gen_length, dream=is_dream(self.model))
        call = dict(job.inputs, **generation)  # the inputs carry their selection settings
        answer_ids, timing = timed_generate(self.model, call, denoising_steps(generation))
        answer = self.processor.decode_answers(answer_ids.cpu())[0]
        sample = EvalSample("query", job.question, [], job.image, answer_box=None if answer_box is None else 0,
                            text_boxes=None if answer_box is None else [answer_box])
        diagnostics = variant_diagnostics(self.model, job.inputs, job.variant, [sample])[0]
        caption = [job.variant.label[:CAPTION_WIDTH],
                   f"{job.image_tokens} image tokens; answer: {answer!r}"[:CAPTION_WIDTH]]
        panel = variant_panel(self.model, job.image, job.variant, caption, diagnostics, answer_box)
        return VariantResult(job.variant.label, answer, job.image_tokens, timing.total_s * 1000,
                             timing.kv_bytes / 2**20, panel)

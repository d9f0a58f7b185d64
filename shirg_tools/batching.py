"""From (image, question, answer) to model inputs, in two stages so that the token budget can be chosen late.

The number of image positions in `input_ids` depends on the selection method and budget, which the trainer picks
per optimizer step. So:
  1. `SampleEncoder.encode` (in dataloader workers) computes what does not depend on the budget: the anyres views,
     the image size, the high-resolution view (when some budget selects from it) and the tokenized chat prompt and
     answer (`processor.encode_prompt` / `encode_answer`: tokenized once); it rejects samples too long for the LM
     under the largest budget.
  2. `collate_samples` concatenates them; `BatchBuilder.build` (in the training process, once the step's budget
     is known) writes input_ids / attention_mask / labels / question_mask for that budget, exactly as
     `LavidaShirgProcessor.__call__` does.
"""

import numpy as np
import torch

from lavida_shirg.configuration_lavida_shirg import SelectionSettings
from lavida_shirg.shirg_selection import image_token_count
from lavida_shirg.processing_lavida_shirg import IGNORE_INDEX


class SkippedSample(Exception):
    """A sample that cannot be used; `reason` is a short category ("missing image", "too long", ...)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def hires_size_of(entries: list, processor):
    """The side of the high-resolution view the entries need (None when none selects from a single view)."""
    sizes = set()
    for entry in entries:
        layout = processor.selection(entry.method, entry.budget, entry.options)
        if layout["selection_method"] != "pooled" and layout["hires_source"] == "single-view":
            sizes.add(layout["hires_image_size"])
    if len(sizes) > 1:
        raise ValueError(f"the budget entries use different hires_image_size values {sorted(sizes)}")
    return sizes.pop() if sizes else None


class SampleEncoder:
    """The budget-independent part of a training sample (see the module docstring)."""

    def __init__(self, processor, entries: list, prompt_suffix: str = "", fim_tokens: bool = False):
        self.processor = processor
        self.fim_tokens = fim_tokens  # answers hold LaViDa's FIM marker and filler (training_data.FimAnswers)
        self.layouts = [processor.selection(e.method, e.budget, e.options) for e in entries]
        self.hires_size = hires_size_of(entries, processor)
        self.prompt_suffix = prompt_suffix

    def encode(self, image, question: str, answer: str) -> dict:
        """pixel_values (V, 3, S, S), image_size (2,), hires_pixel_values (1, 3, H, H) when needed, prompt (the
        processor's `encode_prompt`), answer (its `encode_answer` ids).

        Raises SkippedSample("empty question" / "empty answer" / "too long") for samples that cannot be trained on.
        """
        processor = self.processor
        question = question.replace(processor.image_token, "").strip()
        if not question:
            raise SkippedSample("empty question", "the question is empty once <image> is removed")
        if not answer.strip():
            raise SkippedSample("empty answer", f"question {question[:60]!r} has an empty answer")
        prompt = processor.build_prompt(question + self.prompt_suffix)
        views = processor.image_processor.preprocess([image], return_tensors="pt", hires_size=self.hires_size)
        size = tuple(views["image_sizes"][0].tolist())
        longest = max(image_token_count(size, layout) for layout in self.layouts)
        encoded_prompt, answer_ids = processor.encode_prompt(prompt), processor.encode_answer(answer, self.fim_tokens)
        prompt_length = sum(map(len, encoded_prompt[0])) + longest
        if prompt_length + len(answer_ids) > processor.model_max_length:
            raise SkippedSample("too long", f"{prompt_length} prompt + {len(answer_ids)} answer tokens exceed the "
                                            f"LM's {processor.model_max_length} positions")
        sample = {"pixel_values": views["pixel_values"], "image_size": views["image_sizes"][0],
                  "prompt": encoded_prompt, "answer": answer_ids}
        if self.hires_size is not None:
            sample["hires_pixel_values"] = views["hires_pixel_values"]
        return sample


def collate_samples(samples: list) -> dict:
    """Concatenate encoded samples: pixel_values (sum V, 3, S, S), image_sizes (B, 2), hires_pixel_values
    (B, 3, H, H) when present, prompts and answers (lists of encoded prompts and answer ids), skipped (the samples'
    skip records)."""
    batch = {
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
        "image_sizes": torch.stack([s["image_size"] for s in samples]),
        "prompts": [s["prompt"] for s in samples],
        "answers": [s["answer"] for s in samples],
        "skipped": [record for s in samples for record in s["skipped"]],
    }
    if "hires_pixel_values" in samples[0]:
        batch["hires_pixel_values"] = torch.cat([s["hires_pixel_values"] for s in samples])
    return batch


# LaViDa's collator draws n ~ U{-128, ..., 127} per batch and appends n EOS positions to the longest sample when n > 0
EXTRA_PADDING_LOW, EXTRA_PADDING_HIGH = -128, 128
EXTRA_PADDING_STREAM = 0x5EED_E05  # keeps these draws apart from the other seeded streams of (seed, step, micro-batch)


def lavida_extra_padding(seed: int, step: int, micro_batch: int) -> int:
    """The extra EOS positions of one micro-batch: max(n, 0), n ~ U{-128, ..., 127} (0 for 128 of the 256 values,
    1..127 otherwise: 31.75 on average), drawn from (seed, optimizer step, micro-batch) so that every process pads
    its micro-batch m of a step alike (as LaViDa's identically seeded collators do) and a resumed run repeats it."""
    generator = np.random.default_rng([EXTRA_PADDING_STREAM, seed, step, micro_batch])
    return max(int(generator.integers(EXTRA_PADDING_LOW, EXTRA_PADDING_HIGH)), 0)


class BatchBuilder:
    """Model inputs of a collated batch for one budget entry (the second stage of the module docstring).

    answer_window: W > 0 pads every sample to >= W answer positions; extra_padding_seed: the seed of LaViDa's random
    extra EOS padding (`lavida_extra_padding`), None for none."""

    def __init__(self, processor, answer_window: int = 0, extra_padding_seed: int | None = None):
        if not isinstance(answer_window, int) or answer_window < 0:
            raise ValueError(f"--answer_window must be a non-negative integer, got {answer_window!r}")
        self.processor = processor
        self.answer_window = answer_window
        self.extra_padding_seed = extra_padding_seed

    def extra_positions(self, step: int, micro_batch: int) -> int:
        """The extra EOS positions of micro-batch `micro_batch` of optimizer step `step` (0 without a seed)."""
        if self.extra_padding_seed is None:
            return 0
        return lavida_extra_padding(self.extra_padding_seed, step, micro_batch)

    def build(self, batch: dict, entry, extra_positions: int = 0) -> dict:
        """input_ids, attention_mask, labels, question_mask (B, T) for `entry`, plus the batch's pixel tensors
        (hires_pixel_values only when the entry selects from them) and `selection`, the entry's SelectionSettings.
        Same inputs as `processor(images, prompts, answers, **entry.call_kwargs())` (every sample
        right-padded to the longest with EOS ids and labels, attended), then right-padded the same way until every
        sample has >= `answer_window` answer positions, then by `extra_positions` more (LaViDa's collator; at most
        up to the processor's model_max_length, where LaViDa truncates)."""
        processor = self.processor
        layout = processor.selection(entry.method, entry.budget, entry.options)
        sizes = [[tuple(size)] for size in batch["image_sizes"].tolist()]
        text = processor.text_inputs(batch["prompts"], sizes, batch["answers"], layout)
        width = text["input_ids"].shape[1]
        if self.answer_window:
            prompt_lengths = (text["labels"] == IGNORE_INDEX).sum(axis=1)
            width = max(width, int(prompt_lengths.max()) + self.answer_window)
        text = self.pad_with_eos(text, min(width + extra_positions, max(processor.model_max_length, width)))
        inputs = {name: torch.from_numpy(value) for name, value in text.items()}
        inputs["pixel_values"] = batch["pixel_values"]
        inputs["image_sizes"] = batch["image_sizes"]
        if layout["selection_method"] != "pooled" and layout["hires_source"] == "single-view":
            inputs["hires_pixel_values"] = batch["hires_pixel_values"]
        if isinstance(layout, SelectionSettings):  # as the processor's output: the settings travel with the batch
            inputs["selection"] = layout
        return inputs

    def pad_with_eos(self, text: dict, width: int) -> dict:
        """Extend the (B, T) arrays on the right to `width`: input_ids and labels EOS (targets), attention_mask 1,
        question_mask False (the padding of `processor.text_inputs`)."""
        extra = width - text["input_ids"].shape[1]
        if extra <= 0:
            return text
        eos = self.processor.eos_token_id
        fill = {"input_ids": eos, "labels": eos, "attention_mask": 1, "question_mask": False}
        return {name: np.pad(value, ((0, 0), (0, extra)), constant_values=fill[name]) for name, value in text.items()}

"""Processor of LaViDa-LLaDA with SHIRG: "anyres" image views + LLaDA chat prompts -> model inputs.

`LavidaShirgImageProcessor` turns each image into LaViDa's views: a global view (the whole image squashed to
view_size x view_size) followed by the view-size crops, in row-major order, of the image resized into its best
pinpoint canvas (black padding around it). `LavidaShirgProcessor` writes the "llada" chat prompt, replaces every
`<image>` placeholder with as many `image_token_id` positions as the model fills with image features, and builds
the generation (left padding) or training (answer labels, right EOS padding) batch.

This file travels as remote code with saved processors: it imports only `transformers`, PIL, numpy, torch and its
sibling `image_layout`.
"""

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs

from .configuration_lavida_shirg import SELECTION_FIELDS, with_selection_overrides
from .image_layout import image_token_count, resized_size_in_canvas, select_best_resolution

IGNORE_INDEX = -100  # label of the positions that carry no loss (prompt and image positions)

EOT_TOKEN = "<|eot_id|>"
USER_HEADER = "<|start_header_id|>user<|end_header_id|>\n\n"

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

# LaViDa's "llada" conversation format. Images of a turn come first, one "<image>\n" each, then its text.
LLADA_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}"
    "{%- for item in content if item['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for item in content if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_content = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_content = '" + DEFAULT_SYSTEM_PROMPT + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- '<|startoftext|><|start_header_id|>system<|end_header_id|>\\n\\n' + render(system_content) + '<|eot_id|>' -}}"
    "{%- for message in turns -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{{- render(message['content']) + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

ACCEPTED_IMAGES = (
    "PIL images, uint8 numpy arrays (HxW or HxWxC with C in 1, 3, 4) or uint8 torch tensors (CxHxW with C in 1, 3, 4)"
)


def _image_type_error(image) -> TypeError:
    """The TypeError for an input that is not an accepted image."""
    shape = getattr(image, "shape", None)
    dtype = getattr(image, "dtype", None)
    detail = f" of shape {tuple(shape)} and dtype {dtype}" if shape is not None else ""
    return TypeError(f"`images` must be {ACCEPTED_IMAGES}; got {type(image).__name__}{detail}")


def _array_to_pil(array: np.ndarray, original) -> Image.Image:
    """A PIL image ("L", "RGB" or "RGBA") of a uint8 HxW or HxWxC (C in 1, 3, 4) array."""
    if array.dtype != np.uint8:
        raise _image_type_error(original)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise _image_type_error(original)
    return Image.fromarray(np.ascontiguousarray(array))


def to_rgb_image(image) -> Image.Image:
    """The image as an RGB PIL image, by PIL's `.convert("RGB")` as in LaViDa.

    RGBA/LA drop their alpha channel (transparent pixels keep their stored colour, no compositing), L/1 repeat the
    grey level in the three channels, P looks up its palette, CMYK/YCbCr/LAB/HSV use PIL's colour conversion.
    NumPy arrays and torch tensors go through the PIL image of their channel count (1: L, 3: RGB, 4: RGBA).
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, image).convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise _image_type_error(image)
        return _array_to_pil(image.permute(1, 2, 0).numpy(), image).convert("RGB")
    raise _image_type_error(image)


class LavidaShirgImagesKwargs(ImagesKwargs, total=False):
    """The parameters of `LavidaShirgImageProcessor` beyond the common image-processing ones."""

    view_size: int
    image_grid_pinpoints: list


class LavidaShirgImageProcessor(BaseImageProcessor):
    """LaViDa's anyres preprocessing: per image, [global view, crops...] as normalised CHW float32 views.

    Parameters: `view_size` (side of a vision view in pixels), `image_grid_pinpoints` ((height, width) canvases,
    multiples of view_size, in LaViDa's order: it breaks ties), `image_mean`/`image_std` (per channel),
    `rescale_factor` (pixel scale before normalising) and `resample` (PIL filter code, 3 = bicubic).
    """

    valid_kwargs = LavidaShirgImagesKwargs
    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(
        self,
        view_size: int,
        image_grid_pinpoints: list,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        rescale_factor: float = 1 / 255,
        resample: int = int(Image.Resampling.BICUBIC),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.view_size = int(view_size)
        self.image_grid_pinpoints = [[int(height), int(width)] for height, width in image_grid_pinpoints]
        self.image_mean = [float(value) for value in image_mean]
        self.image_std = [float(value) for value in image_std]
        self.rescale_factor = float(rescale_factor)
        self.resample = int(resample)
        self._check_parameters()

    def _check_parameters(self):
        """Raise a ValueError if the pinpoints are not positive multiples of view_size or mean/std are not RGB."""
        if self.view_size <= 0:
            raise ValueError(f"view_size must be a positive integer, got {self.view_size}")
        if not self.image_grid_pinpoints:
            raise ValueError("image_grid_pinpoints must list at least one (height, width) pair")
        for pair in self.image_grid_pinpoints:
            if any(side <= 0 or side % self.view_size for side in pair):
                raise ValueError(
                    f"image_grid_pinpoints entries must be positive multiples of view_size ({self.view_size}), "
                    f"got {pair}"
                )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values, got {self.image_mean} and {self.image_std}")

    def views(self, image: Image.Image) -> list:
        """LaViDa's views of an RGB image: [global view, crops of the padded best-pinpoint canvas, row-major]."""
        size = (image.height, image.width)
        canvas_h, canvas_w = select_best_resolution(size, self.image_grid_pinpoints)
        new_h, new_w = resized_size_in_canvas(size, (canvas_h, canvas_w))
        canvas = Image.new("RGB", (canvas_w, canvas_h), (0, 0, 0))
        canvas.paste(image.resize((new_w, new_h), self.resample), ((canvas_w - new_w) // 2, (canvas_h - new_h) // 2))
        step = self.view_size
        crops = [
            canvas.crop((left, top, left + step, top + step))
            for top in range(0, canvas_h, step)
            for left in range(0, canvas_w, step)
        ]
        return [image.resize((step, step), self.resample), *crops]

    def normalize_views(self, views: list) -> np.ndarray:
        """(num_views, 3, S, S) float32: each view's pixels x rescale_factor, minus image_mean, over image_std."""
        pixels = np.stack([np.asarray(view, dtype=np.float32) for view in views]) * np.float32(self.rescale_factor)
        pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return pixels.transpose(0, 3, 1, 2)

    def preprocess(self, images, return_tensors="pt", hires_size=None) -> BatchFeature:
        """`pixel_values` (all images' views, concatenated in order) and `image_sizes` ((height, width) per image);
        with `hires_size`, also `hires_pixel_values` (one view per image: the whole image squashed to
        hires_size x hires_size, like the global view) for SHIRG's high-resolution selection.

        `images`: one image or a list of them (see `to_rgb_image` for the accepted types). An empty list gives an
        empty BatchFeature.
        """
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            return BatchFeature({}, tensor_type=return_tensors)
        rgb_images = [to_rgb_image(image) for image in images]
        for image in rgb_images:
            if image.width == 0 or image.height == 0:
                raise ValueError(f"`images` must have at least one pixel, got an image of (height, width) "
                                 f"({image.height}, {image.width})")
        pixel_values = np.concatenate([self.normalize_views(self.views(image)) for image in rgb_images])
        image_sizes = np.array([[image.height, image.width] for image in rgb_images], dtype=np.int64)
        outputs = {"pixel_values": pixel_values, "image_sizes": image_sizes}
        if hires_size is not None:
            hires = [image.resize((hires_size, hires_size), self.resample) for image in rgb_images]
            outputs["hires_pixel_values"] = self.normalize_views(hires)
        return BatchFeature(outputs, tensor_type=return_tensors)


class LavidaShirgProcessor(ProcessorMixin):
    """LaViDa-LLaDA processor: chat prompts with `<image>` placeholders + images -> input_ids, masks, pixels.

    Every `<image>` becomes `image_token_count((height, width))` copies of `image_token_id` (an id outside the LM
    vocabulary: the model fills those positions with image features); `<image>` is never a tokenizer token.
    `pooled_view_size` is the side of each view's pooled feature map, `model_max_length` the LM's maximum number of
    positions; `eos_token_id`, `pad_token_id` and `eot_token_id` must be the tokenizer's ids of its eos and pad
    tokens and of `<|eot_id|>`. `selection_layout` holds the model's SHIRG fields (SELECTION_FIELDS) and the vision
    patch size, so that the image positions of every selection method are counted exactly as the model counts them;
    without it only the pooled path is available.
    """

    def __init__(
        self,
        image_processor,
        tokenizer,
        image_token_id: int,
        pooled_view_size: int,
        model_max_length: int,
        eos_token_id: int,
        pad_token_id: int,
        eot_token_id: int,
        image_token: str = "<image>",
        chat_template: str = LLADA_CHAT_TEMPLATE,
        selection_layout: dict | None = None,
    ):
        self.selection_layout = None if selection_layout is None else dict(selection_layout)
        self.image_token = image_token
        self.image_token_id = int(image_token_id)
        self.pooled_view_size = int(pooled_view_size)
        self.model_max_length = int(model_max_length)
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        self.eot_token_id = int(eot_token_id)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self._check_token_ids()

    def _check_token_ids(self):
        """Raise a ValueError if the special ids disagree with the tokenizer or image_token_id is one of its ids."""
        expected = {
            "eos_token_id": self.tokenizer.eos_token_id,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eot_token_id": self.tokenizer.convert_tokens_to_ids(EOT_TOKEN),
        }
        for name, tokenizer_id in expected.items():
            if getattr(self, name) != tokenizer_id:
                raise ValueError(f"{name} ({getattr(self, name)}) is not the tokenizer's id ({tokenizer_id})")
        if self.image_token_id < len(self.tokenizer):
            raise ValueError(
                f"image_token_id ({self.image_token_id}) must lie outside the tokenizer's vocabulary "
                f"[0, {len(self.tokenizer)})"
            )

    @classmethod
    def from_config(cls, config, tokenizer) -> "LavidaShirgProcessor":
        """The processor (and its image processor) of a `ShirgConfig`, checked against `tokenizer`'s special ids.

        A tokenizer without a pad token gets the config's pad token (LaViDa pads with EOS).
        """
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
        image_processor = LavidaShirgImageProcessor(
            view_size=config.vision_config.image_size, image_grid_pinpoints=config.image_grid_pinpoints
        )
        return cls(
            image_processor,
            tokenizer,
            image_token_id=config.image_token_id,
            pooled_view_size=config.pooled_view_size,
            model_max_length=config.text_config.max_position_embeddings,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
            eot_token_id=config.eot_token_id,
            selection_layout={"patch_size": config.vision_config.patch_size,
                              **{name: getattr(config, name) for name in SELECTION_FIELDS}},
        )

    def build_prompt(self, question: str, num_images: int = 1) -> str:
        """The chat-template prompt of one user turn with `num_images` images and `question`, ready for an answer."""
        if not question.strip():
            raise ValueError("`question` is empty")
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        return self.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def selection(self, method=None, budget=None, options=None) -> dict:
        """The token layout of a call: this processor's geometry and selection_layout, overridden by `method`,
        `budget` and `options` (SHIRG field name -> value), validated as the model validates them."""
        layout = {
            "image_grid_pinpoints": self.image_processor.image_grid_pinpoints,
            "view_size": self.image_processor.view_size,
            "pooled_view_size": self.pooled_view_size,
            "selection_method": "pooled",
        }
        if self.selection_layout is None:
            if (method or "pooled") != "pooled" or options:
                raise ValueError("this processor has no selection_layout (build it with from_config): only "
                                 "selection_method='pooled' is available")
            return layout
        return with_selection_overrides({**layout, **self.selection_layout}, method, budget, options)

    def image_token_count(self, image_size, method=None, budget=None, options=None) -> int:
        """Image positions of one (height, width) image under the given selection settings (default: pooled)."""
        return image_token_count(image_size, self.selection(method, budget, options))

    def question_span(self, prompt: str) -> tuple:
        """Character span [start, end) of the question in a prompt: the last user turn (the whole prompt if it has
        no user header) up to `<|eot_id|>`, after its image placeholders, without surrounding whitespace."""
        header = prompt.rfind(USER_HEADER)
        start = 0 if header < 0 else header + len(USER_HEADER)
        end = prompt.find(EOT_TOKEN, start)
        end = len(prompt) if end < 0 else end
        last_image = prompt.rfind(self.image_token, start, end)
        if last_image >= 0:
            start = last_image + len(self.image_token)
        while start < end and prompt[start].isspace():
            start += 1
        while end > start and prompt[end - 1].isspace():
            end -= 1
        return start, end

    def question_text(self, prompt: str) -> str:
        """The question of a prompt (see `question_span`)."""
        start, end = self.question_span(prompt)
        return prompt[start:end].replace(self.image_token, "").strip()

    def __call__(self, images=None, text=None, answers=None, return_tensors="pt", selection_method=None,
                 selection_budget=None, selection_options=None):
        """Model inputs of prompts with `<image>` placeholders (and, for training, their answers).

        `text`: a prompt or a list of prompts. `images`: one image, a flat list in placeholder order over all
        prompts, or a list of lists (the images of each prompt). `answers`: None (generation: left padding with
        pad_token_id, attention 0 on padding) or one answer per prompt (training: prompt + answer + `<|eot_id|>`,
        `labels` = IGNORE_INDEX on the prompt and the ids on answer, eot and padding, right padding with
        eos_token_id attended, as in LaViDa). `selection_method` / `selection_budget` / `selection_options`: the
        SHIRG settings the model will be called with (they set the number of image positions; a non-pooled method
        with hires_source 'single-view' also gets `hires_pixel_values`).
        Returns input_ids, attention_mask, question_mask (the question's tokens, for text-conditioned selection),
        (labels), and pixel_values + image_sizes (+ hires_pixel_values) when there are images.
        """
        layout = self.selection(selection_method, selection_budget, selection_options)
        prompts = self._prompt_list(text)
        images_per_prompt = self._images_per_prompt(images, prompts)
        answer_list = self._answer_list(answers, len(prompts))
        flat_images = [image for group in images_per_prompt for image in group]
        single_view = layout["selection_method"] != "pooled" and layout["hires_source"] == "single-view"
        hires_size = layout["hires_image_size"] if single_view else None
        image_inputs = self.image_processor(flat_images, return_tensors=None, hires_size=hires_size)
        sizes = iter([tuple(size) for size in image_inputs["image_sizes"].tolist()] if flat_images else [])
        image_sizes = [[next(sizes) for _ in group] for group in images_per_prompt]
        batch = self.text_inputs(prompts, image_sizes, answer_list, layout)
        return BatchFeature({**batch, **image_inputs}, tensor_type=return_tensors)

    def text_inputs(self, prompts: list, image_sizes: list, answers=None, layout=None) -> dict:
        """input_ids, attention_mask, question_mask (and labels with `answers`) as numpy arrays, for prompts whose
        images have the (height, width) sizes `image_sizes` (one list per prompt), under the token `layout` of
        `selection(...)` (default: this processor's). The text half of `__call__`, usable once the images were
        processed apart (e.g. when a trainer picks the token budget late)."""
        layout = self.selection() if layout is None else layout
        encoded = [self.encode_prompt(prompt, [image_token_count(size, layout) for size in sizes])
                   for prompt, sizes in zip(prompts, image_sizes)]
        prompt_ids = [ids for ids, _ in encoded]
        question_flags = [flags for _, flags in encoded]
        if answers is None:
            self._check_lengths(prompt_ids, [[] for _ in prompt_ids])
            return self._generation_batch(prompt_ids, question_flags)
        answer_ids = [self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eot_token_id]
                      for answer in answers]
        self._check_lengths(prompt_ids, answer_ids)
        return self._training_batch(prompt_ids, answer_ids, question_flags)

    def _prompt_list(self, text) -> list:
        """`text` as a non-empty list of prompts; raise if it is not str / list of str or a question is empty."""
        prompts = [text] if isinstance(text, str) else text
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`text` must be a prompt string or a non-empty list of them, got {type(text).__name__}")
        for index, prompt in enumerate(prompts):
            if not self.question_text(prompt):
                raise ValueError(f"`text` sample {index} has an empty question: {prompt!r}")
        return list(prompts)

    def _images_per_prompt(self, images, prompts) -> list:
        """The images of each prompt; raise if their number differs from the prompt's `<image>` placeholders."""
        placeholders = [prompt.count(self.image_token) for prompt in prompts]
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if any(isinstance(item, (list, tuple)) for item in images):
            return self._nested_images(list(images), placeholders)
        if len(images) != sum(placeholders):
            raise ValueError(
                f"`text` has {sum(placeholders)} {self.image_token} placeholders but `images` has {len(images)} images"
            )
        starts = np.cumsum([0, *placeholders]).tolist()
        return [list(images[start:stop]) for start, stop in zip(starts, starts[1:])]

    def _nested_images(self, images: list, placeholders: list) -> list:
        """Check a list of per-prompt image lists against the placeholder counts of the prompts."""
        if len(images) != len(placeholders) or not all(isinstance(group, (list, tuple)) for group in images):
            raise ValueError(
                f"nested `images` must be one list per prompt: {len(placeholders)} prompts in `text`, "
                f"got {len(images)} entries"
            )
        for index, (group, expected) in enumerate(zip(images, placeholders)):
            if len(group) != expected:
                raise ValueError(
                    f"`text` sample {index} has {expected} {self.image_token} placeholders but `images`[{index}] "
                    f"has {len(group)} images"
                )
        return [list(group) for group in images]

    @staticmethod
    def _answer_list(answers, batch_size: int):
        """`answers` as a list with one answer per prompt (None stays None)."""
        if answers is None:
            return None
        answer_list = [answers] if isinstance(answers, str) else answers
        if not isinstance(answer_list, (list, tuple)) or not all(isinstance(a, str) for a in answer_list):
            raise ValueError(f"`answers` must be a string or a list of strings, got {type(answers).__name__}")
        if len(answer_list) != batch_size:
            raise ValueError(f"`answers` has {len(answer_list)} answers but `text` has {batch_size} prompts")
        return list(answer_list)

    def encode_prompt(self, prompt: str, image_token_counts: list) -> tuple:
        """Token ids of a prompt (its text segments tokenized apart, joined by runs of image_token_id) and, per id,
        whether it belongs to the question (its character span overlaps `question_span`)."""
        question_start, question_end = self.question_span(prompt)
        ids, flags, offset = [], [], 0
        for index, segment in enumerate(prompt.split(self.image_token)):
            if index:
                ids += [self.image_token_id] * image_token_counts[index - 1]
                flags += [False] * image_token_counts[index - 1]
                offset += len(self.image_token)
            encoded = self.tokenizer(segment, add_special_tokens=False, return_offsets_mapping=True)
            ids += encoded["input_ids"]
            flags += [offset + end > question_start and offset + start < question_end and end > start
                      for start, end in encoded["offset_mapping"]]
            offset += len(segment)
        return ids, flags

    def _check_lengths(self, prompt_ids: list, answer_ids: list):
        """Raise a ValueError naming `text` if a sample is longer than model_max_length."""
        for index, (prompt, answer) in enumerate(zip(prompt_ids, answer_ids)):
            length = len(prompt) + len(answer)
            if length > self.model_max_length:
                image_positions = prompt.count(self.image_token_id)
                raise ValueError(
                    f"`text` sample {index} needs {length} tokens ({image_positions} of them image tokens), "
                    f"more than model_max_length ({self.model_max_length})"
                )

    def _generation_batch(self, prompt_ids: list, question_flags: list) -> dict:
        """input_ids left-padded with pad_token_id, attention_mask 0 on the padding, question_mask."""
        width = max(len(ids) for ids in prompt_ids)
        input_ids = np.full((len(prompt_ids), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(prompt_ids), width), dtype=np.int64)
        question_mask = np.zeros((len(prompt_ids), width), dtype=bool)
        for row, (ids, flags) in enumerate(zip(prompt_ids, question_flags)):
            input_ids[row, width - len(ids):] = ids
            attention_mask[row, width - len(ids):] = 1
            question_mask[row, width - len(ids):] = flags
        return {"input_ids": input_ids, "attention_mask": attention_mask, "question_mask": question_mask}

    def _training_batch(self, prompt_ids: list, answer_ids: list, question_flags: list) -> dict:
        """prompt + answer ids right-padded with eos_token_id; labels: IGNORE_INDEX on the prompt, ids elsewhere."""
        sequences = [prompt + answer for prompt, answer in zip(prompt_ids, answer_ids)]
        width = max(len(ids) for ids in sequences)
        input_ids = np.full((len(sequences), width), self.eos_token_id, dtype=np.int64)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = ids
        labels = input_ids.copy()
        question_mask = np.zeros(input_ids.shape, dtype=bool)
        for row, (prompt, flags) in enumerate(zip(prompt_ids, question_flags)):
            labels[row, : len(prompt)] = IGNORE_INDEX
            question_mask[row, : len(prompt)] = flags
        return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids), "labels": labels,
                "question_mask": question_mask}

    def decode(self, token_ids) -> str:
        """Text of generated answer ids: cut at the first eos or `<|eot_id|>`, special tokens skipped, stripped."""
        ids = [int(token) for token in token_ids]
        stops = [index for index, token in enumerate(ids) if token in (self.eos_token_id, self.eot_token_id)]
        return self.tokenizer.decode(ids[: stops[0]] if stops else ids, skip_special_tokens=True).strip()

    def batch_decode(self, sequences) -> list:
        """`decode` of each row of `sequences`."""
        return [self.decode(row) for row in sequences]


LavidaShirgImageProcessor.register_for_auto_class("AutoImageProcessor")
LavidaShirgProcessor.register_for_auto_class("AutoProcessor")

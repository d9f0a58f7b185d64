"""Processor of LaViDa-LLaDA with SHIRG: "anyres" image views + LLaDA chat prompts -> model inputs.

`LavidaShirgImageProcessor` turns each image into LaViDa's views: a global view (the whole image squashed to
view_size x view_size) followed by the view-size crops, in row-major order, of the image resized into its best
pinpoint canvas (black padding around it). `LavidaShirgProcessor` writes the "llada" chat prompt, replaces every
`<image>` placeholder with as many `image_token_id` positions as the model fills with image features, and builds
the generation (left padding) or training (answer labels, right EOS padding) batch.

This file travels as remote code with saved processors: it imports only `transformers`, PIL, numpy, torch and its
sibling `image_layout`.
"""

import warnings

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs

from .configuration_lavida_shirg import SELECTION_FIELDS, SelectionSettings, ShirgConfig, with_selection_overrides
from .image_layout import image_token_count, resized_size_in_canvas, select_best_resolution

IGNORE_INDEX = -100  # label of the positions that carry no loss (prompt and image positions)
PADDING_CHOICES = (True, False, "longest", "max_length", "do_not_pad")
# keyword arguments of LavidaShirgProcessor.__call__ that apply_chat_template passes on
CALL_ARGUMENTS = ("answers", "return_tensors", "selection_method", "selection_budget", "selection_options", "padding",
                  "padding_side", "truncation", "max_length")

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
    "PIL images, uint8 or uint16 numpy arrays (HxW or HxWxC with C in 1, 3, 4) or uint8 torch tensors (CxHxW with C in "
    "1, 3, 4)"
)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL's 16-bit greyscale (16-bit PNG/TIFF scans)
# PIL's own decompression-bomb warning threshold (Image.MAX_IMAGE_PIXELS as Pillow ships it): ~9459 x 9459 pixels
DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3


def _image_type_error(image, index: int) -> TypeError:
    """The TypeError for an input that is not an accepted image."""
    shape = getattr(image, "shape", None)
    dtype = getattr(image, "dtype", None)
    detail = f" of shape {tuple(shape)} and dtype {dtype}" if shape is not None else ""
    return TypeError(f"`images`[{index}] must be one of {ACCEPTED_IMAGES}; got {type(image).__name__}{detail}")


def _sixteen_to_eight_bits(array: np.ndarray) -> np.ndarray:
    """uint8 levels of 16-bit ones: round(v * 255 / 65535) = round(v / 257)."""
    return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _array_to_pil(array: np.ndarray, original, index: int) -> Image.Image:
    """A PIL image ("L", "RGB" or "RGBA") of a uint8 or uint16 HxW or HxWxC (C in 1, 3, 4) array."""
    if array.dtype == np.uint16:
        array = _sixteen_to_eight_bits(array)
    if array.dtype != np.uint8:
        raise _image_type_error(original, index)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise _image_type_error(original, index)
    return Image.fromarray(np.ascontiguousarray(array))


def image_size_of(image, index: int) -> tuple:
    """(height, width) of an accepted image, read without decoding or copying its pixels."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        return tuple(image.shape[:2])
    if isinstance(image, torch.Tensor) and image.ndim == 3:
        return tuple(image.shape[1:])
    raise _image_type_error(image, index)


def _pil_to_rgb(image: Image.Image, index: int) -> Image.Image:
    """PIL's `.convert("RGB")` (LaViDa's), with 16-bit greyscale rescaled to 8 bits first, ambiguous 32-bit modes
    refused, a warning for animated images, and decoding errors naming the image."""
    try:
        if image.mode in SIXTEEN_BIT_MODES:
            return Image.fromarray(_sixteen_to_eight_bits(np.asarray(image))).convert("RGB")
        if image.mode in ("I", "F"):
            kind = "32-bit integer" if image.mode == "I" else "32-bit float"
            raise ValueError(
                f"`images`[{index}] has PIL mode {image.mode!r} ({kind} pixels), whose value range is ambiguous: "
                "convert it to 8 bits first (for 16-bit data: image.point(lambda v: v / 257).convert('L'))"
            )
        if getattr(image, "n_frames", 1) > 1:
            warnings.warn(f"`images`[{index}] is animated ({image.n_frames} frames): only its current frame "
                          f"(frame {image.tell()}) is used", stacklevel=4)
        return image.convert("RGB")
    except OSError as error:  # raised by PIL's lazy decoder on truncated or corrupt files
        raise ValueError(f"`images`[{index}] could not be decoded: {error}") from error


def to_rgb_image(image, index: int = 0) -> Image.Image:
    """The image as an RGB PIL image, by PIL's `.convert("RGB")` as in LaViDa.

    RGBA/LA drop their alpha channel (transparent pixels keep their stored colour, no compositing), L/1 repeat the
    grey level in the three channels, P looks up its palette, CMYK/YCbCr/LAB/HSV use PIL's colour conversion.
    16-bit greyscale (PIL "I;16" modes, uint16 arrays) is rescaled to 8 bits (v / 257, rounded); PIL modes "I" and
    "F" are refused (their range is unknown). Animated images use their current frame, with a warning.
    NumPy arrays and torch tensors go through the PIL image of their channel count (1: L, 3: RGB, 4: RGBA).
    `index` names the image in errors (`images`[index]).
    """
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, index)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, image, index).convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise _image_type_error(image, index)
        return _array_to_pil(image.permute(1, 2, 0).numpy(), image, index).convert("RGB")
    raise _image_type_error(image, index)


class LavidaShirgImagesKwargs(ImagesKwargs, total=False):
    """The parameters of `LavidaShirgImageProcessor` beyond the common image-processing ones."""

    view_size: int
    image_grid_pinpoints: list
    max_image_pixels: int


class LavidaShirgImageProcessor(BaseImageProcessor):
    """LaViDa's anyres preprocessing: per image, [global view, crops...] as normalised CHW float32 views.

    Parameters: `view_size` (side of a vision view in pixels), `image_grid_pinpoints` ((height, width) canvases,
    multiples of view_size, in LaViDa's order: it breaks ties), `image_mean`/`image_std` (per channel),
    `rescale_factor` (pixel scale before normalising), `resample` (PIL filter code, 3 = bicubic) and
    `max_image_pixels` (larger images are refused before any pixel is copied; default: PIL's decompression-bomb
    threshold, 89,478,485 pixels; downscale larger images yourself, e.g. with `Image.thumbnail`).
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
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.max_image_pixels = max_image_pixels
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
        if isinstance(self.max_image_pixels, bool) or not isinstance(self.max_image_pixels, int) or \
                self.max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be a positive integer, got {self.max_image_pixels!r}")

    def checked_rgb_image(self, image, index: int) -> Image.Image:
        """`to_rgb_image`, after refusing (before any copy) an empty image or one above max_image_pixels."""
        height, width = image_size_of(image, index)
        if height == 0 or width == 0:
            raise ValueError(f"`images`[{index}] must have at least one pixel, got (height, width) ({height}, {width})")
        if height * width > self.max_image_pixels:
            raise ValueError(
                f"`images`[{index}] has {height} x {width} = {height * width:,} pixels, more than max_image_pixels "
                f"({self.max_image_pixels:,}): downscale it first (e.g. image.thumbnail((4096, 4096))) or raise "
                "the image processor's max_image_pixels"
            )
        return to_rgb_image(image, index)

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

    def normalize_views(self, views: list, do_rescale=True, rescale_factor=None, do_normalize=True, image_mean=None,
                        image_std=None) -> np.ndarray:
        """(num_views, 3, S, S) float32: each view's pixels x rescale_factor (do_rescale), minus image_mean, over
        image_std (do_normalize); None takes this processor's value."""
        pixels = np.stack([np.asarray(view, dtype=np.float32) for view in views])
        if do_rescale:
            pixels = pixels * np.float32(self.rescale_factor if rescale_factor is None else rescale_factor)
        if do_normalize:
            mean = np.asarray(self.image_mean if image_mean is None else image_mean, np.float32)
            std = np.asarray(self.image_std if image_std is None else image_std, np.float32)
            pixels = (pixels - mean) / std
        return pixels.transpose(0, 3, 1, 2)

    def preprocess(self, images, return_tensors="pt", hires_size=None, do_rescale=True, rescale_factor=None,
                   do_normalize=True, image_mean=None, image_std=None) -> BatchFeature:
        """`pixel_values` (all images' views, concatenated in order) and `image_sizes` ((height, width) per image);
        with `hires_size`, also `hires_pixel_values` (one view per image: the whole image squashed to
        hires_size x hires_size, like the global view) for SHIRG's high-resolution selection.

        `images`: one image or a list of them (see `to_rgb_image` for the accepted types). An empty list gives an
        empty BatchFeature. `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`, `image_std`: this call's
        pixel scaling (transformers' image-processor names; None: the processor's values).
        """
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            return BatchFeature({}, tensor_type=return_tensors)
        scaling = dict(do_rescale=do_rescale, rescale_factor=rescale_factor, do_normalize=do_normalize,
                       image_mean=image_mean, image_std=image_std)
        rgb_images = [self.checked_rgb_image(image, index) for index, image in enumerate(images)]
        pixel_values = np.concatenate([self.normalize_views(self.views(image), **scaling) for image in rgb_images])
        image_sizes = np.array([[image.height, image.width] for image in rgb_images], dtype=np.int64)
        outputs = {"pixel_values": pixel_values, "image_sizes": image_sizes}
        if hires_size is not None:
            hires = [image.resize((hires_size, hires_size), self.resample) for image in rgb_images]
            outputs["hires_pixel_values"] = self.normalize_views(hires, **scaling)
        return BatchFeature(outputs, tensor_type=return_tensors)


class LavidaShirgProcessor(ProcessorMixin):
    """LaViDa-LLaDA processor: chat prompts with `<image>` placeholders + images -> input_ids, masks, pixels.

    Every `<image>` becomes `image_token_count((height, width))` copies of `image_token_id` (the model fills those
    positions with image features): the tokenizer's `<image>` token where it has one, else an id beyond its
    vocabulary.
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
        # a processor saved before a SHIRG field was added (detail_term) gets the field's default: the fields added
        # since choose which tokens are kept, not how many
        self.selection_layout = None if selection_layout is None else {
            **{name: getattr(ShirgConfig, name) for name in SELECTION_FIELDS}, **selection_layout}
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
        self._check_image_token_id()

    def _check_image_token_id(self):
        """image_token_id must be the tokenizer's `<image>` token or lie beyond its vocabulary, so that no text token
        (also none added later with `add_tokens`) can take that id. Checked again at every call."""
        tokenizer_image_id = self.tokenizer.get_vocab().get(self.image_token)
        if tokenizer_image_id is not None:
            if tokenizer_image_id != self.image_token_id:
                raise ValueError(f"image_token_id ({self.image_token_id}) is not the tokenizer's id of "
                                 f"{self.image_token} ({tokenizer_image_id})")
        elif self.image_token_id < len(self.tokenizer):
            raise ValueError(
                f"image_token_id ({self.image_token_id}) is the id of the tokenizer's token "
                f"{self.tokenizer.convert_ids_to_tokens(self.image_token_id)!r}: add {self.image_token} to the "
                f"tokenizer as a special token before any other token (tokenizer.add_special_tokens("
                f"{{'additional_special_tokens': [{self.image_token!r}]}})), so that it takes that id"
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
        no user header) up to its closing `<|eot_id|>` (the last one: a question may contain that string), after
        the turn's leading image placeholders (the template writes a turn's images first), without surrounding
        whitespace."""
        header = prompt.rfind(USER_HEADER)
        start = 0 if header < 0 else header + len(USER_HEADER)
        end = prompt.rfind(EOT_TOKEN, start)
        end = len(prompt) if end < 0 else end
        while True:
            while start < end and prompt[start].isspace():
                start += 1
            if not prompt.startswith(self.image_token, start) or start + len(self.image_token) > end:
                break
            start += len(self.image_token)
        while end > start and prompt[end - 1].isspace():
            end -= 1
        return start, end

    def question_text(self, prompt: str) -> str:
        """The question of a prompt (see `question_span`)."""
        start, end = self.question_span(prompt)
        return prompt[start:end].replace(self.image_token, "").strip()

    def __call__(self, images=None, text=None, videos=None, audio=None, answers=None, return_tensors="pt",
                 selection_method=None, selection_budget=None, selection_options=None, padding=True,
                 padding_side=None, truncation=None, max_length=None, add_special_tokens=None,
                 sanitize_control_tokens=None):
        """Model inputs of prompts with `<image>` placeholders (and, for training, their answers).

        `text`: a prompt or a list of prompts. `images`: one image, a flat list in placeholder order over all
        prompts, or a list of lists (the images of each prompt). `answers`: None (generation: left padding with
        pad_token_id, attention 0 on padding) or one answer per prompt (training: prompt + answer + `<|eot_id|>`,
        `labels` = IGNORE_INDEX on the prompt and the ids on answer, eot and padding, right padding with
        eos_token_id attended, as in LaViDa). `selection_method` / `selection_budget` / `selection_options`: the
        SHIRG settings the model will be called with (they set the number of image positions; a non-pooled method
        with hires_source 'single-view' also gets `hires_pixel_values`).
        Tokenizer conventions: `padding` True / "longest" (default), "max_length" (to `max_length`) or False (the
        samples must have one length); `padding_side` must be the side of the batch ("left" for generation,
        "right" for training); `max_length` (default model_max_length) refuses longer samples; `truncation` is
        refused (cutting a LaViDa prompt breaks its image runs or template); `add_special_tokens` may only be False
        (the chat template writes `<|startoftext|>` itself); `sanitize_control_tokens` is accepted: the question
        is always encoded as plain text (see `encode_prompt`). `videos` / `audio` are refused (images only).
        Returns input_ids, attention_mask, question_mask (the question's tokens, for text-conditioned selection),
        (labels), and pixel_values + image_sizes (+ hires_pixel_values) when there are images.
        """
        for name, value in (("videos", videos), ("audio", audio)):
            if value is not None:
                raise ValueError(f"`{name}` is not supported: LaViDa-SHIRG reads images")
        batch_shape = self._batch_shape(answers is not None, padding, padding_side, truncation, max_length,
                                        add_special_tokens)
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
        batch = self.text_inputs(prompts, image_sizes, answer_list, layout, **batch_shape)
        encoded = BatchFeature({**batch, **image_inputs}, tensor_type=return_tensors)
        if all(name in layout for name in SELECTION_FIELDS):  # the model reads the settings from the inputs
            encoded["selection"] = SelectionSettings(**{name: layout[name] for name in SELECTION_FIELDS})
        return encoded

    def apply_chat_template(self, conversation, chat_template=None, images=None, **kwargs):
        """ProcessorMixin.apply_chat_template (images from the messages' image entries); `images` may also be passed
        beside the messages (their image entries then hold none): in placeholder order, one list per conversation
        for a batch. Needs tokenize=True; the keyword arguments of `__call__` go to the processor."""
        if images is None:
            return super().apply_chat_template(conversation, chat_template, **kwargs)
        if not kwargs.get("tokenize"):
            raise ValueError("`images` beside the messages are tokenized with them: pass tokenize=True")
        return_dict = kwargs.pop("return_dict", False)
        call_kwargs = {**(kwargs.pop("processor_kwargs", None) or {}),
                       **{name: kwargs.pop(name) for name in CALL_ARGUMENTS if name in kwargs}}
        prompt = super().apply_chat_template(conversation, chat_template, **{**kwargs, "tokenize": False})
        inputs = self(text=prompt, images=images, **call_kwargs)
        return inputs if return_dict else inputs["input_ids"]

    def _batch_shape(self, training: bool, padding, padding_side, truncation, max_length, add_special_tokens) -> dict:
        """Check the tokenizer-style arguments of `__call__`; returns text_inputs' `pad_to` and `max_length`."""
        if padding not in PADDING_CHOICES:
            raise ValueError(f"padding must be one of {PADDING_CHOICES}, got {padding!r}")
        side = "right" if training else "left"
        if padding_side not in (None, side):
            raise ValueError(f"padding_side must be {side!r} for a {'training' if training else 'generation'} "
                             f"batch (LaViDa's layout), got {padding_side!r}")
        if truncation not in (None, False, "do_not_truncate"):
            raise ValueError(f"truncation={truncation!r} is not supported: cutting a LaViDa prompt would break its "
                             "image-token runs or chat template; shorten the question or raise max_length")
        if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)
                                       or max_length <= 0):
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        if add_special_tokens:
            raise ValueError("add_special_tokens=True is not supported: the chat template writes <|startoftext|> "
                             "itself")
        pad_to = {"max_length": "max_length", False: "none", "do_not_pad": "none"}.get(padding, "longest")
        return {"pad_to": pad_to, "max_length": max_length}

    def text_inputs(self, prompts: list, image_sizes: list, answers=None, layout=None, pad_to="longest",
                    max_length=None) -> dict:
        """input_ids, attention_mask, question_mask (and labels with `answers`) as numpy arrays, for prompts whose
        images have the (height, width) sizes `image_sizes` (one list per prompt), under the token `layout` of
        `selection(...)` (default: this processor's). The text half of `__call__`, usable once the images were
        processed apart (e.g. when a trainer picks the token budget late). `pad_to`: "longest", "max_length" or
        "none" (equal lengths required); `max_length`: the longest sample allowed (default model_max_length)."""
        layout = self.selection() if layout is None else layout
        self._check_image_token_id()
        encoded = [self.encode_prompt(prompt, [image_token_count(size, layout) for size in sizes])
                   for prompt, sizes in zip(prompts, image_sizes)]
        prompt_ids = [ids for ids, _ in encoded]
        question_flags = [flags for _, flags in encoded]
        answer_ids = [[] for _ in prompt_ids] if answers is None else [
            self.encode_text(answer, as_plain_text=True)[0] + [self.eot_token_id] for answer in answers]
        limit = self.model_max_length if max_length is None else max_length
        self._check_lengths(prompt_ids, answer_ids, limit)
        lengths = [len(prompt) + len(answer) for prompt, answer in zip(prompt_ids, answer_ids)]
        if pad_to == "none" and len(set(lengths)) > 1:
            raise ValueError(f"padding=False needs samples of one length, got lengths {lengths}")
        width = limit if pad_to == "max_length" else max(lengths)
        if answers is None:
            return self._generation_batch(prompt_ids, question_flags, width)
        return self._training_batch(prompt_ids, answer_ids, question_flags, width)

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
        if len(images) != len(placeholders):
            raise ValueError(
                f"nested `images` must be one list per prompt: {len(placeholders)} prompts in `text`, "
                f"got {len(images)} entries"
            )
        not_lists = [index for index, group in enumerate(images) if not isinstance(group, (list, tuple))]
        if not_lists:
            raise ValueError(
                f"nested `images` must be one list per prompt, but `images`[{not_lists[0]}] is a "
                f"{type(images[not_lists[0]]).__name__}, not a list (wrap it: [image], or [] for a prompt without images)"
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

    def special_token_strings(self) -> list:
        """The strings the tokenizer turns into special ids when they appear in text."""
        return [token.content for token in self.tokenizer.added_tokens_decoder.values() if token.special]

    def encode_text(self, text: str, as_plain_text: bool = False) -> tuple:
        """(ids, character offsets) of a text segment; `as_plain_text`: special-token strings in it are ordinary
        text, never special ids."""
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                                 split_special_tokens=as_plain_text)
        return encoded["input_ids"], encoded["offset_mapping"]

    def encode_prompt(self, prompt: str, image_token_counts: list) -> tuple:
        """Token ids of a prompt (its text segments tokenized apart, joined by runs of image_token_id) and, per id,
        whether it belongs to the question (its character span overlaps `question_span`).

        The question is user text: special-token strings typed in it (`<|eot_id|>`, `<|mdm_mask|>`, ...) are encoded
        as ordinary text. A segment whose question part holds such a string is tokenized in three parts (before,
        question, after); any other segment in one piece, exactly as LaViDa tokenizes it.
        """
        question_start, question_end = self.question_span(prompt)
        specials = self.special_token_strings()
        ids, flags, offset = [], [], 0
        for index, segment in enumerate(prompt.split(self.image_token)):
            if index:
                ids += [self.image_token_id] * image_token_counts[index - 1]
                flags += [False] * image_token_counts[index - 1]
                offset += len(self.image_token)
            start = min(max(question_start - offset, 0), len(segment))
            end = min(max(question_end - offset, start), len(segment))
            if any(special in segment[start:end] for special in specials):
                parts = [(0, segment[:start], False), (start, segment[start:end], True), (end, segment[end:], False)]
            else:
                parts = [(0, segment, False)]
            for part_offset, text, as_plain_text in parts:
                part_ids, spans = self.encode_text(text, as_plain_text)
                ids += part_ids
                base = offset + part_offset
                flags += [base + stop > question_start and base + begin < question_end and stop > begin
                          for begin, stop in spans]
            offset += len(segment)
        return ids, flags

    def _check_lengths(self, prompt_ids: list, answer_ids: list, limit: int):
        """Raise a ValueError naming `text` if a sample is longer than `limit` (model_max_length or max_length)."""
        for index, (prompt, answer) in enumerate(zip(prompt_ids, answer_ids)):
            length = len(prompt) + len(answer)
            if length > limit:
                image_positions = prompt.count(self.image_token_id)
                name = "model_max_length" if limit == self.model_max_length else "max_length"
                raise ValueError(
                    f"`text` sample {index} needs {length} tokens ({image_positions} of them image tokens), "
                    f"more than {name} ({limit})"
                )

    def _generation_batch(self, prompt_ids: list, question_flags: list, width: int) -> dict:
        """input_ids left-padded with pad_token_id to `width`, attention_mask 0 on the padding, question_mask."""
        input_ids = np.full((len(prompt_ids), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(prompt_ids), width), dtype=np.int64)
        question_mask = np.zeros((len(prompt_ids), width), dtype=bool)
        for row, (ids, flags) in enumerate(zip(prompt_ids, question_flags)):
            input_ids[row, width - len(ids):] = ids
            attention_mask[row, width - len(ids):] = 1
            question_mask[row, width - len(ids):] = flags
        return {"input_ids": input_ids, "attention_mask": attention_mask, "question_mask": question_mask}

    def _training_batch(self, prompt_ids: list, answer_ids: list, question_flags: list, width: int) -> dict:
        """prompt + answer ids right-padded with eos_token_id to `width`; labels: IGNORE_INDEX on the prompt, ids
        elsewhere."""
        sequences = [prompt + answer for prompt, answer in zip(prompt_ids, answer_ids)]
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

    def decode_answers(self, answer_ids) -> list:
        """LaViDa's answer text of each row of generated answer ids (B, G), as its lmms-eval model reports it:
        tokenizer.batch_decode(skip_special_tokens=True), then leading "!" and surrounding whitespace stripped
        (LaViDa strips "!", the text of id 0 in LLaDA's tokenizer, that its uncached sampler leaves in front).
        `batch_decode` / `decode` are the tokenizer's (transformers' ProcessorMixin)."""
        texts = self.tokenizer.batch_decode(answer_ids, skip_special_tokens=True)
        return [text.lstrip("!").strip() for text in texts]


LavidaShirgImageProcessor.register_for_auto_class("AutoImageProcessor")
LavidaShirgProcessor.register_for_auto_class("AutoProcessor")

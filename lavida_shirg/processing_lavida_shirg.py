"""Processor of LaViDa-LLaDA with SHIRG: images + LLaDA chat prompts -> model inputs.

`LavidaShirgProcessor` writes LaViDa's "llada" chat prompt, replaces every `<image>` placeholder with as many
`image_token_id` positions as the model fills with image features under the call's SHIRG settings, and builds the
generation (left padding) or training (answer labels, right padding) batch; its output carries those settings as
`selection`, which the model reads. The views come from `LavidaShirgImageProcessor` (image_processing_lavida_shirg).

Remote code with saved processors: it imports only `transformers`, numpy and its siblings.
"""

import re

import numpy as np
from transformers import BatchFeature, ProcessorMixin
from transformers.processing_utils import ProcessingKwargs, TextKwargs

from .configuration_lavida_shirg import SELECTION_FIELDS, DreamTextConfig, SelectionSettings, with_selection_overrides
from .image_processing_lavida_shirg import LavidaShirgImageProcessor, LavidaShirgImagesKwargs
from .shirg_selection import image_token_count

IGNORE_INDEX = -100  # label of the positions that carry no loss (prompt and image positions)
EOT_TOKEN = "<|eot_id|>"
USER_HEADER = "<|start_header_id|>user<|end_header_id|>\n\n"
# Special-token strings inside message text are wrapped in these private-use characters by `mark_as_text` and
# encoded as ordinary text; unmarked ones are template structure (transformers' sanitize_control_tokens idea).
TEXT_START, TEXT_END = "\ue000", "\ue001"

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

# LaViDa's "llada" conversation format. Images of a turn come first, their placeholders joined by spaces and ended by
# a newline ("<image> <image>\n", as LaViDa's lmms-eval models write them), then its text.
LLADA_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}"
    "{%- for item in content if item['type'] == 'image' -%}"
    "{{- ('' if loop.first else ' ') + '<image>' + ('\\n' if loop.last else '') -}}"
    "{%- endfor -%}"
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
# LaViDa's "dream" conversation format: the Dream (Qwen2.5) tokenizer's ChatML with LaViDa's system prompt, turns
# rendered by the `render` macro LLADA_CHAT_TEMPLATE opens with.
DREAM_CHAT_TEMPLATE = LLADA_CHAT_TEMPLATE[: LLADA_CHAT_TEMPLATE.index("{%- if messages[0]")] + (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_content = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_content = '" + DEFAULT_SYSTEM_PROMPT + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + render(system_content) + '<|im_end|>\\n' -}}"
    "{%- for message in turns -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + render(message['content']) + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# chat format -> (its template, the token that closes a turn, the header of a user turn); a Dream LM uses "dream"
CHAT_FORMATS = {
    "llada": (LLADA_CHAT_TEMPLATE, EOT_TOKEN, USER_HEADER),
    "dream": (DREAM_CHAT_TEMPLATE, "<|im_end|>", "<|im_start|>user\n"),
}


class LavidaShirgTextKwargs(TextKwargs, total=False):
    """The SHIRG settings the model will run with: they set how many image positions each image gets."""

    selection_method: str | None
    selection_budget: int | None
    selection_options: dict | None
    draft: str | list | None


class LavidaShirgProcessorKwargs(ProcessingKwargs, total=False):
    text_kwargs: LavidaShirgTextKwargs
    images_kwargs: LavidaShirgImagesKwargs
    _defaults = {"text_kwargs": {"padding": True, "return_tensors": "pt"}}


SCALING_KWARGS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")  # image kwargs used
PADDING_KWARGS = ("padding", "max_length", "pad_to_multiple_of", "padding_side")  # text kwargs used


def with_image_runs(parts: list, counts: list, fill) -> list:
    """parts[0] + [fill] * counts[0] + parts[1] + ...: a prompt's text segments (or their flags) joined by its image
    runs (counts[i] positions for image i)."""
    joined = list(parts[0])
    for count, part in zip(counts, parts[1:]):
        joined += [fill] * count + part
    return joined


class LavidaShirgProcessor(ProcessorMixin):
    """LaViDa-LLaDA processor: chat prompts with `<image>` placeholders + images -> input_ids, masks, pixels.

    Every `<image>` becomes `image_token_count((height, width))` copies of `image_token_id` (the model fills those
    positions with image features): the tokenizer's `<image>` token where it has one, else an id beyond its
    vocabulary. `pooled_view_size` is the side of each view's pooled feature map, `model_max_length` the LM's maximum
    number of positions; `eos_token_id`, `pad_token_id` and `eot_token_id` must be the tokenizer's ids of its eos and
    pad tokens and of `<|eot_id|>`; `mask_token_id`, `fim_token_id` and `fill_token_id` the model's mask, FIM marker
    and filler ids (drafts need the mask; decoding drops the other two). `selection_layout` holds the model's SHIRG
    fields (SELECTION_FIELDS) and the vision patch size, so that the image positions of every selection method are
    counted as the model counts them; without it only the pooled path is available.
    """

    valid_processor_kwargs = LavidaShirgProcessorKwargs

    def __init__(self, image_processor, tokenizer, image_token_id: int, pooled_view_size: int, model_max_length: int,
                 eos_token_id: int, pad_token_id: int, eot_token_id: int, image_token: str = "<image>",
                 chat_template: str | None = None, selection_layout: dict | None = None, chat_format: str = "llada",
                 mask_token_id: int | None = None, fim_token_id: int | None = None, fill_token_id: int | None = None):
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format must be one of {sorted(CHAT_FORMATS)}, got {chat_format!r}")
        self.chat_format = chat_format
        self.selection_layout = selection_layout
        self.image_token = image_token
        self.image_token_id = int(image_token_id)
        self.pooled_view_size = int(pooled_view_size)
        self.model_max_length = int(model_max_length)
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        self.eot_token_id = int(eot_token_id)
        self.mask_token_id, self.fim_token_id, self.fill_token_id = mask_token_id, fim_token_id, fill_token_id
        template, eot_token, _ = CHAT_FORMATS[chat_format]
        super().__init__(image_processor, tokenizer, chat_template=chat_template or template)
        expected = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                    "eot_token_id": tokenizer.convert_tokens_to_ids(eot_token)}
        for name, tokenizer_id in expected.items():
            if getattr(self, name) != tokenizer_id:
                raise ValueError(f"{name} ({getattr(self, name)}) is not the tokenizer's id ({tokenizer_id})")
        self._check_image_token_id()

    def _check_image_token_id(self):
        """image_token_id must be the tokenizer's `<image>` token or lie beyond its vocabulary, so that no text token
        (also none added later with `add_tokens`) can take that id. Checked again at every call."""
        tokenizer_image_id = self.tokenizer.get_vocab().get(self.image_token)
        if tokenizer_image_id is not None and tokenizer_image_id != self.image_token_id:
            raise ValueError(f"image_token_id ({self.image_token_id}) is not the tokenizer's id of {self.image_token} "
                             f"({tokenizer_image_id})")
        if tokenizer_image_id is None and self.image_token_id < len(self.tokenizer):
            raise ValueError(
                f"image_token_id ({self.image_token_id}) is the id of the tokenizer's token "
                f"{self.tokenizer.convert_ids_to_tokens(self.image_token_id)!r}: add {self.image_token} to the "
                f"tokenizer as a special token before any other token (tokenizer.add_special_tokens("
                f"{{'additional_special_tokens': [{self.image_token!r}]}})), so that it takes that id"
            )

    @classmethod
    def from_config(cls, config, tokenizer) -> "LavidaShirgProcessor":
        """The processor (and its image processor) of a `ShirgConfig`, checked against `tokenizer`'s special ids.
        A tokenizer without a pad token gets the config's pad token (LaViDa pads with EOS)."""
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
        image_processor = LavidaShirgImageProcessor(view_size=config.vision_config.image_size,
                                                    image_grid_pinpoints=config.image_grid_pinpoints,
                                                    image_aspect_ratio=config.image_aspect_ratio)
        return cls(image_processor, tokenizer, image_token_id=config.image_token_id,
                   pooled_view_size=config.pooled_view_size,
                   model_max_length=config.text_config.max_position_embeddings, eos_token_id=config.eos_token_id,
                   pad_token_id=config.pad_token_id, eot_token_id=config.eot_token_id,
                   selection_layout={"patch_size": config.vision_config.patch_size,
                                     **{name: getattr(config, name) for name in SELECTION_FIELDS}},
                   chat_format="dream" if config.text_config.model_type == DreamTextConfig.model_type else "llada",
                   mask_token_id=config.mask_token_id, fim_token_id=config.fim_token_id,
                   fill_token_id=config.fill_token_id)

    # ------------------------------------------------------------------------------------------- chat template

    def mark_as_text(self, text: str) -> str:
        """`text` with every special-token string in it (`<|eot_id|>`, `<|start_header_id|>`, ..., not `<image>`)
        wrapped in TEXT_START/TEXT_END, so that `__call__` encodes it as ordinary text; markers already in `text`
        are dropped first, so they cannot be forged."""
        text = text.replace(TEXT_START, "").replace(TEXT_END, "")
        specials = sorted((token.content for token in self.tokenizer.added_tokens_decoder.values()
                           if token.special and token.content != self.image_token), key=len, reverse=True)
        pattern = "|".join(map(re.escape, specials)) or "(?!)"
        return re.sub(pattern, lambda match: TEXT_START + match.group() + TEXT_END, text)

    def _marked_message(self, message: dict) -> dict:
        """A copy of a chat message with its text (a string, or the "text" of its text items) `mark_as_text`-ed."""
        content = message["content"]
        if isinstance(content, str):
            return {**message, "content": self.mark_as_text(content)}
        return {**message, "content": [{**item, "text": self.mark_as_text(item["text"])} if item["type"] == "text"
                                       else item for item in content]}

    def apply_chat_template(self, conversation, chat_template=None, processor_kwargs=None, **kwargs):
        """ProcessorMixin.apply_chat_template, with message text marked as text (`mark_as_text`: it never becomes
        template structure, also with tokenize=False and then `__call__`), a conversation without a user turn
        refused, and `processor_kwargs` copied (transformers writes into it). Images in the messages may be PIL
        images, arrays, paths or URLs (`{"type": "image", "image" | "path" | "url": ...}`). transformers' own
        `sanitize_control_tokens` (5.25+) is what the marking always does, so it is dropped."""
        kwargs.pop("sanitize_control_tokens", None)
        batched = isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
        conversations = [getattr(messages, "messages", messages) for messages in (conversation if batched else
                                                                                  [conversation])]
        for messages in conversations:
            if not any(message["role"] == "user" for message in messages):
                raise ValueError(f"the conversation has no user turn (roles: {[m['role'] for m in messages]}): "
                                 "LaViDa answers the question of the last user turn")
        marked = [[self._marked_message(message) for message in messages] for messages in conversations]
        return super().apply_chat_template(marked if batched else marked[0], chat_template,
                                           processor_kwargs=dict(processor_kwargs or {}), **kwargs)

    def build_prompt(self, question: str, num_images: int = 1) -> str:
        """The chat-template prompt of one user turn with `num_images` images and `question`, ready for an answer
        (special-token strings in `question` marked as text, see `mark_as_text`)."""
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
        return self.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def question_span(self, prompt: str) -> tuple:
        """Character span [start, end) of the question in a prompt: the last user turn (the whole prompt if it has no
        user header) up to its closing end-of-turn token (`<|eot_id|>`; Dream: `<|im_end|>`), both template structure
        (unmarked), after the turn's leading image placeholders (the template writes a turn's images first), without
        surrounding whitespace."""
        _, eot_token, user_header = CHAT_FORMATS[self.chat_format]
        start = prompt.rfind(user_header)
        start = 0 if start < 0 else start + len(user_header)
        eot = re.compile(f"(?<!{TEXT_START}){re.escape(eot_token)}").search(prompt, start)
        end = len(prompt) if eot is None else eot.start()
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
        """The question of a prompt (see `question_span`), without markers and image placeholders."""
        start, end = self.question_span(prompt)
        return re.sub(f"[{TEXT_START}{TEXT_END}]", "", prompt[start:end]).replace(self.image_token, "").strip()

    # ------------------------------------------------------------------------------------------------ settings

    def selection(self, method=None, budget=None, options=None) -> dict:
        """The token layout of a call: this processor's geometry and selection_layout, overridden by `method`,
        `budget` and `options` (SHIRG field name -> value), validated as the model validates them."""
        layout = {"image_grid_pinpoints": self.image_processor.image_grid_pinpoints,
                  "view_size": self.image_processor.view_size, "pooled_view_size": self.pooled_view_size,
                  "image_aspect_ratio": self.image_processor.image_aspect_ratio, "selection_method": "pooled"}
        if self.selection_layout is None:
            if (method or "pooled") != "pooled" or options:
                raise ValueError("this processor has no selection_layout (build it with from_config): only "
                                 "selection_method='pooled' is available")
            return layout
        return with_selection_overrides({**layout, **self.selection_layout}, method, budget, options)

    def image_token_count(self, image_size, method=None, budget=None, options=None) -> int:
        """Image positions of one (height, width) image under the given selection settings (default: pooled)."""
        return image_token_count(image_size, self.selection(method, budget, options))

    # -------------------------------------------------------------------------------------------------- call

    def __call__(self, images=None, text=None, videos=None, audio=None, answers=None, **kwargs):
        """Model inputs of prompts with `<image>` placeholders (and, for training, their answers).

        `text`: a prompt or a list of prompts. `images`: one image, a flat list in placeholder order over all prompts,
        or one list per prompt (see `to_rgb_image`; paths and URLs are loaded by transformers' `load_image`).
        `answers`: None (generation: left padding, attention 0 on padding) or one answer per prompt (training: prompt
        + answer + `<|eot_id|>`, `labels` = IGNORE_INDEX on the prompt and the ids elsewhere, right padding with the
        pad token = EOS, attended, as in LaViDa).
        Keyword arguments (`LavidaShirgProcessorKwargs`, flat or as text_kwargs / images_kwargs):
        `selection_method`, `selection_budget`, `selection_options`: the SHIRG settings (they set the number of image
        positions; the output carries them as `selection`, which the model reads; a non-pooled method with
        hires_source 'single-view' also gets `hires_pixel_values`); the tokenizer's `padding` (default longest),
        `max_length` (default model_max_length; longer samples are refused, never truncated), `pad_to_multiple_of`,
        `padding_side` (must be the batch's: left for generation, right for training), `return_tensors` (default
        "pt"); `draft` (text infilling, LaViDa's FIM; generation only): the start of each answer, fixed, with
        `<|mdm_mask|>` at the positions to fill and `<|reserved_token_1|>` after each infilled span, as a string (one
        draft for every prompt) or one string per prompt, or token ids (a list, one list per prompt, or an array);
        strings are tokenized without added special tokens; the image processor's do_rescale, rescale_factor,
        do_normalize, image_mean, image_std. Other keyword arguments (generation settings such as max_new_tokens,
        do_sample, temperature that a pipeline passes on) are ignored with transformers' warning.
        Returns input_ids, attention_mask, question_mask (the question's tokens, for text-conditioned selection),
        (labels), (draft_ids: (B, D) right-padded with the mask id, for `generate`), pixel_values + image_sizes
        (+ hires_pixel_values) when there are images, and `selection`.
        """
        if videos is not None or audio is not None:
            raise ValueError("`videos` and `audio` are not supported: LaViDa-SHIRG reads images")
        merged = self._merge_kwargs(LavidaShirgProcessorKwargs, **kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        layout = self.selection(*(text_kwargs.get(name) for name in (
            "selection_method", "selection_budget", "selection_options")))
        prompts = [text] if isinstance(text, str) else text
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`text` must be a prompt string or a non-empty list of them, got {type(text).__name__}")
        empty = [index for index, prompt in enumerate(prompts) if not self.question_text(prompt)]
        if empty:
            raise ValueError(f"`text` sample {empty[0]} has an empty question: {prompts[empty[0]]!r}")
        images_per_prompt = self._images_per_prompt(images, prompts)
        answer_list = None if answers is None else [answers] if isinstance(answers, str) else answers
        if answer_list is not None and (not isinstance(answer_list, (list, tuple)) or len(answer_list) != len(prompts)
                                        or not all(isinstance(answer, str) for answer in answer_list)):
            raise ValueError(f"`answers` must be one string per prompt ({len(prompts)} prompts), got {answers!r}")
        flat_images = [image for group in images_per_prompt for image in group]
        single_view = layout["selection_method"] != "pooled" and layout["hires_source"] == "single-view"
        image_inputs = self.image_processor(
            flat_images, return_tensors=None, hires_size=layout["hires_image_size"] if single_view else None,
            **{name: images_kwargs[name] for name in SCALING_KWARGS if name in images_kwargs})
        sizes = iter(image_inputs["image_sizes"].tolist() if flat_images else [])
        image_sizes = [[next(sizes) for _ in group] for group in images_per_prompt]
        padding = {name: text_kwargs.get(name) for name in PADDING_KWARGS}
        batch = self.text_inputs([self.encode_prompt(prompt) for prompt in prompts], image_sizes,
                                 None if answer_list is None else list(map(self.encode_answer, answer_list)),
                                 layout, **padding)
        if text_kwargs.get("draft") is not None:
            if answer_list is not None:
                raise ValueError("`draft` is the start of an answer to generate: a training call (`answers`) takes "
                                 "none")
            batch["draft_ids"] = self.draft_ids(text_kwargs["draft"], len(prompts))
        encoded = BatchFeature({**batch, **image_inputs}, tensor_type=text_kwargs.get("return_tensors"))
        if isinstance(layout, SelectionSettings):  # the model reads the settings from the inputs
            encoded["selection"] = layout
        return encoded

    def _images_per_prompt(self, images, prompts) -> list:
        """The images of each prompt; raise if their numbers differ from the prompts' `<image>` placeholders."""
        placeholders = [prompt.count(self.image_token) for prompt in prompts]
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        if any(isinstance(item, (list, tuple)) for item in images):
            counts = [len(group) if isinstance(group, (list, tuple)) else type(group).__name__ for group in images]
            if counts != placeholders:
                raise ValueError(f"`text` has {placeholders} {self.image_token} placeholders per prompt but nested "
                                 f"`images` has {counts} (one list per prompt; [] for a prompt without images)")
            return [list(group) for group in images]
        if len(images) != sum(placeholders):
            raise ValueError(f"`text` has {sum(placeholders)} {self.image_token} placeholders but `images` has "
                             f"{len(images)} images")
        starts = np.cumsum([0, *placeholders]).tolist()
        return [images[start:stop] for start, stop in zip(starts, starts[1:])]

    # -------------------------------------------------------------------------------------------------- text

    def encode_answer(self, answer: str, fim_tokens: bool = False) -> list:
        """Token ids of a training answer (special-token strings in it as ordinary text) + `<|eot_id|>`. With
        `fim_tokens` (LaViDa's FIM training data), the FIM marker and filler strings in it are their ids."""
        pieces = [answer]
        if fim_tokens:
            tokens = self.tokenizer.convert_ids_to_tokens([self.fim_token_id, self.fill_token_id])
            pieces = re.split("(" + "|".join(map(re.escape, tokens)) + ")", answer)
        ids = []
        for index, piece in enumerate(pieces):  # odd pieces: the FIM tokens matched by re.split
            ids += (self.tokenizer.convert_tokens_to_ids([piece]) if index % 2 else
                    self.tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        return ids + [self.eot_token_id]

    def encode_prompt(self, prompt: str) -> tuple:
        """(segments, flags): the token ids of the prompt's text before, between and after its `<image>`
        placeholders, and per id whether it belongs to the question (overlaps `question_span`). The same for every
        selection setting (the image runs are inserted by `text_inputs`), so training tokenizes a prompt once.

        Text between placeholders is tokenized in one piece, as LaViDa tokenizes it, except around marked
        special-token strings (`mark_as_text`), which are encoded as ordinary text.
        """
        question_start, question_end = self.question_span(prompt)
        pieces = re.compile(f"({re.escape(self.image_token)})|{TEXT_START}([^{TEXT_START}{TEXT_END}]*){TEXT_END}")
        segments, flags, position = [[]], [[]], 0
        for match in [*pieces.finditer(prompt), None]:
            stop = len(prompt) if match is None else match.start()
            parts = [(position, prompt[position:stop], False)]
            if match is not None and match.group(2) is not None:
                parts.append((match.start(2), match.group(2), True))
            for offset, piece, as_text in parts:
                encoded = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True,
                                         split_special_tokens=as_text)
                segments[-1] += encoded["input_ids"]
                flags[-1] += [begin < end and offset + begin < question_end and offset + end > question_start
                              for begin, end in encoded["offset_mapping"]]
            if match is not None and match.group(1) is not None:
                segments.append([])
                flags.append([])
            position = len(prompt) if match is None else match.end()
        return segments, flags

    def text_inputs(self, encoded_prompts: list, image_sizes: list, answer_ids=None, layout=None, padding=True,
                    max_length=None, pad_to_multiple_of=None, padding_side=None) -> dict:
        """input_ids, attention_mask, question_mask (and labels with `answer_ids`) as numpy arrays, for prompts
        tokenized by `encode_prompt` whose images have the (height, width) sizes `image_sizes` (one list per prompt),
        under the token `layout` of `selection(...)` (default: this processor's). `answer_ids`: `encode_answer` of
        each prompt's answer (training) or None. The text half of `__call__`, usable once the images were processed
        apart (a trainer picks the token budget late). Padding by the tokenizer (`tokenizer.pad`)."""
        layout = self.selection() if layout is None else layout
        self._check_image_token_id()
        training = answer_ids is not None
        side = "right" if training else "left"
        if padding_side not in (None, side):
            raise ValueError(f"padding_side must be {side!r} for a {'training' if training else 'generation'} batch "
                             f"(LaViDa's layout), got {padding_side!r}")
        limit = self.model_max_length if max_length is None else max_length
        rows, question_flags, prompt_lengths = [], [], []
        for index, ((segments, flags), sizes) in enumerate(zip(encoded_prompts, image_sizes)):
            counts = [image_token_count(size, layout) for size in sizes]
            ids = with_image_runs(segments, counts, self.image_token_id)
            answer = answer_ids[index] if training else []
            if len(ids) + len(answer) > limit:
                name = "model_max_length" if max_length is None else "max_length"
                raise ValueError(f"`text` sample {index} needs {len(ids) + len(answer)} tokens ({sum(counts)} of them "
                                 f"image tokens), more than {name} ({limit})")
            rows.append(ids + answer)
            prompt_lengths.append(len(ids))
            question_flags += with_image_runs(flags, counts, False) + [False] * len(answer)
        if padding in (False, "do_not_pad") and len(set(map(len, rows))) > 1:
            raise ValueError(f"padding=False needs samples of one length, got lengths {[len(row) for row in rows]}")
        batch = self.tokenizer.pad({"input_ids": rows}, padding=padding, padding_side=side,
                                   max_length=limit if padding == "max_length" else None,
                                   pad_to_multiple_of=pad_to_multiple_of, return_tensors="np")
        input_ids, attention_mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
        question_mask = np.zeros(input_ids.shape, dtype=bool)
        question_mask[attention_mask == 1] = question_flags  # row-major: each row's tokens in order
        outputs = {"input_ids": input_ids, "attention_mask": attention_mask, "question_mask": question_mask}
        if training:  # LaViDa attends its padding (pad = EOS) and learns it; labels hide the prompt
            positions = np.arange(input_ids.shape[1])
            outputs["labels"] = np.where(positions < np.array(prompt_lengths)[:, None], IGNORE_INDEX, input_ids)
            outputs["attention_mask"] = np.ones_like(input_ids)
        return outputs

    def draft_ids(self, draft, batch_size: int) -> np.ndarray:
        """(B, D) int64 drafts of `__call__`'s `draft`, right-padded with the mask id (the positions a draft leaves
        out are generated freely); one draft is used for every prompt. Strings are tokenized without added special
        tokens (special-token strings in them, `<|mdm_mask|>` and `<|reserved_token_1|>` included, are tokens)."""
        if self.mask_token_id is None:
            raise ValueError("`draft` needs the model's mask_token_id: build the processor with "
                             "LavidaShirgProcessor.from_config(model.config, tokenizer)")
        drafts = draft.tolist() if hasattr(draft, "tolist") else draft
        single = isinstance(drafts, str) or (isinstance(drafts, (list, tuple)) and drafts
                                             and all(_is_token_id(i) for i in drafts))
        drafts = [drafts] * batch_size if single else drafts
        if not isinstance(drafts, (list, tuple)) or len(drafts) != batch_size or not all(
                isinstance(d, str) or (isinstance(d, (list, tuple)) and all(_is_token_id(i) for i in d))
                for d in drafts):
            raise ValueError(f"`draft` must be a string, a list of non-negative token ids, or one of these per prompt "
                             f"({batch_size} prompts), got {draft!r}")
        rows = [self.tokenizer(d, add_special_tokens=False)["input_ids"] if isinstance(d, str) else list(map(int, d))
                for d in drafts]
        if self.image_token_id in {i for row in rows for i in row}:
            raise ValueError(f"`draft` holds the image token ({self.image_token}, id {self.image_token_id}): a draft "
                             "is answer text")
        width = max(map(len, rows))
        if width == 0:
            raise ValueError("`draft` is empty: pass the answer's start (fixed text and <|mdm_mask|> tokens), or none")
        return np.array([row + [self.mask_token_id] * (width - len(row)) for row in rows], dtype=np.int64)

    def without_fim_tokens(self, sequences) -> list:
        """Token ids (one id, one sequence or a batch) as lists without the FIM marker and filler ids."""
        dropped = {self.fim_token_id, self.fill_token_id} - {None}
        rows = sequences.tolist() if hasattr(sequences, "tolist") else sequences
        rows = [rows] if _is_token_id(rows) else list(rows)
        if not rows or _is_token_id(rows[0]):
            return [i for i in rows if i not in dropped]
        return [[i for i in row if i not in dropped] for row in rows]

    def batch_decode(self, sequences, skip_special_tokens=False, **kwargs) -> list:
        """tokenizer.batch_decode; with skip_special_tokens the FIM marker and filler ids are dropped too (an infilled
        answer reads as plain text), without it they show as LaViDa's predict_fim.py prints them."""
        if skip_special_tokens:
            sequences = self.without_fim_tokens(sequences)
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, token_ids, skip_special_tokens=False, **kwargs) -> str:
        """tokenizer.decode, dropping the FIM marker and filler ids with skip_special_tokens (see `batch_decode`)."""
        if skip_special_tokens:
            token_ids = self.without_fim_tokens(token_ids)
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs) -> list:
        """The pipeline's decoding: `batch_decode` (the FIM marker and filler dropped with skip_special_tokens)."""
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode_answers(self, answer_ids) -> list:
        """LaViDa's answer text of each row of generated answer ids (B, G), as its lmms-eval model reports it:
        `batch_decode(skip_special_tokens=True)` (which also drops the FIM marker and filler), then leading "!" and
        surrounding whitespace stripped (LaViDa strips "!", the text of id 0 in LLaDA's tokenizer, that its uncached
        sampler leaves in front)."""
        texts = self.batch_decode(answer_ids, skip_special_tokens=True)
        return [text.lstrip("!").strip() for text in texts]


def _is_token_id(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


LavidaShirgProcessor.register_for_auto_class("AutoProcessor")

"""Configuration of LaViDa-LLaDA with SHIRG token selection.

`ShirgConfig` = SigLIP vision config + LLaDA-style text config + the projector, the "anyres" image layout,
the special tokens of the LLaDA tokenizer and the masked-diffusion training options.
Presets: `ShirgConfig.from_preset("lavida-llada")` (the real 8.4B sizes), `"lavida-dream"` (LaViDa-Dream's real
sizes), `"tiny"` (a few MB, tests and demo), `"tiny-dream"` (the same on a Dream decoder) and `"reader"` (the
shipped reading demo's sizes, trained from scratch on the synthetic reading task).
"""

import dataclasses
import math
from collections.abc import Mapping

from transformers import PreTrainedConfig, SiglipVisionConfig

from .image_layout import IMAGE_ASPECT_RATIOS, fewest_source_tokens
from .shirg_selection import DETAIL_TERMS, METHODS, SCORE_NORMALIZATIONS

LOSS_WEIGHTINGS = ("mean", "inverse_probability")
# "pooled" is LaViDa's own path; "full" keeps every high-resolution token; the others select `selection_budget`
# (shirg_selection.METHODS holds each method's token count, selection and token order).
SELECTION_METHODS = tuple(METHODS)
HIRES_SOURCES = ("single-view", "anyres-views")
SCAFFOLDS = ("global-view", "grid", "none")


class LladaTextConfig(PreTrainedConfig):
    """The LLaDA masked-diffusion language model: a bidirectional Llama-style decoder (RMSNorm, RoPE, SwiGLU)."""

    model_type = "lavida_shirg_text"
    base_config_key = "text_config"

    vocab_size: int = 126464
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 4096
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    # copies of ShirgConfig's ids (set by it), read by Trainer's special-token alignment through get_text_config()
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"text_config.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"text_config.hidden_size ({self.hidden_size}) must be divisible by "
                f"text_config.num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"text_config.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"text_config.num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"the attention head dimension must be even for RoPE, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"text_config.hidden_act must be 'silu' (LLaDA's SwiGLU), got {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class DreamTextConfig(LladaTextConfig):
    """Dream, LaViDa's second masked-diffusion LM: a bidirectional Qwen2-style decoder (RMSNorm, RoPE, SwiGLU, bias on
    the query/key/value projections). Defaults: Dream-v0-7B's sizes (Qwen2.5-7B: grouped-query attention with 4
    key/value heads, RoPE theta 1e6, RMSNorm eps 1e-6). Its sampler reads position j-1's logits for token j."""

    model_type = "lavida_shirg_dream_text"

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 131072


# text_config model_type -> its config class (the LM class is chosen from it: modeling_lavida_shirg.LANGUAGE_MODELS)
TEXT_CONFIGS = {config.model_type: config for config in (LladaTextConfig, DreamTextConfig)}


def text_config_from_dict(values: dict) -> LladaTextConfig:
    """The text config of a dict: the class its `model_type` names (LLaDA's when absent)."""
    model_type = values.get("model_type", LladaTextConfig.model_type)
    if model_type not in TEXT_CONFIGS:
        raise ValueError(f"text_config.model_type must be one of {sorted(TEXT_CONFIGS)}, got {model_type!r}")
    return TEXT_CONFIGS[model_type](**{k: v for k, v in values.items() if k != "model_type"})


class ShirgConfig(PreTrainedConfig):
    """LaViDa = SigLIP (without its last layer, head and post-norm) -> 2-layer GELU MLP -> LLaDA.

    Image layout (`image_aspect_ratio`): "anyres" (default): each image is resized and padded to the best of
    `image_grid_pinpoints` ((height, width) pairs, multiples of the vision image size), cut into vision-size crops
    and preceded by a global view; every view's projected features are bilinearly pooled to `pooled_view_size` x
    `pooled_view_size` (pooled_view_size = patches per side: unpooled), the crops stitched, unpadded, with a newline
    token per row. "pad" / "square": one view per image (padded to a square of the mean colour / resized), its
    features pooled alike, no newline (LaViDa's single-view path, lavida-llada-1.0-lowres: unpooled).

    Special tokens: `image_token_id` marks image positions in `input_ids` (default: text vocab_size, just past the
    LM vocabulary; the tokenizer's `<image>` token where it has one); those positions are filled with image
    features, never embedded, so the id may also lie inside a resized vocabulary.
    """

    model_type = "lavida_shirg"
    sub_configs = {"vision_config": SiglipVisionConfig, "text_config": LladaTextConfig}

    vision_config: dict | SiglipVisionConfig | None = None
    text_config: dict | LladaTextConfig | DreamTextConfig | None = None
    projector_hidden_act: str = "gelu"
    image_aspect_ratio: str = "anyres"
    image_grid_pinpoints: list | None = None
    pooled_view_size: int = 14
    image_token_id: int | None = None
    mask_token_id: int = 126336
    bos_token_id: int = 126080
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    start_header_token_id: int = 126346
    end_header_token_id: int = 126347
    eot_token_id: int = 126348
    # text infilling (LaViDa's FIM checkpoint): the marker that closes an infilled span (`<|reserved_token_1|>`) and
    # the filler token that pads a span to its drafted length (`<|reserved_token_2|>`); None: no FIM tokens
    fim_token_id: int | None = None
    fill_token_id: int | None = None
    min_mask_probability: float = 1e-3
    loss_weighting: str = "mean"
    prefix_lm_training: bool = False
    tie_word_embeddings: bool = False
    # SHIRG token selection (lavida_shirg.shirg_selection); overridable per call (see `selection_settings`)
    selection_method: str = "pooled"
    selection_budget: int = 768
    hires_source: str = "single-view"
    hires_image_size: int = 672
    coverage_region_size: int = 4
    # the score mix of shirg-fixed and shirg-x: relevance_weight * relevance + detail_weight * detail term, and of
    # shirg-v2: (1 - v2_detail_weight) relevance + v2_detail_weight detail + v2_edge_weight edges; the detail term
    # (shirg_selection.DETAIL_TERMS) and each term's per-image normalisation (SCORE_NORMALIZATIONS). Defaults chosen
    # by benchmarks/bench_selection_quality.py on synthetic and photo sets (README "Selection quality"); the seed's
    # formula and the previous default are SELECTION_PRESETS "seed" and "synthetic-tuned".
    relevance_weight: float = 0.3
    detail_weight: float = 0.7
    detail_term: str = "pixel-contrast"
    score_normalization: str = "min-max"
    v2_detail_weight: float = 0.7
    v2_edge_weight: float = 0.15
    v2_summary_token: bool = True
    v2_kmeans_iterations: int = 4
    x_scaffold: str = "global-view"
    x_scaffold_size: int = 8
    x_suppression_rounds: int = 4
    x_suppression_radius: int = 1
    x_suppression_penalty: float = 0.0  # neighbour suppression off: measured to cost text recall (README)
    visionzip_contextual_tokens: int = 16
    random_seed: int = 0
    coordinate_embedding: bool = False
    adaptive_budget: bool = False
    budget_choices: list | None = None

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = SiglipVisionConfig(**REAL_VISION)
        elif isinstance(self.vision_config, dict):
            self.vision_config = SiglipVisionConfig(**{k: v for k, v in self.vision_config.items() if k != "model_type"})
        if self.text_config is None:
            self.text_config = LladaTextConfig()
        elif isinstance(self.text_config, dict):
            self.text_config = text_config_from_dict(self.text_config)
        if self.image_grid_pinpoints is None:
            size = self.vision_config.image_size
            self.image_grid_pinpoints = [[h * size, w * size] for h, w in PINPOINT_GRIDS]
        self.image_grid_pinpoints = [[int(h), int(w)] for h, w in self.image_grid_pinpoints]
        if self.image_token_id is None:
            self.image_token_id = self.text_config.vocab_size
        if self.budget_choices is None:
            self.budget_choices = [512, 768, 1024]
        super().__post_init__(**kwargs)
        for name in TEXT_CONFIG_TOKEN_IDS:
            if getattr(self.text_config, name) is None:
                setattr(self.text_config, name, getattr(self, name))
        self._validate()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """PreTrainedConfig.from_dict (used by from_pretrained), then validated: keyword overrides such as
        `from_pretrained(folder, selection_method=...)` are set after construction and must be checked too."""
        loaded = super().from_dict(config_dict, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        config._validate()
        return loaded

    def _validate(self):
        vision = self.vision_config
        if self.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {IMAGE_ASPECT_RATIOS}, got {self.image_aspect_ratio!r}")
        if not 0 < self.pooled_view_size <= self.patches_per_side:
            raise ValueError(
                f"pooled_view_size must be in [1, {self.patches_per_side}] (the patches per side of a view), "
                f"got {self.pooled_view_size}"
            )
        if not self.image_grid_pinpoints:
            raise ValueError("image_grid_pinpoints must list at least one (height, width) pair")
        for pair in self.image_grid_pinpoints:
            if len(pair) != 2 or any(d <= 0 or d % vision.image_size for d in pair):
                raise ValueError(
                    f"image_grid_pinpoints entries must be (height, width) multiples of vision_config.image_size "
                    f"({vision.image_size}), got {pair}"
                )
        vocab = self.text_config.vocab_size
        for name in SPECIAL_TOKEN_FIELDS:
            value = getattr(self, name)
            if not 0 <= value < vocab:
                raise ValueError(f"{name} ({value}) must be a token of the LM vocabulary [0, {vocab})")
        for name in TEXT_CONFIG_TOKEN_IDS:
            if getattr(self.text_config, name) != getattr(self, name):
                raise ValueError(f"text_config.{name} ({getattr(self.text_config, name)}) must equal {name} "
                                 f"({getattr(self, name)})")
        special_ids = {name: getattr(self, name) for name in SPECIAL_TOKEN_FIELDS}
        if not _is_int(self.image_token_id) or self.image_token_id < 0 or self.image_token_id in special_ids.values():
            raise ValueError(
                f"image_token_id must be a non-negative integer other than the special ids {special_ids}, got "
                f"{self.image_token_id!r}"
            )
        fim_ids = {name: getattr(self, name) for name in FIM_TOKEN_FIELDS}
        if (fim_ids["fim_token_id"] is None) != (fim_ids["fill_token_id"] is None):
            raise ValueError(f"fim_token_id and fill_token_id are set together (LLaDA: {LLADA_FIM_TOKEN_IDS}) or both "
                             f"left None, got {fim_ids}")
        for name, value in fim_ids.items():
            if value is not None and (not _is_int(value) or not 0 <= value < vocab or value in special_ids.values()
                                      or value == self.image_token_id):
                raise ValueError(f"{name} must be a token of the LM vocabulary [0, {vocab}) other than the special "
                                 f"ids {special_ids} and image_token_id ({self.image_token_id}), got {value!r}")
        if fim_ids["fim_token_id"] is not None and fim_ids["fim_token_id"] == fim_ids["fill_token_id"]:
            raise ValueError(f"fim_token_id and fill_token_id must differ, got {fim_ids}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if not 0.0 < self.min_mask_probability < 1.0:
            raise ValueError(f"min_mask_probability must be in (0, 1), got {self.min_mask_probability}")
        self.selection_settings()  # validates the SHIRG fields
        if self.projector_hidden_act != "gelu":
            raise ValueError(f"projector_hidden_act must be 'gelu' (LaViDa's mlp2x_gelu), got {self.projector_hidden_act!r}")

    def selection_settings(self, method=None, budget=None, options=None) -> "SelectionSettings":
        """The SHIRG settings of one call: the config's fields, with `method`, `budget` and `options` (a dict of
        field name -> value) overriding them; validated (the one check of the settings)."""
        return with_selection_overrides(self.token_layout(), method, budget, options)

    def token_layout(self) -> dict:
        """The image geometry and the SHIRG fields: what the processor needs to count image tokens like the model
        (shirg_selection.image_token_count)."""
        return {
            "image_grid_pinpoints": self.image_grid_pinpoints,
            "view_size": self.vision_config.image_size,
            "patch_size": self.vision_config.patch_size,
            "pooled_view_size": self.pooled_view_size,
            "image_aspect_ratio": self.image_aspect_ratio,
            **{name: getattr(self, name) for name in SELECTION_FIELDS},
        }

    @property
    def patches_per_side(self) -> int:
        """Patches per side of one native-size view: floor(image_size / patch_size) (27 for so400m at 384px)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ShirgConfig":
        """Build a named preset ("lavida-llada": the real sizes, "tiny": tests, "reader": the reading demo)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown ShirgConfig fields {unknown}; known fields: {sorted(known)}")
        kwargs = {key: dict(value) if isinstance(value, dict) else value for key, value in PRESETS[name].items()}
        kwargs.update(overrides)
        return cls(**kwargs)


TEXT_CONFIG_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
SPECIAL_TOKEN_FIELDS = ("mask_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "start_header_token_id",
                        "end_header_token_id", "eot_token_id")
FIM_TOKEN_FIELDS = ("fim_token_id", "fill_token_id")
# LLaDA's <|reserved_token_1|> (LaViDa's FIM marker) and <|reserved_token_2|> (its filler)
LLADA_FIM_TOKEN_IDS = dict(fim_token_id=126085, fill_token_id=126086)

SELECTION_FIELDS = (
    "selection_method", "selection_budget", "hires_source", "hires_image_size", "coverage_region_size",
    "relevance_weight", "detail_weight", "detail_term", "score_normalization", "v2_detail_weight", "v2_edge_weight",
    "v2_summary_token", "v2_kmeans_iterations", "x_scaffold", "x_scaffold_size", "x_suppression_rounds",
    "x_suppression_radius", "x_suppression_penalty", "visionzip_contextual_tokens", "random_seed", "coordinate_embedding",
    "adaptive_budget", "budget_choices",
)


# Named SHIRG score settings, usable as a call's `selection_options` (and as eval.py's variant option preset=NAME):
# "seed": the seed's formula, bit for bit; "synthetic-tuned": the default chosen on the synthetic set alone (issue 14),
# before the photo set (issue 22) moved it.
SELECTION_PRESETS = {
    "seed": dict(detail_term="variance", score_normalization="min-max", relevance_weight=0.7, detail_weight=0.3,
                 v2_detail_weight=0.25, v2_edge_weight=0.15, x_suppression_penalty=0.5),
    "synthetic-tuned": dict(detail_term="pixel-contrast", score_normalization="min-max", relevance_weight=0.7,
                            detail_weight=0.3, v2_detail_weight=0.25, v2_edge_weight=0.15, x_suppression_penalty=0.5),
}

# the image geometry a call's settings carry with them (not overridable per call)
LAYOUT_FIELDS = ("image_grid_pinpoints", "view_size", "patch_size", "pooled_view_size", "image_aspect_ratio")
SETTINGS_FIELDS = LAYOUT_FIELDS + SELECTION_FIELDS


class _SettingsMapping(Mapping):
    """Read access by field name (settings["selection_method"]) for a settings dataclass."""

    def __getitem__(self, name):
        if name not in SETTINGS_FIELDS:
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self):
        return iter(SETTINGS_FIELDS)

    def __len__(self):
        return len(SETTINGS_FIELDS)

    def __init__(self, values=None, /, **fields):
        """SelectionSettings(**fields), or SelectionSettings(mapping): transformers' Trainer and accelerate rebuild
        every Mapping of a batch as type(m)({key: value}) when they move it to the device."""
        fields = {**(values or {}), **fields}
        if set(fields) != set(SETTINGS_FIELDS):
            raise TypeError(f"SelectionSettings takes the fields {list(SETTINGS_FIELDS)}, got {sorted(fields)}")
        for name in SETTINGS_FIELDS:
            object.__setattr__(self, name, fields[name])


# The validated SHIRG settings of one call (ShirgConfig.selection_settings): a frozen dataclass with the image
# geometry (LAYOUT_FIELDS) and one typed field per SELECTION_FIELDS entry (types from ShirgConfig), readable as a
# mapping too.
SelectionSettings = dataclasses.make_dataclass(
    "SelectionSettings",
    [("image_grid_pinpoints", list), ("view_size", int), ("patch_size", int), ("pooled_view_size", int),
     ("image_aspect_ratio", str)]
    + [(name, ShirgConfig.__annotations__[name]) for name in SELECTION_FIELDS],
    bases=(_SettingsMapping,), frozen=True, eq=True, init=False,
)
SelectionSettings.__module__ = __name__


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def with_selection_overrides(layout: dict, method=None, budget=None, options=None) -> SelectionSettings:
    """The SelectionSettings of a token layout (`ShirgConfig.token_layout`) with a call's `options` (SHIRG field name
    -> value), `method` and `budget` applied, validated (unknown option names and out-of-range values raise a
    ValueError naming them)."""
    unknown = sorted(set(options or {}) - set(SELECTION_FIELDS))
    if unknown:
        raise ValueError(f"unknown selection options {unknown}; known: {sorted(SELECTION_FIELDS)}")
    layout = {**layout, **(options or {})}
    if method is not None:
        layout["selection_method"] = method
    if budget is not None:
        layout["selection_budget"] = budget
    validate_selection_settings(layout)
    return SelectionSettings(**{name: layout[name] for name in SETTINGS_FIELDS})


# the allowed values of the SHIRG fields besides the method, the budgets and the geometry (validate_selection_settings)
CHOICES = {"hires_source": HIRES_SOURCES, "x_scaffold": SCAFFOLDS, "detail_term": DETAIL_TERMS,
           "score_normalization": tuple(SCORE_NORMALIZATIONS)}
INTEGER_MINIMUMS = {"coverage_region_size": 1, "v2_kmeans_iterations": 1, "x_suppression_rounds": 1,
                    "x_scaffold_size": 0, "x_suppression_radius": 0, "visionzip_contextual_tokens": 0, "random_seed": 0}
WEIGHT_MAXIMUMS = {"relevance_weight": math.inf, "detail_weight": math.inf, "v2_detail_weight": 1.0,
                   "v2_edge_weight": math.inf, "x_suppression_penalty": 1.0}
FLAGS = ("v2_summary_token", "coordinate_embedding", "adaptive_budget")


def _problem(name, value):
    """What is wrong with the value of one SHIRG field (CHOICES, INTEGER_MINIMUMS, WEIGHT_MAXIMUMS, FLAGS), or None."""
    if name in CHOICES:
        return None if value in CHOICES[name] else f"must be one of {CHOICES[name]}"
    if name in INTEGER_MINIMUMS:
        low = INTEGER_MINIMUMS[name]
        ok = _is_int(value) and value >= low
        return None if ok else f"must be a {'positive' if low else 'non-negative'} integer"
    if name in WEIGHT_MAXIMUMS:
        high = WEIGHT_MAXIMUMS[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            return "must be a finite non-negative number"
        return None if value <= high else f"must be in [0, {high:g}]"
    return None if isinstance(value, bool) else "must be true or false"


def validate_selection_settings(settings: dict):
    """Raise a ValueError naming the field for any SHIRG setting of a token layout (`ShirgConfig.token_layout`
    with a call's overrides) out of its allowed values: the one check of a call's settings."""
    if settings["selection_method"] not in SELECTION_METHODS:
        raise ValueError(f"selection_method must be one of {SELECTION_METHODS}, got {settings['selection_method']!r}")
    for name in (*CHOICES, *INTEGER_MINIMUMS, *WEIGHT_MAXIMUMS, *FLAGS):
        problem = _problem(name, settings[name])
        if problem:
            raise ValueError(f"{name} {problem}, got {settings[name]!r}")
    size, patch = settings["hires_image_size"], settings["patch_size"]
    if not _is_int(size) or size < patch or size % patch:
        raise ValueError(f"hires_image_size must be a positive integer multiple of the patch size ({patch}), "
                         f"got {size!r}")
    if settings["hires_source"] == "anyres-views" and settings["image_aspect_ratio"] != "anyres":
        raise ValueError(f"hires_source='anyres-views' selects among the anyres views, which "
                         f"image_aspect_ratio={settings['image_aspect_ratio']!r} does not make (one view per image): "
                         "use hires_source='single-view'")
    if settings["hires_source"] == "anyres-views" and settings["x_scaffold"] == "grid":
        raise ValueError("x_scaffold='grid' pools a single high-resolution view: use 'global-view' or 'none' with "
                         "hires_source='anyres-views'")
    num_tokens = fewest_source_tokens(settings)
    budgets = {"selection_budget": [settings["selection_budget"]], "budget_choices": settings["budget_choices"]}
    for name, values in budgets.items():
        if not isinstance(values, (list, tuple)) or not values or len(set(values)) != len(values) or not all(
                _is_int(b) and 0 < b <= num_tokens for b in values):
            kind = "a positive integer" if name == "selection_budget" else "a list of distinct positive integers"
            fewest = " of the image with the fewest anyres views" if settings["hires_source"] == "anyres-views" else ""
            raise ValueError(f"{name} must be {kind} at most the {num_tokens} high-resolution tokens{fewest}, "
                             f"got {settings[name]!r}")
    contextual, budget = settings["visionzip_contextual_tokens"], settings["selection_budget"]
    if settings["selection_method"] == "visionzip" and contextual >= budget:
        raise ValueError(f"visionzip_contextual_tokens ({contextual}) must be smaller than selection_budget "
                         f"({budget}): the budget counts dominant + contextual tokens")


# Crop grids (rows, cols) of LaViDa's pinpoints, in its order: (w, h) = (384, 768), (768, 384), (768, 768), (1152, 384),
# (384, 1152). The order breaks ties in select_best_resolution (a 300x200 image takes the first, 2 rows x 1 col).
PINPOINT_GRIDS = [[2, 1], [1, 2], [2, 2], [1, 3], [3, 1]]

# google/siglip-so400m-patch14-384 with the last of its 27 encoder layers removed (LaViDa uses 26).
REAL_VISION = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
    image_size=384, patch_size=14, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
    vision_use_head=False,
)

TINY_TEXT_VOCAB = 512  # the size of the byte-level BPE tokenizer built by `lavida_shirg.tiny_tokenizer`
# ids of the special tokens in the tiny tokenizer (see lavida_shirg.tiny_tokenizer.SPECIAL_TOKENS)
TINY_TOKENIZER_IDS = dict(eos_token_id=0, pad_token_id=0, bos_token_id=1, mask_token_id=2, start_header_token_id=3,
                          end_header_token_id=4, eot_token_id=5, fim_token_id=192, fill_token_id=193)

# Dream-v0-Instruct-7B's tokenizer: <|endoftext|> (eos, pad), <|beginoftext|>, <|mask|>; a ChatML header is
# <|im_start|>role + newline (id 198) and a turn ends with <|im_end|>
DREAM_TOKEN_IDS = dict(mask_token_id=151666, bos_token_id=151665, eos_token_id=151643, pad_token_id=151643,
                       start_header_token_id=151644, end_header_token_id=198, eot_token_id=151645)
TINY_TEXT = dict(vocab_size=TINY_TEXT_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)

PRESETS = {
    "lavida-llada": dict(vision_config=REAL_VISION, text_config={}, **LLADA_FIM_TOKEN_IDS),
    "lavida-dream": dict(vision_config=REAL_VISION, text_config=dict(model_type=DreamTextConfig.model_type),
                         **DREAM_TOKEN_IDS),
    "tiny": dict(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=4, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", vision_use_head=False,
        ),
        text_config=TINY_TEXT,
        pooled_view_size=4,
        hires_image_size=64, selection_budget=64, budget_choices=[32, 64, 96], x_scaffold_size=4,
        visionzip_contextual_tokens=8,
        **TINY_TOKENIZER_IDS,
    ),
    # the reading demo (configs/train_reader.yaml, README "The reading demo"): 32 px views of 4 px patches, each crop
    # pooled to 2 x 2 tokens of 16 px, a 64 px high-resolution view of 16 x 16 tokens of 4 px; text 8-9 px tall is
    # below one pooled token and two high-resolution patches tall; budgets 32 / 64 / 85 keep 1/8, 1/4, 1/3 of the 256
    "reader": dict(
        vision_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=32,
            patch_size=4, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", vision_use_head=False,
        ),
        text_config=dict(
            vocab_size=TINY_TEXT_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
        ),
        pooled_view_size=2,
        hires_image_size=64, selection_budget=64, budget_choices=[32, 64, 85], x_scaffold_size=2,
        visionzip_contextual_tokens=4,
        **TINY_TOKENIZER_IDS,
    ),
}

# the tiny preset on a Dream decoder: the tiny tokenizer built with chat_format "dream" adds Dream's ChatML tokens
# <|im_start|> 513 and <|im_end|> 514 (lavida_shirg.tiny_tokenizer.DREAM_CHAT_TOKENS) after <image> 512, which its LM
# vocabulary holds;
# a header ends with a newline (id 204), as Dream's; LaViDa has no FIM for Dream
TINY_DREAM_TEXT_VOCAB = 520
PRESETS["tiny-dream"] = {
    **PRESETS["tiny"],
    "text_config": {**TINY_TEXT, "vocab_size": TINY_DREAM_TEXT_VOCAB, "model_type": DreamTextConfig.model_type},
    "image_token_id": TINY_TEXT_VOCAB, "start_header_token_id": TINY_TEXT_VOCAB + 1, "end_header_token_id": 204,
    "eot_token_id": TINY_TEXT_VOCAB + 2, "fim_token_id": None, "fill_token_id": None,
}

# presets whose LM reads the tiny byte-level tokenizer (lavida_shirg.tiny_tokenizer), with its chat format
TINY_TOKENIZER_PRESETS = {"tiny": "llada", "reader": "llada", "tiny-dream": "dream"}

ShirgConfig.register_for_auto_class()


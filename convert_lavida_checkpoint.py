#!/usr/bin/env python
"""Convert a LaViDa checkpoint (LaViDa's `LlavaLladaForMaskedDiffusion` or `LlavaDreamForMaskedDiffusion`) into this
project's HF-native folder.

    python convert_lavida_checkpoint.py SRC OUT [--overwrite] [--tokenizer PATH] [--vision-config JSON-or-path]
                                        [--dtype keep|bfloat16|float32] [--config-overrides JSON-or-path]

SRC is a LaViDa folder (e.g. a local copy of jacklishufan/lavida-llada-v1.0-instruct or lavida-dream-v1.0-instruct):
config.json with model_type "llava_llada" or "llava_dream", safetensors weights (sharded with
model.safetensors.index.json, or one model.safetensors) and the LLaDA or Dream tokenizer files. OUT receives a
folder that `AutoModel.from_pretrained(OUT, trust_remote_code=True)` loads: config.json (with auto_map), the
remote-code files, the converted safetensors shards with their index, and the processor (or the tokenizer alone when
the processor module is not available).

Tensor names, LaViDa -> ours:
    model.vision_tower.vision_tower.vision_model.<X>  -> model.vision_tower.<X>   (HF SigLIP names below)
    model.mm_projector.0.* / model.mm_projector.2.*   -> model.multi_modal_projector.linear_1.* / linear_2.*
    model.image_newline                               -> model.image_newline
    model.transformer.wte.weight                      -> model.language_model.embed_tokens.weight
    model.transformer.blocks.N.attn_norm.weight       -> model.language_model.layers.N.input_layernorm.weight
    model.transformer.blocks.N.{q,k,v}_proj.weight    -> model.language_model.layers.N.self_attn.{q,k,v}_proj.weight
    model.transformer.blocks.N.attn_out.weight        -> model.language_model.layers.N.self_attn.o_proj.weight
    model.transformer.blocks.N.ff_norm.weight         -> model.language_model.layers.N.post_attention_layernorm.weight
    model.transformer.blocks.N.ff_proj.weight         -> model.language_model.layers.N.mlp.gate_proj.weight (SwiGLU gate)
    model.transformer.blocks.N.up_proj.weight         -> model.language_model.layers.N.mlp.up_proj.weight
    model.transformer.blocks.N.ff_out.weight          -> model.language_model.layers.N.mlp.down_proj.weight
    model.transformer.ln_f.weight                     -> model.language_model.norm.weight
    model.transformer.ff_out.weight                   -> lm_head.weight (a copy of wte when weight_tying is set)
LaViDa-Dream (vision tower, projector and image_newline as above; Dream's Qwen2-style names are ours):
    model.embed_tokens.weight                         -> model.language_model.embed_tokens.weight
    model.layers.N.<X> (self_attn.{q,k,v}_proj.{weight,bias}, self_attn.o_proj.weight, mlp.{gate,up,down}_proj.weight,
                        input_layernorm.weight, post_attention_layernorm.weight) -> model.language_model.layers.N.<X>
    model.norm.weight                                 -> model.language_model.norm.weight
    lm_head.weight                                    -> lm_head.weight (a copy of the embedding when
                                                         tie_word_embeddings is set)
LaViDa's releases: the instruct, FIM and reason folders convert alike (LLaDA's or Dream's layout; a FIM folder is
recorded as such, see --fim). A config.json with LaViDa's single-view layout (image_aspect_ratio pad / square: LaViDa's
eval passes one view per image as a 4-D tensor, which it never pools nor gives an image_newline) converts to our
single-view layout, unpooled; lavida-llada-1.0-lowres (by its folder name) is run unpooled whatever its layout, as
LaViDa's eval/run_coco_lowres.sh does (NOT_ALWASY_DO_2DPOOL). A stage-1 folder (lavida-llada-1.0-stage1, lavida-dream-1.0-stage1: config.json + the projector) is
joined with --base-lm (LLaDA-8B-Instruct or Dream-v0-Instruct-7B) and --vision-tower (SigLIP) into LaViDa's stage-2
starting point; its projector must be mm_projector.safetensors (LaViDa's mm_projector.bin pickle is refused):

    python convert_lavida_checkpoint.py STAGE1 OUT --base-lm LM --vision-tower SIGLIP [--seed N]

    SigLIP's vision_model.<X>                         -> model.vision_tower.<X> (its last encoder layer, post_layernorm,
                                                         head, text tower and logit scale/bias dropped)
    model.mm_projector.{0,2}.* (mm_projector.safetensors), the LM's own names -> as above
    image_newline (absent from every source)          -> randn(hidden) / sqrt(hidden) with --seed, as LaViDa's stage 2

Known-unused LaViDa tensors (dropped and listed in the report): SigLIP's post_layernorm and pooling head, and vision
encoder layers at or past our vision_config.num_hidden_layers (LaViDa removes SigLIP's last layer). A --vision-config
with one layer more than the checkpoint holds (a plain SigLIP config: 27 layers for so400m) gets LaViDa's deletion
of the last layer (a note in the report says so). Any other
tensor we cannot place, any parameter of our model left without a tensor and any shape disagreement is an error;
all of them are listed together before anything is written.

The conversion streams shard by shard (one input shard in memory at a time). OUT is written as every command of
the project writes a folder (shirg_tools.output_folder): aside, then swapped into place atomically, so a failed or
killed conversion leaves OUT as it was; a second conversion into the same OUT while one runs is refused; OUT's
folder and files get the modes of the user's umask.
"""

import argparse
import ast
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lavida_shirg.configuration_lavida_shirg import REAL_VISION, DreamTextConfig, ShirgConfig
from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion
from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from shirg_tools.output_folder import FolderWriter, OutputFolderError
from shirg_tools.run_record import CONVERSION_RECORD

LAVIDA_MODEL_TYPE = "llava_llada"
LAVIDA_ARCHITECTURE = "LlavaLladaForMaskedDiffusion"
DREAM_MODEL_TYPE = "llava_dream"
# LaViDa's model_type -> its architecture (the class that saved the checkpoint)
LAVIDA_ARCHITECTURES = {LAVIDA_MODEL_TYPE: LAVIDA_ARCHITECTURE, DREAM_MODEL_TYPE: "LlavaDreamForMaskedDiffusion"}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "model.pt", "model.ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
DTYPES = {"keep": None, "bfloat16": torch.bfloat16, "float32": torch.float32}

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."

# LLaDA tensor names inside a block -> ours inside `model.language_model.layers.N.`
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight",
    "k_proj.weight": "self_attn.k_proj.weight",
    "v_proj.weight": "self_attn.v_proj.weight",
    "attn_out.weight": "self_attn.o_proj.weight",
    "ff_norm.weight": "post_attention_layernorm.weight",
    "ff_proj.weight": "mlp.gate_proj.weight",
    "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight",
}
TOP_LEVEL_NAMES = {
    "model.mm_projector.0.weight": "model.multi_modal_projector.linear_1.weight",
    "model.mm_projector.0.bias": "model.multi_modal_projector.linear_1.bias",
    "model.mm_projector.2.weight": "model.multi_modal_projector.linear_2.weight",
    "model.mm_projector.2.bias": "model.multi_modal_projector.linear_2.bias",
    "model.image_newline": "model.image_newline",
    "model.transformer.wte.weight": "model.language_model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.language_model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}
BLOCK_PATTERN = re.compile(r"^model\.transformer\.blocks\.(\d+)\.(.+)$")
# LaViDa-Dream (LlavaDreamModel = LlavaMetaModel + Dream's DreamBaseModel): tensor names inside model.layers.N, which
# are ours inside model.language_model.layers.N
DREAM_BLOCK_NAMES = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
    "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight",
    "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
DREAM_TOP_LEVEL_NAMES = {
    **{name: target for name, target in TOP_LEVEL_NAMES.items() if not name.startswith("model.transformer.")},
    "model.embed_tokens.weight": "model.language_model.embed_tokens.weight",
    "model.norm.weight": "model.language_model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
DREAM_BLOCK_PATTERN = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# LaViDa model_type -> (top-level names, block pattern, block names -> ours, our lm_head's source, the tying flag)
KEY_PLANS = {
    LAVIDA_MODEL_TYPE: (TOP_LEVEL_NAMES, BLOCK_PATTERN, BLOCK_NAMES, "model.transformer.ff_out.weight",
                        "weight_tying"),
    DREAM_MODEL_TYPE: (DREAM_TOP_LEVEL_NAMES, DREAM_BLOCK_PATTERN, {name: name for name in DREAM_BLOCK_NAMES},
                       "lm_head.weight", "tie_word_embeddings"),
}
VISION_LAYER_PATTERN = re.compile(r"^encoder\.layers\.(\d+)\.")

# LLaDA's ModelConfig options that change the computation; our LM implements exactly these values.
# (field, required value, default of LLaDA's ModelConfig when config.json omits the field)
LLADA_REQUIRED_OPTIONS = (
    ("block_type", "llama", "sequential"),
    ("activation_type", "silu", "swiglu"),
    ("layer_norm_type", "rms", "default"),
    ("rope", True, False),
    ("alibi", False, False),
    ("block_group_size", 1, 1),
    ("include_bias", False, False),
    ("include_qkv_bias", False, False),
    ("layer_norm_with_affine", True, True),
    ("attention_layer_norm", False, False),
    ("scale_logits", False, False),
    ("input_emb_norm", False, False),
)
# LaViDa (LLaVA) multimodal options; our model implements exactly these values.
LAVIDA_REQUIRED_OPTIONS = (
    ("mm_projector_type", "mlp2x_gelu"),
    ("image_aspect_ratio", "anyres"),
    ("mm_patch_merge_type", "spatial_unpad"),
    ("mm_spatial_pool_mode", "bilinear"),
    ("mm_use_im_start_end", False),
)
# Special tokens of the LLaDA tokenizer, looked up by text, -> ShirgConfig fields.
TOKEN_FIELDS = {
    "bos_token_id": "<|startoftext|>",
    "start_header_token_id": "<|start_header_id|>",
    "end_header_token_id": "<|end_header_id|>",
    "eot_token_id": "<|eot_id|>",
    "image_token_id": "<image>",  # registered by `register_image_token` when the tokenizer lacks it
    "fim_token_id": "<|reserved_token_1|>",  # LaViDa's FIM marker and filler (text infilling)
    "fill_token_id": "<|reserved_token_2|>",
}
MASK_TOKEN = "<|mdm_mask|>"
IMAGE_TOKEN = "<image>"
# The same for Dream's tokenizer (Qwen2's byte-level vocabulary: "\u010a" is the newline that closes a ChatML header)
DREAM_TOKEN_FIELDS = {
    "bos_token_id": "<|beginoftext|>",
    "start_header_token_id": "<|im_start|>",
    "end_header_token_id": "\u010a",
    "eot_token_id": "<|im_end|>",
    "image_token_id": IMAGE_TOKEN,
}
DREAM_MASK_TOKEN = "<|mask|>"
# LaViDa's single-view layouts (lavida-llada-1.0-lowres, and the stage-1 projector's training): the image padded to a
# square ("pad") or resized ("square") to one view; LaViDa's eval passes them as a 4-D tensor, which its
# prepare_inputs_labels_for_multimodal only encodes (no pooling, no image_newline): our image_aspect_ratio of the same
# name, unpooled. mm_patch_merge_type and mm_spatial_pool_mode are not read on that path.
SINGLE_VIEW_LAYOUTS = ("pad", "square")
MULTI_VIEW_OPTIONS = ("mm_patch_merge_type", "mm_spatial_pool_mode")
# Stage-1 folders (see `read_stage1_sources`)
STAGE1_PROJECTOR = "mm_projector.safetensors"
STAGE1_PICKLE = "mm_projector.bin"  # what LaViDa's training saves for a projector-only run
BASE_ARCHITECTURES = {LAVIDA_MODEL_TYPE: "LLaDAModelLM", DREAM_MODEL_TYPE: "DreamModel"}  # the LMs stage 1 loads
SIGLIP_VISION = "vision_model."  # SigLIP's (SiglipModel or SiglipVisionModel) names of the vision tower
IMAGE_NEWLINE = "model.image_newline"
# LaViDa's stage-2 scripts: anyres over (width, height) grids of views (the pinpoints [(384, 768), (768, 384),
# (768, 768), (1152, 384), (384, 1152)] at 384 px), spatial_unpad, bilinear pooling (ALWASY_DO_2DPOOL)
STAGE2_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
STAGE2_LAYOUT = dict(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad", mm_spatial_pool_mode="bilinear",
                     mm_use_im_start_end=False)
LM_SIZE_FIELDS = ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "embedding_size", "vocab_size",
                  "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads")
# LaViDa's FIM checkpoint, by the names its README gives it (Hub and local): its conversion record says fim=true
FIM_FOLDER_NAMES = ("lavida-llada-1.0-fim", "lavida-llada-hd-fim")
FIM_MARKER = "<|reserved_token_1|>"  # predict_fim.py's FIM marker
# LaViDa's low-resolution checkpoint, by its README's names: LaViDa evaluates it with its image features unpooled
# (eval/run_coco_lowres.sh sets NOT_ALWASY_DO_2DPOOL), whatever its config.json's layout: pooled_view_size = the
# patches per side of a view
LOWRES_FOLDER_NAMES = ("lavida-llada-1.0-lowres", "lavida-llada-lowres")
CONFIG_META_KEYS = ("model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path")


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message says why (every offending key when about tensors)."""


@dataclass
class LavidaCheckpoint:
    """A validated LaViDa folder: its config.json and where each tensor lives, with dtype and shape (headers only)."""

    path: Path
    config: dict
    shards: dict  # file name -> list of tensor names, in the index's order of files
    shapes: dict  # tensor name -> tuple shape
    dtypes: dict  # tensor name -> torch dtype
    file_names: dict = field(default_factory=dict)  # tensor name -> its name inside its file, where they differ
    dropped: list = field(default_factory=list)  # (name, reason): known-unused tensors left out before the plan


@dataclass
class ConversionPlan:
    """Per input shard, the (source name, target name) pairs to write, and the dropped known-unused keys."""

    shards: dict  # input file -> list of (source name, target name)
    dropped: list  # (source name, reason)
    num_tensors: int
    num_parameters: int


@dataclass
class ConversionReport:
    source: str
    output: str
    tensors_converted: int
    num_parameters: int
    output_bytes: int
    input_shards: int
    output_shards: int
    dtype: str
    dropped: list = field(default_factory=list)  # (key, reason)
    notes: list = field(default_factory=list)
    saved_processor: str = ""

    def format(self) -> str:
        lines = [
            f"Converted LaViDa checkpoint {self.source} -> {self.output}",
            f"  tensors converted: {self.tensors_converted} ({self.input_shards} input shard(s) -> "
            f"{self.output_shards} output shard(s))",
            f"  parameters total:  {self.num_parameters:,}",
            f"  output size:       {self.output_bytes / 1e9:.3f} GB of weights ({self.output_bytes:,} bytes), "
            f"dtype {self.dtype}",
            f"  tokenizer:         {self.saved_processor}",
            f"  dropped known-unused keys ({len(self.dropped)}):",
        ]
        lines += [f"    {key}  [{reason}]" for key, reason in self.dropped] or ["    (none)"]
        if self.notes:
            lines.append(f"  notes ({len(self.notes)}):")
            lines += [f"    - {note}" for note in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Reading the LaViDa folder


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"{what}: cannot read {path}: {error}") from error
    if not isinstance(value, dict):
        raise ConversionError(f"{what}: {path} must hold a JSON object")
    return value


def read_lavida_checkpoint(src) -> LavidaCheckpoint:
    """Validate that SRC is a LaViDa-LLaDA or LaViDa-Dream safetensors folder and read its config and tensor
    headers (no data)."""
    path = Path(src)
    if not path.is_dir():
        raise ConversionError(f"SRC {str(src)!r} is not a directory (expected a LaViDa checkpoint folder)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"SRC {str(src)!r} has no config.json: not a LaViDa checkpoint folder")
    config = _read_json(config_path, "SRC config.json")
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type not in LAVIDA_ARCHITECTURES or LAVIDA_ARCHITECTURES[model_type] not in architectures:
        raise ConversionError(
            f"SRC {str(src)!r} is not a LaViDa checkpoint: config.json has model_type={model_type!r} and "
            f"architectures={architectures!r}, expected a model_type and architecture of {LAVIDA_ARCHITECTURES}"
        )
    shards, shapes, dtypes = read_safetensors_folder(path, "SRC")
    return LavidaCheckpoint(path=path, config=config, shards=shards, shapes=shapes, dtypes=dtypes)


def read_safetensors_folder(path: Path, argument: str):
    """(shards, shapes, dtypes) of the safetensors weights in folder `path` (sharded with an index, or one
    model.safetensors): shards maps each file name to its tensor names; headers only. Errors name `argument`."""
    where = f"{argument} {str(path)!r}"
    index_path, single_path = path / INDEX_NAME, path / SINGLE_NAME
    if index_path.is_file():
        index = _read_json(index_path, f"{argument} {INDEX_NAME}")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{where}: {INDEX_NAME} has no weight_map")
        shards = {}
        for name, file_name in weight_map.items():
            shards.setdefault(file_name, []).append(name)
    elif single_path.is_file():
        shards = {SINGLE_NAME: None}
    else:
        pickles = sorted(
            p.name for p in path.iterdir() if p.name in PICKLE_NAMES or p.suffix in (".bin", ".pt", ".pth")
        )
        if pickles:
            raise ConversionError(
                f"{where} holds only pickle weights ({', '.join(pickles)}); they are refused because "
                "loading a pickle can run arbitrary code. Convert them to safetensors first."
            )
        raise ConversionError(f"{where} has neither {INDEX_NAME} nor {SINGLE_NAME}")

    missing_files = sorted(name for name in shards if not (path / name).is_file())
    if missing_files:
        raise ConversionError(f"{where}: the index names shard files that do not exist: {missing_files}")

    shapes, dtypes, problems = {}, {}, []
    for file_name in list(shards):
        names = read_safetensors_headers(path / file_name, shards[file_name], shapes, dtypes, problems, where)
        shards[file_name] = names
    if problems:
        raise ConversionError(f"{where}: {len(problems)} tensor(s) of the index are missing:\n  "
                              + "\n  ".join(problems))
    return shards, shapes, dtypes


def read_safetensors_headers(file_path: Path, names, shapes: dict, dtypes: dict, problems: list, where: str) -> list:
    """Record the shape and dtype of `names` (None: every tensor) of one safetensors file; names listed but absent
    go to `problems`. Returns the names read."""
    try:
        with safe_open(file_path, framework="pt") as handle:
            present = list(handle.keys())
            if names is None:
                names = present
            present_set = set(present)
            for name in names:
                if name not in present_set:
                    problems.append(f"{name} (listed in the index for {file_path.name}, absent from that file)")
                    continue
                view = handle.get_slice(name)
                shapes[name] = tuple(view.get_shape())
                dtypes[name] = _safetensors_dtype(view.get_dtype())
    except ConversionError:
        raise
    except Exception as error:  # a corrupt or foreign file
        raise ConversionError(f"{where}: cannot read safetensors file {file_path.name}: {error}") from error
    return names


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_dtype(name: str):
    if name not in _SAFETENSORS_DTYPES:
        raise ConversionError(f"unsupported safetensors dtype {name!r}")
    return _SAFETENSORS_DTYPES[name]


# ----------------------------------------------------------------------------------------------------------------
# Configuration


def load_json_argument(value, argument: str):
    """A dict from a dict, a JSON string or the path of a JSON file (errors name `argument`)."""
    if value is None or isinstance(value, dict):
        return value
    text = str(value)
    if os.path.isfile(text):
        return _read_json(Path(text), argument)
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConversionError(f"{argument}: {text!r} is neither a JSON object nor the path of a JSON file") from error
    if not isinstance(parsed, dict):
        raise ConversionError(f"{argument} must be a JSON object, got {type(parsed).__name__}")
    return parsed


def vision_config_dict(vision_config=None) -> dict:
    """The SigLIP config: so400m-patch14-384 with 26 layers (LaViDa's tower), updated with `vision_config`.

    `vision_config` is a dict, a JSON string or a JSON file path; a full SigLIP config.json (with a nested
    "vision_config") is accepted. The pooling head is always off (LaViDa replaces it with an identity).
    """
    override = load_json_argument(vision_config, "--vision-config") or {}
    if isinstance(override.get("vision_config"), dict):
        override = override["vision_config"]
    merged = dict(REAL_VISION)
    merged.update({k: v for k, v in override.items() if k not in CONFIG_META_KEYS})
    merged["vision_use_head"] = False
    return merged


def checkpoint_vision_layers(checkpoint: LavidaCheckpoint) -> set:
    """Indices of the SigLIP encoder layers the checkpoint holds tensors of."""
    names = (name[len(VISION_PREFIX):] for name in checkpoint.shapes if name.startswith(VISION_PREFIX))
    return {int(match.group(1)) for match in map(VISION_LAYER_PATTERN.match, names) if match}


def lavida_vision_config(vision_config, checkpoint: LavidaCheckpoint, notes: list) -> dict:
    """`vision_config_dict(vision_config)`, with LaViDa's deletion of SigLIP's last encoder layer applied (and noted)
    when the given config counts exactly one layer more than the checkpoint holds (a plain SigLIP config: 27 layers
    for so400m; the default already has LaViDa's 26)."""
    vision = vision_config_dict(vision_config)
    layers = int(vision["num_hidden_layers"])
    if vision_config is not None and layers > 1 and checkpoint_vision_layers(checkpoint) == set(range(layers - 1)):
        vision["num_hidden_layers"] = layers - 1
        notes.append(f"--vision-config has {layers} SigLIP encoder layers and the checkpoint holds {layers - 1}: "
                     f"LaViDa deletes SigLIP's last layer, so the converted tower has {layers - 1} "
                     f"(vision_config.num_hidden_layers={layers - 1})")
    return vision


def pinpoints_from_lavida(value, view_size: int) -> list:
    """LaViDa's image_grid_pinpoints ((width, height) pairs, a list or its string) as our (height, width) list.

    The order is kept (it breaks ties in the best-resolution choice). The "(1x1),...,(3x3)" range form expands
    like LaViDa: every (i, j) with i, j in the ranges, times the view size, as (width, height).
    """
    if isinstance(value, str):
        if "x" in value:
            matches = re.findall(r"\((\d+)x(\d+)\)", value)
            if not matches:
                raise ConversionError(f"image_grid_pinpoints {value!r} is not of the form '(AxB),...,(CxD)'")
            (w0, h0), (w1, h1) = map(int, matches[0]), map(int, matches[-1])
            value = [(i * view_size, j * view_size) for i in range(w0, w1 + 1) for j in range(h0, h1 + 1)]
        else:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError) as error:
                raise ConversionError(f"image_grid_pinpoints {value!r} is not a list of pairs") from error
    try:
        pairs = [(int(width), int(height)) for width, height in value]
    except (TypeError, ValueError) as error:
        raise ConversionError(f"image_grid_pinpoints {value!r} is not a list of (width, height) pairs") from error
    return [[height, width] for width, height in pairs]


def text_config_from_llada(config: dict, notes: list) -> dict:
    """Our LladaTextConfig fields from LLaDA's config.json names (LLaDA's ModelConfig defaults where absent)."""
    missing = [name for name in ("d_model", "n_heads", "n_layers") if config.get(name) is None]
    if config.get("embedding_size") is None and config.get("vocab_size") is None:
        missing.append("embedding_size/vocab_size")
    if missing:
        raise ConversionError(f"SRC config.json lacks the LLaDA size fields {missing}")
    d_model, n_heads = int(config["d_model"]), int(config["n_heads"])
    if config.get("n_kv_heads") is not None:
        kv_heads = int(config["n_kv_heads"])
    else:
        kv_heads = 1 if config.get("multi_query_attention") else n_heads
    if config.get("mlp_hidden_size") is not None:
        intermediate = int(config["mlp_hidden_size"])
    else:
        intermediate = int(config.get("mlp_ratio", 4)) * d_model
    # The embedding has embedding_size rows (>= vocab_size, padded for speed): every row is a token of our LM.
    vocab = int(config.get("embedding_size") or config["vocab_size"])
    for name, fallback in (("rope_theta", 10000.0), ("rms_norm_eps", 1e-5), ("max_sequence_length", 1024)):
        if name not in config:
            notes.append(f"config.json has no {name}; using LLaDA's default {fallback}")
    dropouts = {k: config.get(k) for k in ("residual_dropout", "embedding_dropout") if config.get(k)}
    if dropouts:
        notes.append(f"LLaDA dropouts {dropouts} have no counterpart in our LM (it applies attention dropout only)")
    if config.get("rope_full_precision") is False:
        notes.append("rope_full_precision=False in LLaDA; our LM always applies RoPE in float32")
    return dict(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=intermediate,
        num_hidden_layers=int(config["n_layers"]),
        num_attention_heads=n_heads,
        num_key_value_heads=kv_heads,
        hidden_act="silu",
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        max_position_embeddings=int(config.get("max_sequence_length", 1024)),
        attention_dropout=float(config.get("attention_dropout") or 0.0),
        initializer_range=float(config.get("init_std", 0.02)),
        tie_word_embeddings=False,
    )


def text_config_from_dream(config: dict, notes: list) -> dict:
    """Our DreamTextConfig fields from LaViDa-Dream's config.json (Dream's Qwen2-style names, the same as ours;
    DreamConfig's defaults where absent)."""
    missing = [name for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                                 "intermediate_size") if config.get(name) is None]
    if missing:
        raise ConversionError(f"SRC config.json lacks the Dream size fields {missing}")
    defaults = dict(rms_norm_eps=1e-6, rope_theta=10000.0)
    for name, fallback in (*defaults.items(), ("max_position_embeddings", 32768)):
        if name not in config:
            notes.append(f"config.json has no {name}; using Dream's default {fallback}")
    if config.get("use_sliding_window"):
        notes.append("use_sliding_window=True is ignored, as Dream's own (sdpa) attention ignores it")
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return dict(
        model_type=DreamTextConfig.model_type,
        **{name: int(config[name]) for name in names},
        num_key_value_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
        hidden_act=config.get("hidden_act", "silu"),
        **{name: float(config.get(name, fallback)) for name, fallback in defaults.items()},
        max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
        attention_dropout=float(config.get("attention_dropout") or 0.0),
        initializer_range=float(config.get("initializer_range", 0.02)),
        tie_word_embeddings=False,
    )


def check_supported_options(config: dict, notes: list) -> list:
    """Problems with LLaDA (or Dream) and LaViDa options our model does not implement (present and different).
    Absent -> a note."""
    problems = []
    dream = config.get("model_type") == DREAM_MODEL_TYPE
    if dream and config.get("rope_scaling") is not None:
        problems.append(f"rope_scaling={config['rope_scaling']!r} (our Dream implements plain RoPE: "
                        "rope_scaling=None)")
    for name, required, default in () if dream else LLADA_REQUIRED_OPTIONS:
        if name not in config:
            if default != required:
                notes.append(f"config.json has no {name} (LLaDA's default is {default!r}); assuming {required!r}")
            continue
        value = config[name]
        if value != required and not (name == "block_group_size" and value is None):
            problems.append(f"{name}={value!r} (our LLaDA implements {name}={required!r})")
    if not dream and config.get("bias_for_layer_norm"):
        problems.append("bias_for_layer_norm=True (our RMSNorms have no bias)")
    single_view = config.get("image_aspect_ratio") in SINGLE_VIEW_LAYOUTS
    for name, required in LAVIDA_REQUIRED_OPTIONS:
        if name == "image_aspect_ratio" and single_view:
            notes.append(f"image_aspect_ratio={config[name]!r}: LaViDa's single-view layout (one view per image, "
                         "unpooled, no image_newline)")
        elif name in MULTI_VIEW_OPTIONS and single_view:
            if name in config:
                notes.append(f"{name}={config[name]!r} is not read by LaViDa's single-view image path")
        elif name not in config:
            notes.append(f"config.json has no {name}; assuming LaViDa's {required!r}")
        elif config[name] != required:
            allowed = f" in {(required, *SINGLE_VIEW_LAYOUTS)}" if name == "image_aspect_ratio" else f"={required!r}"
            problems.append(f"{name}={config[name]!r} (our model implements {name}{allowed})")
    tower = config.get("mm_vision_tower")
    if tower is None:
        notes.append("config.json has no mm_vision_tower; assuming SigLIP")
    elif "siglip" not in str(tower).lower():
        problems.append(f"mm_vision_tower={tower!r} is not a SigLIP tower (our model has a SigLIP vision tower)")
    if config.get("mm_vision_select_layer") not in (None, -1):
        notes.append(
            f"mm_vision_select_layer={config['mm_vision_select_layer']} is not used by LaViDa's SigLIP tower (it "
            "reads the output of its last kept layer), nor by our model"
        )
    return problems


def build_config(lavida_config: dict, vision_config=None, token_ids=None, config_overrides=None, notes=None,
                 unpooled=False):
    """A ShirgConfig from LaViDa's config.json (dict), the SigLIP sizes (`vision_config_dict`), the tokenizer's
    special ids (`special_token_ids`) and explicit `config_overrides` (ShirgConfig fields, applied last).
    `unpooled`: LaViDa runs the checkpoint with NOT_ALWASY_DO_2DPOOL (its lowres release): views are not pooled.

    Returns (config, notes). Raises ConversionError listing every unsupported option or inconsistent size.
    """
    notes = [] if notes is None else notes
    overrides = dict(load_json_argument(config_overrides, "--config-overrides") or {})
    problems = check_supported_options(lavida_config, notes)
    dream = lavida_config.get("model_type") == DREAM_MODEL_TYPE
    text = (text_config_from_dream if dream else text_config_from_llada)(lavida_config, notes)
    text.update(overrides.pop("text_config", None) or {})
    vision = vision_config_dict(vision_config)
    vision.update(overrides.pop("vision_config", None) or {})

    mm_hidden = lavida_config.get("mm_hidden_size")
    if mm_hidden is None:
        notes.append("config.json has no mm_hidden_size; the projector's shape is checked against the weights only")
    elif int(mm_hidden) != int(vision["hidden_size"]):
        problems.append(
            f"mm_hidden_size={mm_hidden} differs from the vision tower's hidden_size={vision['hidden_size']} "
            "(pass --vision-config with the tower LaViDa used)"
        )
    if problems:
        raise ConversionError("SRC config.json has settings this model does not implement:\n  " + "\n  ".join(problems))

    single_view = lavida_config.get("image_aspect_ratio") in SINGLE_VIEW_LAYOUTS
    kwargs = dict(vision_config=vision, text_config=text,
                  image_aspect_ratio=lavida_config["image_aspect_ratio"] if single_view else "anyres")
    if "image_grid_pinpoints" not in overrides and not (single_view and lavida_config.get("image_grid_pinpoints")
                                                        is None):
        if lavida_config.get("image_grid_pinpoints") is None:
            raise ConversionError(
                "SRC config.json has no image_grid_pinpoints (LaViDa's anyres layout needs them); pass "
                "--config-overrides '{\"image_grid_pinpoints\": [[height, width], ...]}'"
            )
        kwargs["image_grid_pinpoints"] = pinpoints_from_lavida(lavida_config["image_grid_pinpoints"],
                                                               int(vision["image_size"]))
    # LaViDa pools every view's patch map with stride 2 (bilinear, output side ceil(side / 2)); its image path calls
    # the pooling with the default stride, whatever mm_spatial_pool_stride says (that one is for video frames).
    stride = lavida_config.get("mm_spatial_pool_stride")
    if stride not in (None, 2):
        notes.append(f"mm_spatial_pool_stride={stride} is ignored: LaViDa pools image views with stride 2")
    patches_per_side = int(vision["image_size"]) // int(vision["patch_size"])
    kwargs["pooled_view_size"] = patches_per_side if single_view or unpooled else -(-patches_per_side // 2)
    if unpooled and not single_view:
        notes.append(f"LaViDa runs this checkpoint unpooled (NOT_ALWASY_DO_2DPOOL): pooled_view_size = "
                     f"{patches_per_side}, the patches per side of a view")
    for name in ("mask_token_id", "eos_token_id", "pad_token_id", *(("bos_token_id",) if dream else ())):
        if lavida_config.get(name) is not None:
            kwargs[name] = int(lavida_config[name])
        else:
            notes.append(f"config.json has no {name}; using ShirgConfig's default")
    if "pad_token_id" not in kwargs and "eos_token_id" in kwargs:
        kwargs["pad_token_id"] = kwargs["eos_token_id"]  # LLaDA: pad defaults to eos
    token_ids = dict(token_ids or {})
    tokenizer_mask = token_ids.pop("mask_token_id", None)
    if tokenizer_mask is not None and "mask_token_id" in kwargs and tokenizer_mask != kwargs["mask_token_id"]:
        raise ConversionError(
            f"the tokenizer's {DREAM_MASK_TOKEN if dream else MASK_TOKEN} has id {tokenizer_mask} but SRC config.json "
            "has "
            f"mask_token_id={kwargs['mask_token_id']}"
        )
    if tokenizer_mask is not None:
        kwargs.setdefault("mask_token_id", tokenizer_mask)
    kwargs.update(token_ids)
    kwargs.update(overrides)
    try:
        config = ShirgConfig(**kwargs)
    except (ValueError, TypeError) as error:
        raise ConversionError(f"the configuration built from SRC is invalid: {error}{_fixing_flag(error)}") from error
    config.architectures = [LavidaShirgForMaskedDiffusion.__name__]
    return config, notes


def _fixing_flag(error) -> str:
    """For a ShirgConfig error about a special-token id: the converter flag that sets that id (else '')."""
    match = re.match(r"(\w+_token_id) \(", str(error))
    if match is None:
        return ""
    name = match.group(1)
    hint = f"; pass --config-overrides '{{\"{name}\": ID}}' with the right id"
    if name in TOKEN_FIELDS:
        hint += f", or --tokenizer PATH with the LLaDA tokenizer (its {TOKEN_FIELDS[name]} sets {name})"
    return hint


# ----------------------------------------------------------------------------------------------------------------
# Tensor names and the conversion plan


def rename_key(name: str, num_vision_layers: int, model_type: str = LAVIDA_MODEL_TYPE):
    """(our name, None) for a tensor of a LaViDa checkpoint of `model_type` we use, (None, reason) for a known-unused
    one, (None, None) otherwise."""
    top_level, block_pattern, block_names, _, _ = KEY_PLANS[model_type]
    if name in top_level:
        return top_level[name], None
    match = block_pattern.match(name)
    if match:
        index, rest = match.groups()
        if rest in block_names:
            return f"model.language_model.layers.{int(index)}.{block_names[rest]}", None
        if rest == "self_attn.rotary_emb.inv_freq":
            return None, "RoPE inverse frequencies (recomputed from rope_theta)"
        return None, None
    if name == "model.rotary_emb.inv_freq":
        return None, "RoPE inverse frequencies (recomputed from rope_theta)"
    if name.startswith(VISION_PREFIX):
        rest = name[len(VISION_PREFIX):]
        if rest.startswith("post_layernorm."):
            return None, "SigLIP post_layernorm: LaViDa feeds the last kept layer's output without it"
        if rest.startswith("head."):
            return None, "SigLIP pooling head: LaViDa replaces it with an identity"
        layer = VISION_LAYER_PATTERN.match(rest)
        if layer and int(layer.group(1)) >= num_vision_layers:
            return None, (f"SigLIP encoder layer {int(layer.group(1))}: past the {num_vision_layers} layers of "
                          "vision_config (LaViDa drops SigLIP's last layer)")
        if rest == "embeddings.position_ids":
            return None, "SigLIP position_ids buffer (recomputed)"
        return f"model.vision_tower.{rest}", None
    return None, None


def expected_state(config: ShirgConfig) -> dict:
    """Names -> shapes of our model's state dict, from a model built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = LavidaShirgForMaskedDiffusion(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def plan_conversion(checkpoint: LavidaCheckpoint, config: ShirgConfig, expected: dict) -> ConversionPlan:
    """Map every LaViDa tensor onto our names and check names and shapes; raise listing every problem."""
    num_vision_layers = config.vision_config.num_hidden_layers
    model_type = checkpoint.config["model_type"]
    _, _, _, head_name, tying_flag = KEY_PLANS[model_type]
    tied = bool(checkpoint.config.get(tying_flag, False))
    shards, dropped, unexpected, mismatched, duplicates = {}, list(checkpoint.dropped), [], [], []
    placed = {}  # target -> source
    for file_name, names in checkpoint.shards.items():
        pairs = shards.setdefault(file_name, [])
        for name in names:
            target, reason = rename_key(name, num_vision_layers, model_type)
            if tied and name == head_name:
                target, reason = None, None  # a tied LM has no output projection of its own
            if target is None:
                if reason is None:
                    unexpected.append(name)
                else:
                    dropped.append((name, reason))
                continue
            if target not in expected:
                unexpected.append(f"{name} (would be {target})")
                continue
            if target in placed:
                duplicates.append(f"{name} and {placed[target]} both map to {target}")
                continue
            placed[target] = name
            if checkpoint.shapes[name] != expected[target]:
                mismatched.append(
                    f"{name} -> {target}: checkpoint {list(checkpoint.shapes[name])}, model {list(expected[target])}"
                )
            pairs.append((name, target))
            if tied and target == "model.language_model.embed_tokens.weight":
                placed["lm_head.weight"] = name
                pairs.append((name, "lm_head.weight"))
    missing = sorted(set(expected) - set(placed))
    if unexpected or missing or mismatched or duplicates:
        raise ConversionError(_tensor_problems(checkpoint, config, unexpected, missing, mismatched, duplicates))
    num_tensors = sum(len(pairs) for pairs in shards.values())
    num_parameters = 0
    for target in placed:
        count = 1
        for size in expected[target]:
            count *= size
        num_parameters += count
    return ConversionPlan(
        shards=shards, dropped=sorted(dropped), num_tensors=num_tensors, num_parameters=num_parameters
    )


def _tensor_problems(checkpoint, config, unexpected, missing, mismatched, duplicates) -> str:
    lines = [f"the weights of {str(checkpoint.path)!r} do not match the converted model:"]
    dream = checkpoint.config["model_type"] == DREAM_MODEL_TYPE
    block_pattern = KEY_PLANS[checkpoint.config["model_type"]][1]
    blocks = {int(m.group(1)) for m in map(block_pattern.match, checkpoint.shapes) if m}
    n_layers = config.text_config.num_hidden_layers
    if blocks and blocks != set(range(n_layers)):
        lines.append(f"  the weights hold {'Dream layers' if dream else 'LLaDA blocks'} {_ranges(blocks)} but "
                     f"config.json has {'num_hidden_layers' if dream else 'n_layers'}={n_layers}")
    vision_names = (k[len(VISION_PREFIX):] for k in checkpoint.shapes if k.startswith(VISION_PREFIX))
    vision_layers = {int(m.group(1)) for m in map(VISION_LAYER_PATTERN.match, vision_names) if m}
    num_vision = config.vision_config.num_hidden_layers
    if vision_layers and max(vision_layers) + 1 < num_vision:
        lines.append(
            f"  the weights hold SigLIP encoder layers {_ranges(vision_layers)} but vision_config.num_hidden_layers="
            f"{num_vision} (LaViDa keeps all but SigLIP's last layer; pass --vision-config to match)"
        )
    for title, items in (("missing (model parameters without a tensor)", missing),
                         ("unexpected (tensors the model has no place for)", unexpected),
                         ("shape mismatches", mismatched), ("duplicates", duplicates)):
        if items:
            lines.append(f"  {title}: {len(items)}")
            lines += [f"    {item}" for item in items]
    return "\n".join(lines)


def _ranges(values) -> str:
    values, parts = sorted(values), []
    start = prev = values[0]
    for value in values[1:] + [None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if value is not None:
            start = prev = value
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# LaViDa's stage-1 checkpoints (lavida-llada-1.0-stage1, lavida-dream-1.0-stage1): the projector alone, the start of
# LaViDa's stage 2 once joined with the LM and the SigLIP tower it was trained with


def is_stage1_folder(path: Path) -> bool:
    """A LaViDa stage-1 folder: config.json of a LaViDa model type, the projector file (safetensors or LaViDa's
    pickle) and no model weights."""
    if not (path / "config.json").is_file() or (path / INDEX_NAME).is_file() or (path / SINGLE_NAME).is_file():
        return False
    if not any((path / name).is_file() for name in (STAGE1_PROJECTOR, STAGE1_PICKLE)):
        return False
    return _read_json(path / "config.json", "SRC config.json").get("model_type") in LAVIDA_ARCHITECTURES


def read_stage1_sources(src: Path, base_lm, vision_tower, notes: list):
    """(checkpoint, vision config) of LaViDa's stage-2 starting point: the LM of `base_lm` (LLaDA-8B-Instruct or
    Dream-v0-Instruct-7B, whichever SRC's model_type names), the SigLIP tower of `vision_tower` without its last
    encoder layer, the stage-1 projector of SRC (mm_projector.safetensors). Its LaViDa config is the base LM's
    config.json + SRC's mm_* fields + the layout of LaViDa's stage-2 scripts (anyres over STAGE2_GRIDS,
    spatial_unpad, bilinear pooling); image_newline, which stage 2 draws at random, comes from `add_image_newline`."""
    stage1 = _read_json(src / "config.json", "SRC config.json")
    model_type = stage1["model_type"]
    if not (src / STAGE1_PROJECTOR).is_file():
        raise ConversionError(
            f"SRC {str(src)!r} is a LaViDa stage-1 checkpoint whose projector is a pickle ({STAGE1_PICKLE}); pickles "
            "are refused because loading one can run arbitrary code. Save its four tensors (model.mm_projector.0/2 "
            f"weight and bias) as {STAGE1_PROJECTOR} in SRC (see the README, 'LaViDa's stage-1 checkpoints'), then "
            "pass --base-lm and --vision-tower"
        )
    missing = [flag for flag, value in (("--base-lm", base_lm), ("--vision-tower", vision_tower)) if value is None]
    if missing:
        raise ConversionError(
            f"SRC {str(src)!r} is a LaViDa stage-1 checkpoint (the projector alone): pass {' and '.join(missing)} (the "
            f"{BASE_ARCHITECTURES[model_type]} LM folder it was trained on and the SigLIP folder, safetensors) to "
            "assemble LaViDa's stage-2 starting point"
        )
    base, tower = Path(base_lm), Path(vision_tower)
    configs = {}
    for flag, folder in (("--base-lm", base), ("--vision-tower", tower)):
        if not (folder / "config.json").is_file():
            raise ConversionError(f"{flag} {str(folder)!r} is not a model folder with a config.json")
        configs[flag] = _read_json(folder / "config.json", f"{flag} config.json")
    base_config = configs["--base-lm"]
    expected = BASE_ARCHITECTURES[model_type]
    if expected not in (base_config.get("architectures") or []):
        raise ConversionError(
            f"--base-lm {str(base)!r} is not a {expected} folder (SRC's model_type {model_type!r} was trained on one): "
            f"its config.json has architectures={base_config.get('architectures')!r}"
        )
    disagreements = [f"{name}: SRC {stage1[name]!r}, --base-lm {base_config[name]!r}" for name in LM_SIZE_FIELDS
                     if name in stage1 and name in base_config and stage1[name] != base_config[name]]
    if disagreements:
        raise ConversionError("SRC's config.json and --base-lm's disagree on the LM sizes (the stage-1 projector was "
                              "trained on another LM):\n  " + "\n  ".join(disagreements))

    shards, shapes, dtypes, file_names, dropped = {}, {}, {}, {}, []
    lm_shards, lm_shapes, lm_dtypes = read_safetensors_folder(base, "--base-lm")
    shards.update({str(base.resolve() / name): names for name, names in lm_shards.items()})
    shapes.update(lm_shapes)
    dtypes.update(lm_dtypes)
    problems = []
    names = read_safetensors_headers(src / STAGE1_PROJECTOR, None, shapes, dtypes, problems, f"SRC {str(src)!r}")
    shards[str(src.resolve() / STAGE1_PROJECTOR)] = names
    tower_shards, tower_shapes, tower_dtypes = read_safetensors_folder(tower, "--vision-tower")
    for file_name, names in tower_shards.items():
        kept = []
        for name in names:
            if not name.startswith(SIGLIP_VISION):
                dropped.append((name, "SigLIP's text tower and contrastive scale: not part of LaViDa"))
                continue
            ours = VISION_PREFIX + name[len(SIGLIP_VISION):]
            kept.append(ours)
            file_names[ours] = name
            shapes[ours], dtypes[ours] = tower_shapes[name], tower_dtypes[name]
        shards[str(tower.resolve() / file_name)] = kept

    vision = vision_config_dict(configs["--vision-tower"])
    vision["num_hidden_layers"] = int(vision["num_hidden_layers"]) - 1
    notes.append(f"--vision-tower's SigLIP has {vision['num_hidden_layers'] + 1} encoder layers: LaViDa deletes the "
                 f"last, so the converted tower has {vision['num_hidden_layers']}")
    lavida_config = stage1_lavida_config(stage1, base_config, int(vision["image_size"]))
    notes.append(
        f"SRC is a stage-1 checkpoint: its projector was trained on LaViDa's square single-view layout "
        f"(image_aspect_ratio={stage1.get('image_aspect_ratio', 'square')!r}); the folder is LaViDa's stage-2 starting "
        "point (the anyres pooled layout of its stage-2 scripts, a random image_newline) and needs fine-tuning "
        "(train.py) before its answers mean anything"
    )
    checkpoint = LavidaCheckpoint(path=src, config=lavida_config, shards=shards, shapes=shapes, dtypes=dtypes,
                                  file_names=file_names, dropped=dropped)
    return checkpoint, vision


def stage1_lavida_config(stage1: dict, base_config: dict, view_size: int) -> dict:
    """The LaViDa config.json of LaViDa's stage-2 starting point: the base LM's config.json, the stage-1 mm_* fields
    (projector type and sizes, vision tower) and the layout of LaViDa's stage-2 scripts at `view_size` px views."""
    model_type = stage1["model_type"]
    return {
        **base_config, **{name: value for name, value in stage1.items() if name.startswith("mm_")},
        "model_type": model_type, "architectures": [LAVIDA_ARCHITECTURES[model_type]], **STAGE2_LAYOUT,
        "image_grid_pinpoints": [[width * view_size, height * view_size] for width, height in STAGE2_GRIDS],
    }


def add_image_newline(checkpoint: LavidaCheckpoint, hidden_size: int, seed: int, folder: Path, notes: list):
    """Add image_newline as LaViDa's stage 2 creates it, randn(hidden) / sqrt(hidden), drawn from a CPU generator
    seeded with `seed`, in the dtype of the LM's embedding; written to `folder` (a temporary folder) as a source."""
    embedding = KEY_PLANS[checkpoint.config["model_type"]][0]
    embedding = next(name for name, ours in embedding.items() if ours == "model.language_model.embed_tokens.weight")
    dtype = checkpoint.dtypes.get(embedding, torch.float32)
    generator = torch.Generator().manual_seed(seed)
    newline = (torch.randn(hidden_size, generator=generator) / math.sqrt(hidden_size)).to(dtype)
    path = folder / "image_newline.safetensors"
    save_file({IMAGE_NEWLINE: newline}, str(path))
    checkpoint.shards[str(path)] = [IMAGE_NEWLINE]
    checkpoint.shapes[IMAGE_NEWLINE], checkpoint.dtypes[IMAGE_NEWLINE] = tuple(newline.shape), dtype
    notes.append(f"image_newline drawn as LaViDa's stage 2 draws it: randn({hidden_size}) / sqrt({hidden_size}), "
                 f"seed {seed}")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and processor


def load_source_tokenizer(src, tokenizer=None, source_argument="SRC"):
    """The tokenizer at `tokenizer` (a path) or else in `src` (the folder of `source_argument`), loaded from local
    files only."""
    from transformers import AutoTokenizer

    location, argument = (tokenizer, "--tokenizer") if tokenizer is not None else (src, source_argument)
    path = Path(location)
    if not path.is_dir() or not any((path / name).is_file() for name in TOKENIZER_FILES):
        if tokenizer is None:
            raise ConversionError(
                f"{source_argument} {str(src)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass "
                "--tokenizer PATH (a folder with the LLaDA or Dream tokenizer)"
            )
        raise ConversionError(f"--tokenizer {str(tokenizer)!r} is not a folder with tokenizer files")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as error:
        raise ConversionError(f"{argument} {str(location)!r}: cannot load its tokenizer: {error}") from error


def register_image_token(tokenizer, notes: list):
    """Add `<image>` to the tokenizer as a special token when it lacks one: image positions in input_ids then hold
    a real token id (its first free id), which tokens added later can never take. The processor splits prompts at
    `<image>` before tokenizing, so no other token changes."""
    if IMAGE_TOKEN in tokenizer.get_vocab():
        return
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    notes.append(f"registered {IMAGE_TOKEN} as a special token of the tokenizer, id "
                 f"{tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)} (image_token_id)")


def special_token_ids(tokenizer, model_type: str = LAVIDA_MODEL_TYPE) -> dict:
    """ShirgConfig special-token fields found in the tokenizer's vocabulary, by their token text in the LLaDA (or,
    for `model_type` llava_dream, the Dream) tokenizer."""
    fields, mask = (DREAM_TOKEN_FIELDS, DREAM_MASK_TOKEN) if model_type == DREAM_MODEL_TYPE else (TOKEN_FIELDS,
                                                                                                   MASK_TOKEN)
    vocab = tokenizer.get_vocab()
    ids = {name: vocab[token] for name, token in fields.items() if token in vocab}
    if mask in vocab:
        ids["mask_token_id"] = vocab[mask]
    return ids


def build_processor(config: ShirgConfig, tokenizer):
    """(processor, description): the LavidaShirgProcessor of `config` and `tokenizer`.
    Raises ConversionError if they disagree (special ids, vocabulary)."""
    try:
        processor = LavidaShirgProcessor.from_config(config, tokenizer)
    except (ValueError, TypeError) as error:
        raise ConversionError(
            f"cannot build the processor from the tokenizer and the converted config: {error}"
        ) from error
    return processor, f"processor {type(processor).__name__} with tokenizer {type(tokenizer).__name__}"


def save_processor(out_dir, config: ShirgConfig, tokenizer) -> str:
    """Save the processor built from `config` and `tokenizer` (see `build_processor`) into out_dir; returns what
    was saved, in words."""
    processor, description = build_processor(config, tokenizer)
    processor.save_pretrained(str(out_dir))
    return description


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _check_output(out: Path, src: Path, overwrite: bool):
    if out.exists() and not out.is_dir():
        raise ConversionError(f"OUT {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"OUT {str(out)!r} exists and is not empty; pass --overwrite to replace it")
    out_resolved, src_resolved = out.resolve(), src.resolve()
    if out_resolved == src_resolved or src_resolved in out_resolved.parents or out_resolved in src_resolved.parents:
        raise ConversionError(f"OUT {str(out)!r} must be outside SRC {str(src)!r} and must not contain it")


def write_weights(checkpoint: LavidaCheckpoint, plan: ConversionPlan, folder: Path, dtype=None):
    """Write the converted shards (one input shard in memory at a time) and their index. Returns
    (total bytes, output shard count, {dtype: element count})."""
    shard_files = [name for name, pairs in plan.shards.items() if pairs]
    count = len(shard_files)
    weight_map, total_bytes, elements = {}, 0, {}
    for number, file_name in enumerate(shard_files, start=1):
        out_name = SINGLE_NAME if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        tensors, read = {}, set()
        with safe_open(checkpoint.path / file_name, framework="pt") as handle:
            for source, target in plan.shards[file_name]:
                tensor = handle.get_tensor(checkpoint.file_names.get(source, source))
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                if source in read:
                    tensor = tensor.clone()  # a second use (weight tying): safetensors refuses shared storage
                read.add(source)
                tensors[target] = tensor.contiguous()
        save_file(tensors, str(folder / out_name), metadata={"format": "pt"})
        for target, tensor in tensors.items():
            weight_map[target] = out_name
            total_bytes += tensor.numel() * tensor.element_size()
            elements[tensor.dtype] = elements.get(tensor.dtype, 0) + tensor.numel()
        del tensors
    if count > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(folder / INDEX_NAME, "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2)
            handle.write("\n")
    return total_bytes, count, elements


def write_config_and_code(config: ShirgConfig, folder: Path):
    """config.json with auto_map, generation_config.json, and the remote-code files (the model's and config's modules
    and their siblings)."""
    from transformers.dynamic_module_utils import custom_object_save

    with torch.device("meta"):
        model = LavidaShirgForMaskedDiffusion(config)
    custom_object_save(model, folder, config=config)  # copies modeling_*.py + relative imports, sets auto_map
    config.save_pretrained(str(folder))  # copies configuration_*.py, adds AutoConfig to auto_map
    # the sampler defaults of LaViDa's lmms-eval runs: greedy, one token per step, uniform schedule
    model.generation_config.save_pretrained(str(folder))


def convert_checkpoint(src, out, overwrite=False, tokenizer=None, vision_config=None, dtype="keep",
                       config_overrides=None, base_lm=None, vision_tower=None, seed=0, fim=False) -> ConversionReport:
    """Convert the LaViDa folder `src` into our folder `out`; returns the report. Raises ConversionError.

    tokenizer: folder of the LLaDA / Dream tokenizer when SRC has none. vision_config: SigLIP sizes (dict, JSON or
    path) over the so400m/26-layer default (see `lavida_vision_config`). dtype: "keep", "bfloat16" or "float32".
    config_overrides: ShirgConfig fields. A stage-1 SRC (the projector alone) is joined with the LM folder `base_lm`
    and the SigLIP folder `vision_tower` (see `read_stage1_sources`), image_newline drawn with `seed`. fim: record
    the folder as LaViDa's FIM checkpoint (automatic for the folder names FIM_FOLDER_NAMES).
    """
    src, out = Path(src), Path(out)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not src.is_dir():
        raise ConversionError(f"SRC {str(src)!r} is not a directory (expected a LaViDa checkpoint folder)")
    _check_output(out, src, overwrite)
    stage1 = is_stage1_folder(src)
    if stage1 and vision_config is not None:
        raise ConversionError("--vision-config does not apply to a stage-1 SRC: the tower's sizes come from "
                              "--vision-tower's config.json")
    if not stage1 and (base_lm is not None or vision_tower is not None):
        raise ConversionError(f"--base-lm and --vision-tower are for LaViDa's stage-1 checkpoints (the projector "
                              f"alone); SRC {str(src)!r} is not one")
    fim = bool(fim) or src.resolve().name in FIM_FOLDER_NAMES
    writer = FolderWriter(out, "OUT", overwrite)  # one writer of OUT at a time; see shirg_tools.output_folder
    try:
        with tempfile.TemporaryDirectory() as scratch:
            notes = []
            if stage1:
                checkpoint, vision = read_stage1_sources(src, base_lm, vision_tower, notes)
                tok = load_source_tokenizer(base_lm, tokenizer, "--base-lm")
            else:
                checkpoint = read_lavida_checkpoint(src)
                tok = load_source_tokenizer(src, tokenizer)
                vision = lavida_vision_config(vision_config, checkpoint, notes)
            register_image_token(tok, notes)
            model_type = checkpoint.config["model_type"]
            config, notes = build_config(checkpoint.config, vision, special_token_ids(tok, model_type),
                                         config_overrides, notes, unpooled=src.resolve().name in LOWRES_FOLDER_NAMES)
            if stage1:
                add_image_newline(checkpoint, config.text_config.hidden_size, seed, Path(scratch), notes)
            plan = plan_conversion(checkpoint, config, expected_state(config))
            processor, processor_description = build_processor(config, tok)  # checked before any weight is written
            if fim:
                marker = tok.get_vocab().get(FIM_MARKER)
                notes.append(f"LaViDa's FIM checkpoint: recorded as fim=true in {CONVERSION_RECORD}; its FIM marker "
                             f"{FIM_MARKER} is token {marker} of the tokenizer")

            tmp = writer.stage()
            total_bytes, out_shards, elements = write_weights(checkpoint, plan, tmp, DTYPES[dtype])
        main_dtype = max(elements, key=elements.get)
        config.dtype = main_dtype
        write_config_and_code(config, tmp)
        processor.save_pretrained(str(tmp))
        # where the weights came from, read by publish.py's model card
        provenance = {"converted_from": src.resolve().name, "dtype": str(main_dtype).removeprefix("torch."),
                      "converter": "convert_lavida_checkpoint.py", "fim": fim}
        if stage1:
            provenance["stage1"] = {"base_lm": Path(base_lm).resolve().name,
                                    "vision_tower": Path(vision_tower).resolve().name, "image_newline_seed": seed}
        (tmp / CONVERSION_RECORD).write_text(json.dumps(provenance, indent=2))
        writer.commit()  # the umask's modes (not mkdir's or the copied code files'), then swapped into place
    finally:
        writer.release()
    if len(elements) > 1:
        notes.append(f"mixed dtypes kept: { {str(k).replace('torch.', ''): v for k, v in elements.items()} } elements")
    return ConversionReport(
        source=str(src), output=str(out), tensors_converted=plan.num_tensors, num_parameters=plan.num_parameters,
        output_bytes=total_bytes, input_shards=len(checkpoint.shards), output_shards=out_shards,
        dtype=str(main_dtype).replace("torch.", ""), dropped=plan.dropped, notes=notes,
        saved_processor=processor_description,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", metavar="SRC", help="LaViDa checkpoint folder (config.json + safetensors)")
    parser.add_argument("out", metavar="OUT", help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    parser.add_argument("--tokenizer", metavar="PATH", help="LLaDA tokenizer folder, when SRC has no tokenizer")
    parser.add_argument("--vision-config", metavar="JSON", help="SigLIP config fields (JSON or a JSON file path, "
                        "e.g. SigLIP's own config.json) over the default so400m-patch14-384 with 26 layers; a config "
                        "with one layer more than the checkpoint holds gets LaViDa's deletion of the last layer")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="dtype of the written weights")
    parser.add_argument("--config-overrides", metavar="JSON", help="ShirgConfig fields (JSON or a JSON file path)")
    stage1 = parser.add_argument_group("a stage-1 SRC (lavida-llada-1.0-stage1, lavida-dream-1.0-stage1: the projector "
                                       "alone, as mm_projector.safetensors)")
    stage1.add_argument("--base-lm", metavar="PATH", help="the LM it was trained on: LLaDA-8B-Instruct or "
                        "Dream-v0-Instruct-7B (safetensors + tokenizer)")
    stage1.add_argument("--vision-tower", metavar="PATH", help="SigLIP (google/siglip-so400m-patch14-384, "
                        "safetensors); LaViDa deletes its last layer")
    stage1.add_argument("--seed", type=int, default=0, help="seed of image_newline, drawn as LaViDa's stage 2 does")
    parser.add_argument("--fim", action="store_true", help="record OUT as LaViDa's FIM checkpoint (automatic for the "
                        f"folder names {', '.join(FIM_FOLDER_NAMES)})")
    args = parser.parse_args(argv)
    try:
        report = convert_checkpoint(
            args.src, args.out, overwrite=args.overwrite, tokenizer=args.tokenizer, vision_config=args.vision_config,
            dtype=args.dtype, config_overrides=args.config_overrides, base_lm=args.base_lm,
            vision_tower=args.vision_tower, seed=args.seed, fim=args.fim,
        )
    except (ConversionError, OutputFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())

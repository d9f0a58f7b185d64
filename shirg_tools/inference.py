"""Model loading and sampling settings shared by the evaluation front ends (eval.py, the app and the lmms-eval plugin
`lavida_shirg_lmms`): LaViDa's sampling as its evaluation runs it, per backbone (LLaDA: steps = int(answer tokens x
step ratio), the "shift" schedule with shift 3, one block; Dream: its eval's topk_margin sampler from the folder's
generation config, timesteps for one step per answer token, LaViDa's step_ratio and schedule when given), the one
call that samples answers, the model-folder rules, the device check and the check of a variant against a loaded
model. Errors are ValueErrors naming the caller's argument (`argument`)."""

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lavida_shirg.configuration_lavida_shirg import DreamTextConfig
from lavida_shirg.masked_diffusion import LAVIDA_SCHEDULE_SHIFT, SCHEDULES

DEFAULT_STEP_RATIO = 1.0  # one answer token per step, as LaViDa evaluates
DEFAULT_SCHEDULE = "shift"  # LaViDa's LLaDA schedule (with LAVIDA_SCHEDULE_SHIFT)
DREAM_DEFAULT_SCHEDULE = "uniform"  # Dream's own timesteps, as LaViDa's eval/run_dream.sh (no schedule)
DREAM_EVAL_STEPS = 512  # LaViDa's LlavaDream.generate: steps=512, capped at the answer length by Dream's _sample
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 on CUDA, float32 on CPU
DEVICE_TYPES = ("cpu", "cuda")


def diffusion_steps(gen_length: int, step_ratio: float) -> int:
    """LaViDa's step count: int(gen_length * step_ratio) (truncated, as LaViDa), at least 1."""
    return max(1, int(gen_length * step_ratio))


def is_dream(model) -> bool:
    """Whether the model's LM is Dream (its sampler takes generate()'s Dream settings) rather than LLaDA."""
    return model.config.text_config.model_type == DreamTextConfig.model_type


def folder_is_dream(folder: Path) -> bool:
    """Whether the LM of a model folder (as `model_folder` found it) is Dream, read from its config.json."""
    text_config = json.loads((Path(folder) / "config.json").read_text()).get("text_config") or {}
    return text_config.get("model_type") == DreamTextConfig.model_type


def default_schedule(dream: bool) -> str:
    """LaViDa's evaluation schedule of a backbone: "shift" for LLaDA, Dream's own timesteps ("uniform") for Dream."""
    return DREAM_DEFAULT_SCHEDULE if dream else DEFAULT_SCHEDULE


def generation_settings(gen_length: int, step_ratio: float = DEFAULT_STEP_RATIO, schedule: str | None = None,
                        schedule_shift: float = LAVIDA_SCHEDULE_SHIFT, block_length: int | None = None,
                        dream: bool = False) -> dict:
    """The sampler arguments of one call for answers of `gen_length` tokens (schedule None: the backbone's
    `default_schedule`). LLaDA: diffusion_generate's, steps = int(gen_length x step_ratio), one block unless
    `block_length`. Dream: generate()'s, as LaViDa's Dream evaluation calls its sampler: timesteps for
    min(512, gen_length) steps, of which int(gen_length x step_ratio) run (LaViDa's step_ratio; 1.0 passes none,
    as its eval/run_dream.sh); the algorithm and filters are the folder's generation config (a converted folder:
    topk_margin, top_k 50)."""
    schedule = schedule or default_schedule(dream)
    if dream:
        return dict(max_new_tokens=gen_length, steps=min(DREAM_EVAL_STEPS, gen_length),
                    step_ratio=None if step_ratio == DEFAULT_STEP_RATIO else step_ratio, schedule=schedule,
                    schedule_shift=schedule_shift)
    return dict(gen_length=gen_length, block_length=block_length or gen_length,
                steps=diffusion_steps(gen_length, step_ratio), schedule=schedule, schedule_shift=schedule_shift)


def denoising_steps(settings: dict) -> int:
    """The diffusion steps a call of `generation_settings` runs: Dream's int(max_new_tokens x step_ratio), LLaDA's
    steps."""
    if settings.get("step_ratio") is not None:
        return int(settings["max_new_tokens"] * settings["step_ratio"])
    return settings["steps"]


def check_dream_generation(model, settings: dict, **prefix):
    """ValueError (the sampler's message, naming the setting) unless the Dream model's sampler takes `settings`
    (`generation_settings`' Dream arguments) with the prefix settings `prefix` (default: the prefix cache), checked
    against its generation config before any sample runs."""
    from lavida_shirg.generation_lavida_shirg import generation_config_of_call

    generation_config_of_call(model.generation_config, None, **settings, **prefix)


def generate_answer_ids(model, call: dict):
    """The answer ids (B, G) of one sampler call (processor outputs + `generation_settings` arguments + prefix
    settings): LLaDA through diffusion_generate (LaViDa's argument names), Dream through generate (the prompt cut
    off)."""
    if is_dream(model):
        return model.generate(**call)[:, call["input_ids"].shape[1]:]
    return model.diffusion_generate(**call)


def check_sampling(step_ratio, schedule, schedule_shift, names: dict | None = None):
    """ValueError naming the argument (`names` maps step_ratio / schedule / schedule_shift to the caller's
    argument names, e.g. --step-ratio) unless step_ratio is in (0, 1], schedule None (the backbone's) or one of
    SCHEDULES and schedule_shift finite and > 0."""
    names = {name: (names or {}).get(name, name) for name in ("step_ratio", "schedule", "schedule_shift")}
    if isinstance(step_ratio, bool) or not isinstance(step_ratio, (int, float)) or not 0 < step_ratio <= 1:
        raise ValueError(f"{names['step_ratio']} must be in (0, 1], got {step_ratio!r}")
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"{names['schedule']} must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if (isinstance(schedule_shift, bool) or not isinstance(schedule_shift, (int, float))
            or not (math.isfinite(schedule_shift) and schedule_shift > 0)):
        raise ValueError(f"{names['schedule_shift']} must be a finite number > 0 (LaViDa: {LAVIDA_SCHEDULE_SHIFT}), "
                         f"got {schedule_shift!r}")


def check_device(text: str, argument: str) -> torch.device:
    """The device `text` names (cpu, cuda or cuda:N with that CUDA device present); ValueError naming `argument`
    otherwise."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{argument} {text!r} is not a device: use cpu, cuda or cuda:N") from error
    if device.type not in DEVICE_TYPES or (device.type == "cpu" and device.index not in (None, 0)):
        raise ValueError(f"{argument} {text!r} is not supported: use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{argument} {text!r}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}, CUDA build: {torch.version.cuda}); use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{argument} {text!r}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}")
    return device


def resolve_dtype(dtype: str, device: torch.device, argument: str) -> str:
    """The model dtype's name: `dtype` itself, or for "auto" bfloat16 on CUDA and float32 on CPU."""
    if dtype not in DTYPES:
        raise ValueError(f"{argument} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return dtype


def model_folder(folder: Path, argument: str) -> Path:
    """The folder holding a lavida_shirg model's config.json: `folder` itself, or the merged model a training run
    wrote into folder/merged (train.py --save_merged_model). ValueError naming `argument` for anything else (no
    config.json, an adapter-only folder, another model type)."""
    if (folder / "config.json").is_file():
        found = folder
    elif (folder / "merged" / "config.json").is_file():
        found = folder / "merged"
    elif (folder / "adapter_config.json").is_file():
        raise ValueError(f"{argument} {str(folder)!r} holds a LoRA adapter only: train with --save_merged_model and "
                         "pass the training output folder (its merged/ model is used)")
    else:
        raise ValueError(f"{argument} {str(folder)!r} is not a model folder (no config.json)")
    model_type = json.loads((found / "config.json").read_text()).get("model_type")
    if model_type != "lavida_shirg":
        raise ValueError(f"{argument} {str(folder)!r} holds a {model_type!r} model, not a lavida_shirg one: convert a "
                         "LaViDa checkpoint with convert_lavida_checkpoint.py first")
    check_weight_files(found, argument)
    return found


def check_weight_files(folder: Path, argument: str):
    """ValueError naming the file when a safetensors file of `folder` cannot be read or is shorter than its header
    says (a cut download or copy). Reads the headers only."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{argument} {str(folder)!r}: {path.name} is not a complete safetensors file ({error}); "
                             "copy or download it again") from error


def load_pretrained(folder: Path, dtype: str, device: torch.device):
    """(model in eval mode on `device` in `dtype`, processor) of a lavida_shirg folder (see `model_folder`), through
    AutoModel / AutoProcessor with the folder's remote code."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, dtype=getattr(torch, dtype))
    processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
    return model.to(device=device, dtype=getattr(torch, dtype)).eval(), processor


def high_resolution_tokens(model) -> int:
    """The model's single-view high-resolution token count, (hires_image_size // patch_size)^2: what `full` keeps of
    one image and the largest selection budget (default variant budgets and the app's budget slider scale with it)."""
    config = model.config
    return (config.hires_image_size // config.vision_config.patch_size) ** 2


def check_variant(model, processor, variant):
    """The variant's SelectionSettings (the model's), validated once; a ValueError naming the variant when the model
    or the processor refuses its settings (budget beyond the token count, out-of-range option, a learned part the
    model lacks)."""
    try:
        processor.selection(variant.method, variant.budget, variant.options)
        return model.selection_settings(variant.method, variant.budget, variant.options)
    except ValueError as error:
        raise ValueError(f"variant {variant.label!r}: {error}") from error

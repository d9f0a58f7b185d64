"""PEFT LoRA for SHIRG adaptation: which modules get adapters, which train in full, and their learning rates.

Adapters: the projector's two linear layers (rank `projector_rank`, dropout `projector_dropout`), SigLIP blocks'
attention projections (rank `vision_rank`, dropout `vision_dropout`) and optionally the LM's attention. Trained
in full (`modules_to_save`): SHIRG-X's coordinate layer and the adaptive-budget head when the model has them,
plus any module named by the caller. Everything else is frozen.
"""

import dataclasses
import re

from peft import LoraConfig, get_peft_model
from torch import nn

PROJECTOR_TARGETS = ("linear_1", "linear_2")
LEARNED_SHIRG_MODULES = ("coordinate_embedding", "budget_head")


@dataclasses.dataclass(frozen=True)
class LoraPlan:
    """Adapter shapes. vision_layers / lm_layers: block indices (lm_layers None = all blocks when lm is on)."""

    projector_rank: int = 64
    projector_alpha: int = 32
    projector_dropout: float = 0.05
    vision_layers: tuple = (0, 1, 2, 3)
    vision_targets: tuple = ("q_proj", "k_proj", "v_proj")
    vision_rank: int = 64
    vision_alpha: int = 32
    vision_dropout: float = 0.0
    language_model: bool = False
    lm_layers: tuple | None = None
    lm_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    lm_rank: int = 16
    lm_alpha: int = 32
    lm_dropout: float = 0.05
    modules_to_save: tuple = ()


BASE = r"model\."  # LavidaShirgForMaskedDiffusion's base model (vision, projector, LM) lives under `model.`


def _alternatives(values) -> str:
    return "|".join(re.escape(str(v)) for v in values)


def target_patterns(plan: LoraPlan) -> dict:
    """Per adapter group (projector; vision unless vision_layers is empty; language_model when on), the regular
    expression its module names fully match."""
    patterns = {"projector": rf"{BASE}multi_modal_projector\.({_alternatives(PROJECTOR_TARGETS)})"}
    if plan.vision_layers:
        patterns["vision"] = (rf"{BASE}vision_tower\.encoder\.layers\.({_alternatives(plan.vision_layers)})\."
                              rf"self_attn\.({_alternatives(plan.vision_targets)})")
    if plan.language_model:
        layers = r"\d+" if plan.lm_layers is None else f"({_alternatives(plan.lm_layers)})"
        patterns["language_model"] = (rf"{BASE}language_model\.layers\.{layers}\.self_attn\."
                                      rf"({_alternatives(plan.lm_targets)})")
    return patterns


def check_plan(model: nn.Module, plan: LoraPlan):
    """Raise ValueError naming the argument when a requested target matches no nn.Linear of `model`, a requested
    block index does not exist, a rank/dropout is out of range, or a full-training module is missing."""
    names = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    for group, rank, dropout in (("projector", plan.projector_rank, plan.projector_dropout),
                                 ("vision", plan.vision_rank, plan.vision_dropout),
                                 ("lm", plan.lm_rank, plan.lm_dropout)):
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"--lora_{group}_rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"--lora_{group}_dropout must be in [0, 1), got {dropout!r}")
    num_vision = len(model.vision_tower.encoder.layers)
    num_lm = len(model.language_model.layers)
    for argument, layers, count in (("--lora_vision_layers", plan.vision_layers, num_vision),
                                    ("--lora_lm_layers", plan.lm_layers or (), num_lm)):
        bad = [layer for layer in layers if not 0 <= layer < count]
        if bad:
            raise ValueError(f"{argument} {list(layers)}: blocks {bad} do not exist (the model has {count} blocks, "
                             f"0 .. {count - 1})")
    checks = [("--lora_vision_targets", "vision", dataclasses.replace(plan, vision_targets=(target,)), target)
              for target in plan.vision_targets if plan.vision_layers]
    if plan.language_model:
        checks += [("--lora_lm_targets", "language_model", dataclasses.replace(plan, lm_targets=(target,)), target)
                   for target in plan.lm_targets]
    for argument, group, single, target in checks:
        if not any(re.fullmatch(target_patterns(single)[group], name) for name in names):
            tower = "model.vision_tower.encoder" if group == "vision" else "model.language_model"
            prefix = f"{tower}.layers.0.self_attn."
            available = sorted(name[len(prefix):] for name in names if name.startswith(prefix))
            raise ValueError(f"{argument} entry {target!r} matches no linear layer of the model (the attention "
                             f"layers are {available})")
    patterns = target_patterns(plan)
    if not any(re.fullmatch(patterns["projector"], name) for name in names):
        raise ValueError("the model has no multi_modal_projector.linear_1/linear_2 layers to adapt")
    modules = dict(model.named_modules())
    missing = [name for name in plan.modules_to_save  # PEFT matches modules_to_save as name suffixes
               if not any((key == name or key.endswith(f".{name}")) and module is not None
                          for key, module in modules.items())]
    if missing:
        raise ValueError(f"--modules_to_save {list(plan.modules_to_save)}: {missing} are not modules of the model")


def lora_config(plan: LoraPlan) -> LoraConfig:
    """One LoraConfig: targets = the union of the groups' patterns; rank/alpha per group via rank_pattern and
    alpha_pattern (the projector's are the defaults); dropout = the projector's (`apply_lora` sets the others)."""
    patterns = target_patterns(plan)
    ranks = {"vision": (plan.vision_rank, plan.vision_alpha), "language_model": (plan.lm_rank, plan.lm_alpha)}
    rank_pattern = {patterns[group]: rank for group, (rank, _) in ranks.items() if group in patterns}
    alpha_pattern = {patterns[group]: alpha for group, (_, alpha) in ranks.items() if group in patterns}
    return LoraConfig(
        r=plan.projector_rank, lora_alpha=plan.projector_alpha, lora_dropout=plan.projector_dropout,
        target_modules="|".join(f"({pattern})" for pattern in patterns.values()),
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, modules_to_save=list(plan.modules_to_save) or None,
        bias="none",
    )


def apply_lora(model: nn.Module, plan: LoraPlan):
    """The PeftModel of `model` under `plan` (checked first), with each group's own LoRA dropout in place."""
    check_plan(model, plan)
    peft_model = get_peft_model(model, lora_config(plan))
    patterns = target_patterns(plan)
    dropouts = {"vision": plan.vision_dropout, "language_model": plan.lm_dropout}
    for name, module in peft_model.base_model.model.named_modules():
        for group, probability in dropouts.items():
            if group in patterns and re.fullmatch(patterns[group], name):
                for adapter in module.lora_dropout:
                    module.lora_dropout[adapter] = nn.Dropout(probability) if probability > 0 else nn.Identity()
    return peft_model


def parameter_group_name(name: str, full_training: bool = False) -> str:
    """The learning-rate group of a trainable parameter, from its name: projector, vision, language_model (LoRA
    adapters; with `full_training`, no adapters: the projector's and the vision tower's own weights),
    coordinate_embedding, budget_head, or full (other modules trained in full)."""
    if full_training:
        for group, prefix in (("projector", "multi_modal_projector."), ("vision", "vision_tower.")):
            if prefix in name:
                return group
    if "lora_" in name:
        for group, prefix in (("projector", "multi_modal_projector."), ("vision", "vision_tower."),
                              ("language_model", "language_model.")):
            if prefix in name:
                return group
    for module in LEARNED_SHIRG_MODULES:
        if f"{module}." in name:
            return module
    return "full"


def parameter_groups(model: nn.Module, learning_rates: dict, weight_decay: float, decay_names,
                     full_training: bool = False) -> list:
    """Optimizer groups of the trainable parameters: per `parameter_group_name` group, one with `weight_decay`
    (names in `decay_names`) and one without; each with lr = learning_rates[group]. Empty groups are left out."""
    groups = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        group = parameter_group_name(name, full_training)
        decay = name in decay_names
        key = (group, decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": learning_rates[group], "weight_decay": weight_decay if decay else 0.0,
                           "group": group}
        groups[key]["params"].append(parameter)
    order = ("projector", "vision", "language_model", "coordinate_embedding", "budget_head", "full")
    return [groups[key] for key in sorted(groups, key=lambda key: (order.index(key[0]), not key[1]))]


def trainable_summary(peft_model, base_parameters: int, full_training: bool = False) -> str:
    """Trainable / total parameters (total = the base model + the adapters, counting a module trained in full
    once), with the count of each learning-rate group (see `parameter_group_name`)."""
    counts = {}
    for name, parameter in peft_model.named_parameters():
        if parameter.requires_grad:
            group = parameter_group_name(name, full_training)
            counts[group] = counts.get(group, 0) + parameter.numel()
    adapters = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    trainable = sum(counts.values())
    total = base_parameters + adapters
    groups = ", ".join(f"{group} {count:,}" for group, count in counts.items())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%): {groups}"

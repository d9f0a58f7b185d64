"""Variant strings of the evaluation CLI: `METHOD[@BUDGET][:OPTION=VALUE]...`.

Examples: `pooled`, `full`, `shirg-fixed@768`, `shirg-fixed@768:relevance_weight=1.0:detail_weight=0`,
`shirg-v2@768:v2_summary_token=false`, `shirg-v2@768:v2_detail_weight=0.1`,
`shirg-fixed@768:hires_source=anyres-views`, `shirg-x@768:detail_term=pixel-contrast`.
METHOD is one of the config's SELECTION_METHODS; BUDGET the number of kept high-resolution tokens (selection
methods only); each OPTION a SHIRG config field (SELECTION_FIELDS), by the same name as in the config, the processor's
`selection_options` and `generate`.
Values are parsed by the field's type: booleans true/false/1/0/yes/no, integers, numbers, strings, and lists of
integers written with '/' (budget_choices=32/64/96).
"""

from typing import NamedTuple

from lavida_shirg.configuration_lavida_shirg import SELECTION_FIELDS, SELECTION_METHODS

# set by METHOD@BUDGET itself, never as options
RESERVED_FIELDS = ("selection_method", "selection_budget")
OPTION_FIELDS = tuple(name for name in SELECTION_FIELDS if name not in RESERVED_FIELDS)
UNBUDGETED_METHODS = ("pooled", "full")
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class Variant(NamedTuple):
    """One evaluated variant: its label (the normalised variant string), method, budget (None: the config's for a
    selection method, none for pooled/full) and option overrides (full SHIRG field names -> values)."""

    label: str
    method: str
    budget: int | None
    options: dict

    def call_settings(self) -> dict:
        """Keyword arguments of the processor / diffusion_generate / inspect_selection for this variant."""
        return dict(selection_method=self.method, selection_budget=self.budget, selection_options=self.options or None)


def _field_types() -> dict:
    """Python type of every option field: the type of its value in a default ShirgConfig (bool, int, float, str
    or list)."""
    from lavida_shirg.configuration_lavida_shirg import ShirgConfig

    config = ShirgConfig.from_preset("tiny")
    return {name: type(getattr(config, name)) for name in OPTION_FIELDS}


FIELD_TYPES = _field_types()


def option_names_help() -> str:
    """The accepted option names (the SHIRG config fields), for error messages and --help."""
    return f"options: {', '.join(OPTION_FIELDS)}"


def _parse_value(field: str, text: str, variant: str):
    """`text` parsed as the type of SHIRG field `field`; ValueError naming the variant otherwise."""
    kind = FIELD_TYPES[field]
    lowered = text.strip().lower()
    if kind is bool:
        if lowered in TRUE_WORDS or lowered in FALSE_WORDS:
            return lowered in TRUE_WORDS
        raise ValueError(f"variant {variant!r}: {field} takes true or false, got {text!r}")
    if kind is list:
        parts = [part for part in lowered.split("/") if part]
        if not parts or not all(part.isdigit() for part in parts):
            raise ValueError(f"variant {variant!r}: {field} takes integers separated by '/', e.g. 512/768/1024, "
                             f"got {text!r}")
        return [int(part) for part in parts]
    if kind is str:
        return text.strip()
    number = _parse_number(kind, lowered)
    if number is None:
        raise ValueError(f"variant {variant!r}: {field} takes {'an integer' if kind is int else 'a number'}, "
                         f"got {text!r}")
    return number


def _parse_number(kind, text: str):
    """int(text) / float(text), or None when `text` is not such a number."""
    if kind is int:
        return int(text) if text.lstrip("-").isdigit() else None
    try:
        return float(text)
    except ValueError:  # reported by the caller with the field and the variant
        return None


def parse_variant(text: str) -> Variant:
    """Parse one variant string (see the module docstring). Raises ValueError naming the variant and listing the
    valid methods or option names."""
    spec = text.strip()
    head, *option_parts = spec.split(":")
    method, _, budget_text = head.partition("@")
    method = method.strip()
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown variant method {method!r} in {text!r}; methods: {', '.join(SELECTION_METHODS)}")
    budget = None
    if budget_text:
        if method in UNBUDGETED_METHODS:
            raise ValueError(f"variant {text!r}: {method} keeps no budget (write {method!r} without '@')")
        if not budget_text.strip().isdigit() or int(budget_text) <= 0:
            raise ValueError(f"variant {text!r}: the budget after '@' must be a positive integer, got {budget_text!r}")
        budget = int(budget_text)
    options = {}
    for part in option_parts:
        name, equals, value = part.partition("=")
        name = name.strip()
        if not equals or not name:
            raise ValueError(f"variant {text!r}: options are written NAME=VALUE, got {part!r}")
        if name in RESERVED_FIELDS:
            raise ValueError(f"variant {text!r}: set {name} with METHOD@BUDGET, not as an option")
        field = name
        if field not in OPTION_FIELDS:
            raise ValueError(f"variant {text!r}: unknown option {name!r}; {option_names_help()}")
        if field in options:
            raise ValueError(f"variant {text!r}: option {field} is given twice")
        options[field] = _parse_value(field, value, text)
    return Variant(format_variant(method, budget, options), method, budget, options)


def format_variant(method: str, budget, options: dict) -> str:
    """The canonical variant string: METHOD[@BUDGET] then :field=value in SELECTION_FIELDS order."""
    label = method if budget is None else f"{method}@{budget}"
    for field in OPTION_FIELDS:
        if field in options:
            value = options[field]
            if isinstance(value, bool):
                value = str(value).lower()
            elif isinstance(value, list):
                value = "/".join(str(item) for item in value)
            label += f":{field}={value}"
    return label


def parse_variants(text: str) -> list:
    """A comma-separated list of variant strings -> [Variant], in order; duplicates (same label) are refused."""
    variants = [parse_variant(part) for part in text.split(",") if part.strip()]
    if not variants:
        raise ValueError("--variants lists no variant")
    labels = [variant.label for variant in variants]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"--variants lists {duplicates} more than once")
    return variants


# The variant list, for the real model (2304 high-resolution tokens at 672 px).
REFERENCE_TOKENS = 2304
DEFAULT_VARIANTS = ("pooled,full,shirg-fixed@512,shirg-fixed@768,shirg-fixed@1024,shirg-v2@768,shirg-x@768,"
                    "random@768,visionzip@768,divprune@768")


def default_variants(num_tokens: int) -> str:
    """DEFAULT_VARIANTS with every budget scaled to a model with `num_tokens` high-resolution tokens:
    round(budget * num_tokens / 2304) (the tiny preset's 256 tokens: 512 -> 57, 768 -> 85, 1024 -> 114)."""
    parts = []
    for part in DEFAULT_VARIANTS.split(","):
        method, _, budget = part.partition("@")
        parts.append(part if not budget else f"{method}@{max(1, round(int(budget) * num_tokens / REFERENCE_TOKENS))}")
    return ",".join(parts)

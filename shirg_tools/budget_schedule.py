"""Mixed-budget training: the token budgets a run trains with and which one each optimizer step uses.

An entry of the budget list is a number K (the SHIRG method keeps K high-resolution tokens), "pooled" (LaViDa's
pooled layout) or "adaptive" (the model's budget head picks K per image among its budget_choices). The schedule is
a pure function of (seed, global step): every process, every dataloader worker set-up and every resumed run gets
the same sequence, and each budget is used exactly once in every cycle of len(entries) steps (a seeded shuffle per
cycle), so no budget is starved by chance.
"""

import dataclasses

import numpy as np

POOLED, ADAPTIVE = "pooled", "adaptive"


@dataclasses.dataclass(frozen=True)
class BudgetEntry:
    """One budget of the list and the selection settings it gives the processor and the model.

    label: "pooled", "adaptive" or the decimal budget. method / budget / options: the `selection_method`,
    `selection_budget` and `selection_options` of the processor and model calls.
    """

    label: str
    method: str
    budget: int | None
    options: dict

    def call_kwargs(self) -> dict:
        """Keyword arguments for `processor(...)` and `model(...)`."""
        return {"selection_method": self.method, "selection_budget": self.budget,
                "selection_options": dict(self.options)}


def parse_budget_entries(text: str, method: str, options: dict, has_budget_head: bool,
                         argument: str = "--budgets") -> list:
    """The entries of a comma-separated budget list ("512,768,1024,pooled"); numbers use the SHIRG `method`.

    Every entry gets `options` plus adaptive_budget (True only for "adaptive"). Raises ValueError naming
    `argument` for an empty list, a duplicate, a non-positive or non-integer number, an unknown word, or
    "adaptive" on a model without a budget head.
    """
    labels = [part.strip() for part in str(text).split(",")]
    if not labels or any(not label for label in labels):
        raise ValueError(f"{argument} must be a comma-separated list of budgets, '{POOLED}' or '{ADAPTIVE}', "
                         f"got {text!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"{argument} lists an entry twice: {text!r}")
    if "adaptive_budget" in options:
        raise ValueError("selection_options must not set adaptive_budget: the budget list sets it (entry "
                         f"'{ADAPTIVE}')")
    entries = []
    for label in labels:
        if label == POOLED:
            entries.append(BudgetEntry(POOLED, POOLED, None, {**options, "adaptive_budget": False}))
        elif label == ADAPTIVE:
            if not has_budget_head:
                raise ValueError(f"{argument} entry '{ADAPTIVE}' needs a model with a budget head "
                                 "(--adaptive_budget)")
            entries.append(BudgetEntry(ADAPTIVE, method, None, {**options, "adaptive_budget": True}))
        elif label.isdigit() and int(label) > 0:
            entries.append(BudgetEntry(str(int(label)), method, int(label), {**options, "adaptive_budget": False}))
        else:
            raise ValueError(f"{argument} entry {label!r} is not a positive integer, '{POOLED}' or '{ADAPTIVE}' "
                             f"(in {text!r})")
    return entries


def validate_entries(entries: list, model, processor, argument: str = "--budgets"):
    """Check every entry against the model and the processor (their `selection_settings` / `selection`); a
    ValueError naming `argument` and the entry reports a budget the model cannot serve."""
    for entry in entries:
        try:
            model.selection_settings(entry.method, entry.budget, entry.options)
            processor.selection(entry.method, entry.budget, entry.options)
        except ValueError as error:
            raise ValueError(f"{argument} entry {entry.label!r} (selection_method={entry.method!r}) is invalid "
                             f"for this model: {error}") from error


class BudgetSchedule:
    """entry_at(step) = entries[order_c[step mod n]], n = len(entries), c = step // n, order_c a permutation of
    range(n) drawn by numpy's PCG64 seeded with (seed, c). Deterministic, balanced per cycle, process-independent."""

    def __init__(self, entries: list, seed: int):
        if not entries:
            raise ValueError("the budget schedule needs at least one entry")
        self.entries = list(entries)
        self.seed = int(seed)

    def index_at(self, step: int) -> int:
        """Index into `entries` of the budget of optimizer step `step` (0-based global step)."""
        cycle, position = divmod(int(step), len(self.entries))
        order = np.random.default_rng([self.seed, cycle]).permutation(len(self.entries))
        return int(order[position])

    def entry_at(self, step: int) -> BudgetEntry:
        return self.entries[self.index_at(step)]

"""The configuration record of a training run, written next to its checkpoints and checked on resume.

A checkpoint continues exactly only under the configuration that wrote it (same model, adapters, budgets, data,
seed and batch geometry); `check_resume` refuses any other, naming the differing fields.
"""

import json
import os

from .output_folder import write_atomic

RUN_RECORD = "shirg_run.json"
CONVERSION_RECORD = "shirg_conversion.json"  # written by convert_lavida_checkpoint.py: where the weights came from


def write_run_record(folder: str, record: dict):
    """Write `record` as JSON into folder/RUN_RECORD (atomically; the folder must exist)."""
    write_atomic(os.path.join(folder, RUN_RECORD), json.dumps(record, indent=2, sort_keys=True).encode())


def _differences(saved, current, prefix="") -> list:
    """Dotted paths where two JSON-like values differ, with both values."""
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(saved) | set(current)):
            found += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return found
    return [] if saved == current else [f"{prefix[:-1]}: {saved!r} in the checkpoint, {current!r} now"]


def check_resume(checkpoint: str, record: dict, argument: str = "--resume_from_checkpoint"):
    """Raise ValueError naming `argument` if `checkpoint` is not a folder with a train.py run record and a
    Trainer state, or if its record differs from `record` (the differing fields are listed)."""
    if not os.path.isdir(checkpoint):
        raise ValueError(f"{argument} {checkpoint} is not a folder")
    path = os.path.join(checkpoint, RUN_RECORD)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
        raise ValueError(f"{argument} {checkpoint} is not a train.py checkpoint (it lacks {RUN_RECORD} or "
                         "trainer_state.json)")
    with open(path) as handle:
        saved = json.load(handle)
    # round-trip through JSON so that tuples and lists compare equal
    differences = _differences(saved, json.loads(json.dumps(record)))
    if differences:
        raise ValueError(f"{argument} {checkpoint} was written by another configuration; it can only continue "
                         "under its own. Differences:\n  " + "\n  ".join(differences))

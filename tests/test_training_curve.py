"""shirg_tools.training_curve: loss per budget from the trainer state, exact match per checkpoint from eval.py
summaries, one PNG and its JSON."""

import json

import numpy as np
import pytest
from PIL import Image

from shirg_tools import training_curve


def write_run(folder, steps=(250, 500)):
    history = [{"step": 25, "loss": 5.0, "loss_pooled": 5.1, "loss_32": 4.9},
               {"step": 50, "loss": 2.0, "loss_pooled": 2.5, "loss_32": 1.5},
               {"step": 500, "train_runtime": 1.0}]
    for step in steps:
        checkpoint = folder / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": history[: 1 + (step == 500)]}))
        summary = folder / "curve-eval" / f"checkpoint-{step}" / "summary.json"
        summary.parent.mkdir(parents=True)
        rows = {"pooled": {"exact_match": 10.0 * step / 500}, "full": {"exact_match": 90.0 * step / 500}}
        summary.write_text(json.dumps({"tasks": {"synthetic-ocr": {"variants": rows}}}))
    (folder / "checkpoint-notes").mkdir()  # not a checkpoint-N folder


def test_curves_from_the_latest_state_and_the_checkpoint_summaries(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    assert [step for step, _ in training_curve.checkpoints(run)] == [250, 500]
    assert training_curve.loss_curves(run) == {"pooled": [[25, 5.1], [50, 2.5]], "32": [[25, 4.9], [50, 1.5]]}
    output = tmp_path / "curve.png"
    training_curve.main([str(run), "--output", str(output), "--variants", "pooled,full"])
    data = json.loads(output.with_suffix(".json").read_text())
    assert data["exact_match"] == {"pooled": [[250, 5.0], [500, 10.0]], "full": [[250, 45.0], [500, 90.0]]}
    image = Image.open(output)
    assert image.size == (2 * training_curve.PANEL[0], training_curve.PANEL[1])
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    for colour in training_curve.COLOURS[:2]:  # both series of each chart are drawn
        assert (np.abs(pixels.astype(int) - colour).sum(axis=1) == 0).sum() > 50


def test_a_folder_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="holds no checkpoint-N folder"):
        training_curve.main([str(tmp_path), "--output", str(tmp_path / "c.png")])
    with pytest.raises(SystemExit, match="is not a folder"):
        training_curve.main([str(tmp_path / "missing"), "--output", str(tmp_path / "c.png")])

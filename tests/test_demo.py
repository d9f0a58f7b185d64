"""demo.py: its arguments are checked before any step runs, and its steps are the project's CLIs as written."""

import pytest

import demo


@pytest.fixture
def shipped(monkeypatch, tmp_path):
    """A stand-in for reader_model/ (a folder with a config.json)."""
    folder = tmp_path / "reader_model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(demo, "SHIPPED_MODEL", str(folder))
    return str(folder)


@pytest.mark.parametrize("argv, message", [
    (["--tower-steps", "0"], "--tower-steps, --train-steps and --eval-limit must be positive"),
    (["--train-steps", "0"], "--tower-steps, --train-steps and --eval-limit must be positive"),
    (["--eval-limit", "-1"], "--tower-steps, --train-steps and --eval-limit must be positive"),
    (["--tower-stop-at", "1.5"], "--tower-stop-at must be in"),
    (["--model", "/no/such/folder"], "--model /no/such/folder is not a model folder"),
    (["--retrain", "--model", "x"], "--retrain trains the model it evaluates"),
])
def test_bad_arguments_stop_before_any_step(argv, message, monkeypatch, shipped):
    monkeypatch.setattr(demo, "run", lambda step, command: pytest.fail(f"{step} ran"))
    with pytest.raises(SystemExit, match=message):
        demo.main(argv)


def test_without_a_shipped_model_the_default_asks_for_one(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "run", lambda step, command: pytest.fail(f"{step} ran"))
    monkeypatch.setattr(demo, "SHIPPED_MODEL", str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="not a model folder .*--retrain"):
        demo.main([])


def test_default_evaluates_the_shipped_model_then_publishes(monkeypatch, tmp_path, shipped):
    calls = []
    monkeypatch.setattr(demo, "run", lambda step, command: calls.append((step, command)))
    demo.main(["--output", str(tmp_path / "out")])
    (evaluate, eval_command), (publish, publish_command) = calls
    assert eval_command[:7] == ["eval.py", "--model", shipped, "--synthetic", "task=reading", "--limit", "200"]
    assert eval_command[eval_command.index("--variants") + 1] == demo.VARIANTS
    assert publish_command[:3] == ["publish.py", "--model", shipped]


def test_retrain_runs_stage_0_then_stage_1_then_evaluates_that_model(monkeypatch, tmp_path, shipped):
    calls = []
    monkeypatch.setattr(demo, "run", lambda step, command: calls.append((step, command)))
    demo.main(["--output", str(tmp_path), "--retrain", "--tower-steps", "9", "--train-steps", "7",
               "--eval-limit", "5"])
    assert [step for step, _ in calls] == ["stage 0", "stage 1", "evaluate", "publish"]
    tower, model = str(tmp_path / "tower"), str(tmp_path / "train")
    assert calls[0][1] == ["train_tower.py", "--output_dir", tower, "--max_steps", "9", "--stop_at_per_digit", "0.975"]
    assert calls[1][1] == ["train.py", "--config", demo.TRAIN_CONFIG, "--model_name_or_path", f"{tower}/model",
                           "--output_dir", model, "--max_steps", "7"]
    assert calls[2][1][:7] == ["eval.py", "--model", model, "--synthetic", "task=reading", "--limit", "5"]
    calls.clear()
    for name, marker in (("tower", "model"), ("train", "shirg_run.json"), ("eval", "run_config.json")):
        (tmp_path / name).mkdir()
        (tmp_path / name / marker).write_text("{}")
    demo.main(["--output", str(tmp_path), "--retrain"])
    assert calls[1][1] == ["train.py", "--config", demo.TRAIN_CONFIG, "--model_name_or_path", f"{tower}/model",
                           "--output_dir", model], "the config's max_steps"
    for name in ("tower", "train", "eval"):
        assert not (tmp_path / name).exists(), f"{name}: the trainers and eval.py would resume from it"
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a previous demo's output"):
        demo.main(["--output", str(tmp_path)])
    assert (tmp_path / "eval" / "notes.txt").read_text() == "mine", "a user's files are never removed"
    (tmp_path / "eval" / "notes.txt").unlink()
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "x").write_text("kept")
    calls.clear()
    demo.main(["--output", str(tmp_path)])
    assert [step for step, _ in calls] == ["evaluate", "publish"], "the shipped model is evaluated, not retrained"
    assert (tmp_path / "train" / "x").exists(), "an evaluation keeps the earlier demo's training folder"

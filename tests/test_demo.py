"""demo.py: its arguments are checked before any step runs, and its steps are the project's CLIs as written."""

import pytest

import demo


@pytest.mark.parametrize("argv, message", [
    (["--train-steps", "0"], "--train-steps and --eval-limit must be positive"),
    (["--eval-limit", "-1"], "--train-steps and --eval-limit must be positive"),
    (["--model", "/no/such/folder"], "--model /no/such/folder is not a model folder"),
])
def test_bad_arguments_stop_before_any_step(argv, message, monkeypatch):
    monkeypatch.setattr(demo, "run", lambda step, command: pytest.fail(f"{step} ran"))
    with pytest.raises(SystemExit, match=message):
        demo.main(argv)


def test_steps_train_then_evaluate_the_reading_task_then_publish(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(demo, "run", lambda step, command: calls.append((step, command)))
    demo.main(["--output", str(tmp_path), "--train-steps", "7", "--eval-limit", "5"])
    (train, train_command), (evaluate, eval_command), (publish, publish_command) = calls
    model = str(tmp_path / "train")
    assert train_command == ["train.py", "--config", demo.TRAIN_CONFIG, "--output_dir", model, "--max_steps", "7",
                             "--save_steps", "7"]
    assert eval_command[:7] == ["eval.py", "--model", model, "--synthetic", "task=reading", "--limit", "5"]
    assert eval_command[eval_command.index("--variants") + 1] == demo.VARIANTS
    assert publish_command[:3] == ["publish.py", "--model", model]
    calls.clear()
    for name, marker in (("train", "shirg_run.json"), ("eval", "run_config.json")):  # a previous demo's outputs
        (tmp_path / name).mkdir()
        (tmp_path / name / marker).write_text("{}")
    demo.main(["--output", str(tmp_path)])
    assert not (tmp_path / "train").exists() and not (tmp_path / "eval").exists(), "eval.py would resume from them"
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a previous demo's output"):
        demo.main(["--output", str(tmp_path)])
    assert (tmp_path / "eval" / "notes.txt").read_text() == "mine", "a user's files are never removed"
    (tmp_path / "eval" / "notes.txt").unlink()
    calls.clear()
    (tmp_path / "train").mkdir()
    folder = tmp_path / "given"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    demo.main(["--output", str(tmp_path), "--model", str(folder)])
    assert [step for step, _ in calls] == ["evaluate", "publish"], "a given model is evaluated, not retrained"
    assert (tmp_path / "train").exists(), "a given model keeps the earlier demo's training folder"

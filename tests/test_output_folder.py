"""shirg_tools.output_folder: the one rule every command that writes a folder follows (lock, aside, atomic swap,
umask), checked on the helper itself; the commands' own tests check that they use it."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shirg_tools import output_folder
from shirg_tools.output_folder import FolderLock, OutputFolderError, write_folder

ROOT = Path(__file__).resolve().parents[1]


def fill(folder: Path, tag: str, files: int = 5):
    for number in range(files):
        (folder / f"part-{number}.txt").write_text(f"{tag} {number}")
    (folder / "sub").mkdir()
    (folder / "sub" / "last.txt").write_text(tag)


def content(folder: Path) -> dict:
    return {str(path.relative_to(folder)): path.read_text() for path in sorted(folder.rglob("*")) if path.is_file()}


def siblings(out: Path) -> list:
    """What a writer may leave beside OUT (lock file, staging folder, set-aside old content)."""
    return sorted(path.name for path in out.parent.iterdir() if path.name.startswith(f".{out.name}."))


def test_write_replace_and_refuse_a_non_empty_folder(tmp_path):
    out = tmp_path / "out"
    with write_folder(out) as folder:
        assert folder.name == "out" and folder.parent.name == ".out.staging" and not out.exists()
        fill(folder, "first")
    assert content(out)["part-3.txt"] == "first 3" and siblings(out) == []
    with pytest.raises(OutputFolderError, match=r"OUT '.*out' exists and is not empty; pass --overwrite"):
        with write_folder(out):
            pass
    with write_folder(out, overwrite=True) as folder:
        fill(folder, "second", files=2)
    assert content(out) == {"part-0.txt": "second 0", "part-1.txt": "second 1", "sub/last.txt": "second"}
    with pytest.raises(RuntimeError):
        with write_folder(out, overwrite=True) as folder:
            fill(folder, "third")
            raise RuntimeError("the writer failed")
    assert content(out)["sub/last.txt"] == "second" and siblings(out) == []


def test_a_second_writer_is_refused_and_a_folder_made_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with write_folder(out, "--output-dir") as folder:
        with pytest.raises(OutputFolderError, match=rf"--output-dir .* is being written by another process "
                                                    rf"\(pid {os.getpid()}\)"):
            FolderLock(out, "--output-dir")
        fill(folder, "first")
    lock = FolderLock(out)  # free again once the first writer is done
    lock.release()

    # someone who does not take the lock makes OUT while the writer works: it is left alone, the writer fails
    with pytest.raises(OutputFolderError, match="exists and is not empty"):
        with write_folder(tmp_path / "other") as folder:
            fill(folder, "mine")
            (tmp_path / "other").mkdir()
            (tmp_path / "other" / "theirs.txt").write_text("theirs")
    assert content(tmp_path / "other") == {"theirs.txt": "theirs"} and siblings(tmp_path / "other") == []


CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from shirg_tools import output_folder

    out, point, fallback = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if fallback:  # a system without renameat2: the old folder is renamed aside, then the new one into place
        output_folder._renameat2 = lambda *args: False
    if point == "staging":
        output_folder.apply_umask = die
    elif point == "swap":  # between the two renames of the fallback (one atomic exchange otherwise)
        real_rename = os.rename
        def rename(source, target):
            real_rename(source, target)
            if ".replaced-" in str(target) or not fallback:
                die()
        output_folder.os.rename = rename
        output_folder.shutil.rmtree = die  # after the exchange: the old content not yet deleted
    with output_folder.write_folder(out, overwrite=True) as folder:
        for number in range(5):
            (folder / f"part-{number}.txt").write_text(f"new {number}")
        if point == "writing":
            die()
""")


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("point", ["writing", "staging", "swap"])
def test_a_kill_at_any_point_leaves_the_old_folder_or_the_new_one(tmp_path, point, fallback):
    out = tmp_path / "out"
    out.mkdir()
    fill(out, "old")
    old = content(out)
    run = subprocess.run([sys.executable, "-c", CHILD, str(out), point, str(int(fallback))], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == -signal.SIGKILL, run.stderr
    new = {f"part-{number}.txt": f"new {number}" for number in range(5)}
    if point == "swap" and not fallback:
        assert content(out) == new  # the exchange happened, only the clean-up was cut
    elif point == "swap":
        assert not out.exists()  # killed between the renames: the old content is aside ...
    else:
        assert content(out) == old
    # ... and the next writer of OUT puts it back (or removes the leftovers) under the lock before it starts
    with pytest.raises(OutputFolderError, match="exists and is not empty"):
        with write_folder(out):
            pass
    assert content(out) == (new if point == "swap" and not fallback else old) and siblings(out) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_modes_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with write_folder(tmp_path / "out") as folder:
            fill(folder, "x")
            (folder / "part-0.txt").chmod(0o600)  # e.g. a file made through mkstemp
    finally:
        os.umask(previous)
    paths = [tmp_path / "out", *(tmp_path / "out").rglob("*")]
    assert {str(p): stat.S_IMODE(p.stat().st_mode) for p in paths} == {
        str(p): (0o777 if p.is_dir() else 0o666) & ~umask for p in paths}


def test_an_unwritable_place_is_one_clear_error(unwritable):
    with pytest.raises(OutputFolderError, match=r"^cannot write OUT '.*/out': \[Errno \d+\] "):
        with write_folder(unwritable / "out"):
            pass
    assert not (unwritable / "out").exists()


def test_keep_others_carries_the_old_entries_as_links(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "weights").write_text("step 2")
    (out / "model").write_text("old model")
    (out / ".checkpoint-4.staging").mkdir()  # a crashed checkpoint save: not carried over
    writer = output_folder.FolderWriter(out, "--output_dir", overwrite=True)
    try:
        (writer.stage() / "model").write_text("new model")
        writer.commit(keep_others=True)
    finally:
        writer.release()
    assert content(out) == {"checkpoint-2/weights": "step 2", "model": "new model"}
    assert sorted(os.listdir(out)) == ["checkpoint-2", "model"] and siblings(out) == []

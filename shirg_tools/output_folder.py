"""One rule for every command that writes a folder (convert_lavida_checkpoint.py, publish.py, train.py, eval.py).

- One writer per folder: a writer holds an exclusive lock (flock) on OUT's lock file `.NAME.lock`, beside OUT, for
  as long as it writes; a second writer into the same OUT is refused with an error naming the holder's process. The
  kernel drops the lock when its process dies (SIGKILL included), and the file is removed when the lock is released.
- Written aside: the files go into `.NAME.staging/NAME` beside OUT. The finished folder gets the modes of the user's
  umask and replaces OUT in one atomic exchange of the two paths (renameat2 RENAME_EXCHANGE on Linux; elsewhere the
  old OUT is renamed aside first and deleted only after the new one is in place). A crash at any point leaves the
  old OUT or the new one, never a mix (the fallback, cut between its two renames, leaves the old one aside). The
  next writer of OUT removes what a crashed one left, or puts the old OUT back (it holds the lock: all is stale).
- OUT is checked under the lock (a non-empty OUT is replaced only with `overwrite`) and again at the swap.
- Files written one by one into a folder that stays in place (eval.py's results) go through `write_atomic`.

Every failure of these steps is an `OutputFolderError` naming the argument: "cannot write OUT '...': ...".
"""

import ctypes
import errno
import fcntl
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .file_modes import apply_umask, umask_mode

_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


class OutputFolderError(ValueError):
    """An output folder that cannot be written as asked; the message names the argument."""


def staging_root(out) -> Path:
    """`.NAME.staging` beside `out`: the folder that holds the staged `NAME` while a writer works."""
    out = Path(out)
    return out.parent / f".{out.name}.staging"


def staged_folder(out) -> Path:
    """Where a writer of `out` stages it: `.NAME.staging/NAME` (the same path in every process of a run)."""
    return staging_root(out) / Path(out).name


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _cannot_write(argument: str, out: Path, error: OSError) -> OutputFolderError:
    return OutputFolderError(f"cannot write {argument} {str(out)!r}: {error}")


class FolderLock:
    """The exclusive lock on `out`'s lock file (see the module docstring); `release()` (or the process's end)
    frees it."""

    def __init__(self, out, argument: str = "OUT"):
        self.out, self.argument = Path(out), argument
        self.path = _lock_path(self.out)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            while True:  # a holder may remove the file between our open and our flock: then take the new file
                handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(handle, 32).decode(errors="replace").strip() or "unknown"
                    os.close(handle)
                    raise OutputFolderError(
                        f"{argument} {str(self.out)!r} is being written by another process (pid {holder}): wait for "
                        f"it to end or choose another {argument}") from None
                try:
                    same_file = os.stat(self.path).st_ino == os.fstat(handle).st_ino
                except FileNotFoundError:
                    same_file = False
                if same_file:
                    break
                os.close(handle)
            os.ftruncate(handle, 0)
            os.write(handle, f"{os.getpid()}\n".encode())
        except OSError as error:
            raise _cannot_write(argument, self.out, error) from error
        self.handle = handle

    def release(self):
        if self.handle is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.handle)
        self.handle = None


def check_output_folder(out, overwrite: bool, argument: str = "OUT"):
    """OutputFolderError if `out` exists and is not a folder, or is a non-empty folder and not `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{argument} {str(out)!r} exists and is not a directory")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise OutputFolderError(f"{argument} {str(out)!r} exists and is not empty; pass --overwrite to replace it")


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """renameat2(source, target, flags); False where the system lacks it (not Linux, old libc or kernel, or a file
    system without the flag)."""
    if not sys.platform.startswith("linux"):
        return False
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def swap_into_place(new: Path, out: Path, overwrite: bool, argument: str = "OUT"):
    """Move the finished folder `new` to `out` (same file system). A missing `out` is never created meanwhile by
    someone else unnoticed (OutputFolderError unless `overwrite`); an existing one is exchanged atomically with
    `new` and then deleted."""
    new, out = Path(new), Path(out)
    try:
        if not out.exists():
            try:
                if _renameat2(new, out, _RENAME_NOREPLACE):
                    return
            except FileExistsError:
                if not overwrite:
                    raise OutputFolderError(f"{argument} {str(out)!r} was created by someone else while this run "
                                            "wrote it; it is left as it is (pass --overwrite to replace it)") from None
            else:
                os.rename(new, out)
                return
        check_output_folder(out, overwrite, argument)  # re-checked at the swap
        if _renameat2(new, out, _RENAME_EXCHANGE):
            shutil.rmtree(new)  # `new` now holds the old content
            return
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
        os.rmdir(aside)
        os.rename(out, aside)
        try:
            os.rename(new, out)
        except OSError:
            os.rename(aside, out)
            raise
        shutil.rmtree(aside)
    except OSError as error:
        raise _cannot_write(argument, out, error) from error


def _remove_stale(out: Path):
    """What a crashed writer of `out` left: its staging folder, and the old content a fallback swap had set aside
    (put back when `out` is missing: the writer died between its two renames)."""
    root = staging_root(out)
    if root.exists():
        shutil.rmtree(root)
    for stale in sorted(out.parent.glob(f".{out.name}.replaced-*")):
        if not out.exists():
            os.rename(stale, out)
        else:
            shutil.rmtree(stale)


class FolderWriter:
    """A writer of the folder `out` under the rule of the module docstring:

        writer = FolderWriter(out, "--output-dir", overwrite)  # lock taken, `out` checked, stale staging removed
        folder = writer.stage()                                  # an empty `.NAME.staging/NAME` to write into
        ... write into folder ...
        writer.commit()                                          # umask modes, `out` re-checked, swapped in
        writer.release()                                         # (always) staging removed if left, lock freed

    `lock=False` when the caller already holds a lock covering `out` (train.py's checkpoints inside its locked
    output folder). `write_folder` is the same as a context manager."""

    def __init__(self, out, argument: str = "OUT", overwrite: bool = False, lock: bool = True):
        self.out, self.argument, self.overwrite = Path(out), argument, overwrite
        self.staging = staged_folder(self.out)
        self.lock = FolderLock(self.out, argument) if lock else None
        try:
            _remove_stale(self.out)
            check_output_folder(self.out, overwrite, argument)
        except OSError as error:
            self.release()
            raise _cannot_write(argument, self.out, error) from error
        except BaseException:
            self.release()
            raise

    def stage(self) -> Path:
        """A fresh, empty staging folder (what an earlier `stage` of this writer held is removed)."""
        try:
            _remove_stale(self.out)
            self.staging.mkdir(parents=True)
        except OSError as error:
            raise _cannot_write(self.argument, self.out, error) from error
        return self.staging

    def commit(self, keep_others: bool = False):
        """Give the staged folder the umask's modes and swap it into place. With `keep_others`, the entries of the
        current `out` that the staged folder lacks are carried over first as hard links (the staging folder is on
        `out`'s file system): train.py's checkpoints, whose files are never written again."""
        apply_umask(self.staging)
        try:
            names = os.listdir(self.out) if keep_others and self.out.is_dir() else []
            for name in names:
                source, target = self.out / name, self.staging / name
                if target.exists() or _is_working_entry(name):
                    continue
                if source.is_dir():
                    shutil.copytree(source, target, copy_function=os.link)
                else:
                    os.link(source, target)
        except OSError as error:
            raise _cannot_write(self.argument, self.out, error) from error
        swap_into_place(self.staging, self.out, self.overwrite, self.argument)
        staging_root(self.out).rmdir()

    def release(self):
        """Remove the staging folder if it is still there (a failed write) and free the lock."""
        try:
            if staging_root(self.out).exists():
                shutil.rmtree(staging_root(self.out))
        finally:
            if self.lock is not None:
                self.lock.release()


def _is_working_entry(name: str) -> bool:
    """A lock file, staging folder or set-aside old content of a writer (never carried over)."""
    return name.startswith(".") and (name.endswith((".lock", ".staging")) or ".replaced-" in name)


@contextmanager
def write_folder(out, argument: str = "OUT", overwrite: bool = False, lock: bool = True):
    """`with write_folder(out, "OUT", overwrite) as folder:` write into `folder`; on leaving without an exception it
    replaces `out` (see FolderWriter); on an exception `out` stays as it was and nothing is left behind."""
    writer = FolderWriter(out, argument, overwrite, lock)
    try:
        folder = writer.stage()
        yield folder
        writer.commit()
    finally:
        writer.release()


def write_atomic(path, data: bytes):
    """Write `data` to `path` through a temporary file in the same folder, fsync and os.replace: `path` holds its
    old content or the new, never a part (modes: the umask's, as open() gives)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(handle, umask_mode())  # mkstemp's 0600 -> what open() gives under the umask
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise

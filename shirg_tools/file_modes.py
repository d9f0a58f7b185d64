"""Modes under the user's umask for outputs made through tempfile (mkstemp: 0600, mkdtemp: 0700) or copies (which
keep their source's mode) before they are renamed into place: what a plain open() / mkdir() would have given."""

import os


def umask_mode(directory: bool = False) -> int:
    """The mode of a new file (0o666) or folder (0o777) under the process's umask (e.g. 0o644 / 0o755 for 022)."""
    mask = os.umask(0o077)  # read by setting it: anything created meanwhile by another thread stays private
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def apply_umask(folder) -> None:
    """Give `folder` and every folder and file in it the umask's modes (see `umask_mode`)."""
    file_mode, folder_mode = umask_mode(), umask_mode(directory=True)
    for root, _, files in os.walk(folder):
        os.chmod(root, folder_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)

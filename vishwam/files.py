"""Crash-safe writes (a file or a whole directory appears complete or not at all), and
the one reader of JSON-object files (configs) with errors that name the file.

Every file and directory the library publishes (configs, tokenizers, safetensors,
pipelines, HF exports) goes through these three functions:

- `atomic_write_bytes` / `atomic_write_text`: write a temporary file in the same
  directory, `fsync` it, `os.replace` it over the destination, then `fsync` the
  directory so the rename itself survives a power cut. A reader sees the old
  file or the new one, never a prefix.
- `atomic_directory`: a context manager that hands out a staging directory beside
  the destination; on a clean exit the staging directory (its files fsynced)
  takes the destination's name, replacing an existing one with a single atomic
  exchange (`renameat2(RENAME_EXCHANGE)`) where the kernel offers it. On an
  exception the staging directory is deleted and the destination is untouched.

Temporary names start with `.` and contain `.tmp-`, so a crash can leave at most
a hidden `.<name>.tmp-*` entry beside the destination, never a partial result
under the destination's own name.
"""

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidValueError

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _fsync_directory(directory: Path) -> None:
    # Makes a rename in `directory` durable; not possible (nor needed) on Windows.
    if sys.platform == "win32":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` crash-safely (see the module docstring). Returns the path.

    The parent directory is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp creates 0600; a published file gets ordinary permissions.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """`atomic_write_bytes(path, text.encode(encoding))`."""
    return atomic_write_bytes(path, text.encode(encoding))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_tree(root: Path) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_directory(Path(folder))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory in a staging folder and publish it as `path` on success.

    Arguments:
        path: the directory to create (its parent is created if missing).
        overwrite: replace an existing `path` (only once the new one is complete);
            otherwise an existing `path` raises `FileExistsError` before anything is written.

    Yields:
        The empty staging directory to fill (beside `path`, same file system).

    Example:
        with atomic_directory(out, overwrite=True) as staging:
            atomic_write_text(staging / "config.json", text)
            save_file(arrays, str(staging / "model.safetensors"))
    """
    target = Path(path).absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) or choose another "
                              "directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        # mkdtemp creates 0700; the published directory gets ordinary permissions.
        for entry in (staging, *staging.rglob("*")):
            if not entry.is_symlink():
                entry.chmod(0o755 if entry.is_dir() else 0o644)
        _fsync_tree(staging)
        if target.exists() and _exchange(staging, target):
            pass  # `staging` now holds the old directory, removed below
        elif target.exists():
            # No atomic exchange here: park the old directory, then move the new one in.
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
        _fsync_directory(target.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def read_json_object(path: Path, *, what: str | None = None, fix: str | None = None) -> dict:
    """The JSON object in the file at `path`; `ValueError` naming the file (after `what`, e.g.
    "--config") and the `fix` when it is not valid UTF-8 JSON or holds something else."""
    name = f"{what} {path}" if what else str(path)
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidValueError(f"{name} is not valid JSON ({error}){'; ' + fix if fix else ''}.") from None
    if not isinstance(value, dict):
        raise InvalidValueError(f"{name} must hold a JSON object, got {type(value).__name__}.")
    return value

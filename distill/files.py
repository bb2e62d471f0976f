"""Files distill keeps. Atomic writes: a temporary file beside the target, fsynced, renamed over it, and the
directory fsynced, so a kill at any instant leaves the old file or the new one (never a partial one) and the rename
survives a power cut; every file distill writes that a later run reads goes through here. And YAML mappings
(recipes, grids, published numbers) read with one-line errors."""
import contextlib
import errno
import json
import os
import tempfile
from typing import Any, Callable, Dict, IO, Iterator

from .errors import DistillError


def atomic_write(path: str, write: Callable[[IO], None], mode: str = 'wb') -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then move it over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    with space_errors(path):
        os.makedirs(directory, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(prefix=os.path.basename(path) + '.', suffix='.tmp', dir=directory)
        try:
            follow_umask(tmp_path)
            with os.fdopen(fd, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
        except BaseException:
            if os.path.exists(tmp_path):
                os.unlink(tmp_path)
            raise
        fsync_directory(directory)


def out_of_space(exc: BaseException) -> bool:
    """A write that failed for want of space: a full disk or quota, a file-size limit (``ulimit -f``), or
    torch.save's writer reporting the short write."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in ('unexpected pos',
                                                                               'failed writing file'))


@contextlib.contextmanager
def space_errors(path: str) -> Iterator[None]:
    """A write to ``path`` that fails for want of space becomes one line naming the file and the way on."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not out_of_space(exc):
            raise
        reason = exc.strerror if isinstance(exc, OSError) else 'short write'
        raise DistillError(f"could not write {path} ({reason}: the disk is full or a file-size limit was reached); "
                           f"the files already there are intact (the last checkpoint included): free space, then "
                           f"run the same command with --resume") from None


def check_folder_writable(path: str, what: str, fix: str) -> None:
    """Fail in one line, creating nothing, when folder ``path`` (``what`` names it) cannot be created or written;
    ``fix`` says the way out."""
    existing = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise DistillError(f"cannot create {what} {path}: {existing} is a file; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DistillError(f"cannot write {what} {path}: {existing} is not writable; {fix}")


def follow_umask(path: str) -> None:
    """Give the file or folder ``path`` the mode a plain open / mkdir gives: mkstemp's 0600 and mkdtemp's 0700 (and
    safetensors' 0600) would ignore the user's umask."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_directory(directory: str) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path``, atomically."""
    import torch
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode='w')


def atomic_write_json(path: str, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2))


def load_yaml_mapping(path: str, what: str) -> Dict[str, Any]:
    """A YAML file holding a mapping (a recipe, a grid, published numbers); anything else is a one-line error."""
    import yaml
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=getattr(yaml, 'CSafeLoader', yaml.SafeLoader)) or {}  # libyaml: 10x faster
    except yaml.YAMLError as exc:
        raise DistillError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}; fix the file") from None
    except OSError as exc:
        raise DistillError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise DistillError(f"cannot read {what} {path}: not UTF-8 text ({exc}); fix or delete the file") from None
    if not isinstance(data, dict):
        raise DistillError(f"{what} {path} must be a mapping, got {type(data).__name__}")
    return data

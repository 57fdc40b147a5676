"""Atomic checkpoint directories: a reader sees the old checkpoint or the new one, never a mix.

A checkpoint is written into a temporary sibling directory ``.<name>.tacq-tmp-<pid>`` next to
the target, re-read through the format's validation (:func:`validate_checkpoint_dir`), and only
then put in place:

* no target yet: one ``rename`` (atomic on POSIX);
* ``overwrite``: on Linux the two directories are swapped in one ``renameat2(RENAME_EXCHANGE)``
  call, so at every instant the target name holds the complete old or the complete new
  checkpoint; the old one (now under the temporary name) is deleted afterwards. Where that call is
  missing (other systems, file systems without it) the old directory is renamed aside to
  ``.<name>.tacq-old-<pid>``, the new one renamed in, and the old one deleted; a crash between
  the two renames leaves the old checkpoint complete under the aside name, and the next writer
  puts it back (:func:`recover_stale`).

A crash at any point leaves at most a stale temporary directory; :func:`recover_stale`, called
by every writer before it starts, names it and deletes it (or restores an old checkpoint that
was set aside).

``TACQ_TEST_KILL_AT`` is a test hook (:func:`test_point`): the process sends itself a signal at a
named point, so tests can interrupt a run exactly there instead of guessing with sleeps.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import sys
from typing import Callable, Iterator

from .format import CheckpointError, parse_quantization_config, read_safetensors, split_layer_state_dict

TMP_TAG = ".tacq-tmp-"
OLD_TAG = ".tacq-old-"
KILL_ENV = "TACQ_TEST_KILL_AT"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def test_point(name: str) -> None:
    """Test hook: when ``$TACQ_TEST_KILL_AT`` is ``name`` or ``name@SIGNAL`` (``KILL``, ``INT``;
    default ``KILL``), send this process that signal here. Costs one dictionary look-up otherwise."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    point, _, sig = spec.partition("@")
    if point != name:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), getattr(signal, "SIG" + (sig or "KILL").upper()))


def _siblings(target: str, tag: str) -> list[str]:
    parent, name = os.path.split(os.path.realpath(target))
    prefix = f".{name}{tag}"
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    return sorted(os.path.join(parent, e) for e in entries if e.startswith(prefix) and e[len(prefix):].isdigit())


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale(target: str | os.PathLike, log: Callable[[str], None] | None = None) -> list[str]:
    """Clean up after a writer of ``target`` that crashed; returns one message per action.

    A temporary directory of a process that no longer runs is deleted (it never was a complete,
    validated checkpoint under the target name). An old checkpoint set aside by the two-rename
    fallback is renamed back when the target is missing, deleted when the target exists (the
    crash came after the new checkpoint was in place).
    """
    target = os.path.realpath(os.fspath(target))
    messages = []
    for path in _siblings(target, OLD_TAG):
        if not _pid_alive(int(path.rsplit("-", 1)[1])):
            if not os.path.exists(target):
                os.rename(path, target)
                messages.append(f"restored the previous checkpoint {target} from {path} (an interrupted --overwrite)")
            else:
                shutil.rmtree(path, ignore_errors=True)
                messages.append(f"deleted {path}, the previous checkpoint left by an interrupted --overwrite")
    for path in _siblings(target, TMP_TAG):
        if not _pid_alive(int(path.rsplit("-", 1)[1])):
            shutil.rmtree(path, ignore_errors=True)
            messages.append(f"deleted {path}, an incomplete checkpoint left by an interrupted write")
    for m in messages:
        (log or (lambda s: print(s, file=sys.stderr)))(m)
    return messages


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False when unsupported."""
    if os.environ.get("TACQ_NO_RENAME_EXCHANGE") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot exchange
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _fsync_tree(path: str) -> None:
    for root, dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def validate_checkpoint_dir(path: str | os.PathLike) -> dict:
    """Re-read a checkpoint directory through the format's validation; returns its config.

    Reads config.json and every safetensors file (all tensors: a truncated file fails), checks
    the ``quantization_config`` and every quantized layer's tensors (:func:`split_layer_state_dict`).
    """
    path = os.fspath(path)
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read config.json ({e})") from e
    qc = config.get("quantization_config")
    if not qc:
        raise CheckpointError(f"{path}: config.json has no quantization_config")
    specs = parse_quantization_config(qc)
    split_layer_state_dict(read_safetensors(path), specs)
    return config


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike,
    overwrite: bool = False,
    validate: Callable[[str], object] | None = validate_checkpoint_dir,
    log: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """Yield a temporary sibling directory to write into; on a clean exit validate it and put it
    in place of ``target`` (module docstring). On an exception the temporary directory is deleted
    and ``target`` is untouched. Without ``overwrite`` an existing non-empty ``target`` is an error.
    """
    target = os.path.realpath(os.fspath(target))  # a symlinked --out: replace the directory it points to
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    recover_stale(target, log)
    exists = os.path.lexists(target)
    if exists and not os.path.isdir(target):
        raise FileExistsError(f"{target} exists and is not a directory")
    if exists and os.listdir(target) and not overwrite:
        raise FileExistsError(f"{target} is not empty")
    tmp = os.path.join(parent, f".{os.path.basename(target)}{TMP_TAG}{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.mkdir(tmp)
    try:
        yield tmp
        test_point("write:before-validate")
        if validate is not None:
            validate(tmp)
        _fsync_tree(tmp)
        test_point("write:before-rename")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not os.path.lexists(target):
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        test_point("write:after-exchange")
        shutil.rmtree(tmp, ignore_errors=True)  # now the old checkpoint
    else:
        aside = os.path.join(parent, f".{os.path.basename(target)}{OLD_TAG}{os.getpid()}")
        os.rename(target, aside)
        test_point("write:old-aside")
        os.rename(tmp, target)
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(parent)

"""Atomic output directories: a command writes into a staging directory that replaces ``--out``
as a whole only when it succeeds, so ``--out`` always holds one complete run.

* The staging directory is a hidden sibling of ``--out`` (same file system). On success it
  receives what must survive from the old ``--out`` (the user's own files, and ``keep`` entries
  such as distillation checkpoints), a manifest listing this run's files, and is then swapped
  with ``--out`` in one ``renameat2(RENAME_EXCHANGE)`` where Linux offers it (else two renames).
  Files the previous run wrote (its manifest) and this run did not are gone with the old copy.
* On failure, Ctrl-C or SIGTERM the staging directory is deleted and ``--out`` is untouched. A
  run killed outright (SIGKILL) leaves its staging directory behind; the next run into the same
  ``--out`` deletes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from graphopt.errors import GraphoptError

MANIFEST = "graphopt-manifest.json"
_STAGING = ".graphopt-staging-"


@contextlib.contextmanager
def staged_outputs(out: Path, keep: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a private staging directory; on success it becomes ``out`` (see the module
    docstring). ``keep`` names entries written into ``out`` directly during the run (e.g.
    ``distill`` checkpoints) that the new ``out`` keeps and lists."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GraphoptError(
            f"cannot create the output directory {str(out)!r}: a file of that name exists; "
            "give --out a directory path"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        stage = Path(
            tempfile.mkdtemp(prefix=f".{out.name}{_STAGING}{os.getpid()}-", dir=out.parent)
        )
    except OSError as e:
        raise GraphoptError(f"cannot create the output directory {str(out)!r}: {e}") from e
    try:
        yield stage
        _commit(stage, out, keep)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def manifest(out: Path) -> list[str]:
    """The entries the last complete run wrote into ``out`` (``[]`` if none is recorded)."""
    try:
        return list(json.loads((Path(out) / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _commit(stage: Path, out: Path, keep: Sequence[str]) -> None:
    written = sorted(p.name for p in stage.iterdir())
    owned = set(manifest(out))
    kept: list[str] = []
    if out.is_dir():
        for entry in out.iterdir():
            name = entry.name
            if name in written or name == MANIFEST:
                continue
            if name in keep:
                kept.append(name)
            elif name in owned:
                continue  # the previous run's file this run did not write: dropped
            _link_copy(entry, stage / name)  # kept, or the user's own file: carried over
    files = sorted(written + kept)
    (stage / MANIFEST).write_text(json.dumps({"files": files}, indent=2) + "\n")
    if not out.exists():
        os.rename(stage, out)
        return
    if not _exchange(stage, out):
        old = out.with_name(f".{out.name}{_STAGING}{os.getpid()}-old")
        os.rename(out, old)
        os.rename(stage, out)
        stage = old
    shutil.rmtree(stage, ignore_errors=True)  # now the previous run's directory


def _link_copy(src: Path, dst: Path) -> None:
    """Hard links where the file system allows (no data is copied), else copies."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, copy_function=link, symlinks=True)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link(str(src), str(dst))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove_stale(out: Path) -> None:
    """Staging directories of runs into ``out`` that were killed (their process is gone)."""
    for path in out.parent.glob(f".{out.name}{_STAGING}*"):
        pid = path.name[len(f".{out.name}{_STAGING}") :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

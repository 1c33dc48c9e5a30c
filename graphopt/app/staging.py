"""Atomic output directories: a command writes into a staging directory whose entries replace
those in ``--out`` only when it succeeds, so a failed run leaves earlier outputs intact."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from graphopt.errors import GraphoptError


@contextlib.contextmanager
def staged_outputs(out: Path) -> Iterator[Path]:
    """Yield a private staging directory inside ``out``. On success each entry is moved into
    ``out`` by an atomic rename; on failure the staging directory is deleted, so earlier outputs
    in ``out`` stay intact and no partial file is left behind."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GraphoptError(f"cannot create the output directory {str(out)!r}: {e}") from e
    stage = Path(tempfile.mkdtemp(prefix=".graphopt-staging-", dir=out))
    try:
        yield stage
        for entry in sorted(stage.iterdir()):
            _replace(entry, out / entry.name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if still empty
        raise
    shutil.rmtree(stage, ignore_errors=True)


def _replace(src: Path, dst: Path) -> None:
    if src.is_dir() and dst.is_dir():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)

"""Run a benchmark's worker in a fresh Python process, so the tool's imports and first calls
are counted (cold), and read the JSON line the worker prints last.

The worker may write bytecode caches (``PYTHONDONTWRITEBYTECODE`` is dropped from its
environment), as a user's interpreter does: packages installed by pip come with theirs, and a
source tree such as graphopt's editable install would otherwise be compiled again in every
process."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_worker(script: str, argv: list[str], timeout: float, label: str) -> tuple[dict | None, str]:
    """``python script *argv``: ``(its last stdout line as JSON, "")``, or ``(None, the last
    stderr line)`` when it fails (also printed to stderr, prefixed with ``label``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.run(
        [sys.executable, script, *argv], capture_output=True, text=True, timeout=timeout, env=env
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"  {label} failed: {tail}", file=sys.stderr)
        return None, tail
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""

"""Output that libraries write straight to the terminal, routed into the debug log."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def output_to_log(what: str = "exporter") -> Iterator[None]:
    """Capture file descriptors 1 and 2 into the debug log. Exporters write there directly:
    torch.export's shape warnings and graph dumps on stderr, and, when the TorchScript exporter
    fails, its C++ side prints the whole TorchScript IR on stdout."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as tmp:
        saved = [(fd, os.dup(fd)) for fd in (1, 2)]
        for fd, _ in saved:
            os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                log.debug("%s output:\n%s", what, text)

"""ONNX Runtime as the commands use it: the backend (or a one-line error when it is missing)
and the top-1 accuracy of an exported model."""

from __future__ import annotations

from pathlib import Path

from graphopt.errors import GraphoptError


def load_ort():
    """The ONNX Runtime backend module, or a one-line error when it cannot be imported."""
    try:
        from graphopt.backends import onnxruntime as ort_backend
    except ImportError as e:
        raise GraphoptError(
            f"the ONNX Runtime backend is unavailable ({e}); use --backend none"
        ) from e
    return ort_backend


def ort_top1(ort_backend, onnx_path: str | Path, batches, threads: int) -> float:
    """Top-1 accuracy of the ONNX model at ``onnx_path`` over ``(x, y)`` batches (``x`` a
    tensor, or a tuple for several inputs)."""
    from graphopt.zoo.digits import evaluate

    sess = ort_backend.session(onnx_path, threads=threads)
    return evaluate(
        lambda x: ort_backend.run(sess, *(x if isinstance(x, (list, tuple)) else (x,)))[0], batches
    )

"""Backends lower a :class:`graphopt.Graph` (or an exported file) to a runtime; they never reach
back into passes.

- :mod:`graphopt.backends.onnxruntime`: ONNX export with module paths in node metadata,
  ONNX Runtime sessions, parity checks and latency benchmarks.
"""

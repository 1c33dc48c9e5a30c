"""ONNX -> dependency-free C99 (static arena, const weights, float and int8 kernels).

    from graphopt.backends.c import emit, build
    report = emit("model.onnx", "out/", name="net")   # net.h, net.c, net_weights.c, report.json
    cmodel = build("model.onnx")                      # compiled into a temp dir, via ctypes
    (y,) = cmodel.run(x)

See ``emit.emit`` for what is written, ``planner`` for the arena, ``kernels_*`` for the ops.
"""

from .build import CModel, build, build_many, find_compiler
from .emit import OPS, compile_program, emit, supported_ops
from .ir import UnsupportedError

__all__ = [
    "OPS",
    "CModel",
    "build",
    "build_many",
    "compile_program",
    "emit",
    "find_compiler",
    "supported_ops",
    "UnsupportedError",
]

"""graphopt: trace a PyTorch model, rewrite it with a pipeline of passes, lower it to ONNX
Runtime or C.

    import graphopt
    graph = graphopt.trace(model, example_inputs)
    result = graphopt.Pipeline.parse("fold-bn,dce").run(graph)
    print(result.summary())
"""

from __future__ import annotations

import logging

from . import compat
from .cost import Cost, cost_of
from .errors import (
    BackendError,
    DataError,
    GraphoptError,
    ModelSpecError,
    OptionError,
    PassContractError,
    PassFailure,
    PipelineSyntaxError,
    TraceError,
    UnknownPassError,
    VerificationError,
)
from .graph import Graph, NodeMeta, TensorInfo, node_meta
from .instruments import DumpDir, Instrument, PrintAfter, Timing
from .manager import PassReport, PassSpec, Pipeline, PipelineResult, compress
from .pass_api import Pass, PassContext, PassResult
from .registry import REGISTRY, get_pass, register_pass
from .tracing import trace

logging.getLogger(__name__).addHandler(logging.NullHandler())
compat.install()  # graphopt 0.1's module names, for files saved then

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "Cost",
    "DataError",
    "DumpDir",
    "Graph",
    "GraphoptError",
    "Instrument",
    "ModelSpecError",
    "NodeMeta",
    "OptionError",
    "Pass",
    "PassContext",
    "PassContractError",
    "PassFailure",
    "PassReport",
    "PassResult",
    "PassSpec",
    "Pipeline",
    "PipelineResult",
    "PipelineSyntaxError",
    "PrintAfter",
    "REGISTRY",
    "TensorInfo",
    "Timing",
    "TraceError",
    "UnknownPassError",
    "VerificationError",
    "compress",
    "cost_of",
    "get_pass",
    "node_meta",
    "register_pass",
    "trace",
]

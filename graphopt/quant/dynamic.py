"""Dynamic int8 quantization of Linear layers (``qdq(activations=dynamic)``).

Each call quantizes its input on the fly, per tensor, asymmetric uint8, exactly as ONNX's
DynamicQuantizeLinear does:

    lo = min(0, min x),  hi = max(0, max x),  s_x = (hi - lo) / 255  (1 when hi = lo),
    z_x = round(clamp(-lo / s_x, 0, 255)),     x_q = clamp(round(x / s_x) + z_x, 0, 255),

then multiplies integers, ``y = s_x s_w[n] sum_k (x_q[k] - z_x) W_q[k, n] + b[n]`` with int8
symmetric per-output-column weights ``W = s_w W_q``. Nothing is calibrated, so it suits
models whose activation ranges vary from input to input (transformers).

The layer is one custom op, ``graphopt::dynamic_linear``; :data:`ONNX_TRANSLATIONS` lowers it
to ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> Add``, which ONNX Runtime fuses
into its ``DynamicQuantizeMatMul`` kernel. The ONNX backend picks the translations up when
this module is loaded (a graph holding the op cannot exist otherwise).

A matrix product of two activations (attention's ``q kᵀ`` and ``p v``) is the custom op
``graphopt::dynamic_matmul``: both operands quantized as above, each with its own scale and
zero point, ``y = s_a s_b sum_k (a_q[m, k] - z_a)(b_q[k, n] - z_b)``. It lowers to what ORT's
own ``quantize_dynamic`` writes for such a MatMul (with ``MatMulConstBOnly=False``; by default
that tool leaves it float): ``DynamicQuantizeLinear`` on each operand -> ``MatMulInteger``
(uint8 x uint8, both zero points) -> ``Cast`` -> ``Mul`` by ``s_a s_b``.
"""

from typing import Optional

import torch
import torch.nn as nn
from torch.utils.flop_counter import register_flop_formula

from graphopt.quant.observers import quantize_weight, weight_qparams


def dynamic_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX ``DynamicQuantizeLinear`` on a float32 tensor: ``(x_q, s_x, z_x)``, ``x_q`` and
    ``z_x`` as floats holding integers in [0, 255]."""
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
    zp = torch.round(torch.clamp(-lo / scale, 0.0, 255.0))
    return torch.clamp(torch.round(x / scale) + zp, 0.0, 255.0), scale, zp


@torch.library.custom_op("graphopt::dynamic_linear", mutates_args=())
def dynamic_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045  (custom_op reads this annotation at runtime)
) -> torch.Tensor:
    """``x @ (s_w W_q^T) + b`` with ``x`` dynamically quantized (see the module docstring);
    ``weight_t`` is ``W_q^T`` (int8, ``[in, out]``)."""
    xq, scale, zp = dynamic_quantize(x.float())
    # integer accumulation, exact in float64 for any realistic depth (|acc| < 2^53)
    acc = torch.matmul((xq - zp).double(), weight_t.double())
    y = acc.float() * (scale * weight_scale)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


@dynamic_linear.register_fake
def _(x, weight_t, weight_scale, bias):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


@register_flop_formula(torch.ops.graphopt.dynamic_linear)
def _flops(x_shape, weight_shape, *args, **kwargs) -> int:
    """2 x tokens x in x out, as for a float linear (``torch.utils.flop_counter``)."""
    tokens = 1
    for d in x_shape[:-1]:
        tokens *= d
    return 2 * tokens * weight_shape[0] * weight_shape[1]


class DynamicQuantLinear(nn.Module):
    """A Linear with int8 weights (per output column, symmetric) and dynamically quantized
    uint8 inputs."""

    def __init__(self, linear: nn.Linear, per_channel: bool = True, weight_qmax: int = 127):
        super().__init__()
        w = linear.weight.detach()
        scale = weight_qparams(w, per_channel, weight_qmax)
        self.register_buffer(
            "weight_int8_t", quantize_weight(w, scale, weight_qmax).t().contiguous()
        )
        self.register_buffer(
            "weight_scale", scale if per_channel else scale.expand(w.shape[0]).clone()
        )
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.graphopt.dynamic_linear(
            x, self.weight_int8_t, self.weight_scale, self.bias
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, "
            "dynamic uint8 inputs"
        )


def _dynamic_linear_onnx(x, weight_t, weight_scale, bias=None):
    from onnxscript import ir
    from onnxscript import opset18 as op

    xq, x_scale, x_zp = op.DynamicQuantizeLinear(x)
    acc = op.MatMulInteger(xq, weight_t, x_zp)
    y = op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), op.Mul(x_scale, weight_scale))
    return y if bias is None else op.Add(y, bias)


@torch.library.custom_op("graphopt::dynamic_matmul", mutates_args=())
def dynamic_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)`` with both operands dynamically quantized, per tensor (see the
    module docstring)."""
    aq, sa, za = dynamic_quantize(a.float())
    bq, sb, zb = dynamic_quantize(b.float())
    acc = torch.matmul((aq - za).double(), (bq - zb).double())  # exact, as MatMulInteger's int32
    return (acc.float() * (sa * sb)).to(a.dtype)


@dynamic_matmul.register_fake
def _(a, b):
    return torch.empty_like(torch.matmul(a, b))


@register_flop_formula(torch.ops.graphopt.dynamic_matmul)
def _matmul_flops(a_shape, b_shape, *args, **kwargs) -> int:
    """2 x (output elements) x depth, as for ``torch.matmul``."""
    a, b = list(a_shape), list(b_shape)
    rows = a[-2] if len(a) > 1 else 1
    cols = b[-1] if len(b) > 1 else 1
    batch = torch.broadcast_shapes(torch.Size(a[:-2]), torch.Size(b[:-2]))
    return 2 * batch.numel() * rows * cols * a[-1]


def _dynamic_matmul_onnx(a, b):
    from onnxscript import ir
    from onnxscript import opset18 as op

    aq, a_scale, a_zp = op.DynamicQuantizeLinear(a)
    bq, b_scale, b_zp = op.DynamicQuantizeLinear(b)
    acc = op.MatMulInteger(aq, bq, a_zp, b_zp)
    return op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), op.Mul(a_scale, b_scale))


ONNX_TRANSLATIONS = {
    torch.ops.graphopt.dynamic_linear.default: _dynamic_linear_onnx,
    torch.ops.graphopt.dynamic_matmul.default: _dynamic_matmul_onnx,
}


class QuantEmbedding(nn.Module):
    """An Embedding stored as int8 rows with one float scale per row (symmetric):
    ``s_i = max_j |W_ij| / qmax``, ``q_ij = round(W_ij / s_i)``, and a lookup returns
    ``q[ids] * s[ids]``, so only the rows read are dequantized (ONNX: Gather on the int8 table,
    Cast, Mul by the gathered scales). Per-row scales keep each token's vector to ~qmax
    levels of its own range, where one scale for the whole table (ORT's ``quantize_dynamic``)
    lets rare large rows set the step for all."""

    def __init__(self, embedding: nn.Embedding, qmax: int = 127):
        super().__init__()
        w = embedding.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny) / qmax
        self.register_buffer(
            "weight_int8", torch.round(w / scale).clamp(-qmax, qmax).to(torch.int8)
        )
        self.register_buffer("weight_scale", scale)
        self.num_embeddings, self.embedding_dim = w.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.nn.functional.embedding(ids, self.weight_int8).to(self.weight_scale.dtype)
        return rows * torch.nn.functional.embedding(ids, self.weight_scale)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows, per-row scales"

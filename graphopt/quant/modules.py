"""The modules a quantized Graph is made of.

Three forms, one per stage of the ``qdq`` pass:

- **calibration**: :class:`Observer` sits on each tensor to be quantized and records its range;
- **fake-quant** (QAT): :class:`FakeQuant` on activations and :class:`QATConv` /
  :class:`QATLinear` with fake-quantized float weights; every rounding passes gradients
  straight through (STE), and with ``learnable`` scales follow LSQ (Esser et al., 2020:
  ``d r'/d s = round(r/s) - r/s`` inside the range, ``qmin`` or ``qmax`` outside, times
  ``1 / sqrt(numel * qmax)``);
- **integer** (PTQ, export): ``quantize_per_tensor`` / ``dequantize_per_tensor`` call sites on
  activations and :class:`QuantConv` / :class:`QuantLinear` holding int8 weights (symmetric,
  ``W = s_w W_q``) and an int32 bias ``b = s_x s_w b_q``. The exporter lowers them to
  QuantizeLinear / DequantizeLinear, which ONNX Runtime fuses into integer kernels.

The integer form simulates the integer kernels exactly up to float32 rounding of the
accumulation: ``y_q = clamp(round(s_x s_w (sum (x_q - z_x) W_q + b_q) / s_y) + z_y)``.
"""

from __future__ import annotations

import math

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
import torch.nn as nn
import torch.nn.functional as F

from graphopt.quant.observers import (
    QParams,
    RangeObserver,
    affine_qparams,
    quantize_weight,
    weight_qparams,
)

qd = torch.ops.quantized_decomposed
Q_OPS = (qd.quantize_per_tensor.default, qd.quantize_per_channel.default)
DQ_OPS = (qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_dim(conv: nn.Module) -> int:
    return {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(conv)]


class Observer(nn.Module):
    """Identity that records the range of what flows through it (calibration only)."""

    def __init__(self, observer: RangeObserver):
        super().__init__()
        self.observer = observer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observer.observe(x)
        return x


# -- fake-quant (QAT) ----------------------------------------------------------------------------
class FakeQuant(nn.Module):
    """``r' = s (clamp(round(r / s) + z, qmin, qmax) - z)`` with a straight-through gradient.

    ``bounds`` is the range of a clamping activation fused before it (kept so that conversion
    can keep the representable range inside it). With ``learnable`` the scale is an LSQ
    parameter, stored as ``log_scale`` so that optimizer steps change it by a ratio and never
    make it negative; the zero point stays fixed.
    """

    def __init__(
        self,
        qparams: QParams,
        learnable: bool = False,
        bounds: tuple[float, float] | None = None,
    ):
        super().__init__()
        scale = torch.tensor([qparams.scale], dtype=torch.float32)
        if learnable:
            self.log_scale = nn.Parameter(torch.log(scale))
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.tensor([qparams.zero_point], dtype=torch.int32))
        self.qmin, self.qmax = qparams.qmin, qparams.qmax
        self.dtype_name = str(qparams.dtype).replace("torch.", "")
        self.learnable = learnable
        self.bounds = bounds

    def qparams(self) -> QParams:
        """Current qparams, the scale kept inside ``bounds`` (float32, positive)."""
        s = max(float(self.current_scale().detach().item()), 1e-12)
        z = int(self.zero_point.item())
        dtype = getattr(torch, self.dtype_name)
        lo, hi = s * (self.qmin - z), s * (self.qmax - z)
        if self.bounds is None:
            return QParams(
                float(torch.tensor(s, dtype=torch.float32)), z, self.qmin, self.qmax, dtype
            )
        return affine_qparams(lo, hi, dtype, self.bounds)

    def current_scale(self) -> torch.Tensor:
        return self.log_scale.exp() if self.learnable else self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.learnable:
            grad = 1.0 / math.sqrt(max(1, x.numel()) * self.qmax)
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, self.current_scale(), self.zero_point.float(), self.qmin, self.qmax, grad
            )
        return torch.fake_quantize_per_tensor_affine(
            x, self.scale, self.zero_point, self.qmin, self.qmax
        )

    def extra_repr(self) -> str:
        return (
            f"scale={float(self.current_scale().detach()):.4g}, zero_point={int(self.zero_point)}, "
            f"{self.dtype_name}, learnable={self.learnable}"
        )


class _QATWeighted(nn.Module):
    """Float weights fake-quantized symmetric int8 (``[-qmax, qmax]``, ``z = 0``, ``qmax`` 127
    or 63) on the fly: per output channel (axis 0) or per tensor. Without ``learnable`` the
    scale follows the weights (``max|W| / qmax``, no gradient); with it, an LSQ parameter."""

    def __init__(
        self,
        layer: nn.Module,
        per_channel: bool = True,
        learnable: bool = False,
        weight_qmax: int = 127,
    ):
        super().__init__()
        self.weight_qmax = int(weight_qmax)
        self.weight = nn.Parameter(layer.weight.detach().clone())
        bias = layer.bias.detach().clone() if layer.bias is not None else None
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.per_channel = per_channel
        self.learnable = learnable
        if learnable:
            self.weight_log_scale = nn.Parameter(
                torch.log(weight_qparams(self.weight, per_channel, self.weight_qmax))
            )

    @property
    def qmax(self) -> int:
        return getattr(self, "weight_qmax", 127)  # files saved before the avx2 target

    def current_weight_scale(self) -> torch.Tensor:
        if self.learnable:
            return self.weight_log_scale.detach().exp().clamp_min(1e-12).float()
        return weight_qparams(self.weight, self.per_channel, self.qmax)

    def fake_weight(self) -> torch.Tensor:
        w = self.weight
        n = w.shape[0] if self.per_channel else 1
        zp = torch.zeros(n, dtype=torch.int32, device=w.device)
        q = self.qmax
        if self.learnable:
            grad = 1.0 / math.sqrt(w.numel() * q)
            if self.per_channel:
                return torch._fake_quantize_learnable_per_channel_affine(
                    w, self.weight_log_scale.exp(), zp.float(), 0, -q, q, grad
                )
            return torch._fake_quantize_learnable_per_tensor_affine(
                w, self.weight_log_scale.exp(), zp.float(), -q, q, grad
            )
        scale = weight_qparams(w, self.per_channel, q)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -q, q)
        return torch.fake_quantize_per_tensor_affine(w, scale, zp, -q, q)


class QATConv(_QATWeighted):
    """A Conv1d/2d/3d (zero padding) whose weights are fake-quantized int8."""

    def __init__(
        self,
        conv: nn.Module,
        per_channel: bool = True,
        learnable: bool = False,
        weight_qmax: int = 127,
    ):
        super().__init__(conv, per_channel, learnable, weight_qmax)
        self.dim = _conv_dim(conv)
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CONV_FN[self.dim](
            x, self.fake_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CONV_FN[self.dim](
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class QATLinear(_QATWeighted):
    """A Linear whose weights are fake-quantized int8."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_weight(), self.bias)

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


# -- integer form -------------------------------------------------------------------------------
class _QuantWeighted(nn.Module):
    """int8 weights ``W = s_w W_q`` and an int32 bias ``b = (s_x s_w) b_q``, dequantized in
    ``forward`` with ``quantized_decomposed`` ops so that the exporter writes int8/int32
    initializers behind DequantizeLinear (per channel: axis 0)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        w_scale: torch.Tensor,
        in_scale: float,
        weight_qmax: int = 127,
    ):
        super().__init__()
        w_scale = w_scale.detach().float().reshape(-1)
        self.per_channel = w_scale.numel() > 1
        self.register_buffer("weight_int8", quantize_weight(weight, w_scale, weight_qmax))
        self.register_buffer("weight_scale", w_scale.clone())
        self.register_buffer("weight_zero_point", torch.zeros(w_scale.numel(), dtype=torch.int64))
        self.in_scale = float(in_scale)
        # per-tensor scales as Python floats: torch.export cannot read a buffer's value
        self.weight_scale_value = float(w_scale[0])
        if bias is not None:
            b_scale = (w_scale.double() * in_scale).float()
            b_scale = torch.where(b_scale > 0, b_scale, torch.ones_like(b_scale))
            q = torch.round(bias.detach().double() / b_scale.double())
            self.register_buffer("bias_int32", q.clamp(INT32_MIN, INT32_MAX).to(torch.int32))
            self.register_buffer("bias_scale", b_scale)
            self.bias_scale_value = float(b_scale[0])
        else:
            self.bias_int32 = None
            self.bias_scale = None

    def dequantized_weight(self, transposed: bool = False) -> torch.Tensor:
        """The dequantized weight; ``transposed``: ``[in, out]``, the transpose done on the
        int8 tensor so that the export holds a transposed int8 initializer."""
        w, axis = (self.weight_int8.t(), 1) if transposed else (self.weight_int8, 0)
        if self.per_channel:
            return qd.dequantize_per_channel(
                w, self.weight_scale, self.weight_zero_point, axis, -127, 127, torch.int8
            )
        return qd.dequantize_per_tensor(w, self.weight_scale_value, 0, -127, 127, torch.int8)

    def dequantized_bias(self) -> torch.Tensor | None:
        if self.bias_int32 is None:
            return None
        if self.per_channel:
            return qd.dequantize_per_channel(
                self.bias_int32,
                self.bias_scale,
                self.weight_zero_point,
                0,
                INT32_MIN,
                INT32_MAX,
                torch.int32,
            )
        return qd.dequantize_per_tensor(
            self.bias_int32, self.bias_scale_value, 0, INT32_MIN, INT32_MAX, torch.int32
        )

    def weight_step(self) -> torch.Tensor:
        """The weight quantization step per output channel (``s_w``)."""
        return self.weight_scale


class QuantConv(_QuantWeighted):
    """Conv1d/2d/3d with int8 weights and int32 bias (ORT: QLinearConv)."""

    def __init__(
        self,
        weight,
        bias,
        w_scale,
        in_scale,
        dim,
        stride,
        padding,
        dilation,
        groups,
        weight_qmax: int = 127,
    ):
        super().__init__(weight, bias, w_scale, in_scale, weight_qmax)
        self.dim = dim
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CONV_FN[self.dim](
            x,
            self.dequantized_weight(),
            self.dequantized_bias(),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def extra_repr(self) -> str:
        w = self.weight_int8
        return (
            f"{w.shape[1] * self.groups}, {w.shape[0]}, kernel_size={tuple(w.shape[2:])}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, int8 weights "
            f"{'per-channel' if self.per_channel else 'per-tensor'}"
        )


class QuantLinear(_QuantWeighted):
    """Linear with int8 weights and int32 bias (ORT: QGemm / QLinearMatMul)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # exported as Gemm(transB=1): ORT's QGemm
            return F.linear(x, self.dequantized_weight(), self.dequantized_bias())
        # N-D: MatMul on the transposed int8 weight (per channel along axis 1), then the bias
        # Add: ORT's MatMulIntegerToFloat (or QLinearMatMul without a bias), no Transpose
        # between the weight's DequantizeLinear and the MatMul for ORT to move first
        y = torch.matmul(x, self.dequantized_weight(transposed=True))
        bias = self.dequantized_bias()
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        w = self.weight_int8
        return (
            f"in_features={w.shape[1]}, out_features={w.shape[0]}, int8 weights "
            f"{'per-channel' if self.per_channel else 'per-tensor'}"
        )


def to_integer(layer: _QATWeighted, in_scale: float) -> _QuantWeighted:
    """The integer form of a fake-quant layer whose input has scale ``in_scale``."""
    w_scale = layer.current_weight_scale()
    bias = layer.bias.detach() if layer.bias is not None else None
    if isinstance(layer, QATConv):
        return QuantConv(
            layer.weight.detach(),
            bias,
            w_scale,
            in_scale,
            layer.dim,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.qmax,
        )
    return QuantLinear(layer.weight.detach(), bias, w_scale, in_scale, layer.qmax)

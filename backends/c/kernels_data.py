"""Data-movement ops for any dtype: views (Identity, Reshape, Flatten, Squeeze, Unsqueeze),
Transpose, Concat, Split, Slice, Pad. Views share their input's storage (see ``planner``);
the others are strided copies with every shape and stride a literal."""

from __future__ import annotations

import numpy as np

from .ctext import c_scalar, strided_copy, strides_of
from .ir import Node, Tensor, Unsupported
from .opbase import EmitContext, Op, const_ints, need, norm_axis, opt


def sattr(node: Node, key: str, default: str) -> str:
    v = node.attr(key, default)
    return v.decode() if isinstance(v, bytes) else str(v)


class _View(Op):
    """Output 0 holds input 0's bytes with a new shape."""

    alias = True

    def emit(self, node: Node, cg: EmitContext) -> str:
        x = cg.t(node.inputs[0])
        if x.nbytes == 0:
            return "  /* empty */"
        return f"  memcpy({cg.ptr(node.outputs[0])}, {cg.ptr(node.inputs[0])}, {x.nbytes});"


class Identity(_View):
    def infer(self, node, ins):
        x = need(ins, 0, "input")
        return [(x.shape, x.dtype)]


class Reshape(_View):
    def infer(self, node, ins):
        x = need(ins, 0, "data")
        if node.opset < 5:
            shape = list(node.attr("shape", []))
        else:
            shape = const_ints(ins, 1, "shape")
            if shape is None:
                raise Unsupported("missing shape input")
        allowzero = int(node.attr("allowzero", 0))
        out = []
        for i, d in enumerate(shape):
            if d == 0 and not allowzero:
                if i >= len(x.shape):
                    raise Unsupported(f"shape {shape}: 0 at {i} copies a missing dimension")
                out.append(x.shape[i])
            else:
                out.append(d)
        if out.count(-1) > 1:
            raise Unsupported(f"shape {shape} has more than one -1")
        if -1 in out:
            rest = int(np.prod([d for d in out if d != -1], dtype=np.int64))
            if rest == 0 or x.size % rest:
                raise Unsupported(f"cannot reshape {x.shape} to {shape}")
            out[out.index(-1)] = x.size // rest
        if int(np.prod(out, dtype=np.int64)) != x.size:
            raise Unsupported(f"cannot reshape {x.shape} to {shape}")
        return [(out, x.dtype)]


class Flatten(_View):
    def infer(self, node, ins):
        x = need(ins, 0, "input")
        r = len(x.shape)
        axis = int(node.attr("axis", 1))
        if not -r <= axis <= r:
            raise Unsupported(f"axis {axis} out of range for rank {r}")
        axis = axis + r if axis < 0 else axis
        a = int(np.prod(x.shape[:axis], dtype=np.int64))
        b = int(np.prod(x.shape[axis:], dtype=np.int64))
        return [((a, b), x.dtype)]


class Squeeze(_View):
    def infer(self, node, ins):
        x = need(ins, 0, "data")
        r = len(x.shape)
        axes = node.attr("axes") if node.opset < 13 else const_ints(ins, 1, "axes")
        if axes is None:
            keep = [d for d in x.shape if d != 1]
            return [(keep, x.dtype)]
        axes = {norm_axis(int(a), r, node) for a in axes}
        for a in axes:
            if x.shape[a] != 1:
                raise Unsupported(f"cannot squeeze axis {a} of size {x.shape[a]}")
        return [([d for i, d in enumerate(x.shape) if i not in axes], x.dtype)]


class Unsqueeze(_View):
    def infer(self, node, ins):
        x = need(ins, 0, "data")
        axes = node.attr("axes") if node.opset < 13 else const_ints(ins, 1, "axes")
        if axes is None:
            raise Unsupported("missing axes")
        r = len(x.shape) + len(axes)
        axes = sorted(norm_axis(int(a), r, node) for a in axes)
        if len(set(axes)) != len(axes):
            raise Unsupported(f"repeated axes {axes}")
        out = list(x.shape)
        for a in axes:
            out.insert(a, 1)
        return [(out, x.dtype)]


class Transpose(Op):
    def infer(self, node, ins):
        x = need(ins, 0, "data")
        r = len(x.shape)
        perm = list(node.attr("perm", list(range(r))[::-1]))
        if sorted(perm) != list(range(r)):
            raise Unsupported(f"perm {perm} is not a permutation of {r} axes")
        node.extra["perm"] = perm
        return [([x.shape[p] for p in perm], x.dtype)]

    def emit(self, node, cg):
        x, y = cg.t(node.inputs[0]), cg.t(node.outputs[0])
        perm = node.extra["perm"]
        xs = strides_of(x.shape)
        src = [xs[p] for p in perm]
        if not y.size:
            return "  /* empty */"
        return _decl(cg, node) + strided_copy(y.ctype, "y", "x", y.shape, strides_of(y.shape), src)


def _decl(cg: EmitContext, node: Node, n_in: int = 1) -> str:
    """``const T *x = ...; T *y = ...;`` for a single-input single-output op."""
    x, y = cg.t(node.inputs[0]), cg.t(node.outputs[0])
    return f"  const {x.ctype} *x = {cg.ptr(x.name)};\n  {y.ctype} *y = {cg.ptr(y.name)};\n"


class Concat(Op):
    def infer(self, node, ins):
        ts = [t for t in ins if t is not None]
        if not ts:
            raise Unsupported("no inputs")
        r = len(ts[0].shape)
        axis = norm_axis(int(node.attr("axis", 0)), r, node)
        for t in ts:
            if len(t.shape) != r or any(
                t.shape[i] != ts[0].shape[i] for i in range(r) if i != axis
            ):
                raise Unsupported(f"input shapes {[t.shape for t in ts]} do not concatenate")
            if t.dtype != ts[0].dtype:
                raise Unsupported("inputs of different dtypes")
        node.extra["axis"] = axis
        shape = list(ts[0].shape)
        shape[axis] = sum(t.shape[axis] for t in ts)
        return [(shape, ts[0].dtype)]

    def emit(self, node, cg):
        y = cg.t(node.outputs[0])
        axis = node.extra["axis"]
        ys = strides_of(y.shape)
        lines = [f"  {y.ctype} *y = {cg.ptr(y.name)};"]
        pos = 0
        for k, name in enumerate(i for i in node.inputs if i):
            t = cg.t(name)
            if t.size:
                lines.append("  {")
                lines.append(f"    const {t.ctype} *x{k} = {cg.ptr(name)};")
                lines.append(
                    strided_copy(
                        y.ctype,
                        "y",
                        f"x{k}",
                        t.shape,
                        ys,
                        strides_of(t.shape),
                        dst_off=pos * ys[axis],
                        indent="    ",
                    )
                )
                lines.append("  }")
            pos += t.shape[axis]
        return "\n".join(lines)


class Split(Op):
    def infer(self, node, ins):
        x = need(ins, 0, "input")
        r = len(x.shape)
        axis = norm_axis(int(node.attr("axis", 0)), r, node)
        n = len(node.outputs)
        split = node.attr("split") if node.opset < 13 else const_ints(ins, 1, "split")
        dim = x.shape[axis]
        if split is None:
            num = int(node.attr("num_outputs", n))
            if num != n:
                raise Unsupported(f"num_outputs={num} but {n} outputs")
            if node.opset >= 18 and "num_outputs" in node.attrs:
                chunk = -(-dim // n)
                split = [min(chunk, max(0, dim - chunk * i)) for i in range(n)]
            else:
                if dim % n:
                    raise Unsupported(f"axis size {dim} does not split into {n} equal parts")
                split = [dim // n] * n
        split = [int(s) for s in split]
        if len(split) != n or sum(split) != dim or any(s < 0 for s in split):
            raise Unsupported(f"split {split} does not fit axis size {dim} and {n} outputs")
        node.extra.update(axis=axis, split=split)
        outs = []
        for s in split:
            shape = list(x.shape)
            shape[axis] = s
            outs.append((shape, x.dtype))
        return outs

    def emit(self, node, cg):
        x = cg.t(node.inputs[0])
        axis, split = node.extra["axis"], node.extra["split"]
        xs = strides_of(x.shape)
        lines = [f"  const {x.ctype} *x = {cg.ptr(x.name)};", "  (void)x;"]
        pos = 0
        for k, (name, s) in enumerate(zip(node.outputs, split)):
            if name and s and cg.t(name).size:
                t = cg.t(name)
                lines.append("  {")
                lines.append(f"    {t.ctype} *y{k} = {cg.ptr(name)};")
                lines.append(
                    strided_copy(
                        t.ctype,
                        f"y{k}",
                        "x",
                        t.shape,
                        strides_of(t.shape),
                        xs,
                        src_off=pos * xs[axis],
                        indent="    ",
                    )
                )
                lines.append("  }")
            pos += s
        return "\n".join(lines)


class Slice(Op):
    def infer(self, node, ins):
        x = need(ins, 0, "data")
        r = len(x.shape)
        if node.opset < 10:
            starts, ends = node.attr("starts"), node.attr("ends")
            axes, steps = node.attr("axes"), None
        else:
            starts, ends = const_ints(ins, 1, "starts"), const_ints(ins, 2, "ends")
            axes, steps = const_ints(ins, 3, "axes"), const_ints(ins, 4, "steps")
        if starts is None or ends is None or len(starts) != len(ends):
            raise Unsupported("starts/ends missing or of different lengths")
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        if not len(axes) == len(steps) == len(starts):
            raise Unsupported("starts/ends/axes/steps lengths differ")
        start = [0] * r
        step = [1] * r
        count = list(x.shape)
        for a, s, e, st in zip(axes, starts, ends, steps):
            a = norm_axis(int(a), r, node)
            d = x.shape[a]
            if st == 0:
                raise Unsupported("step 0")
            s = s + d if s < 0 else s
            e = e + d if e < 0 else e
            if st > 0:
                s, e = min(max(s, 0), d), min(max(e, 0), d)
                n = max(0, -(-(e - s) // st))
            else:
                s, e = min(max(s, 0), d - 1), min(max(e, -1), d - 1)
                n = max(0, -(-(s - e) // -st))
            start[a], step[a], count[a] = s, st, n
        node.extra.update(start=start, step=step)
        return [(count, x.dtype)]

    def emit(self, node, cg):
        x, y = cg.t(node.inputs[0]), cg.t(node.outputs[0])
        if not y.size:
            return "  /* empty */"
        xs = strides_of(x.shape)
        off = sum(s * st for s, st in zip(node.extra["start"], xs))
        src = [st * step for st, step in zip(xs, node.extra["step"])]
        return _decl(cg, node) + strided_copy(
            y.ctype, "y", "x", y.shape, strides_of(y.shape), src, src_off=off
        )


class Pad(Op):
    def infer(self, node, ins):
        x = need(ins, 0, "data")
        r = len(x.shape)
        mode = sattr(node, "mode", "constant")
        if mode not in ("constant", "reflect", "edge", "wrap"):
            raise Unsupported(f"mode={mode!r}")
        value_t = None
        if node.opset < 11:
            pads, value = (
                list(node.attr("pads", node.attr("paddings", []))),
                node.attr("value", 0.0),
            )
            axes = None
        else:
            pads = const_ints(ins, 1, "pads")
            value_t = opt(ins, 2)
            value = 0
            if value_t is not None and value_t.value is not None:
                value = np.asarray(value_t.value).reshape(-1)[0]
                value_t = None
            axes = const_ints(ins, 3, "axes")
        if pads is None:
            raise Unsupported("missing pads")
        axes = list(range(r)) if axes is None else [norm_axis(a, r, node) for a in axes]
        if len(pads) != 2 * len(axes):
            raise Unsupported(f"pads {pads} do not match {len(axes)} axes")
        pb, pe = [0] * r, [0] * r
        for i, a in enumerate(axes):
            pb[a], pe[a] = pads[i], pads[len(axes) + i]
        out = [x.shape[i] + pb[i] + pe[i] for i in range(r)]
        if any(d < 0 for d in out):
            raise Unsupported(f"pads {pads} remove more than the input {x.shape}")
        if mode != "constant" and (r == 0 or any(x.shape[i] == 0 and out[i] for i in range(r))):
            raise Unsupported(f"mode {mode} on an empty axis")
        node.extra.update(pb=pb, mode=mode, value=value, value_t=value_t)
        return [(out, x.dtype)]

    def emit(self, node, cg):
        x, y = cg.t(node.inputs[0]), cg.t(node.outputs[0])
        if not y.size:
            return "  /* empty */"
        pb, mode = node.extra["pb"], node.extra["mode"]
        r = len(x.shape)
        xs, ys = strides_of(x.shape), strides_of(y.shape)
        lines = [_decl(cg, node)]
        if mode == "constant":
            vt = node.extra["value_t"]
            v = f"*{cg.ptr(vt.name)}" if vt is not None else c_scalar(node.extra["value"], y.dtype)
            lines.append(f"  {{ const {y.ctype} v = {v}; long i;")
            lines.append(f"    for (i = 0; i < {y.size}; ++i) y[i] = v; }}")
            # the overlap of the input with the output window
            lo = [max(0, -pb[i]) for i in range(r)]  # first input index copied
            hi = [min(x.shape[i], y.shape[i] - pb[i]) for i in range(r)]
            shape = [max(0, h - low) for h, low in zip(hi, lo)]
            if all(shape):
                src_off = sum(lo[i] * xs[i] for i in range(r))
                dst_off = sum((lo[i] + pb[i]) * ys[i] for i in range(r))
                lines.append(strided_copy(y.ctype, "y", "x", shape, ys, xs, dst_off, src_off))
            return "\n".join(lines)
        maps = []
        for i in range(r):
            n = x.shape[i]
            idx = []
            for o in range(y.shape[i]):
                j = o - pb[i]
                if mode == "edge":
                    j = min(max(j, 0), n - 1)
                elif mode == "wrap":
                    j %= n
                elif n == 1:
                    j = 0
                else:
                    period = 2 * (n - 1)
                    j = abs(j) % period
                    j = period - j if j >= n else j
                idx.append(j * xs[i])
            maps.append(idx)
        for i, m in enumerate(maps):
            lines.append(f"  static const long m{i}[{len(m)}] = {{{', '.join(map(str, m))}}};")
        loops = [f"  long j = 0, {', '.join(f'i{i}' for i in range(r))};"]
        pad = "  "
        for i in range(r):
            loops.append(f"{pad}for (i{i} = 0; i{i} < {y.shape[i]}; ++i{i})")
            pad += "  "
        src = " + ".join(f"m{i}[i{i}]" for i in range(r))
        loops.append(f"{pad}y[j++] = x[{src}];")
        return "\n".join(lines + loops)


DATA_OPS: dict[str, Op] = {
    "Identity": Identity(),
    "Reshape": Reshape(),
    "Flatten": Flatten(),
    "Squeeze": Squeeze(),
    "Unsqueeze": Unsqueeze(),
    "Transpose": Transpose(),
    "Concat": Concat(),
    "Split": Split(),
    "Slice": Slice(),
    "Pad": Pad(),
}

__all__ = ["DATA_OPS", "Tensor"]

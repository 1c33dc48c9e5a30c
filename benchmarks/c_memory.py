"""Peak RAM of the C backend below the layer-by-layer bound: in-place depthwise convolution and
patch-based execution of the first stages.

    python benchmarks/c_memory.py [--budget-ratio 3] [--patches N] [--runs 50] [--rounds 5]

Two int8 models (random weights; ORT ``quantize_static``: QDQ, per-channel int8 weights, int8
activations, 32 random normal calibration inputs): torchvision ``mobilenet_v2(width_mult=
0.35)`` at 1x3x96x96, and an MCUNet-like net built here (inverted residual blocks with 3x3,
5x5 and 7x7 depthwise kernels and expansion 3 to 6, at 1x3x80x80, the resolution of
mcunet-vww1). Each is emitted three ways: layer by layer (no kernel writes over its input:
the planner's previous lower bound), with in-place depthwise convs, and with in-place convs
plus patches (``emit(ram_budget=layer-by-layer arena / --budget-ratio)``: the smallest grid
and the cut that meet it with the least recompute; ``--patches N`` fixes the grid instead).
For each: flash (constant weight bytes), the arena (peak RAM of the activations and kernel
scratch) and the largest sum of live tensors alone (no kernel scratch), the grid and cut, the extra MACs, the median latency of the compiled C (``cc -O3
-march=native``, one thread: ``--rounds`` rounds of ``--runs`` calls, the median of the
round medians) and whether the output equals the layer-by-layer C's bit for bit on four
random inputs.

The published figures beside them are for the authors' own (trained) models on an
STM32H743 and are not the same networks: they show the size of the effect, not a like-for-like
comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import graphopt
from graphopt.backends.c import emit, planner
from graphopt.backends.c.build import CModel, compile_shared, compiler_version, find_compiler
from graphopt.backends.onnxruntime import export, ort_quantize_static
from graphopt.cpu import cpu_int8
from graphopt.table import render

FLAGS = ("-O3", "-march=native")

# TinyEngine's README, "Measured Results" (github.com/mit-han-lab/tinyengine, TinyEngine @
# 0363956, TF-Lite Micro @ 713b6ed, STM32H743); models from the MCUNet model zoo (MCUNet:
# Lin et al., NeurIPS 2020, arXiv:2007.10319; patch-based inference: MCUNetV2, Lin et al.,
# NeurIPS 2021, arXiv:2110.15352, which reports MobileNetV2's peak memory cut by 8x).
PUBLISHED = [
    ["mcunet-vww0 (64x64)", "627 kB", "163 kB", "587 ms", "453 kB", "59 kB", "27 ms"],
    ["mcunet-vww1 (80x80)", "718 kB", "220 kB", "1120 ms", "521 kB", "92 kB", "51 ms"],
    ["mbv2-w0.35 (144x144)", "-", "OOM", "OOM", "-", "295 kB", "124 ms"],
]


def _cbr(cin: int, cout: int, k: int = 1, s: int = 1, g: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout)]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, s: int, t: int):
        super().__init__()
        mid = cin * t
        layers = [*_cbr(cin, mid), nn.ReLU6()] if t != 1 else []
        layers += [*_cbr(mid, mid, k, s, mid), nn.ReLU6(), *_cbr(mid, cout)]
        self.body = nn.Sequential(*layers)
        self.res = s == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.res else self.body(x)


# (kernel, expansion, out channels, stride): shaped like the MCUNet VWW models
MCUNET_LIKE = [
    (3, 1, 8, 1),
    (7, 4, 16, 2),
    (3, 3, 16, 1),
    (5, 6, 24, 2),
    (5, 3, 24, 1),
    (3, 5, 40, 2),
    (7, 4, 40, 1),
    (5, 6, 48, 1),
    (5, 6, 96, 2),
    (3, 4, 96, 1),
]


class McuNetLike(nn.Module):
    def __init__(self, classes: int = 2):
        super().__init__()
        layers: list[nn.Module] = [*_cbr(3, 16, 3, 2), nn.ReLU6()]
        cin = 16
        for k, t, c, s in MCUNET_LIKE:
            layers.append(InvertedResidual(cin, c, k, s, t))
            cin = c
        layers += [*_cbr(cin, 160), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(160, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def _models() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    import torchvision

    torch.manual_seed(0)
    mb = torchvision.models.mobilenet_v2(width_mult=0.35)
    return [
        ("mobilenet_v2 w0.35 96x96", mb, (1, 3, 96, 96)),
        ("MCUNet-like 80x80", McuNetLike(), (1, 3, 80, 80)),
    ]


def _int8(model: nn.Module, shape, root: Path, stem: str) -> Path:
    model.eval()
    path = root / f"{stem}.onnx"
    export(graphopt.trace(model, (torch.randn(shape),)), path, dynamic_batch=False)
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal(shape).astype(np.float32) for _ in range(32)]
    return ort_quantize_static(path, root / f"{stem}_int8.onnx", calib)


@contextlib.contextmanager
def _layer_by_layer():
    """Plan as before in-place kernels: no conv writes over its input."""
    plan = planner.plan
    planner.plan = lambda prog, ops, kernels_inplace=True: plan(prog, ops, False)
    try:
        yield
    finally:
        planner.plan = plan


def _compile(path: Path, out: Path, name: str, **kw) -> CModel:
    report = emit(path, out, name=name, **kw)
    lib = out / f"lib{name}.so"
    compile_shared([out / f"{name}.c", out / f"{name}_weights.c"], lib, flags=FLAGS)
    return CModel(lib, report)


def _median_ms(cm: CModel, x: np.ndarray, runs: int, rounds: int) -> float:
    cm.time_run(x, repeat=5)
    meds = [statistics.median(cm.time_run(x, repeat=runs)) for _ in range(rounds)]
    return statistics.median(meds) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-ratio", type=float, default=3.0)
    ap.add_argument("--patches", type=int, default=None, help="a fixed grid instead of a budget")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    rows = []
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for label, model, shape in _models():
            stem = label.split()[0].lower().replace("-", "_")
            path = _int8(model, shape, root, stem)
            xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
            with _layer_by_layer():
                base = _compile(path, root / f"{stem}_lbl", "lbl")
            inplace = _compile(path, root / f"{stem}_ip", "ip")
            kw = (
                {"patches": args.patches}
                if args.patches
                else {"ram_budget": int(base.arena_bytes / args.budget_ratio)}
            )
            patched = _compile(path, root / f"{stem}_pt", "pt", **kw)
            ref = [base.run(x)[0] for x in xs]
            for variant, cm in (
                ("layer by layer", base),
                ("in-place dw", inplace),
                ("in-place dw + patches", patched),
            ):
                p = cm.report["patches"]
                exact = all(np.array_equal(cm.run(x)[0], r) for x, r in zip(xs, ref))
                rows.append(
                    [
                        label,
                        variant,
                        f"{cm.weight_bytes:,}",
                        f"{cm.arena_bytes:,}",
                        f"{cm.arena_bytes / base.arena_bytes:.2f}",
                        f"{cm.report['memory']['activations_peak_bytes']:,}",
                        f"{p['grid'][0]}x{p['grid'][1]} to {p['cut_shape'][1:]}" if p else "-",
                        f"{p['recompute_pct']}%" if p else "-",
                        f"{_median_ms(cm, xs[0], args.runs, args.rounds):.3f}",
                        "yes" if exact else "NO",
                    ]
                )
    head = [
        "model (int8)",
        "plan",
        "flash B",
        "arena B",
        "vs layer by layer",
        "of it tensors B",
        "patches to cut [C,H,W]",
        "extra MACs",
        "C ms",
        "bit-exact",
    ]
    cc = find_compiler()
    budget = f"--patches {args.patches}" if args.patches else f"budget 1/{args.budget_ratio:g}"
    print(
        f"{datetime.date.today()}, {cpu_int8().describe()}, {cc} {' '.join(FLAGS)} "
        f"({compiler_version(cc)}), {budget}, "
        f"{args.rounds} rounds x {args.runs} runs, one thread\n"
    )
    print(render(head, rows, markdown=True))
    print(
        "\nPublished (TinyEngine README 'Measured Results', STM32H743; MCUNet NeurIPS 2020, "
        "MCUNetV2 NeurIPS 2021):\n"
    )
    print(
        render(
            ["model", "TFLM flash", "TFLM SRAM", "TFLM ms", "TinyEngine flash", "TE SRAM", "TE ms"],
            PUBLISHED,
            markdown=True,
        )
    )


if __name__ == "__main__":
    main()

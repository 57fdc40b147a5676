#!/usr/bin/env python3
"""Kernel benchmark: tacq_kernels' linear against torch.matmul and the copy-bandwidth floor.

    python benchmarks/bench_kernels.py                   # the full suite on a CUDA GPU (long: see --plan)
    python benchmarks/bench_kernels.py --suite check     # the GPU-check subset (what gpu_check.sh runs)
    python benchmarks/bench_kernels.py --shapes 28672x8192,llama3-8b --m 1,16 --bits 2,3
    python benchmarks/bench_kernels.py --suite check --plan   # tuning keys, compiles, time estimate; no GPU
    python benchmarks/bench_kernels.py --dry-run         # tiny shapes through the Triton interpreter (CPU)

Each case is one quantized layer shape, batch size M, bit-width, decoding (affine with one group
per row, affine g128, LUT), permutation or not, outlier fraction and activation dtype, run through
``kernels.linear`` (the dispatching path) or one forced path (``gemv``, ``gemm``, ``prefill``). In
the same run: ``torch.matmul`` at the same shape in the same dtype (the ``fp16_us`` baseline), the
bandwidth of a device-to-device copy and the rate of a large dense matmul (the two ceilings). Every
case's output is checked against the fp32 reference before it is timed. Writes a JSON list of
records (``--out``, default ``benchmarks/results/kernels-<gpu>-<date>.json``), prints a table and
the headline ratios, and plots speedup against M (``--png``). docs/benchmarks.md explains every
field and the method.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import math
import os
import sys
import time

import benchlib
from benchlib import Flavor

# (N, K) = (out_features, in_features) of each linear layer, by model and role.
SHAPES = {
    "llama2-7b": {"qkvo": (4096, 4096), "gate_up": (11008, 4096), "down": (4096, 11008)},
    "llama3-8b": {"qo": (4096, 4096), "kv": (1024, 4096), "gate_up": (14336, 4096), "down": (4096, 14336)},
    "llama2-70b": {"qo": (8192, 8192), "kv": (1024, 8192), "gate_up": (28672, 8192), "down": (8192, 28672)},
    "square": {"16k": (16384, 16384)},
}
# How many layers of each role one decoder layer has (for the per-decoder-layer headline ratios).
ROLE_COUNTS = {"qkvo": 4, "qo": 2, "kv": 2, "gate_up": 2, "down": 1, "16k": 1}
# The dry run: N not a multiple of any tile, K not a multiple of 32 (padding) in one shape.
DRY_SHAPES = {"tiny": {"a": (48, 80), "b": (40, 128), "c": (40, 160)}}

M_ALL = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
DECODINGS = {"row": ("affine", None), "g128": ("affine", 128), "lut": ("lut", None)}
KERNELS = ("linear", "gemv", "gemm", "prefill")
DEFAULTS = dict(bits=[2, 3], decoding=["row"], perm=[False], outlier_frac=[0.0035], dtype=["float16"],
                kernel=["linear"])
RESERVE_S = 30  # seconds kept at the end of a time budget for writing the JSON and the plot


def model_shapes(*models, roles=None, table=SHAPES) -> list[tuple[int, int]]:
    out = []
    for model in models:
        for role, nk in table[model].items():
            if (roles is None or role in roles) and nk not in out:
                out.append(nk)
    return out


ALL_SHAPES = model_shapes(*SHAPES)
L3_8B = model_shapes("llama3-8b")
MLP_70B = (28672, 8192)
MLP_8B = (14336, 4096)


def sweep(shapes, m, **axes) -> dict:
    return dict(DEFAULTS, shapes=list(shapes), m=list(m), **axes)


SUITES = {
    # Every value of every axis the issue names, one factor at a time around TACQ's default
    # (affine, one group per row, 0.35 % outliers, no perm, fp16, through kernels.linear).
    "full": [
        sweep(ALL_SHAPES, M_ALL, bits=[2, 3, 4]),
        sweep(ALL_SHAPES, [1, 16, 2048], outlier_frac=[0.0, 0.01]),
        sweep([MLP_8B, (4096, 14336), MLP_70B, (16384, 16384)], M_ALL, bits=[2, 3, 4], decoding=["g128", "lut"],
              perm=[False, True]),
        sweep([MLP_8B, (4096, 14336), MLP_70B, (16384, 16384)], M_ALL, bits=[2, 3, 4], perm=[True]),
        sweep(ALL_SHAPES, M_ALL, kernel=["gemv", "gemm", "prefill"]),
        sweep(ALL_SHAPES, M_ALL, dtype=["bfloat16"]),
    ],
    # The GPU-check subset: the headline ratios, the outlier cost, both crossovers, the other
    # decodings and bf16 at one shape (docs/benchmarks.md, "How the GPU subset was sized").
    "check": [
        sweep(L3_8B + [MLP_70B], [1, 16, 2048]),
        sweep(L3_8B, [8]),  # batch-8 decode: the e2e benchmark's other batch size (shares its tuning)
        sweep([MLP_70B, MLP_8B], [1, 16], outlier_frac=[0.0]),
        sweep([MLP_8B], [1, 2, 4, 8], bits=[3], kernel=["gemv", "gemm"]),
        sweep([MLP_8B], [16, 128, 512, 2048], bits=[3], kernel=["gemm", "prefill"]),
        sweep([MLP_8B], [1, 16], bits=[3], decoding=["g128", "lut"], perm=[False, True]),
        sweep([MLP_8B], [1, 16, 2048], bits=[2], dtype=["bfloat16"]),
    ],
    # --dry-run: the same harness on tiny shapes, every value of every axis at least once (N below
    # every tile width; K = 80 is padded to 96; K = 160 has a partial second g128 group).
    "dry": [
        sweep([(48, 80), (40, 128)], [1, 16, 1040], bits=[2]),
        sweep([(48, 80)], [1], bits=[3]),
        sweep([(48, 80)], [4], bits=[2], outlier_frac=[0.0], dtype=["bfloat16"]),
        sweep([(40, 160)], [1, 16], bits=[3], decoding=["g128", "lut"], perm=[True]),
        sweep([(40, 128)], [1], bits=[4], kernel=["gemv", "gemm", "prefill"]),
    ],
}


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str  # linear (dispatch) or a forced path
    n: int
    k: int
    m: int
    flavor: Flavor

    @property
    def path(self) -> str:
        from tacq_kernels import kernels

        if self.kernel != "linear":
            return self.kernel
        return kernels.path_for(self.m, benchlib.dtype_of(self.flavor.dtype))


def expand(sweeps: list[dict]) -> list[Case]:
    """The cases of a suite: each sweep's cartesian product, in order, without duplicates; the
    forced GEMV only where it runs (M <= 8)."""
    from tacq_kernels.kernels import GEMV_MAX_M

    cases = []
    for sw in sweeps:
        for (n, k), m, bits, decoding, perm, frac, dtype, kernel in itertools.product(
            sw["shapes"], sw["m"], sw["bits"], sw["decoding"], sw["perm"], sw["outlier_frac"], sw["dtype"], sw["kernel"]
        ):
            if kernel == "gemv" and m > GEMV_MAX_M:
                continue
            decoder, group = DECODINGS[decoding]
            case = Case(kernel, n, k, m, Flavor(bits, decoder, group, perm, frac, dtype))
            if case not in cases:
                cases.append(case)
    return cases


def plan(cases: list[Case]) -> benchlib.Plan:
    p = benchlib.Plan(cases=len(cases))
    p.add([(c.path, c.m, c.n, c.k, c.flavor) for c in cases], set(), set())
    return p


def shape_label(n: int, k: int, table=None) -> str:
    names = [f"{model}.{role}" for model, roles in (table or {**SHAPES, **DRY_SHAPES}).items()
             for role, nk in roles.items() if nk == (n, k)]
    return ",".join(names) or f"{n}x{k}"


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def layer_bytes(layer) -> int:
    """Every stored byte of the layer: codes (with K padding), scales/zeros or tables, perm, CSR, bias."""
    return sum(t.numel() * t.element_size() for t in layer.tensors.values())


class Runner:
    def __init__(self, args, gpu: str, commit: str):
        self.args = args
        self.dry = args.dry_run
        self.gpu, self.commit = gpu, commit
        self.records: list[dict] = []
        self.failures: list[str] = []
        self.baselines: dict = {}
        self.copy_gbps = 0.0
        self.tflops: dict[str, float] = {}

    def base(self, **fields) -> dict:
        return dict(fields, gpu=self.gpu, commit=self.commit)

    def ceilings(self, dtypes) -> None:
        bw = benchlib.copy_bandwidth(self.dry)
        self.copy_gbps = bw["gbps"]
        n_elems = bw["bytes"] // 4  # fp16 elements copied
        self.records.append(self.base(
            kernel="copy", path="device-to-device", M=1, N=n_elems, K=1, bits=16, decoder="dense", group_size=None,
            perm=False, outlier_frac=0.0, dtype="float16", us=bw["us"], fp16_us=bw["us"], speedup=1.0,
            bytes=bw["bytes"], gbps=bw["gbps"], pct_of_copy_bw=100.0, timing=bw["timing"], runs=bw["runs"]))
        print(f"copy bandwidth: {bw['gbps']:.0f} GB/s ({bw['bytes'] / 1e9:.2f} GB read + written in {bw['us']:.1f} us)")
        for dt in dtypes:
            mm = benchlib.matmul_rate(dt, self.dry)
            self.tflops[dt] = mm["tflops"]
            n = mm["n"]
            nbytes = 3 * n * n * (2 if dt != "float32" else 4)
            self.records.append(self.base(
                kernel="torch.matmul", path="cublas-peak", M=n, N=n, K=n, bits=16, decoder="dense", group_size=None,
                perm=False, outlier_frac=0.0, dtype=dt, us=mm["us"], fp16_us=mm["us"], speedup=1.0, bytes=nbytes,
                gbps=nbytes / mm["us"] / 1e3, pct_of_copy_bw=100 * nbytes / mm["us"] / 1e3 / self.copy_gbps,
                tflops=mm["tflops"], timing=mm["timing"], runs=mm["runs"]))
            print(f"dense matmul {dt} {n}^3: {mm['tflops']:.1f} TFLOP/s")

    def floor_us(self, nbytes: int, m: int, n: int, k: int, dtype: str) -> float:
        return max(nbytes / self.copy_gbps / 1e3, 2 * m * n * k / self.tflops[dtype] / 1e6)

    def timing_args(self, m: int) -> dict:
        if self.dry:
            return dict(graph=False, min_runs=1)
        return dict(graph=m <= self.args.graph_max_m, target_ms=self.args.target_ms, min_runs=self.args.min_runs)

    def baseline(self, n, k, m, dtype, xs) -> dict:
        """torch.matmul (cuBLAS) at [M, K] x [K, N] in ``dtype``, cached; adds its record once."""
        import torch

        key = (n, k, m, dtype)
        if key in self.baselines:
            return self.baselines[key]
        dev, dt = benchlib.device(), benchlib.dtype_of(dtype)
        copies = benchlib.rotation_copies(n * k * 2, self.dry)
        weights = [(torch.randn(n, k, device=dev) * 0.02).to(dt) for _ in range(copies)]
        outs = [torch.empty(m, n, device=dev, dtype=dt) for _ in range(copies)]
        calls = [functools.partial(torch.matmul, xs[i % len(xs)], w.t(), out=o) for i, (w, o) in enumerate(zip(weights, outs))]
        for c in calls[:1]:
            c()
        t = benchlib.time_calls(calls, **self.timing_args(m))
        nbytes = (n * k + m * k + m * n) * weights[0].element_size()
        floor = self.floor_us(nbytes, m, n, k, dtype)
        rec = self.base(
            kernel="torch.matmul", path="cublas", M=m, N=n, K=k, bits=16, decoder="dense", group_size=None, perm=False,
            outlier_frac=0.0, dtype=dtype, us=t["us"], fp16_us=t["us"], speedup=1.0, bytes=nbytes,
            gbps=nbytes / t["us"] / 1e3, pct_of_copy_bw=100 * nbytes / t["us"] / 1e3 / self.copy_gbps,
            shape=shape_label(n, k), floor_us=floor, floor_speedup=t["us"] / floor, copies=copies,
            **{f: t[f] for f in ("us_p20", "us_p80", "runs", "calls_per_run", "timing")})
        self.records.append(rec)
        self.baselines[key] = rec
        del weights, outs
        return rec

    def run_group(self, n, k, flavor_layer: Flavor, cases: list[Case], progress) -> None:
        """Cases that share one layer (shape and flavor apart from dtype): build the rotated copies
        once, then each (M, dtype, kernel)."""
        import torch

        from tacq_kernels import reference
        from tacq_kernels.testing import random_layer

        dev = benchlib.device()
        f = flavor_layer

        def build(seed):
            return random_layer(n, k, bits=f.bits, decoder=f.decoder, group_size=f.group, outlier_frac=f.outlier_frac,
                                perm=f.perm, seed=seed, device=dev, generate_on_device=True)

        first = build(0)
        nbytes_layer = layer_bytes(first)
        copies = benchlib.rotation_copies(nbytes_layer, self.dry)
        layers = [first] + [build(i) for i in range(1, copies)]
        w_ref = reference.dequantize(first)  # fp32 [N, K], for the correctness check
        by_md = {}
        for c in cases:
            by_md.setdefault((c.m, c.flavor.dtype), []).append(c)
        for (m, dtype), group in by_md.items():
            dt = benchlib.dtype_of(dtype)
            xs = [torch.randn(m, k, device=dev).to(dt) for _ in range(copies)]
            outs = [torch.empty(m, n, device=dev, dtype=dt) for _ in range(copies)]
            base = self.baseline(n, k, m, dtype, xs)
            y_ref = xs[0].float() @ w_ref.t()
            for case in group:
                progress(case)
                try:
                    self.run_case(case, layers, xs, outs, y_ref, base, nbytes_layer, copies)
                except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
                    msg = f"{case}: {type(e).__name__}: {e}"
                    self.failures.append(msg)
                    print("  FAILED " + msg[:600], flush=True)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
            del xs, outs, y_ref
        del layers, first, w_ref
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def run_case(self, case: Case, layers, xs, outs, y_ref, base, nbytes_layer, copies) -> None:
        import torch

        from tacq_kernels import kernels

        fn = getattr(kernels, case.kernel)
        m, n, k, f = case.m, case.n, case.k, case.flavor
        # The first call tunes (times every candidate once per key) and compiles; into a
        # NaN-poisoned output, checked against the fp32 reference, before any timing.
        outs[0].fill_(float("nan"))
        fn(xs[0], layers[0], outs[0])
        err = float((outs[0].float() - y_ref).norm() / y_ref.norm())
        if torch.isnan(outs[0]).any() or not err < benchlib.TOL[f.dtype]:
            raise AssertionError(f"output differs from the fp32 reference: relative error {err:.3e} "
                                 f"(tolerance {benchlib.TOL[f.dtype]:.0e})")
        calls = [functools.partial(fn, x, layer, out) for x, layer, out in zip(xs, layers, outs)]
        t = benchlib.time_calls(calls, **self.timing_args(m))
        nbytes = nbytes_layer + (m * k + m * n) * xs[0].element_size()
        floor = self.floor_us(nbytes, m, n, k, f.dtype)
        rec = self.base(
            kernel=case.kernel, path=case.path, M=m, N=n, K=k, bits=f.bits, decoder=f.decoder,
            group_size=f.group_size(k), perm=f.perm, outlier_frac=f.outlier_frac, dtype=f.dtype, us=t["us"],
            fp16_us=base["us"], speedup=base["us"] / t["us"], bytes=nbytes, gbps=nbytes / t["us"] / 1e3,
            pct_of_copy_bw=100 * nbytes / t["us"] / 1e3 / self.copy_gbps, shape=shape_label(n, k), floor_us=floor,
            floor_speedup=base["us"] / floor, rel_err=err, nnz=layers[0].spec.nnz, copies=copies,
            **{key: t[key] for key in ("us_p20", "us_p80", "runs", "calls_per_run", "timing")})
        self.records.append(rec)
        print_row(rec)


COLUMNS = [
    ("kernel", "kernel", ""), ("path", "path", ""), ("M", "M", "d"), ("N", "N", "d"), ("K", "K", "d"),
    ("bits", "bits", "d"), ("dec", "dec", ""), ("perm", "perm_s", ""), ("out%", "out_pct", ".2f"), ("dtype", "dt", ""),
    ("us", "us", ".2f"), ("fp16_us", "fp16_us", ".2f"), ("speedup", "speedup", ".2f"), ("floor_x", "floor_speedup", ".2f"),
    ("GB/s", "gbps", ".0f"), ("%copy", "pct_of_copy_bw", ".1f"),
]
_header_printed = False


def table_row(rec: dict) -> dict:
    dec = rec["decoder"]
    if dec == "affine":
        dec = "aff-row" if rec["group_size"] == rec["K"] else f"aff-g{rec['group_size']}"
    return dict(rec, dec=dec, perm_s="perm" if rec["perm"] else "-", out_pct=100 * rec["outlier_frac"],
                dt={"float16": "fp16", "bfloat16": "bf16"}.get(rec["dtype"], rec["dtype"]))


def print_row(rec: dict) -> None:
    global _header_printed
    widths = [7, 8, 5, 6, 6, 4, 8, 5, 5, 5, 9, 9, 7, 7, 6, 6]
    r = table_row(rec)
    cells = [format(r[key], spec) if r.get(key) is not None else "-" for _, key, spec in COLUMNS]
    if not _header_printed:
        print("  ".join(h.rjust(w) for (h, _, _), w in zip(COLUMNS, widths)), flush=True)
        _header_printed = True
    print("  ".join(c.rjust(w) for c, w in zip(cells, widths)), flush=True)


# --------------------------------------------------------------------------------------------
# Headline ratios against the project's goals
# --------------------------------------------------------------------------------------------


def find(records, n, k, m, bits, outlier_frac=0.0035, kernel="linear"):
    for r in records:
        if (r["kernel"], r["N"], r["K"], r["M"], r["bits"], r["outlier_frac"]) == (kernel, n, k, m, bits, outlier_frac) \
                and r["decoder"] == "affine" and r["group_size"] == k and not r["perm"] and r["dtype"] == "float16":
            return r
    return None


def layer_speedup(records, model: str, m: int, bits: int):
    """Speedup of one whole decoder layer's linears (each role weighted by its count), or None."""
    fp16 = quant = 0.0
    for role, (n, k) in SHAPES[model].items():
        r = find(records, n, k, m, bits)
        if r is None:
            return None
        fp16 += ROLE_COUNTS[role] * r["fp16_us"]
        quant += ROLE_COUNTS[role] * r["us"]
    return fp16 / quant


def headline(records) -> list[dict]:
    """The issue's goals, each with the measured value (None when this run did not measure it)."""
    n70, k70 = MLP_70B
    rows = []

    def speed(label, value, target):
        rows.append(dict(goal=label, value=value, target=f">= {target}x" if target else "-",
                         met=None if value is None or target is None else value >= target, unit="x"))

    def one(n, k, m, bits):
        r = find(records, n, k, m, bits)
        return r["speedup"] if r else None

    speed("M=1 2-bit +0.35% 28672x8192 vs fp16", one(n70, k70, 1, 2), 5)
    speed("M=1 3-bit +0.35% 28672x8192 vs fp16", one(n70, k70, 1, 3), 3.8)
    speed("M=1 2-bit Llama-3-8B layer vs fp16", layer_speedup(records, "llama3-8b", 1, 2), 3)
    speed("M=1 3-bit Llama-3-8B layer vs fp16", layer_speedup(records, "llama3-8b", 1, 3), None)
    speed("M=16 2-bit 28672x8192 vs fp16", one(n70, k70, 16, 2), 3)
    speed("M=16 2-bit Llama-3-8B layer vs fp16", layer_speedup(records, "llama3-8b", 16, 2), 3)
    speed("M=2048 2-bit 28672x8192 vs fp16", one(n70, k70, 2048, 2), 0.85)
    speed("M=2048 2-bit Llama-3-8B layer vs fp16", layer_speedup(records, "llama3-8b", 2048, 2), 0.85)
    for (n, k), m, bits in itertools.product([MLP_70B, MLP_8B], [1, 16], [2, 3]):
        with_o, without = find(records, n, k, m, bits), find(records, n, k, m, bits, outlier_frac=0.0)
        value = with_o["us"] / without["us"] - 1 if with_o and without else None
        rows.append(dict(goal=f"outlier cost M={m} {bits}-bit {n}x{k}: us(0.35%)/us(0) - 1", value=value,
                         target="<= 10%", met=None if value is None else value <= 0.10, unit="%"))
    return rows


def print_headline(rows, out=None) -> None:
    print("\nheadline (goals from issue 12; 'not measured' = not in this run's cases):", file=out)
    for r in rows:
        if r["value"] is None:
            value = "not measured"
        elif r["unit"] == "%":
            value = f"{100 * r['value']:+.1f}%"
        else:
            value = f"{r['value']:.2f}x"
        met = {None: "", True: "met", False: "MISSED"}[r["met"]]
        print(f"  {r['goal']:58s} {value:>13s}  goal {r['target']:8s} {met}", file=out)


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


def plot(records, path: str, title: str) -> str | None:
    """Speedup against M, one panel per bit-width, one line per shape (TACQ's default layer
    through kernels.linear, fp16); dashed: the speedup at the floor (bytes at copy bandwidth,
    or flops at the measured matmul rate, whichever is slower)."""
    plt = benchlib.pyplot()
    if plt is None:
        return None
    sel = [r for r in records if r["kernel"] == "linear" and r["decoder"] == "affine" and r["group_size"] == r["K"]
           and not r["perm"] and r["outlier_frac"] == 0.0035 and r["dtype"] == "float16"]
    bits_list = sorted({r["bits"] for r in sel}) or [2]
    fig, axes = plt.subplots(1, len(bits_list), figsize=(6 * len(bits_list), 4.5), squeeze=False)
    for ax, bits in zip(axes[0], bits_list):
        shapes = sorted({(r["N"], r["K"]) for r in sel if r["bits"] == bits})
        for i, (n, k) in enumerate(shapes):
            rows = sorted((r for r in sel if r["bits"] == bits and (r["N"], r["K"]) == (n, k)), key=lambda r: r["M"])
            color = f"C{i % 10}"
            ms = [r["M"] for r in rows]
            ax.plot(ms, [r["speedup"] for r in rows], "o-", color=color, label=f"{n}x{k}")
            ax.plot(ms, [r["floor_speedup"] for r in rows], "x--", color=color, alpha=0.6)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("M (rows of x)")
        ax.set_ylabel("speedup vs torch.matmul fp16")
        ax.set_title(f"{bits}-bit + 0.35% outliers (dashed: at the floor)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return benchlib.save_figure(fig, path)


# --------------------------------------------------------------------------------------------


def parse_list(text: str, kind=int):
    return [kind(v) for v in text.split(",") if v]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        if item in SHAPES:
            out += [s for s in model_shapes(item) if s not in out]
        else:
            n, _, k = item.partition("x")
            out.append((int(n), int(k)))
    return out


def build_cases(args) -> list[Case]:
    custom = {name: getattr(args, name) for name in ("shapes", "m", "bits", "decoding", "perm", "outliers", "dtype", "kernel")}
    if not any(v is not None for v in custom.values()):
        return expand(SUITES["dry" if args.dry_run else args.suite])
    sw = sweep(
        parse_shapes(args.shapes) if args.shapes else L3_8B,
        parse_list(args.m) if args.m else M_ALL,
        bits=parse_list(args.bits) if args.bits else DEFAULTS["bits"],
        decoding=parse_list(args.decoding, str) if args.decoding else DEFAULTS["decoding"],
        perm=[bool(int(v)) for v in args.perm.split(",")] if args.perm else DEFAULTS["perm"],
        outlier_frac=parse_list(args.outliers, float) if args.outliers else DEFAULTS["outlier_frac"],
        dtype=parse_list(args.dtype, str) if args.dtype else DEFAULTS["dtype"],
        kernel=parse_list(args.kernel, str) if args.kernel else DEFAULTS["kernel"],
    )
    for name, allowed in (("decoding", DECODINGS), ("kernel", KERNELS), ("dtype", ("float16", "bfloat16"))):
        bad = [v for v in sw[name] if v not in allowed]
        if bad:
            raise SystemExit(f"--{name}: unknown {bad}; choose from {list(allowed)}")
    return expand([sw])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--suite", choices=["full", "check"], default="full", help="which cases (default: full)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes through the Triton interpreter on the CPU")
    ap.add_argument("--plan", action="store_true", help="print the tuning/compile plan and time estimate, run nothing")
    g = ap.add_argument_group("a custom sweep instead of a suite (any of these; the rest take TACQ's defaults)")
    g.add_argument("--shapes", help="NxK list and/or model names: " + ",".join(SHAPES) + " (default llama3-8b)")
    g.add_argument("--m", help="batch sizes, e.g. 1,16,2048 (default: " + ",".join(map(str, M_ALL)) + ")")
    g.add_argument("--bits", help="e.g. 2,3 (default 2,3)")
    g.add_argument("--decoding", help="row,g128,lut (default row: affine, one group per row)")
    g.add_argument("--perm", help="0,1 (default 0)")
    g.add_argument("--outliers", help="outlier fractions, e.g. 0,0.0035,0.01 (default 0.0035)")
    g.add_argument("--dtype", help="float16,bfloat16 (default float16)")
    g.add_argument("--kernel", help="linear,gemv,gemm,prefill (default linear: the dispatching path)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/kernels-<gpu>-<date>.json)")
    ap.add_argument("--png", help="plot path (default: the JSON path with .png)")
    ap.add_argument("--tuning-cache", help="load tuned configs from this file if it exists; save them there at the end")
    ap.add_argument("--verify-workers", type=int, help="processes that compile and check every candidate config "
                    "before tuning (default: CPUs - 2, at most 12; 0 skips the pass)")
    ap.add_argument("--target-ms", type=float, default=100.0, help="timed replays per case, in ms (default 100)")
    ap.add_argument("--min-runs", type=int, default=10, help="at least this many timed replays (default 10)")
    ap.add_argument("--graph-max-m", type=int, default=1 << 30,
                    help="CUDA graphs for M up to this (default: every M; eager launches above it)")
    ap.add_argument("--time-budget", type=float, help="seconds: start no new layer after this (less a reserve for "
                    "writing); gpu_check.sh sets the same through $GPU_CHECK_STEP_DEADLINE")
    args = ap.parse_args(argv)

    if not args.plan:
        benchlib.setup(args.dry_run, "bench_kernels.py")
    elif args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    cases = build_cases(args)
    workers = args.verify_workers if args.verify_workers is not None else benchlib.default_workers(args.dry_run)
    the_plan = plan(cases)
    benchlib.print_plan(the_plan, len(cases), max(1, workers), "dry run" if args.dry_run else args.suite)
    if args.plan:
        return 0

    import torch

    t_start = time.perf_counter()
    torch.manual_seed(0)
    gpu, commit = benchlib.gpu_name(), benchlib.commit()
    out = args.out or benchlib.default_out("kernels", args.dry_run)
    png = args.png or os.path.splitext(out)[0] + ".png"
    print(f"gpu: {gpu}; commit {commit}; torch {torch.__version__}; {len(cases)} cases -> {out}", flush=True)
    benchlib.load_tuning(args.tuning_cache)
    runner = Runner(args, gpu, commit)
    deadline = benchlib.step_deadline()
    if args.time_budget:
        deadline = min(deadline or math.inf, time.time() + args.time_budget)
    if workers > 0:
        verify_until = None if deadline is None else time.time() + 0.4 * (deadline - time.time())
        # A dry run checks the pass itself (its worker pool included) on a few configs: the
        # interpreter compiles nothing and the CPU tests run every path anyway.
        jobs = the_plan.jobs[:4] if args.dry_run else the_plan.jobs
        results = benchlib.verify_configs(jobs, workers, deadline=verify_until)
        runner.failures += [f"verify: {r['path']} M={r['m']} {r['flavor']} {r['config']}: {r['status']} "
                            f"{r['error'] or r['rel_err']}" for r in results if r["status"] in ("wrong", "error")]
    runner.ceilings(sorted({c.flavor.dtype for c in cases}))

    groups: dict = {}
    for c in cases:
        layer_flavor = dataclasses.replace(c.flavor, dtype="float16")
        groups.setdefault((c.n, c.k, layer_flavor), []).append(c)
    done = [0]

    def progress(case):
        done[0] += 1
        if done[0] % 20 == 1:
            print(f"[{done[0]}/{len(cases)}, {time.perf_counter() - t_start:.0f} s]", flush=True)

    for (n, k, layer_flavor), group in groups.items():
        if deadline is not None and time.time() > deadline - RESERVE_S:
            runner.failures.append(f"INCOMPLETE: stopped at the time budget after {done[0]} of {len(cases)} cases "
                                   "(the suite's order puts the headline cases first)")
            break
        runner.run_group(n, k, layer_flavor, group, progress)
        benchlib.write_records(out, runner.records, benchlib.KERNEL_FIELDS)  # partial results survive a kill
        benchlib.save_tuning(args.tuning_cache)

    benchlib.write_records(out, runner.records, benchlib.KERNEL_FIELDS)
    title = f"tacq_kernels: {gpu}, commit {commit}" + (" (DRY RUN: interpreter timings, meaningless)" if args.dry_run else "")
    written = plot(runner.records, png, title)
    benchlib.save_tuning(args.tuning_cache)
    print_headline(headline(runner.records))
    print(f"\n{len(runner.records)} records -> {out}" + (f"; plot -> {written}" if written else ""))
    print(f"{len(cases)} cases in {time.perf_counter() - t_start:.0f} s; {len(runner.failures)} failure(s)")
    for msg in runner.failures:
        print("  FAILURE " + msg[:600])
    return 1 if runner.failures else 0


if __name__ == "__main__":
    sys.exit(main())

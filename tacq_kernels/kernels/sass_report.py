"""The SASS cost report: instructions per weight in each kernel's hot loop, against each GPU's budget.

    python -m tacq_kernels.kernels.sass_report [--arch 90 89 80] [--paths gemv1 gemv2 ...] [--smoke]
                                               [--jobs N] [--out benchmarks/results/static]

For each path (the GEMV at M = 1, 2, 4, 8; the GEMM at M = 16 and 64; the prefill path's
dequantize kernel), bit-width (2, 3, 4), decoder (affine with one group per row, affine g128,
LUT) and, where the kernel has the switch, with and without the permutation, it compiles the
config each launcher tries first (``compile_check``'s compile path: Triton's ASTSource for a
GPUTarget, no GPU needed) for sm_90, sm_89 and sm_80, counts the hot loop with
:func:`.sass.count_hot_loop` and predicts the fraction of the bandwidth roofline on an H100,
H200, A100 and RTX 4090 with :func:`.sass.predict`. It prints markdown tables and writes them,
the JSON and a bar chart (SVG) to ``--out``.

Weights per iteration, per thread (what every count is divided by):

* gemv: one iteration of the chunk loop decodes a [BLOCK_K, BLOCK_N] tile over 32 * num_warps
  threads: BLOCK_K * BLOCK_N / (32 * num_warps) (256 x 64 over 128 threads: 128). Where the loop
  over bit positions stays a loop (T_UNROLL < VPW) it runs VPW / T_UNROLL times per chunk.
* gemm: the same tile, decoded once per chunk whatever BLOCK_M; the MMA work for the BLOCK_M
  rows of x is inside the same loop.
* dequant: no loop (one [64, 128] tile per program): the whole kernel over 64 * 128 / 128.

The GEMM has no permutation switch: its launcher gathers x's columns once per call (an M x K
copy), so the loop is the same with and without.

Run it with ``TRITON_INTERPRET`` unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
import triton

from . import compile_check as cc
from .sass import ARCHS, GPUS, MMA, Instruction, mma_macs, access_bits, count_hot_loop, cuobjdump_path, pipe_cycles, predict

# (label, kind, M): the report's paths
PATHS = [("gemv1", "gemv", 1), ("gemv2", "gemv", 2), ("gemv4", "gemv", 4), ("gemv8", "gemv", 8),
         ("gemm16", "gemm", 16), ("gemm64", "gemm", 64), ("dequant", "dequant", None)]
DECODERS = [("affine", "row"), ("affine", "g128"), ("lut", "-")]
ARCH_LIST = (90, 89, 80)
K_EXAMPLE = N_EXAMPLE = 4096  # the shape the metadata bytes are amortised over (cc.N, cc.K)


@dataclass(frozen=True)
class Case:
    path: str  # label from PATHS
    bits: int
    decoder: str
    group: str
    perm: bool | None  # None: the kernel has no permutation switch (gemm)
    arch: int

    @property
    def name(self) -> str:
        perm = "" if self.perm is None else (" perm" if self.perm else "")
        return f"{self.path} {self.bits}b {self.decoder}{'' if self.group == '-' else ' ' + self.group}{perm}"


def cases(archs=ARCH_LIST, paths=None, bits=(2, 3, 4)) -> list[Case]:
    out = []
    for arch in archs:
        for label, kind, _ in PATHS:
            if paths and label not in paths:
                continue
            for b in bits:
                for decoder, group in DECODERS:
                    for perm in ((False, True) if kind != "gemm" else (None,)):
                        out.append(Case(label, b, decoder, group, perm, arch))
    return out


def bytes_per_weight(case: Case) -> float:
    """DRAM bytes the kernel moves per weight: codes, scales/zeros (fp16 pairs per group and
    column) or tables (2^b fp16 per K row, shared by N columns), plus the dense fp16 weight the
    dequantize kernel writes. Outliers (CSR) and x are left out: they are outside the loop."""
    codes = case.bits / 8
    if case.decoder == "lut":
        meta = 2 ** case.bits * 2 / N_EXAMPLE
    else:
        meta = 4 / (128 if case.group == "g128" else K_EXAMPLE)
    return codes + meta + (2.0 if case.path == "dequant" else 0.0)


def _job(case: Case):
    """(kernel fn, args, constexprs, warps, stages, weights per iteration, inner trips, loop mode, config)."""
    kind, m = next((k, m) for label, k, m in PATHS if label == case.path)
    seg = cc._segment(case.bits, case.decoder, case.group)
    if kind == "gemv":
        fn, args, cx, warps, stages, label = next(cc.gemv_jobs(m, seg, torch.float16, True, has_perm=case.perm))
        vpw = 8 if case.bits == 4 else 16
        trips = {1: vpw // cx["T_UNROLL"]} if cx["T_UNROLL"] < vpw else None
        loop = "auto"
    elif kind == "gemm":
        fn, args, cx, warps, stages, label = next(cc.gemm_jobs(m, seg, torch.float16, True))
        trips, loop = None, "auto"
    else:
        fn, args, cx, warps, stages, label = next(cc.prefill_jobs(seg, torch.float16, has_perm=case.perm))
        trips, loop = None, "kernel"
    weights = cx["BLOCK_N"] * cx["BLOCK_K"] / (32 * warps)
    config = {k: v for k, v in cx.items() if k.startswith("BLOCK") or k in ("T_UNROLL", "SPLIT_K")}
    config.update(num_warps=warps, num_stages=stages)
    return fn, args, cx, warps, stages, weights, trips, loop, config, label


def run_case(case: Case) -> dict:
    """Compile one case and count it: a JSON-able record."""
    fn, args, cx, warps, stages, weights, trips, loop, config, label = _job(case)
    cubin, shared = cc.compile_cubin(fn, args, cx, case.arch, warps, stages)
    usage = cc.cubin_usage(cubin, shared)
    count = count_hot_loop(cubin, fn.__name__, weights, inner_trips=trips, loop=loop)
    record = dict(
        path=case.path, bits=case.bits, decoder=case.decoder, group=case.group, perm=case.perm, arch=case.arch,
        name=case.name, config=config, config_label=label, registers=usage.registers, spill_bytes=usage.spill_bytes,
        shared_bytes=usage.shared_bytes, bytes_per_weight=bytes_per_weight(case),
        cycles=pipe_cycles(count, ARCHS[case.arch]),
        **{k: v for k, v in count.to_dict().items() if k != "arch"},
    )
    record["checks"] = checks(case, count, config)
    record["predictions"] = {  # (their "cycles" are the record's)
        gpu.name: {k: v for k, v in predict(count, gpu, record["bytes_per_weight"]).items() if k != "cycles"}
        for gpu in GPUS.values() if gpu.arch == case.arch
    }
    return record


def checks(case: Case, count, config: dict) -> dict[str, bool]:
    """Invariants that confirm the loop found is the hot loop and that weights_per_iteration
    (and the inner trip count) match what the compiler emitted, e.g. that ptxas did not unroll
    the loop: every weight's code is loaded exactly once, multiplied BLOCK_M times, or written once.

    gemv: the plane words the loop loads (global loads read by bit operations) are bits / 8
    bytes per weight; for 3 bits also 4 / 8, because ``common.load_words`` loads each 1-bit word
    twice (for the two 2-bit word rows that share it; an unrolled loop would show 6 / 8 or more).
    gemm: the MMAs do BLOCK_M multiply-adds per weight. dequant: the kernel stores 2 bytes (one
    fp16) per weight.
    """
    if case.path.startswith("gemv"):
        words = count.load_bytes.get("load: weight words", 0.0)
        allowed = (case.bits / 8,) + ((4 / 8,) if case.bits == 3 else ())
        return {"weight words read once (bits/8 B per weight)": any(abs(words - a) < 1e-9 for a in allowed)}
    if case.path.startswith("gemm"):
        macs = sum(n / 32 * mma_macs(op) for op, n in count.opcodes.items() if op.split(".")[0] in MMA)
        return {"MMA multiply-adds per weight = BLOCK_M": abs(macs - config["BLOCK_M"]) < 1e-9}
    stored = sum(n * access_bits(Instruction(0, None, op, ())) / 8 for op, n in count.opcodes.items()
                 if op.split(".")[0] == "STG")
    return {"one fp16 stored per weight": abs(stored - 2.0) < 1e-9}


def environment() -> dict:
    def run(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(__file__)).stdout.strip()
        except OSError:
            return ""

    version = run(cuobjdump_path(), "--version").splitlines()
    return dict(
        commit=run("git", "rev-parse", "HEAD"), dirty=bool(run("git", "status", "--porcelain", "--", ".")),
        kernels_tree=run("git", "rev-parse", "HEAD:tacq_kernels/kernels"),  # survives a rebase that leaves it alone
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        triton=triton.__version__, torch=torch.__version__, cuobjdump=version[-1] if version else "",
        shape=dict(N=N_EXAMPLE, K=K_EXAMPLE), x_dtype="fp16",
        archs={sm: vars(a) for sm, a in ARCHS.items()}, gpus={name: vars(g) for name, g in GPUS.items()},
    )


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

_TOP_SOURCES = ["math (FMA/FADD/FMUL)", "decode", "convert", "address", "mask", "load: weight words",
                "load: x / tables / scales", "load: index (gather)", "store: shared (layout)", "MMA"]
_GPU_ARCH = [("H100 SXM", 90), ("H200", 90), ("A100 SXM 80GB", 80), ("RTX 4090", 89)]


def _fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def _pipe_cell(r: dict | None, digits: int) -> str:
    """The busiest pipe of a record, in issue-slot equivalents per weight (cycles x 128)."""
    if not r:
        return "-"
    pipe = max((k for k in r["cycles"] if k != "issue"), key=r["cycles"].get)
    return f"{pipe} {r['cycles'][pipe] * 128:.{digits}f}"


def _bandwidth_cell(r: dict | None, gpu: str) -> str:
    """Predicted % of the roofline on ``gpu``: from the issue limit alone / from issue and pipes."""
    if not r:
        return "-"
    p = r["predictions"][gpu]
    issue_only = min(1.0, p["budget_instructions_per_weight"] / r["per_weight"])
    return f"{100 * issue_only:.0f} / {100 * p['roofline']:.0f}"


def markdown(records: list[dict]) -> str:
    """Two tables: per case, instructions per weight and the busiest pipe by arch with the
    predicted % of bandwidth; and the sm_90 counts by source."""
    by = {(r["name"], r["arch"]): r for r in records}
    names = list(dict.fromkeys(r["name"] for r in records))
    archs = [a for a in ARCH_LIST if any(r["arch"] == a for r in records)]
    gpus = [(g, a) for g, a in _GPU_ARCH if a in archs]
    head = ["case", "config (first candidate)"]
    for a in archs:
        head += [f"sm_{a} instr/w", f"sm_{a} pipe"]
    head += [f"% BW {g}" for g, _ in gpus]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        first = next(by[(name, a)] for a in archs if (name, a) in by)
        row = [name, first["config_label"].split(" ", 2)[-1] if first["path"] != "dequant" else "64x128 w4"]
        for a in archs:
            r = by.get((name, a))
            if not r:
                row += ["-", "-"]
                continue
            spill = f" (spills {r['spill_bytes']} B)" if r["spill_bytes"] else ""
            row += [_fmt(r["per_weight"]) + spill, _pipe_cell(r, 2)]
        row += [_bandwidth_cell(by.get((name, a)), gpu) for gpu, a in gpus]
        lines.append("| " + " | ".join(row) + " |")
    out = ["### Instructions per weight, busiest pipe, predicted share of bandwidth", "",
           "instr/w: instructions one thread issues per weight it decodes in the hot loop. pipe: the busiest "
           "execution pipe in issue-slot equivalents per weight (its cycles per weight per SM x 128), to compare "
           "with instr/w. % BW: predicted fraction of the DRAM roofline from the issue limit alone / from issue "
           "and pipes together.", ""] + lines
    if 90 in archs:
        out += ["", "### sm_90: what the hot loop's instructions are for (per weight)", "", sources_table(records, names)]
    return "\n".join(out) + "\n"


def classes_table(records: list[dict], keys: list[tuple[str, int]], min_share: float = 0.05) -> str:
    """Per-weight counts by instruction class of the given (case name, arch) records; classes
    under ``min_share`` per weight in all of them are summed into "other"."""
    by = {(r["name"], r["arch"]): r for r in records}
    rows = [by[k] for k in keys if k in by]
    order = ["FFMA", "FMUL/FADD", "HFMA2", "I2F", "I2FP", "HADD2.F32", "F2F", "F2FP", "SHF", "SGXT/BFE", "LOP3",
             "PRMT", "SEL/FSEL", "LEA", "IMAD/IADD", "MOV", "ISETP"]
    classes = sorted({c for r in rows for c, v in r["classes"].items() if v >= min_share},
                     key=lambda c: (order.index(c) if c in order else len(order), c))
    head = ["case", "total"] + classes + ["other"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rest = r["per_weight"] - sum(r["classes"].get(c, 0.0) for c in classes)
        lines.append("| " + " | ".join([f"{r['name']} sm_{r['arch']}", _fmt(r["per_weight"])]
                                        + [_fmt(r["classes"].get(c, 0.0)) for c in classes] + [_fmt(rest)]) + " |")
    return "\n".join(lines)


def sources_table(records: list[dict], names: list[str], arch: int = 90) -> str:
    """Per-weight counts by source (see :func:`.sass._sources`) of the named cases on one arch."""
    by = {(r["name"], r["arch"]): r for r in records}
    head = [f"case (sm_{arch})", "total"] + _TOP_SOURCES + ["other"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        r = by.get((name, arch))
        if not r:
            continue
        src = r["sources"]
        rest = r["per_weight"] - sum(src.get(k, 0.0) for k in _TOP_SOURCES)
        lines.append("| " + " | ".join([name, _fmt(r["per_weight"])] + [_fmt(src.get(k, 0.0)) for k in _TOP_SOURCES]
                                        + [_fmt(rest)]) + " |")
    return "\n".join(lines)


def summary_table(records: list[dict]) -> str:
    """The compact table docs/kernels.md shows: one row per path, bit-width and decoder;
    instructions per weight without / with the permutation per arch, sm_90's busiest pipe, and
    the predicted % of bandwidth (issue alone / issue and pipes) without the permutation."""
    by = {(r["name"], r["arch"]): r for r in records}
    archs = [a for a in ARCH_LIST if any(r["arch"] == a for r in records)]
    gpus = [(g, a) for g, a in _GPU_ARCH if a in archs]
    head = ["path", "bits", "decoder"] + [f"sm_{a}" for a in archs] + ["sm_90 busiest pipe"] + [g for g, _ in gpus]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen = []
    for r in records:
        key = (r["path"], r["bits"], r["decoder"], r["group"])
        if key not in seen:
            seen.append(key)
    for path, bits, decoder, group in seen:
        base = Case(path, bits, decoder, group, None if path.startswith("gemm") else False, 0).name
        perm = base + " perm"
        row = [path, str(bits), decoder if group == "-" else f"{decoder} {group}"]
        for a in archs:
            r, rp = by.get((base, a)), by.get((perm, a))
            row.append("-" if not r else _fmt(r["per_weight"]) + (f" / {_fmt(rp['per_weight'])}" if rp else ""))
        row.append(_pipe_cell(by.get((base, 90)), 1))
        row += [_bandwidth_cell(by.get((base, a)), gpu) for gpu, a in gpus]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def svg_chart(records: list[dict], arch: int = 90, gpu: str = "H100 SXM") -> str:
    """A bar chart (plain SVG, no plotting library): instructions per weight of every case
    without the permutation on one arch, each with a tick at ``gpu``'s issue budget for it."""
    rows = [r for r in records if r["arch"] == arch and not r["perm"] and gpu in r["predictions"]]
    if not rows:
        return ""
    scale = 560 / max(r["per_weight"] for r in rows)
    height, top = 16, 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="860" height="{top + height * len(rows) + 30}" '
             'font-family="sans-serif" font-size="11">',
             f'<text x="10" y="18" font-size="13">sm_{arch}: hot-loop instructions per weight (bars) and the '
             f'{gpu} issue budget at full bandwidth (red ticks)</text>']
    for i, r in enumerate(rows):
        y = top + i * height
        budget = r["predictions"][gpu]["budget_instructions_per_weight"]
        parts += [f'<text x="185" y="{y + 11}" text-anchor="end">{r["name"]}</text>',
                  f'<rect x="190" y="{y + 2}" width="{r["per_weight"] * scale:.1f}" height="{height - 4}" fill="#4a7ab5"/>',
                  f'<text x="{194 + r["per_weight"] * scale:.1f}" y="{y + 11}">{r["per_weight"]:.1f}</text>',
                  f'<line x1="{190 + budget * scale:.1f}" x2="{190 + budget * scale:.1f}" y1="{y}" y2="{y + height}" '
                  'stroke="#c0392b" stroke-width="2"/>']
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def dump_json(env: dict, records: list[dict]) -> str:
    """The report as JSON, one record per line (readable diffs), floats to 6 significant digits."""
    lines = ",\n".join(json.dumps(_rounded(r), separators=(",", ":")) for r in records)
    return '{"environment": ' + json.dumps(env, indent=1) + ',\n"records": [\n' + lines + "\n]}\n"


def _run(case):
    try:
        return run_case(case)
    except Exception as exc:  # reported, and counted as a failure by main()
        return dict(name=case.name, arch=case.arch, error=f"{type(exc).__name__}: {exc}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCH_LIST), choices=sorted(ARCHS))
    parser.add_argument("--paths", nargs="+", choices=[p[0] for p in PATHS], help="default: all")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], choices=[2, 3, 4])
    parser.add_argument("--smoke", action="store_true", help="gemv M=1 and gemm M=16, 2-bit, sm_90 only")
    parser.add_argument("--jobs", type=int, default=1, help="compile in parallel processes")
    parser.add_argument("--out", default=None, help="directory for sass_report.json and sass_report.md")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default; FFMA vs FMUL + FADD
    env = environment()  # before the run: the commit that produced the counts
    todo = (cases((90,), ["gemv1", "gemm16"], (2,)) if args.smoke
            else cases(tuple(args.arch), args.paths, tuple(args.bits)))
    records = []
    pool = ProcessPoolExecutor(args.jobs) if args.jobs > 1 else None
    results = pool.map(_run, todo) if pool else map(_run, todo)
    for i, record in enumerate(results):
        records.append(record)
        if "error" in record:
            print(f"[{i + 1}/{len(todo)}] sm_{record['arch']} {record['name']}: {record['error']}", flush=True)
        else:
            failed = [k for k, ok in record["checks"].items() if not ok]
            print(f"[{i + 1}/{len(todo)}] sm_{record['arch']} {record['name']:28s} {record['per_weight']:6.2f} instr/weight"
                  f"  regs {record['registers']}" + (f"  SPILL {record['spill_bytes']} B" if record["spill_bytes"] else "")
                  + "".join(f"  CHECK FAILED: {k}" for k in failed), flush=True)
    if pool:
        pool.shutdown()
    good = [r for r in records if "error" not in r]
    table = ("### Summary\n\n" + summary_table(good) + "\n" + markdown(good)) if good else ""
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sass_report.json"), "w") as f:
            f.write(dump_json(env, records))
        with open(os.path.join(args.out, "sass_report.md"), "w") as f:
            f.write(table)
        with open(os.path.join(args.out, "sass_report.svg"), "w") as f:
            f.write(svg_chart(good))
        print(f"wrote {args.out}/sass_report.json, sass_report.md and sass_report.svg")
    failed = sum(1 for r in good for ok in r["checks"].values() if not ok)
    if failed:
        print(f"{failed} check(s) failed: the count of those cases is not per weight as derived")
    return 1 if len(good) < len(records) or failed else 0


if __name__ == "__main__":
    sys.exit(main())

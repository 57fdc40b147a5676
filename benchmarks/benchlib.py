"""What the two benchmarks share: set-up, timing, the two ceilings, records and their schemas,
the tuning plan with its time estimate, the parallel compile-and-verify pass, tables and plots.

Used by ``bench_kernels.py`` and ``bench_e2e.py`` (run as scripts, so this directory is on
``sys.path``). Nothing here imports Triton or the kernels at import time: ``--dry-run`` must set
``TRITON_INTERPRET=1`` first (:func:`setup`), before any ``@triton.jit`` function is created.

Timing method (docs/benchmarks.md, "Method"): every measured call has its own rotated inputs
(layer copies, x, y) whose total size is several times the GPU's L2, so no call finds its
weights in the cache; calls are warmed up (which tunes and compiles them), captured in a CUDA
graph (no launch overhead from Python), replayed many times between CUDA events, and the median
replay is reported per call.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
DRY_RUN_DIR = os.path.join(REPO, "runs", "bench-dry")  # git-ignored: dry-run numbers are not results

# Relative-error tolerances of a kernel's output against the fp32 reference (as tests/test_kernels.py).
TOL = {"float16": 1e-3, "bfloat16": 1e-2, "float32": 1e-5}


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------


def setup(dry_run: bool, script: str) -> None:
    """Switch Triton to its interpreter for a dry run, or stop with a pointer to ``--dry-run``
    when there is no GPU. Call before importing anything that imports Triton."""
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        return
    import torch

    if not torch.cuda.is_available():
        print(
            f"{script}: needs a CUDA GPU, and none is visible.\n"
            f"  On a CPU, `python benchmarks/{script} --dry-run` runs the same harness on tiny shapes through\n"
            "  the Triton interpreter and writes the same JSON records and PNG (its timings mean nothing).\n"
            "  On a GPU machine, `benchmarks/gpu_check.sh OUTDIR` runs the GPU tests and both benchmarks.",
            file=sys.stderr,
        )
        sys.exit(2)


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def gpu_name() -> str:
    import torch

    if device().type == "cuda":
        return torch.cuda.get_device_name()
    return "cpu (dry run, Triton interpreter)"


def commit() -> str:
    """The checked-out commit (``-dirty`` with uncommitted changes to tracked files); ``$TACQ_COMMIT``
    wins, for copies of the tree without ``.git`` (the device machine gets such a copy)."""
    if os.environ.get("TACQ_COMMIT"):
        return os.environ["TACQ_COMMIT"]
    try:
        def git(*args):
            return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, check=True,
                                  timeout=20).stdout.strip()

        sha = git("rev-parse", "--short=12", "HEAD")
        return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def default_out(kind: str, dry_run: bool) -> str:
    """``benchmarks/results/<kind>-<gpu>-<date>.json``; dry runs go to the git-ignored runs/."""
    if dry_run:
        return os.path.join(DRY_RUN_DIR, f"{kind}.json")
    return os.path.join(RESULTS, f"{kind}-{slug(gpu_name())}-{datetime.date.today():%Y%m%d}.json")


def dtype_of(name: str):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def time_calls(
    calls: Sequence[Callable[[], object]],
    *,
    graph: bool = True,
    target_ms: float = 100.0,
    min_runs: int = 10,
    max_runs: int = 500,
    warmup_runs: int = 3,
) -> dict:
    """Median time of one call in microseconds.

    ``calls`` are zero-argument callables, one per rotated input set; one *run* calls each once,
    in order. On CUDA the run is captured in a CUDA graph (``graph=True``) after a warm-up on a
    side stream, and replays are timed between CUDA events: ``max(min_runs, target_ms / run)``
    of them, at most ``max_runs``. On the CPU (dry run) each run is timed with a host clock,
    ``min_runs`` times, without warm-up. The calls must already be tuned and compiled
    (call each once first): tuning cannot happen during capture.
    """
    import torch

    def run_all():
        for call in calls:
            call()

    if device().type != "cuda":
        times = []  # the calls ran once already (tuned, checked): the dry run has no time to spare
        for _ in range(min_runs):
            t0 = time.perf_counter()
            run_all()
            times.append((time.perf_counter() - t0) * 1e3)
        method = "cpu-eager"
    else:
        body = run_all
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run_all()  # the CUDA-graph docs' advice: warm the allocator up on a side stream
            torch.cuda.current_stream().wait_stream(side)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                run_all()
            body = cuda_graph.replay
        for _ in range(warmup_runs):
            body()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        body()
        end.record()
        end.synchronize()
        runs = int(min(max_runs, max(min_runs, math.ceil(target_ms / max(start.elapsed_time(end), 1e-3)))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
        for a, b in events:
            a.record()
            body()
            b.record()
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in events]
        method = "cuda-graph" if graph else "cuda-eager"
    per_call = sorted(t * 1e3 / len(calls) for t in times)
    return {
        "us": quantile(per_call, 0.5),
        "us_p20": quantile(per_call, 0.2),
        "us_p80": quantile(per_call, 0.8),
        "runs": len(per_call),
        "calls_per_run": len(calls),
        "timing": method,
    }


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted sequence."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def l2_bytes() -> int:
    """The GPU's L2 size (a 4 MiB stand-in on the CPU)."""
    import torch

    if device().type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20))
    return 4 << 20


def rotation_copies(bytes_per_copy: int, dry_run: bool, factor: int = 3, cap: int = 256) -> int:
    """How many copies of an input set make ``factor`` times the L2 (at least 2: the rotation
    itself is then exercised everywhere; 2 in a dry run)."""
    if dry_run:
        return 2
    return int(min(cap, max(2, math.ceil(factor * l2_bytes() / max(1, bytes_per_copy)))))


# --------------------------------------------------------------------------------------------
# The two ceilings: copy bandwidth and dense matmul rate, measured in the same run
# --------------------------------------------------------------------------------------------


def copy_bandwidth(dry_run: bool) -> dict:
    """A device-to-device copy of 1 GiB (1 MiB in a dry run): bytes read + written over its median time."""
    import torch

    n = (1 << 20 if dry_run else 1 << 30) // 2
    dev = device()
    src = torch.randn(n, device=dev).to(torch.float16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    timing = time_calls([lambda: dst.copy_(src)], graph=False, target_ms=300, min_runs=3 if dry_run else 30)
    moved = 2 * src.numel() * src.element_size()
    return dict(timing, bytes=moved, gbps=moved / timing["us"] / 1e3)


def matmul_rate(dtype_name: str, dry_run: bool) -> dict:
    """Dense ``torch.matmul`` at 8192^3 (256^3 in a dry run) on random data: FLOP/s."""
    import torch

    n = 256 if dry_run else 8192
    dev, dt = device(), dtype_of(dtype_name)
    a = torch.randn(n, n, device=dev).to(dt)
    b = torch.randn(n, n, device=dev).to(dt)
    out = torch.empty(n, n, device=dev, dtype=dt)
    torch.matmul(a, b, out=out)
    timing = time_calls([lambda: torch.matmul(a, b, out=out)], graph=False, target_ms=300,
                        min_runs=3 if dry_run else 20)
    flops = 2 * n**3
    return dict(timing, n=n, flops=flops, tflops=flops / timing["us"] / 1e6)


# --------------------------------------------------------------------------------------------
# Records and their schemas (the field lists; docs/benchmarks.md explains each)
# --------------------------------------------------------------------------------------------

NUMBER = (int, float)
KERNEL_FIELDS = {
    "kernel": str, "path": str, "M": int, "N": int, "K": int, "bits": int, "decoder": str,
    "group_size": (int, type(None)), "perm": bool, "outlier_frac": NUMBER, "dtype": str, "us": NUMBER,
    "fp16_us": NUMBER, "speedup": NUMBER, "bytes": int, "gbps": NUMBER, "pct_of_copy_bw": NUMBER,
    "gpu": str, "commit": str,
}
E2E_FIELDS = {
    "model": str, "variant": str, "bits": int, "outlier_frac": NUMBER, "phase": str, "batch": int,
    "seq_len": int, "tokens_per_s": NUMBER, "ms_per_step": NUMBER, "fp16_tokens_per_s": NUMBER,
    "speedup": NUMBER, "peak_mem_gib": NUMBER, "weights_gib": NUMBER, "mode": str, "dtype": str,
    "gpu": str, "commit": str,
}
POSITIVE = {"M", "N", "K", "bits", "us", "fp16_us", "speedup", "bytes", "gbps", "pct_of_copy_bw", "batch",
            "seq_len", "tokens_per_s", "ms_per_step", "fp16_tokens_per_s", "peak_mem_gib", "weights_gib"}


def check_records(records, fields: dict) -> list[str]:
    """Problems with ``records`` against a schema: a non-empty JSON list of objects, each with
    every field of the right type (a bool is not an int), positive finite numbers where a
    quantity must be positive. Returns a list of messages (empty when all is well)."""
    if not isinstance(records, list) or not records:
        return ["expected a non-empty JSON list of records"]
    problems = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            problems.append(f"record {i}: not an object")
            continue
        for name, kind in fields.items():
            if name not in rec:
                problems.append(f"record {i}: missing '{name}'")
                continue
            value = rec[name]
            kinds = kind if isinstance(kind, tuple) else (kind,)
            if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
                problems.append(f"record {i}: '{name}' = {value!r} is not {'/'.join(k.__name__ for k in kinds)}")
                continue
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"record {i}: '{name}' = {value!r} is not finite")
            elif name in POSITIVE and isinstance(value, NUMBER) and not value > 0:
                problems.append(f"record {i}: '{name}' = {value!r} must be positive")
    return problems


def write_records(path: str, records: list, fields: dict) -> None:
    """Check the records against their schema, then write them as a JSON list (checked first so
    that a broken harness never leaves a file that looks like results)."""
    problems = check_records(records, fields)
    if problems:
        raise ValueError("records do not follow the schema:\n  " + "\n  ".join(problems[:20]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")


def print_table(rows: Iterable[dict], columns: Sequence[tuple[str, str, str]], file=None) -> None:
    """Rows as an aligned text table; ``columns`` are (header, key, format spec)."""
    rows = list(rows)
    cells = [[format(r[key], spec) if r.get(key) is not None else "-" for _, key, spec in columns] for r in rows]
    widths = [max([len(h)] + [len(c[j]) for c in cells]) for j, (h, _, _) in enumerate(columns)]
    out = file or sys.stdout
    print("  ".join(h.rjust(w) for (h, _, _), w in zip(columns, widths)), file=out)
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)), file=out)
    out.flush()


def pyplot():
    """matplotlib's pyplot with the file-only backend, or None (with a note) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no PNG written", file=sys.stderr)
        return None
    return plt


def save_figure(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# The tuning plan: which configs tuning will time and which kernels it compiles, and how long
# that takes (estimates; docs/benchmarks.md "How the GPU subset was sized")
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flavor:
    """What a quantized layer is, apart from its shape: what the kernels specialise on."""

    bits: int
    decoder: str = "affine"
    group: int | None = None  # affine group size; None = one group per row; ignored for LUT
    perm: bool = False
    outlier_frac: float = 0.0035
    dtype: str = "float16"

    def group_size(self, k: int) -> int | None:
        if self.decoder == "lut":
            return None
        return k if self.group is None else self.group


# Estimates, not measurements (no GPU was available when they were set): seconds per Triton
# compile (0.5-1.1 s measured for sm_90 on a loaded 2-core CPU by compile_check), per candidate
# timed by the tuner (do_bench: 5 ms warm-up + 25 ms of runs, plus its own estimate and L2 flush),
# per timed case (layer copies built on the GPU, reference check, graph capture, ~100 ms of
# replays), and for start-up (imports, CUDA context, ceilings).
ESTIMATE = {"compile_s": 1.0, "candidate_s": 0.06, "case_s": 0.4, "startup_s": 15.0, "pool_start_s": 10.0}
GPU_SMS = 132  # H100 SXM and H200: the SM count the plan assumes for the launchers' split-K choices


def plan_tuning(path: str, m: int, n: int, k: int, flavor: Flavor, sms: int = GPU_SMS):
    """(tuning key, candidate configs, compile signature of each) for one launch of ``path``.

    Mirrors what the launchers do for a one-segment layer: gemv and gemm tune over
    ``gemv.candidates`` / ``gemm.candidates`` once per key; prefill is not tuned. A compile
    signature names what Triton specialises on (the constexprs, x's dtype, M = 1): two launches
    with one signature share one compiled kernel.
    """
    import importlib

    from tacq_kernels.format import SegmentSpec
    from tacq_kernels.kernels.common import group_mode
    from tacq_kernels.kernels.tuning import next_pow2

    seg = SegmentSpec(0, k, flavor.bits, flavor.decoder, flavor.group_size(k))
    sparse = flavor.outlier_frac > 0
    base = (flavor.bits, flavor.decoder, flavor.dtype, sparse)
    if path == "prefill":
        sigs = [("dequant",) + base[:3] + (flavor.perm,)] + ([("csr_fold", flavor.dtype)] if sparse else [])
        return None, [None], [tuple(sigs)]
    bucket = next_pow2(m)
    key = (path, bucket, n, k, flavor.bits, flavor.decoder, seg.group_size or 0, flavor.perm, sparse, flavor.dtype)
    # The modules, not the launcher functions that tacq_kernels.kernels exports under the same names.
    module = importlib.import_module(f"tacq_kernels.kernels.{path}")
    cands = module.candidates(m if path == "gemv" else bucket, n, seg, sms)
    sigs = []
    for cfg in cands:
        mode = group_mode(seg, cfg["BLOCK_K"])
        tile = tuple(sorted(cfg.items()))
        # gemm gathers x[:, perm] in PyTorch, so its kernel does not depend on the permutation.
        # BLOCK_M is the bucket in the GEMV and part of the tile in the GEMM.
        gemv_only = (flavor.perm, bucket) if path == "gemv" else (None, None)
        main = (path, *base, mode, *gemv_only, m == 1, m % 16 == 0, tile)
        reduce = ("splitk_reduce", flavor.dtype) if cfg["SPLIT_K"] > 1 else None
        sigs.append(tuple(s for s in (main, reduce) if s is not None))
    return key, cands, sigs


@dataclass
class Plan:
    cases: int = 0
    tuning_keys: int = 0
    candidates: int = 0
    compiles: int = 0
    jobs: list | None = None  # verify jobs: one per distinct main compile signature

    def add(self, launches: Iterable[tuple[str, int, int, int, Flavor]], seen_keys: set, seen_sigs: set,
            tuned: bool = True) -> None:
        """Count the tuning and compiling that ``launches`` (path, M, N, K, flavor) add; with
        ``tuned=False`` (launches made with ``TACQ_AUTOTUNE=0``) only the default config's."""
        if self.jobs is None:
            self.jobs = []
        for path, m, n, k, flavor in launches:
            key, cands, sigs = plan_tuning(path, m, n, k, flavor)
            if not tuned:
                cands, sigs = cands[:1], sigs[:1]
            elif key is not None and key in seen_keys:
                continue
            elif key is not None:
                seen_keys.add(key)
                self.tuning_keys += 1
                self.candidates += len(cands)
            for cfg, sig in zip(cands, sigs):
                new = [s for s in sig if s not in seen_sigs]
                seen_sigs.update(new)
                self.compiles += len(new)
                if sig[0] in new:
                    self.jobs.append(dict(path=path, m=m, flavor=asdict(flavor), config=cfg))

    def estimate_s(self, workers: int, timed_cases: int) -> dict:
        """Seconds, estimated: compiles (spread over ``workers`` by the verify pass), tuning, timing."""
        compile_s = ESTIMATE["compile_s"] * self.compiles / max(1, workers)
        if workers > 1:
            compile_s += ESTIMATE["pool_start_s"]
        tune_s = ESTIMATE["candidate_s"] * self.candidates
        time_s = ESTIMATE["case_s"] * timed_cases
        total = ESTIMATE["startup_s"] + compile_s + tune_s + time_s
        return {"compile_s": compile_s, "tune_s": tune_s, "time_s": time_s, "total_s": total}


def print_plan(plan: Plan, timed_cases: int, workers: int, what: str) -> dict:
    est = plan.estimate_s(workers, timed_cases)
    print(f"plan ({what}): {timed_cases} timed cases, {plan.tuning_keys} tuning keys, {plan.candidates} candidate "
          f"configs timed, {plan.compiles} kernel compiles ({len(plan.jobs or [])} verify jobs on {workers} "
          f"worker(s)); estimated {est['total_s']:.0f} s = start-up {ESTIMATE['startup_s']:.0f} + compile "
          f"{est['compile_s']:.0f} + tuning {est['tune_s']:.0f} + timing {est['time_s']:.0f} "
          f"(estimates: {ESTIMATE})", flush=True)
    return est


# --------------------------------------------------------------------------------------------
# Compile and verify every candidate config in parallel, before tuning times them
# --------------------------------------------------------------------------------------------

VERIFY_SHAPE = (384, 512)  # (N, K): divisible by 16 like every benchmarked shape, so the same kernels compile
VERIFY_SHAPE_DRY = (40, 96)  # the interpreter is slow; it compiles nothing anyway


def default_workers(dry_run: bool) -> int:
    if dry_run:
        return 2
    return max(1, min(12, (os.cpu_count() or 2) - 2))


def _verify_one(job: dict) -> dict:
    """Run one config of one launcher on a small layer of the job's flavor into a NaN-poisoned
    output and compare with the fp32 reference (in a worker process; compiling is the point)."""
    import torch

    from tacq_kernels import kernels, reference
    from tacq_kernels.testing import random_layer

    t0 = time.perf_counter()
    flavor = Flavor(**job["flavor"])
    n, k = VERIFY_SHAPE_DRY if interpreting() else VERIFY_SHAPE
    dev = device()
    layer = random_layer(n, k, bits=flavor.bits, decoder=flavor.decoder, group_size=flavor.group,
                         outlier_frac=0.01 if flavor.outlier_frac > 0 else 0.0, perm=flavor.perm, seed=job["m"],
                         device=dev, generate_on_device=True)
    x = torch.randn(job["m"], k, device=dev).to(dtype_of(flavor.dtype))
    out = torch.full((job["m"], n), float("nan"), device=dev, dtype=x.dtype)
    result = dict(job, status="ok", rel_err=None, error=None)
    try:
        if job["path"] == "prefill":
            kernels.prefill(x, layer, out)
        else:
            getattr(kernels, job["path"])(x, layer, out, config=job["config"])
    except Exception as e:  # noqa: BLE001 - a config this GPU cannot compile is reported, as the tuner skips it
        kind = type(e).__name__
        compile_kinds = ("OutOfResources", "PTXASError", "CompilationError")
        result.update(status="compile-error" if kind in compile_kinds else "error", error=f"{kind}: {e}"[:400])
        result["seconds"] = time.perf_counter() - t0
        return result
    y_ref = x.float() @ reference.dequantize(layer).t()
    err = float((out.float() - y_ref).norm() / y_ref.norm())
    if torch.isnan(out).any() or not err < TOL[flavor.dtype]:
        result["status"] = "wrong"
    result["rel_err"] = err if math.isfinite(err) else None
    result["seconds"] = time.perf_counter() - t0
    return result


def verify_configs(jobs: list[dict], workers: int, deadline: float | None = None) -> list[dict]:
    """Compile and check ``jobs`` (from :class:`Plan`) in ``workers`` processes sharing Triton's
    on-disk cache, so that the tuner later loads every kernel instead of compiling it serially.
    Stops waiting at ``deadline`` (epoch seconds; the rest then compiles during tuning). Prints
    one line per problem and a summary; returns the results it got."""
    import concurrent.futures
    import multiprocessing

    t0 = time.perf_counter()
    results = []
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            if deadline is not None and time.time() > deadline:
                break
            results.append(_verify_one(job))
    else:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        try:
            futures = [pool.submit(_verify_one, job) for job in jobs]
            timeout = None if deadline is None else max(1.0, deadline - time.time())
            for fut in concurrent.futures.as_completed(futures, timeout=timeout):
                results.append(fut.result())
        except concurrent.futures.TimeoutError:
            print(f"verify: stopped waiting at the deadline, {len(results)} of {len(jobs)} configs done", flush=True)
        except Exception as e:  # noqa: BLE001 - a broken pool costs speed (serial compiles), not results
            print(f"verify: the worker pool failed ({type(e).__name__}: {e}); kernels compile during tuning", flush=True)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    bad = [r for r in results if r["status"] in ("wrong", "error")]
    skipped = [r for r in results if r["status"] == "compile-error"]
    for r in bad + skipped:
        print(f"  verify {r['status']}: {r['path']} M={r['m']} {r['flavor']} {r['config']}: "
              f"rel_err={r['rel_err']} {r['error'] or ''}", flush=True)
    print(f"verified {len(results)} of {len(jobs)} configs in {time.perf_counter() - t0:.1f} s on {workers} "
          f"worker(s): {len(results) - len(bad) - len(skipped)} correct, {len(bad)} wrong or failing, "
          f"{len(skipped)} that this GPU cannot compile (the tuner skips those)", flush=True)
    return results


def step_deadline() -> float | None:
    """When gpu_check.sh kills this step (``$GPU_CHECK_STEP_DEADLINE``, epoch seconds), if it runs us."""
    value = os.environ.get("GPU_CHECK_STEP_DEADLINE")
    return float(value) if value else None


def save_tuning(path: str | None) -> None:
    if path:
        from tacq_kernels import kernels

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kernels.save_cache(path)


def load_tuning(path: str | None) -> None:
    if path and os.path.exists(path):
        from tacq_kernels import kernels

        print(f"loaded {kernels.load_cache(path)} tuned configs from {path}", flush=True)

"""Time the CUDA C++ GEMV (tacq_cuda::gemv) against the Triton GEMV and torch.matmul (fp16 W).

The Triton GEMV runs its tuned config, or its default one under TACQ_AUTOTUNE=0 (what
benchmarks/gpu_check.sh uses, to fit its budget; bench-kernels times the tuned Triton paths).

    python benchmarks/bench_cuda_gemv.py [--dry-run] [--out cuda-gemv.json] [--tuning-cache FILE]

Llama-3-8B and Llama-2-70B layer shapes, M = 1, 4, 8, 2- and 3-bit affine per row (TACQ's
default) plus 3-bit LUT, fp16 activations, 0.35 % outliers. Each time is the median of
triton.testing.do_bench (CUDA events; weights bigger than L2 are streamed from DRAM on every
call). The JSON records per case the three times, the speedups and the CUDA path's error against
the reference; benchmarks/gpu_check.sh runs it (step cuda-gemv-bench) and the dispatch default
(tacq_kernels.cuda_ext.DEFAULT_MODE) is to be set from its results.

--dry-run (no GPU): lists the cases and checks the host re-statement of the kernel
(tacq_kernels.cuda_ext.host_gemv) against the reference on a small layer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tacq_kernels import cuda_ext, reference  # noqa: E402
from tacq_kernels.testing import random_layer  # noqa: E402

MODELS = {
    "llama3-8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)],
    "llama2-70b": [("qkv", 8192, 10240), ("o", 8192, 8192), ("gate_up", 8192, 57344), ("down", 28672, 8192)],
}
M_VALUES = (1, 4, 8)
FORMATS = [(2, "affine"), (3, "affine"), (3, "lut")]


def cases():
    for model, layers in MODELS.items():
        for name, k, n in layers:
            for bits, decoder in FORMATS:
                for m in M_VALUES:
                    yield dict(model=model, layer=name, K=k, N=n, bits=bits, decoder=decoder, M=m)


def run_gpu(args) -> dict:
    from triton.testing import do_bench

    from tacq_kernels.kernels import gemv, load_cache, save_cache
    from tacq_kernels.ops import spec_to_ints

    if args.tuning_cache and os.path.exists(args.tuning_cache):
        load_cache(args.tuning_cache)
    if not cuda_ext.load():
        raise SystemExit(f"CUDA extension not available: {cuda_ext.load_error()}")
    deadline = float(os.environ.get("GPU_CHECK_STEP_DEADLINE", "inf")) - 20
    records, layers = [], {}
    for case in cases():
        if time.time() > deadline:
            print("stopping: step deadline near", flush=True)
            break
        key = (case["K"], case["N"], case["bits"], case["decoder"])
        if key not in layers:
            layers.clear()
            torch.cuda.empty_cache()
            layers[key] = random_layer(case["N"], case["K"], bits=case["bits"], decoder=case["decoder"],
                                       outlier_frac=0.0035, perm=case["decoder"] == "lut", device="cuda",
                                       generate_on_device=True)
        layer = layers[key]
        tensors, ints = [layer.tensors[n] for n in layer.spec.tensor_specs()], spec_to_ints(layer.spec)
        x = torch.randn(case["M"], case["K"], device="cuda").half()
        w = torch.randn(case["K"], case["N"], device="cuda").half()  # the fp16 weight a dense layer would read
        y = torch.ops.tacq_cuda.gemv(x, tensors, ints)
        y_ref = x.float() @ reference.dequantize(layer).t()
        err = float((y.float() - y_ref).norm() / y_ref.norm())
        t_cuda = do_bench(lambda: torch.ops.tacq_cuda.gemv(x, tensors, ints), warmup=10, rep=50)
        t_triton = do_bench(lambda: gemv(x, layer), warmup=10, rep=50)
        t_fp16 = do_bench(lambda: torch.matmul(x, w), warmup=10, rep=50)
        del w
        rec = dict(case, cuda_us=1e3 * t_cuda, triton_us=1e3 * t_triton, matmul_fp16_us=1e3 * t_fp16,
                   cuda_vs_triton=t_triton / t_cuda, cuda_vs_matmul=t_fp16 / t_cuda, cuda_rel_err=err)
        records.append(rec)
        print(f"{case['model']:10s} {case['layer']:8s} K={case['K']:5d} N={case['N']:5d} {case['bits']}b "
              f"{case['decoder']:6s} M={case['M']}: cuda {rec['cuda_us']:7.1f} us  triton {rec['triton_us']:7.1f} us  "
              f"fp16 {rec['matmul_fp16_us']:7.1f} us  err {err:.1e}", flush=True)
    if args.tuning_cache:
        save_cache(args.tuning_cache)
    return dict(gpu=torch.cuda.get_device_name(), records=records)


def run_dry(args) -> dict:
    planned = list(cases())
    layer = random_layer(64, 200, bits=3, outlier_frac=0.01, perm=True, seed=3)
    x = torch.randn(4, 200)
    y = cuda_ext.host_gemv(x, layer)
    want = x @ reference.dequantize(layer).t()
    err = float((y - want).norm() / want.norm())
    print(f"dry run: {len(planned)} cases planned; host re-statement of the kernel vs reference: {err:.1e}")
    if not err < 1e-5:
        raise SystemExit(f"host re-statement disagrees with the reference: {err}")
    return dict(dry_run=True, planned=len(planned), host_rel_err=err)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tuning-cache", default=None)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU: use --dry-run", file=sys.stderr)
        return 2
    result = run_dry(args) if args.dry_run else run_gpu(args)
    result.update(commit=os.environ.get("TACQ_COMMIT", ""), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The optional CUDA C++ decode GEMV (csrc/, docs/cuda.md): build, load, compile checks, dispatch.

The extension is the op ``torch.ops.tacq_cuda.gemv(x, tensors, spec_ints)`` (same arguments as
``tacq_kernels::quant_linear``, M = 1..8, fp16/bf16 x). It is built

* by ``setup.py`` (module ``tacq_kernels._cuda``) when torch has CUDA and nvcc is present and
  ``TACQ_NO_CUDA_EXT`` is not 1 (:func:`build_skip_reason` says why not);
* or just in time by :func:`load` through ``torch.utils.cpp_extension.load``.

The package never needs it: :func:`load` returns False where it cannot be had, and the op
``tacq_kernels::quant_linear`` uses it only when :func:`use_cuda` says so (``TACQ_CUDA``: ``0``
never, ``1`` whenever it loads and supports the layer, ``auto`` where a correctness probe and a
timing against the Triton GEMV on this GPU found it correct and faster, cached with the Triton
tuning cache). Unset means ``0`` until a GPU run has verified the kernel (docs/cuda.md).

Without a GPU, :func:`compile_cubin` compiles the kernel file for one sm and reads ptxas's
register and spill report, and :func:`host_library` builds the host test library of the decode
functions (tests/test_cuda_ext.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
KERNEL_SOURCE = os.path.join(CSRC, "tacq_gemv.cu")
BINDING_SOURCE = os.path.join(CSRC, "tacq_ops.cpp")
HOST_TEST_SOURCE = os.path.join(CSRC, "tacq_host_test.cpp")
HEADERS = [os.path.join(CSRC, f) for f in ("tacq_decode.cuh", "tacq_gemv.h")]
BUILD_DIR = os.environ.get("TACQ_CUDA_BUILD_DIR", os.path.join(ROOT, "build", "cuda"))
NVCC_FLAGS = ["-std=c++17", "-O3", "--use_fast_math"]
ARCHS = (80, 86, 89, 90)
MAX_M = 8
# Default of TACQ_CUDA while no GPU has verified the kernel (docs/cuda.md): off.
DEFAULT_MODE = "0"


# --------------------------------------------------------------------------------------------
# Toolchain and build decisions
# --------------------------------------------------------------------------------------------


def nvcc_path() -> str | None:
    """nvcc on PATH, else under CUDA_HOME / CUDA_PATH / /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return None


def cuda_include_dir() -> str | None:
    """The CUDA toolkit's include directory (cuda_runtime_api.h), next to nvcc or under
    CUDA_HOME / CUDA_PATH / /usr/local/cuda (nvcc may be a wrapper script elsewhere)."""
    nvcc = nvcc_path()
    roots = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    roots += [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in roots:
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime_api.h")):
            return os.path.join(root, "include")
    return None


def build_skip_reason() -> str | None:
    """Why the extension is not built here (None: it can be): TACQ_NO_CUDA_EXT=1, a torch
    without CUDA, or no nvcc."""
    if os.environ.get("TACQ_NO_CUDA_EXT", "0") == "1":
        return "TACQ_NO_CUDA_EXT=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    if nvcc_path() is None:
        return "nvcc not found (PATH, CUDA_HOME)"
    return None


def _digest(paths, *extra) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    for e in extra:
        h.update(repr(e).encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Compile checks without a GPU
# --------------------------------------------------------------------------------------------

_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(text: str) -> dict[str, dict]:
    """ptxas -v output -> {mangled kernel: {registers, spill_stores, spill_loads, stack}}."""
    out: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        found = _PTXAS_ENTRY.search(line)
        if found:
            current = out.setdefault(found[1], {"arch": int(found[2])})
            continue
        if current is None:
            continue
        found = _PTXAS_SPILL.search(line)
        if found:
            current.update(stack=int(found[1]), spill_stores=int(found[2]), spill_loads=int(found[3]))
        found = _PTXAS_REGS.search(line)
        if found:
            current["registers"] = int(found[1])
    return out


def compile_cubin(arch: int, out_dir: str | None = None, *, torch_headers: bool = True) -> tuple[str, dict]:
    """Compile csrc/tacq_gemv.cu for sm_<arch> to a cubin (cached by source hash); returns
    (cubin path, ptxas report per kernel). ``torch_headers`` puts torch's include directories
    on the include path, as the extension build does (the CPU torch ships them)."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found")
    out_dir = out_dir or BUILD_DIR
    os.makedirs(out_dir, exist_ok=True)
    includes = [f"-I{CSRC}"]
    if torch_headers:
        from torch.utils.cpp_extension import include_paths

        includes += [f"-I{p}" for p in include_paths()]
    flags = NVCC_FLAGS + [f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v"] + includes
    tag = _digest([KERNEL_SOURCE] + HEADERS, flags, subprocess.run([nvcc, "--version"], capture_output=True,
                                                                   text=True).stdout)
    cubin = os.path.join(out_dir, f"tacq_gemv_sm{arch}_{tag}.cubin")
    log = cubin[: -len(".cubin")] + ".ptxas.txt"
    if not (os.path.exists(cubin) and os.path.exists(log)):
        tmp = cubin + f".tmp{os.getpid()}"
        result = subprocess.run(["nice", "-n", "10", nvcc, *flags, "-o", tmp, KERNEL_SOURCE], capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed for sm_{arch}:\n{result.stderr[-4000:]}")
        with open(log + f".tmp{os.getpid()}", "w") as f:
            f.write(result.stderr + result.stdout)
        os.replace(log + f".tmp{os.getpid()}", log)
        os.replace(tmp, cubin)
    with open(log) as f:
        return cubin, parse_ptxas(f.read())


def kernel_name(bits: int, mode: int, mt: int, centred: bool = True) -> str:
    """A unique substring of the mangled name of gemv_kernel<BITS, MODE, MT, CENTRED> (mode 0:
    one group per row, 1: groups a multiple of 32, 2: generic)."""
    return f"gemv_kernelILi{bits}ELi{mode}ELi{mt}ELb{int(centred)}E"


def weights_per_iteration(bits: int) -> int:
    """Weights one thread decodes per iteration of the chunk loop: 32 K rows x 4 columns."""
    return 32 * 4


def count_sass(cubin: str, bits: int, mode: int = 0, mt: int = 1, centred: bool = True):
    """The SASS cost report's count (tacq_kernels.kernels.sass) of one instantiation's hot loop."""
    from .kernels.sass import count_hot_loop, disassemble

    return count_hot_loop(cubin, kernel_name(bits, mode, mt, centred), weights_per_iteration(bits))


# --------------------------------------------------------------------------------------------
# Host test library (the __host__ __device__ decode functions on the CPU)
# --------------------------------------------------------------------------------------------

_HOST_LIB = None


def host_library(out_dir: str | None = None) -> ctypes.CDLL:
    """Build (cached by source hash) and load csrc/tacq_host_test.cpp: with nvcc as CUDA source
    (so the decode functions compile as __host__ __device__), else with the C++ compiler."""
    global _HOST_LIB
    if _HOST_LIB is not None:
        return _HOST_LIB
    out_dir = out_dir or BUILD_DIR
    os.makedirs(out_dir, exist_ok=True)
    nvcc = nvcc_path()
    if nvcc:
        cmd = [nvcc, "-std=c++17", "-O1", "-x", "cu", "--shared", "-Xcompiler", "-fPIC", f"-I{CSRC}"]
    else:
        cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
        if cxx is None:
            raise FileNotFoundError("neither nvcc nor a C++ compiler found")
        cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{CSRC}"]
    tag = _digest([HOST_TEST_SOURCE] + HEADERS, cmd)
    path = os.path.join(out_dir, f"tacq_host_test_{tag}.so")
    if not os.path.exists(path):
        tmp = path + f".tmp{os.getpid()}"
        result = subprocess.run(["nice", "-n", "10", *cmd, "-o", tmp, HOST_TEST_SOURCE], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"host test build failed: {' '.join(cmd)}\n{result.stderr[-4000:]}")
        os.replace(tmp, path)
    lib = ctypes.CDLL(path)
    u32, i32, f32p, vp = ctypes.c_uint32, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p
    lib.tacq_xprep_row.argtypes, lib.tacq_xprep_row.restype = [i32, i32], i32
    lib.tacq_xprep_pos.argtypes, lib.tacq_xprep_pos.restype = [i32, i32], i32
    lib.tacq_code_at.argtypes, lib.tacq_code_at.restype = [i32, u32, u32, i32], u32
    lib.tacq_spread_q1.argtypes, lib.tacq_spread_q1.restype = [u32, i32], u32
    lib.tacq_half_to_float.argtypes, lib.tacq_half_to_float.restype = [u32], ctypes.c_float
    lib.tacq_decode_word.argtypes, lib.tacq_decode_word.restype = [i32, u32, u32, f32p], None
    lib.tacq_decode_word_centred.argtypes, lib.tacq_decode_word_centred.restype = [i32, u32, u32, f32p], None
    lib.tacq_decode_constants.argtypes, lib.tacq_decode_constants.restype = [i32, i32, f32p], None
    lib.tacq_decode_center.argtypes, lib.tacq_decode_center.restype = [i32], ctypes.c_float
    lib.tacq_host_gemv.argtypes = [i32, i32, i32, vp, vp, i32, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp]
    lib.tacq_host_gemv.restype = None
    _HOST_LIB = lib
    return lib


def host_gemv(x: torch.Tensor, layer) -> torch.Tensor:
    """y = x @ (dequant(D) + S)^T in fp32 by the host re-statement of the kernel (no bias):
    csrc/tacq_host_test.cpp's tacq_host_gemv on CPU tensors."""
    lib = host_library()
    spec = layer.spec
    x = x.float().contiguous()
    m = x.shape[0]
    keep = [x]

    def ptr(t):
        if t is None:
            return None
        t = t.contiguous()
        keep.append(t)
        return t.data_ptr()

    def ptr_array(values):
        arr = (ctypes.c_void_p * len(values))(*[ptr(v) for v in values])
        keep.append(arr)
        return ctypes.cast(arr, ctypes.c_void_p)

    segs = [layer.segment_tensors(i) for i in range(len(spec.segments))]
    ints = []
    for s in spec.segments:
        ints += [s.start, s.k, s.bits, int(s.decoder == "lut"), s.group_size or 0]
    ints_t = torch.tensor(ints, dtype=torch.int32)
    as_u16 = lambda t: None if t is None else t.view(torch.int16)  # noqa: E731
    t = layer.tensors
    col = t["sparse_col"].to(torch.int32)
    y = torch.empty(m, spec.out_features, dtype=torch.float32)
    lib.tacq_host_gemv(
        m, spec.out_features, spec.in_features, ptr(x), ptr(layer.perm), len(segs), ptr(ints_t),
        ptr_array([sg.get("q2", sg.get("q4")) for sg in segs]), ptr_array([sg.get("q1") for sg in segs]),
        ptr_array([as_u16(sg.get("scale")) for sg in segs]), ptr_array([as_u16(sg.get("zero")) for sg in segs]),
        ptr_array([as_u16(sg.get("lut")) for sg in segs]), ptr(t["sparse_row_ptr"]), ptr(col),
        ptr(as_u16(t["sparse_val"])), ptr(y),
    )
    return y


# --------------------------------------------------------------------------------------------
# Loading the extension
# --------------------------------------------------------------------------------------------

_LOADED: bool | None = None
_LOAD_ERROR: str | None = None


def _register_fake() -> None:
    @torch.library.register_fake("tacq_cuda::gemv")
    def _gemv_fake(x, tensors, spec_ints):
        return x.new_empty((x.shape[0], spec_ints[1]))

    @torch.library.register_fake("tacq_cuda::gemv_out")
    def _gemv_out_fake(x, tensors, spec_ints, out):
        return None


def load(jit: bool | None = None, verbose: bool = False) -> bool:
    """Make ``torch.ops.tacq_cuda.gemv`` available: the module setup.py built
    (``tacq_kernels._cuda``), else (``jit`` not False, and :func:`build_skip_reason` is None) a
    build through ``torch.utils.cpp_extension.load`` into build/cuda/jit. Returns whether the op
    is there; :func:`load_error` says why not."""
    global _LOADED, _LOAD_ERROR
    if _LOADED is not None:
        return _LOADED
    _LOADED = False
    try:
        from . import _cuda  # noqa: F401  (built by setup.py; registers the op on import)

        _LOADED = True
    except ImportError as e:
        _LOAD_ERROR = f"no prebuilt tacq_kernels._cuda ({e})"
    if not _LOADED and jit is not False:
        reason = build_skip_reason()
        if reason is not None:
            _LOAD_ERROR = f"{_LOAD_ERROR}; no JIT build: {reason}"
        else:
            try:
                from torch.utils.cpp_extension import load as cpp_load

                build = os.path.join(BUILD_DIR, "jit")
                os.makedirs(build, exist_ok=True)
                cpp_load(name="tacq_cuda_ext", sources=[BINDING_SOURCE, KERNEL_SOURCE], extra_include_paths=[CSRC],
                         extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=NVCC_FLAGS, build_directory=build,
                         is_python_module=False, verbose=verbose)
                _LOADED = True
            except Exception as e:  # a failed build must not break the package
                _LOAD_ERROR = f"{_LOAD_ERROR}; JIT build failed: {e}"
    if _LOADED:
        _register_fake()
    return _LOADED


def load_error() -> str | None:
    return _LOAD_ERROR


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def mode() -> str:
    """TACQ_CUDA: "0" (off), "1" (on where supported) or "auto" (probe and time); unset: DEFAULT_MODE."""
    value = os.environ.get("TACQ_CUDA", DEFAULT_MODE).strip().lower()
    return value if value in ("0", "1", "auto") else "0"


def supports(x: torch.Tensor, layer) -> bool:
    """Whether the kernel handles this call at all (what it checks, so that it never raises)."""
    spec = layer.spec
    if not (1 <= x.shape[0] <= MAX_M and x.dtype in (torch.float16, torch.bfloat16) and x.stride(1) == 1):
        return False
    if spec.out_features % 4 or not 1 <= len(spec.segments) <= 16:
        return False
    for name, t in layer.tensors.items():
        if not t.is_contiguous() or t.data_ptr() % 16:
            return False
    return True


_warned: set = set()


def use_cuda(x: torch.Tensor, layer) -> bool:
    """Whether ``tacq_kernels::quant_linear`` runs this CUDA call with the CUDA C++ GEMV."""
    chosen = mode()
    if chosen == "0" or not supports(x, layer):
        return False
    if not load():
        if chosen == "1" and "load" not in _warned:
            warnings.warn(f"tacq_kernels: TACQ_CUDA=1 but the CUDA extension is not available: {load_error()}",
                          stacklevel=3)
            _warned.add("load")
        return False
    if chosen == "1":
        return True
    return _probe(x, layer)


def _probe_key(x: torch.Tensor, layer) -> tuple:
    from .kernels import tuning

    spec = layer.spec
    segs = [v for s in spec.segments for v in (s.k, s.bits, s.decoder, s.group_size or 0)]
    # flat, so that tuning.save_cache / load_cache (JSON lists) give the same hashable key back
    return ("cuda_gemv", tuning.next_pow2(x.shape[0]), spec.out_features, spec.in_features, spec.has_perm,
            spec.nnz > 0, str(x.dtype), torch.cuda.get_device_name(x.device), *segs)


def _probe(x: torch.Tensor, layer) -> bool:
    """One correctness probe and one timing per shape and M bucket, cached in the Triton tuning
    cache (saved and loaded with it): the CUDA kernel must match the Triton GEMV on random x
    and be faster."""
    from .kernels import tuning
    from .kernels.gemv import gemv as triton_gemv
    from .ops import spec_to_ints

    key = _probe_key(x, layer)
    cached = tuning._cache.get(key)
    if cached is not None:
        return bool(cached["use"])
    if torch.cuda.is_current_stream_capturing():
        return False  # never probe during capture: warm up first (tacq_kernels.warmup)
    from triton.testing import do_bench

    tensors, ints = [layer.tensors[n] for n in layer.spec.tensor_specs()], spec_to_ints(layer.spec)
    probe = torch.randn(x.shape[0], layer.spec.in_features, device=x.device).to(x.dtype)
    got = torch.ops.tacq_cuda.gemv(probe, tensors, ints).float()
    want = triton_gemv(probe, layer).float()
    err = ((got - want).norm() / want.norm().clamp_min(1e-6)).item()
    correct = bool(torch.isfinite(got).all()) and err < 1e-2
    t_cuda = do_bench(lambda: torch.ops.tacq_cuda.gemv(probe, tensors, ints), warmup=5, rep=25) if correct else None
    t_triton = do_bench(lambda: triton_gemv(probe, layer), warmup=5, rep=25)
    use = correct and t_cuda < t_triton
    tuning._cache[key] = {"use": use, "rel_err": err, "cuda_ms": t_cuda, "triton_ms": t_triton}
    return use


# --------------------------------------------------------------------------------------------
# The SASS cost report of the CUDA kernel, beside the Triton GEMV's
# --------------------------------------------------------------------------------------------

SASS_CASES = [  # (bits, mode, group label, decoder, MT, centred)
    (b, mode, group, dec, mt, centred)
    for b in (2, 3, 4)
    for mode, group, dec in ((0, "row", "affine"), (1, "g128", "affine"), (2, "-", "lut"))
    for mt, centred in ((1, False), (1, True), (8, True))
    if not (mode == 2 and not centred)
]


def sass_records(archs=(90, 80), triton_report: str | None = None) -> list[dict]:
    """Count every SASS_CASES instantiation's chunk loop per weight (compiling, cached, as the
    tests do) and put the Triton GEMV's count of the same case (benchmarks/results/static/
    sass_report.json: gemv1 / gemv8, no perm) beside it."""
    import json

    from .kernels.sass import count_hot_loop, disassemble

    triton_report = triton_report or os.path.join(ROOT, "benchmarks", "results", "static", "sass_report.json")
    triton = {}
    if os.path.exists(triton_report):
        with open(triton_report) as f:
            for r in json.load(f)["records"]:
                if r["path"] in ("gemv1", "gemv8") and not r["perm"]:
                    triton[(r["path"], r["bits"], r["decoder"], r["group"], r["arch"])] = r["per_weight"]
    out = []
    for arch in archs:
        cubin, ptxas = compile_cubin(arch)
        listing = disassemble(cubin)  # once per arch: count_hot_loop takes the listing
        for bits, mode, group, dec, mt, centred in SASS_CASES:
            name = kernel_name(bits, mode, mt, centred)
            trips = {1: 32} if mode == 2 else None  # the generic path keeps its loop over the chunk's rows
            c = count_hot_loop(listing, name, weights_per_iteration(bits), inner_trips=trips)
            usage = next(v for k, v in ptxas.items() if name in k)
            out.append(dict(
                arch=arch, bits=bits, decoder=dec, group=group, M=mt, centred=centred, kernel=name,
                per_weight=c.per_weight, classes=c.classes, load_bytes=c.load_bytes, registers=usage["registers"],
                spill_bytes=usage["spill_stores"] + usage["spill_loads"],
                triton_per_weight=triton.get((f"gemv{mt}", bits, dec, group, arch)),
            ))
    return out


def sass_markdown(records: list[dict]) -> str:
    lines = ["| case | M | centred | sm | CUDA instr/w | Triton gemv instr/w | registers | spills | top classes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(r["classes"].items())[:4])
        tri = "-" if r["triton_per_weight"] is None else f"{r['triton_per_weight']:.2f}"
        case = f"{r['bits']}b {r['decoder']}" + ("" if r["group"] == "-" else f" {r['group']}")
        lines.append(f"| {case} | {r['M']} | {'yes' if r['centred'] else 'no'} | {r['arch']} | {r['per_weight']:.2f} | "
                     f"{tri} | {r['registers']} | {r['spill_bytes']} | {top} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """python -m tacq_kernels.cuda_ext [--arch 90 80] [--out benchmarks/results/static]: the SASS
    report of the CUDA kernel (cuda_sass_report.json / .md)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "static"))
    args = parser.parse_args(argv)
    records = sass_records(args.arch)
    md = sass_markdown(records)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    nvcc = subprocess.run([nvcc_path(), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    with open(os.path.join(args.out, "cuda_sass_report.json"), "w") as f:
        json.dump(dict(commit=commit, nvcc=nvcc, flags=NVCC_FLAGS, records=records), f, indent=1)
    with open(os.path.join(args.out, "cuda_sass_report.md"), "w") as f:
        f.write(f"CUDA GEMV (csrc/tacq_gemv.cu) hot-loop counts, nvcc {nvcc}, commit {commit}\n\n" + md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

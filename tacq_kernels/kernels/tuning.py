"""Config selection for the Triton kernels: a tiny autotuner with an explicit cache.

Why not ``triton.autotune``: the split-K count decides the size of the fp32 workspace and whether
a reduction launch follows, so the launcher must know the config *before* it launches, and the
time that matters is kernel + reduction, not the kernel alone. So each launcher builds a short
list of candidate configs from the shape, and :func:`pick` times the whole launch for each one
(once per key, with ``triton.testing.do_bench``) and remembers the fastest.

Timing needs a GPU and must not happen while a CUDA graph is being captured: run
:func:`tacq_kernels.warmup` over a model for the batch sizes it will see before capturing.
A key first met during capture, under the interpreter, without a GPU, or with
``TACQ_AUTOTUNE=0`` takes the first candidate, which every launcher orders as its default.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Callable, Hashable, Sequence

import torch

Config = dict  # BLOCK_* sizes, SPLIT_K, num_warps, num_stages

_cache: dict[Hashable, Config] = {}
_warned_capture = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    return os.environ.get("TACQ_AUTOTUNE", "1") != "0"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device; the interpreter pretends to have 4 so that
    split-K still happens (and is tested) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def pick(key: Hashable, candidates: Sequence[Config], bench: Callable[[Config], None], device: torch.device) -> Config:
    """The fastest of ``candidates`` for ``key`` (timed once, then cached); see the module doc."""
    global _warned_capture
    if not candidates:
        raise ValueError(f"no kernel config fits {key}")
    cached = _cache.get(key)
    if cached is not None:
        return cached
    if len(candidates) == 1 or device.type != "cuda" or interpreting() or not autotune_enabled():
        return candidates[0]
    if torch.cuda.is_current_stream_capturing():
        if not _warned_capture:
            warnings.warn(
                "tacq_kernels: a kernel shape was first seen during CUDA-graph capture, so it runs an untuned "
                "default config; call tacq_kernels.warmup(model, batch_sizes=...) before capturing",
                stacklevel=3,
            )
            _warned_capture = True
        return candidates[0]
    import triton
    from triton.testing import do_bench

    compile_errors = tuple(
        getattr(module, name)
        for module, name in [
            (triton.runtime.errors, "OutOfResources"),  # shared memory or registers beyond this GPU's
            (triton.runtime.errors, "PTXASError"),
            (triton.compiler.errors, "CompilationError"),
        ]
        if hasattr(module, name)
    )
    best, best_ms = None, math.inf
    for cfg in candidates:
        try:
            ms = do_bench(lambda: bench(cfg), warmup=5, rep=25)
        except compile_errors:
            continue  # a config this GPU cannot run; the others compete
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"tacq_kernels: no candidate config compiled for {key}")
    _cache[key] = best
    return best


def clear_cache() -> None:
    _cache.clear()


def save_cache(path: str | os.PathLike) -> None:
    """Write the tuned configs to JSON, so that a later process can skip tuning (:func:`load_cache`)."""
    with open(path, "w") as f:
        json.dump([[list(k), v] for k, v in _cache.items()], f)


def load_cache(path: str | os.PathLike) -> int:
    """Read configs written by :func:`save_cache` (same GPU model assumed); returns how many."""
    with open(path) as f:
        entries = json.load(f)
    for key, cfg in entries:
        _cache[tuple(key)] = cfg
    return len(entries)

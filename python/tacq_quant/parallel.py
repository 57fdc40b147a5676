"""Quantize every decoder linear on its own, with Hessians given in advance, across processes.

TACQ's Q(W) is only an estimate of the final perturbation (the final pass runs again with the
mask), so its pass need not be sequential: with every Hessian taken on the *unquantized* model
(in the gradient pass's forwards, :func:`tacq_quant.tacq.accumulate_abs_gradients`), no
quantized layer feeds the next, no calibration forward is needed, and the 210 matrices of the
default model are independent. The quantizers run Python-level column loops (CLAQ's k-means per
column) that use one core each, so the matrices are shared out to ``workers`` forked processes.

Each matrix is quantized exactly as in a sequential pass with that Hessian (the same quantizer
function, the same per-matrix seeds), so the result does not depend on the number of workers
(``tests/test_quant_tacq.py`` checks 1 against 2).
"""

from __future__ import annotations

import multiprocessing
import os
import time

import torch
from torch import nn

from .sequential import LayerReport, SequentialResult, find_decoder_layers, linear_names, quantize_linear

# read by the forked workers (inherited memory: nothing of it is pickled)
_JOB: dict = {}


def default_workers() -> int:
    """One worker per core the process may use, at most 2 (the quantizers' loops are serial)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(2, cores))


def _quantize_one(name: str):
    device = _JOB["device"]
    bias = _JOB["biases"][name]
    _, packed, w_eff, report = quantize_linear(
        name, _JOB["weights"][name].to(device), _JOB["hessians"][name].to(device),
        None if bias is None else bias.to(device), _JOB["quantize"])
    if device.type != "cpu":
        packed, w_eff = packed.to("cpu"), w_eff.cpu()
    return name, packed, w_eff, report


def _init_worker() -> None:
    torch.set_num_threads(1)


def quantize_independent(
    model: nn.Module,
    hessians: dict[str, torch.Tensor],
    quantize_weight,
    *,
    workers: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    store=None,
) -> tuple[SequentialResult, dict[str, torch.Tensor]]:
    """Quantize every decoder linear of ``model`` with ``hessians[name]`` (fp32 [K, K], CPU; only
    needed for the layers not yet in ``store``);
    the model is left unchanged. Returns the packed layers with their reports, and the effective
    (decoded) weight of every linear, by full name, in model order.

    ``store`` (a :class:`tacq_quant.progress.LayerStore`): decoder layers already saved there are
    loaded instead of quantized, and each finished one is saved (as a sequential pass does).
    ``workers``: processes (default :func:`default_workers`); 1 runs in this process, and so
    does a CUDA ``device`` (default: CUDA if available), which a forked process cannot use.
    """
    from tqdm.auto import tqdm

    from tacq_kernels.reference import dequantize

    from .progress import checkpoint, test_point

    start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prefix, layers = find_decoder_layers(model)
    per_layer = []
    for li, layer in enumerate(layers):
        modules = dict(layer.named_modules())
        per_layer.append({f"{prefix}.{li}.{n}": modules[n] for n in linear_names(layer)})
    result = SequentialResult()
    effective: dict[str, torch.Tensor] = {}
    stage = store.stage if store is not None else "pass"
    done = min(store.completed(), len(layers)) if store is not None else 0
    todo = [n for group in per_layer[done:] for n in group]
    missing = [n for n in todo if n not in hessians]
    if missing:
        raise ValueError(f"no Hessian for {missing[0]}")
    for li in range(done):
        packed, reports = store.load(li)
        result.packed.update(packed)
        result.reports.extend(LayerReport(**r) for r in reports)
        effective.update({n: dequantize(p).to(torch.float32) for n, p in packed.items()})
    _JOB.update(
        quantize=quantize_weight,
        device=device,
        weights={n: m.weight.detach().to("cpu", torch.float32) for g in per_layer[done:] for n, m in g.items()},
        biases={n: None if m.bias is None else m.bias.detach().cpu() for g in per_layer[done:] for n, m in g.items()},
        hessians={n: hessians[n] for n in todo},
    )
    workers = 1 if device.type != "cpu" else default_workers() if workers is None else workers
    pool = None
    bar = tqdm(total=sum(len(g) for g in per_layer), initial=sum(len(g) for g in per_layer[:done]),
               desc=f"quantize ({workers} process{'es' if workers > 1 else ''})", unit="linear",
               disable=not progress, dynamic_ncols=True)
    try:
        if workers > 1 and len(todo) > 1:
            pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker)
            outputs = pool.imap(_quantize_one, todo)
        else:
            outputs = map(_quantize_one, todo)
        for li in range(done, len(layers)):
            names = list(per_layer[li])
            for _ in names:  # imap keeps the order of todo: this layer's linears, in order
                name, packed, w_eff, report = next(outputs)
                short = name[len(f"{prefix}.{li}."):]
                result.packed[name] = packed
                result.reports.append(report)
                effective[name] = w_eff
                bar.set_description(f"layer {li}/{len(layers)} {short}")
                bar.update(1)
                test_point(f"{stage}:{li}:{short}")
            if store is not None:
                store.save(li, {n: result.packed[n] for n in names}, [r.__dict__ for r in result.reports[-len(names):]])
                test_point(f"{stage}-saved:{li}")
                checkpoint(f"layer {li} of {len(layers)} of the {'Q(W)' if stage == 'qw' else stage} pass")
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        _JOB.clear()
    result.seconds = time.perf_counter() - start
    return result, effective

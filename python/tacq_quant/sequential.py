"""Layer-by-layer quantization of a decoder-only model (the GPTQ recipe), for every method.

1. The calibration windows run through the model up to the first decoder layer, where a
   pre-forward hook records that layer's inputs (hidden states and keyword arguments: attention
   mask, position embeddings, ...) and stops the forward.
2. For each decoder layer in turn (moved alone to the device): forward hooks on its linear layers
   accumulate the Hessian ``2/n sum x x^T`` of their inputs; each weight is quantized by the
   method; the weight is replaced by exactly what the checkpoint will decode (dense codes plus the
   fp16 sparse correction); then the layer's outputs, computed with the quantized weights, become
   the next layer's inputs.
3. With ``true_sequential`` (the default, as in the TACQ and CLAQ scripts) a Llama layer is done in
   four steps, {q, k, v} -> {o} -> {gate, up} -> {down}: each step's Hessians are collected with
   the earlier steps already quantized. A forward stops as soon as the hooked modules have seen
   their inputs (pre-hooks: the last of them does not even run), so early steps do not pay for
   the rest of the layer.
4. On such a layer the later steps also skip what no quantization changed
   (:class:`_CachedLlamaLayer`): the {o} step keeps o_proj's inputs (the attention output, final
   once q/k/v are quantized), so the {gate, up} and {down} steps and the layer's outputs replay
   the attention as ``o_proj(cached input)`` instead of recomputing it, and the outputs take
   down_proj's cached inputs instead of recomputing the MLP. That is about half the arithmetic of
   plain forwards, with identical results: for the first batch of every layer the replayed
   tensors are compared with a full forward and the layer falls back to full forwards (with a
   warning) if they differ.

Memory holds one decoder layer on the device plus the activations of the calibration set
(``nsamples * seqlen * hidden`` floats, twice). Nothing else of the model leaves the CPU.
"""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from tacq_kernels import PackedLayer

from .gptq import HessianAccumulator, relative_output_error
from .quantized_weight import QuantizedWeight

LLAMA_SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
DECODER_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers")


class WeightQuantizer(Protocol):
    """A method as the driver sees it: one weight and its Hessian in, a QuantizedWeight out."""

    def __call__(self, name: str, weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedWeight: ...


@dataclass
class LayerReport:
    name: str
    out_features: int
    in_features: int
    rel_error: float
    bits_weights: float
    bits_total: float
    nnz: int
    seconds: float
    peak_mem_mb: float
    segments: str = ""

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass
class SequentialResult:
    packed: dict[str, PackedLayer] = field(default_factory=dict)
    reports: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0


class _StopForward(Exception):
    """Raised from a hook once everything needed from a forward pass has been recorded."""


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for path in DECODER_LAYER_PATHS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod):
            return path, mod
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (looked for {DECODER_LAYER_PATHS})")


def linear_names(layer: nn.Module) -> list[str]:
    return [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]


def sequential_groups(layer: nn.Module, true_sequential: bool) -> list[list[str]]:
    names = linear_names(layer)
    if true_sequential and sorted(names) == sorted(n for g in LLAMA_SEQUENTIAL_GROUPS for n in g):
        return [list(g) for g in LLAMA_SEQUENTIAL_GROUPS]
    return [names]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_layer0_inputs(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int):
    """Run the calibration windows up to the first decoder layer; return (inputs, kwargs per batch).

    ``inputs`` is a list of hidden-state batches on ``device``.
    """
    prefix, layers = find_decoder_layers(model)
    parent = model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else model
    moved = [m for name, m in parent.named_children() if m is not layers]
    for m in moved:
        m.to(device)
    inputs, kwargs_list = [], []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden.detach())
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in range(0, windows.shape[0], batch_size):
                try:
                    model(input_ids=windows[b:b + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
        if device.type != "cpu":
            for m in moved:
                m.to("cpu")
    return inputs, kwargs_list


def quantize_linear(name: str, weight: torch.Tensor, hessian: torch.Tensor, bias: torch.Tensor | None,
                    quantize_weight: WeightQuantizer) -> tuple[QuantizedWeight, PackedLayer, torch.Tensor, LayerReport]:
    """One linear: quantize ``weight`` with its ``hessian``, pack it, decode it back. Returns the
    QuantizedWeight, the packed layer, the effective weight (what the checkpoint decodes to, on
    ``weight``'s device and dtype) and its summary row. The weight itself is not changed."""
    device = weight.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    qw = quantize_weight(name, weight, hessian)
    packed = qw.pack(name, bias)
    w_eff = qw.effective_weight(packed).to(device=device, dtype=weight.dtype)
    bpw = packed.spec.bits_per_weight()
    report = LayerReport(
        name=name, out_features=packed.spec.out_features, in_features=packed.spec.in_features,
        rel_error=relative_output_error(weight, w_eff, hessian), bits_weights=bpw["weights"],
        bits_total=bpw["total"], nnz=packed.spec.nnz, seconds=time.perf_counter() - t0,
        peak_mem_mb=peak_memory_mb(device), segments=packed.spec.describe_bits(),
    )
    return qw, packed, w_eff, report


def quantize_sequential(
    model: nn.Module,
    windows: torch.Tensor,
    quantize_weight: WeightQuantizer,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    true_sequential: bool = True,
    progress: bool = True,
    on_layer: Callable[[str, QuantizedWeight], None] | None = None,
    store=None,
) -> SequentialResult:
    """Quantize every decoder-layer linear of ``model`` (in place) on calibration ``windows``
    [nsamples, seqlen] (token ids). The model's weights become the effective (decoded) weights;
    returns the packed layers and a report per layer.

    ``store`` (a :class:`tacq_quant.progress.LayerStore`): each finished decoder layer is saved
    there, and layers already saved are loaded instead of quantized (their weights set to what
    they decode to, their outputs recomputed), so an interrupted pass resumes with the same
    result. ``on_layer`` is not called for loaded layers.
    """
    from tqdm.auto import tqdm

    from .progress import checkpoint, test_point

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    prefix, layers = find_decoder_layers(model)
    model.eval()
    result = SequentialResult()
    stage = store.stage if store is not None else "pass"
    done = min(store.completed(), len(layers)) if store is not None else 0
    if done == len(layers):  # every layer saved: nothing to compute
        for li, layer in enumerate(layers):
            _restore_layer(store, li, layer, prefix, result)
        result.seconds = time.perf_counter() - start
        return result
    inputs, kwargs_list = capture_layer0_inputs(model, windows, device, batch_size)
    total = sum(len(linear_names(layer)) for layer in layers)
    bar = tqdm(total=total, desc="quantize", unit="linear", disable=not progress, dynamic_ncols=True)
    try:
        for li, layer in enumerate(layers):
            layer.to(device)
            if li < done:
                bar.update(_restore_layer(store, li, layer, prefix, result))
                with torch.no_grad():
                    inputs = [_layer_output(layer(x, **kw)) for x, kw in zip(inputs, kwargs_list)]
                if device.type != "cpu":
                    layer.to("cpu")
                continue
            modules = dict(layer.named_modules())
            first_report = len(result.reports)
            groups = sequential_groups(layer, true_sequential)
            cached = _CachedLlamaLayer.for_layer(layer, groups, name=f"{prefix}.{li}")
            for group in groups:
                hessians = (cached.collect_hessians(group, inputs, kwargs_list) if cached is not None
                            else _collect_hessians(layer, modules, group, inputs, kwargs_list, device))
                for short in group:
                    name = f"{prefix}.{li}.{short}"
                    bar.set_description(f"layer {li}/{len(layers)} {short}")
                    module = modules[short]
                    bias = None if module.bias is None else module.bias.data
                    qw, packed, w_eff, report = quantize_linear(name, module.weight.data, hessians[short], bias,
                                                                quantize_weight)
                    module.weight.data.copy_(w_eff)
                    if on_layer is not None:
                        on_layer(name, qw)
                    result.packed[name] = packed
                    result.reports.append(report)
                    bar.update(1)
                    test_point(f"{stage}:{li}:{short}")
                del hessians
            if store is not None:
                names = [r.name for r in result.reports[first_report:]]
                store.save(li, {n: result.packed[n] for n in names},
                           [r.__dict__ for r in result.reports[first_report:]])
                test_point(f"{stage}-saved:{li}")
                checkpoint(f"layer {li} of {len(layers)} of the {'Q(W)' if stage == 'qw' else 'final'} pass")
            with torch.no_grad():
                if cached is not None:
                    inputs = cached.outputs(inputs, kwargs_list)
                else:
                    inputs = [_layer_output(layer(x, **kw)) for x, kw in zip(inputs, kwargs_list)]
            del cached
            if device.type != "cpu":
                layer.to("cpu")
    finally:
        bar.close()
    result.seconds = time.perf_counter() - start
    return result


def _restore_layer(store, li: int, layer: nn.Module, prefix: str, result: SequentialResult) -> int:
    """Load saved decoder layer ``li``: its weights become exactly what they decode to (as after
    quantizing it), its packed layers and reports join ``result``. Returns the number of linears."""
    from tacq_kernels.reference import dequantize

    packed, reports = store.load(li)
    modules = dict(layer.named_modules())
    with torch.no_grad():
        for name, p in packed.items():
            short = name[len(f"{prefix}.{li}."):]
            if short not in modules:
                raise ValueError(f"saved layer {name} is not a module of decoder layer {li}")
            w = modules[short].weight
            w.data.copy_(dequantize(p).to(device=w.device, dtype=w.dtype))
    result.packed.update(packed)
    result.reports.extend(LayerReport(**r) for r in reports)
    return len(packed)


def _collect_hessians(layer, modules, group, inputs, kwargs_list, device, *, keep_input: str | None = None,
                      before_batch=None) -> dict[str, torch.Tensor]:
    """Hessians of the inputs of the linears in ``group`` over all calibration batches.

    ``keep_input``: a module of ``group`` whose input of every batch is also returned, as a list
    under the key ``"__inputs__"``. ``before_batch(b)`` is called before batch ``b`` runs (the
    cached layer sets its replay index there).
    """
    accs = {n: HessianAccumulator(modules[n].in_features, device) for n in group}
    seen: set[str] = set()
    xtx_cache: dict[tuple, tuple[torch.Tensor, int]] = {}
    kept: list[torch.Tensor] = []

    def make_hook(short):
        def hook(module, args):
            x = args[0].detach()
            # q/k/v (and gate/up) read the same tensor: compute its x^T x once per batch
            key = (x.data_ptr(), tuple(x.shape), x._version)
            if key not in xtx_cache:
                x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
                xtx_cache[key] = (x2.t() @ x2, x2.shape[0])
            accs[short].add_xtx(*xtx_cache[key])
            if short == keep_input:
                kept.append(x)
            seen.add(short)
            if len(seen) == len(group):
                raise _StopForward
        return hook

    handles = [modules[n].register_forward_pre_hook(make_hook(n)) for n in group]
    try:
        with torch.no_grad():
            for b, (x, kw) in enumerate(zip(inputs, kwargs_list)):
                seen.clear()
                xtx_cache.clear()
                if before_batch is not None:
                    before_batch(b)
                try:
                    layer(x, **kw)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    out = {n: acc.hessian() for n, acc in accs.items()}
    if keep_input is not None:
        out["__inputs__"] = kept
    return out


def _first_input(layer, module, x, kw) -> torch.Tensor:
    """The input ``module`` receives when ``layer`` runs on ``x`` (the forward stops there)."""
    got = []

    def hook(mod, args):
        got.append(args[0].detach())
        raise _StopForward

    h = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            layer(x, **kw)
    except _StopForward:
        pass
    finally:
        h.remove()
    return got[0]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6))


class _CachedLlamaLayer:
    """The true-sequential steps of one Llama-style decoder layer without recomputing what the
    earlier steps fixed (module docstring, point 4).

    Once q/k/v are quantized, the attention output of every batch is final: the {o} step keeps
    it (o_proj's input). Later steps replace ``self_attn.forward`` by ``o_proj(kept input)`` for
    the batch being run (the decoder layer's own code still does the residuals and norms), and the
    outputs also replace ``mlp.forward`` by ``down_proj(kept input)`` with down_proj's inputs kept
    by the {down} step. The replay is checked against a full forward on the first batch, twice:
    the MLP's input when the {gate, up} step starts and the layer's output at the end; a
    difference turns the replay off for the rest of the layer (full forwards, a warning).
    """

    def __init__(self, layer, name: str):
        self.layer, self.name = layer, name
        self.attn, self.mlp = layer.get_submodule("self_attn"), layer.get_submodule("mlp")
        self.modules = dict(layer.named_modules())
        self.o_proj, self.down_proj = self.modules["self_attn.o_proj"], self.modules["mlp.down_proj"]
        self.device = self.o_proj.weight.device
        self.attn_in: list[torch.Tensor] | None = None
        self.down_in: list[torch.Tensor] | None = None
        self.batch = 0
        self.enabled = True

    @classmethod
    def for_layer(cls, layer, groups, name: str):
        if [tuple(g) for g in groups] != list(LLAMA_SEQUENTIAL_GROUPS):
            return None
        try:
            return cls(layer, name)
        except (AttributeError, KeyError):
            return None

    def _replay_attention(self, *args, **kwargs):
        return self.o_proj(self.attn_in[self.batch]), None

    def _replay_mlp(self, *args, **kwargs):
        return self.down_proj(self.down_in[self.batch])

    def _set_batch(self, b: int) -> None:
        self.batch = b

    @contextlib.contextmanager
    def _patched(self, attention: bool, mlp: bool):
        """The attention (and the MLP) replayed from the kept inputs while the block runs."""
        if attention:
            self.attn.forward = self._replay_attention
        if mlp:
            self.mlp.forward = self._replay_mlp
        try:
            yield
        finally:
            self.attn.__dict__.pop("forward", None)
            self.mlp.__dict__.pop("forward", None)

    def _disable(self, what: str) -> None:
        import warnings

        warnings.warn(f"{self.name}: replaying the attention/MLP gave a different {what} than a full forward; "
                      "this layer falls back to full forwards", RuntimeWarning, stacklevel=3)
        self.enabled = False

    def collect_hessians(self, group, inputs, kwargs_list) -> dict[str, torch.Tensor]:
        first = tuple(group)
        replay = self.enabled and self.attn_in is not None
        if replay and first == LLAMA_SEQUENTIAL_GROUPS[2]:
            # check the replay once: the MLP's input, replayed vs from a full forward
            gate = self.modules[group[0]]
            ref = _first_input(self.layer, gate, inputs[0], kwargs_list[0])
            self.batch = 0
            with self._patched(attention=True, mlp=False):
                fast = _first_input(self.layer, gate, inputs[0], kwargs_list[0])
            if not _same(ref, fast):
                self._disable("MLP input")
                replay = False
        keep = {LLAMA_SEQUENTIAL_GROUPS[1]: "self_attn.o_proj", LLAMA_SEQUENTIAL_GROUPS[3]: "mlp.down_proj"}.get(first)
        if keep == "mlp.down_proj" and not replay:
            keep = None
        with self._patched(attention=True, mlp=False) if replay else contextlib.nullcontext():
            out = _collect_hessians(self.layer, self.modules, group, inputs, kwargs_list, self.device,
                                    keep_input=keep, before_batch=self._set_batch if replay else None)
        kept = out.pop("__inputs__", None)
        if keep == "self_attn.o_proj":
            self.attn_in = kept
        elif keep == "mlp.down_proj":
            self.down_in = kept
        return out

    @torch.no_grad()
    def outputs(self, inputs, kwargs_list) -> list[torch.Tensor]:
        """The layer's outputs (its inputs for the next layer), with the quantized weights."""
        if self.enabled and self.attn_in is not None and self.down_in is not None:
            outs = []
            with self._patched(attention=True, mlp=True):
                for b, (x, kw) in enumerate(zip(inputs, kwargs_list)):
                    self.batch = b
                    outs.append(_layer_output(self.layer(x, **kw)))
            ref = _layer_output(self.layer(inputs[0], **kwargs_list[0]))
            if _same(ref, outs[0]):
                return outs
            self._disable("layer output")
        return [_layer_output(self.layer(x, **kw)) for x, kw in zip(inputs, kwargs_list)]


def format_summary(reports: list[LayerReport], seconds: float | None = None) -> str:
    """A plain-text table: one row per quantized linear, then the totals (numel-weighted)."""
    head = f"{'layer':<40} {'shape':>11} {'bits':>11} {'rel.err':>8} {'w.bits':>6} {'tot.bits':>8} " \
           f"{'outl.%':>6} {'sec':>6} {'peakMB':>7}"
    lines = [head, "-" * len(head)]
    for r in reports:
        lines.append(
            f"{r.name:<40} {r.out_features:>5}x{r.in_features:<5} {r.segments:>11} {r.rel_error:>8.4f} "
            f"{r.bits_weights:>6.3f} {r.bits_total:>8.3f} {100 * r.nnz / r.numel:>6.3f} {r.seconds:>6.2f} "
            f"{r.peak_mem_mb:>7.0f}"
        )
    lines.append("-" * len(head))
    lines.append(summary_line(reports, seconds))
    return "\n".join(lines)


def summarize(reports: list[LayerReport]) -> dict:
    n = sum(r.numel for r in reports)
    if not n:
        return {}
    return {
        "layers": len(reports),
        "numel": n,
        "bits_weights": sum(r.bits_weights * r.numel for r in reports) / n,
        "bits_total": sum(r.bits_total * r.numel for r in reports) / n,
        "nnz": sum(r.nnz for r in reports),
        "outlier_frac": sum(r.nnz for r in reports) / n,
        "mean_rel_error": sum(r.rel_error for r in reports) / len(reports),
        "quantize_seconds": sum(r.seconds for r in reports),
        "peak_mem_mb": max(r.peak_mem_mb for r in reports),
    }


def summary_line(reports: list[LayerReport], seconds: float | None = None) -> str:
    s = summarize(reports)
    if not s:
        return "no layers quantized"
    wall = f", {seconds:.1f} s wall" if seconds is not None else ""
    return (
        f"{s['layers']} layers, {s['numel']:,} weights: {s['bits_weights']:.3f} bits (weights only), "
        f"{s['bits_total']:.3f} bits (all-inclusive), {s['nnz']:,} kept ({100 * s['outlier_frac']:.3f} %), "
        f"mean rel. error {s['mean_rel_error']:.4f}, {s['quantize_seconds']:.1f} s in the quantizers{wall}, "
        f"peak memory {s['peak_mem_mb']:.0f} MB"
    )

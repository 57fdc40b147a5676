"""One entry point for every method: ``quantize_model(model, calibration, config)``.

``rtn`` and ``gptq`` are one sequential pass; ``claq`` is one pass with the k-means column
quantizer; ``tacq`` is (1) the per-sample |gradient| pass on the unquantized model, which also
collects the unquantized model's Hessians, (2) its *base* quantizer without mask for Q(W): every
matrix on its own with those Hessians, in worker processes (:mod:`tacq_quant.parallel`;
``qw_hessians="sequential"``: a plain sequential pass instead, as the authors' code; or Q(W) read
from a checkpoint of that base made with the same settings), (3) the global top-k selection and
(4) the masked sequential pass of the base quantizer. The base is GPTQ's affine grid
(``base="gptq"``, the paper's TACQ) or CLAQ's per-column k-means codebooks (``base="claq"``: kept
weights are left out of the codebook fit, see :mod:`tacq_quant.claq`; fractional bits give
CLAQ's adaptive precision; ``codebook_weights`` weights the k-means by the gradients). Every
final pass goes through :func:`tacq_quant.sequential.quantize_sequential`, so all methods see the
same calibration activations, report the same table and produce format-v1 layers.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from tacq_kernels import PackedLayer

from .claq import KMeansColumnQuantizer, validate_claq_bits
from .data import CalibrationData
from .finetune import FinetuneConfig, finetune_layers
from .gptq import AffineColumnQuantizer, gptq_quantize
from .parallel import quantize_independent
from .quantized_weight import QuantizedWeight
from .rtn import rtn_quantize
from .sequential import LayerReport, find_decoder_layers, quantize_sequential, summarize
from .tacq import SALIENCY_KINDS, cached_abs_gradients, keep_count, saliency, select_top_k, target_linears

METHODS = ("rtn", "gptq", "tacq", "claq")
TACQ_BASES = ("gptq", "claq")
QW_HESSIANS = ("fp", "sequential")
CODEBOOK_WEIGHTS = ("none", "g", "g2")
DEFAULT_OUTLIER_FRAC = 0.0035


class ConfigError(ValueError):
    """Invalid quantization settings (one line for the user)."""


@dataclass
class QuantizeConfig:
    method: str
    bits: float
    group_size: int = -1
    outlier_frac: float = DEFAULT_OUTLIER_FRAC  # TACQ only
    saliency: str = "tacq"  # TACQ only: the score; qal / msg / magnitude are ablations
    base: str = "gptq"  # TACQ only: the quantizer of the non-kept weights (gptq: affine grid, claq: k-means)
    act_order: bool | None = None  # None: the method's default (CLAQ on, others off)
    true_sequential: bool = True
    percdamp: float = 0.01
    blocksize: int = 128
    clip_search: bool = True
    reserve_outliers: bool = False  # CLAQ outlier reservation (OR)
    kmeans_init: str = "kmeans++"
    seed: int = 0
    grad_max_batch_tokens: int = 2048
    grad_cache: str | None = None  # TACQ: reuse |gradients| across runs (depends on model + data only)
    corrupt_from: str | None = None  # TACQ: take Q(W) from this GPTQ checkpoint instead of a GPTQ pass
    qw_hessians: str = "fp"  # TACQ: Q(W)'s Hessians from the unquantized model ("fp") or a sequential pass
    workers: int | None = None  # TACQ, qw_hessians="fp": processes for the Q(W) pass (None: up to 2)
    codebook_weights: str = "none"  # TACQ over CLAQ: k-means weighted by the |gradient| sums G ("g") or G^2 ("g2")
    finetune_steps: int = 0  # any method: distillation steps on the stored 16-bit values afterwards (0: none)
    finetune_lr: float = FinetuneConfig.lr
    finetune_batch_size: int = FinetuneConfig.batch_size
    finetune_precision: str = FinetuneConfig.precision  # the fine-tune's matmuls: auto (bf16 where native), fp32, bf16

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.base not in TACQ_BASES:
            raise ConfigError(f"--base must be one of {', '.join(TACQ_BASES)}, got {self.base!r}")
        if self.method != "tacq" and self.base != "gptq":
            raise ConfigError("--base is a TACQ option (the quantizer under the kept weights)")
        if self.uses_kmeans:
            try:
                validate_claq_bits(self.bits)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        elif self.bits not in (2, 3, 4):
            raise ConfigError(f"{self.method} needs integer bits 2, 3 or 4, got {self.bits:g} "
                              "(fractional bits are CLAQ's adaptive precision: --method claq or --base claq)")
        if self.method == "tacq" and not 0 <= self.outlier_frac < 1:
            raise ConfigError(f"--outlier-frac must be in [0, 1), got {self.outlier_frac}")
        if self.group_size == 0 or self.group_size < -1:
            raise ConfigError(f"--group-size must be -1 (one group per row) or positive, got {self.group_size}")
        if self.uses_kmeans and self.group_size != -1:
            hint = " (TACQ with groups: --base gptq)" if self.method == "tacq" else ""
            raise ConfigError(f"CLAQ has one codebook per column; --group-size does not apply{hint}")
        if self.reserve_outliers and not self.uses_kmeans:
            raise ConfigError("--reserve-outliers is a CLAQ option (--method claq, or --method tacq --base claq)")
        if not 0 <= self.percdamp < 10:
            raise ConfigError(f"--percdamp must be in [0, 10), got {self.percdamp}")
        if self.blocksize <= 0:
            raise ConfigError(f"--blocksize must be positive, got {self.blocksize}")
        if self.saliency not in SALIENCY_KINDS:
            raise ConfigError(f"--saliency must be one of {', '.join(SALIENCY_KINDS)}, got {self.saliency!r}")
        # an input the chosen score never reads is a mistake in the run's set-up, not something to ignore
        if self.corrupt_from and self.saliency in ("msg", "magnitude"):
            raise ConfigError(f"--saliency {self.saliency} does not use Q(W); drop --corrupt-from")
        if self.grad_cache and self.saliency == "magnitude":
            raise ConfigError("--saliency magnitude uses no gradients; drop --grad-cache")
        if self.kmeans_init not in ("kmeans++", "quantile"):
            raise ConfigError(f"--kmeans-init must be kmeans++ or quantile, got {self.kmeans_init!r}")
        if self.qw_hessians not in QW_HESSIANS:
            raise ConfigError(f"--qw-hessians must be one of {', '.join(QW_HESSIANS)}, got {self.qw_hessians!r}")
        if self.codebook_weights not in CODEBOOK_WEIGHTS:
            raise ConfigError(f"--codebook-weights must be one of {', '.join(CODEBOOK_WEIGHTS)}, "
                              f"got {self.codebook_weights!r}")
        if self.codebook_weights != "none" and not (self.method == "tacq" and self.base == "claq"
                                                    and self.saliency != "magnitude"):
            raise ConfigError("--codebook-weights weights CLAQ's k-means by TACQ's gradients: it needs "
                              "--method tacq --base claq and a saliency with gradients")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        try:
            self.finetune_config().validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def finetune_config(self) -> FinetuneConfig:
        return FinetuneConfig(steps=self.finetune_steps, batch_size=self.finetune_batch_size, lr=self.finetune_lr,
                              precision=self.finetune_precision, seed=self.seed)

    @property
    def uses_kmeans(self) -> bool:
        """Whether the weights go to per-column k-means codebooks (CLAQ, or TACQ over CLAQ)."""
        return self.method == "claq" or (self.method == "tacq" and self.base == "claq")

    @property
    def runs_qw_pass(self) -> bool:
        """Whether TACQ quantizes the model once without mask for Q(W) (its score reads Q(W) and
        no ``corrupt_from`` checkpoint supplies it)."""
        return self.method == "tacq" and self.saliency in ("tacq", "qal") and not self.corrupt_from

    @property
    def effective_act_order(self) -> bool:
        return self.act_order if self.act_order is not None else self.uses_kmeans

    def method_args(self) -> dict:
        d = asdict(self)
        d["act_order"] = self.effective_act_order
        d.pop("grad_cache")
        d.pop("corrupt_from")
        d.pop("grad_max_batch_tokens")
        d.pop("workers")  # the result does not depend on it
        if not self.finetune_steps:
            for key in ("finetune_steps", "finetune_lr", "finetune_batch_size", "finetune_precision"):
                d.pop(key)  # as before the option existed
        if not self.runs_qw_pass:
            d.pop("qw_hessians")
        if self.method != "tacq":
            d.pop("outlier_frac")
            d.pop("saliency")
            d.pop("base")
        if self.codebook_weights == "none":
            d.pop("codebook_weights")  # as before the option existed
        if not self.uses_kmeans:
            d.pop("reserve_outliers")
            d.pop("kmeans_init")
        else:
            d.pop("clip_search")
            d.pop("group_size")
        if self.method == "rtn":
            for key in ("act_order", "true_sequential", "percdamp", "blocksize"):
                d.pop(key)
        if isinstance(d["bits"], float) and d["bits"].is_integer():
            d["bits"] = int(d["bits"])
        return d


@dataclass
class QuantizeOutcome:
    packed: dict[str, PackedLayer]
    reports: list[LayerReport]
    method_args: dict
    seconds: float
    stages: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"method_args": self.method_args, "seconds": self.seconds, "stages": self.stages,
                **summarize(self.reports)}


def _mask_of(masks: dict[str, torch.Tensor] | None, name: str) -> torch.Tensor | None:
    """TACQ's keep-mask of one matrix, or None where it keeps nothing (or there is no mask)."""
    keep = None if masks is None else masks.get(name)
    return keep if keep is not None and bool(keep.any()) else None


def _gptq_weight_quantizer(cfg: QuantizeConfig, masks: dict[str, torch.Tensor] | None = None):
    def quantize(name: str, weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedWeight:
        q = AffineColumnQuantizer(int(cfg.bits), cfg.group_size, clip_search=cfg.clip_search)
        keep = _mask_of(masks, name)
        return gptq_quantize(weight, hessian, q, blocksize=cfg.blocksize, percdamp=cfg.percdamp,
                             act_order=cfg.effective_act_order, keep_mask=keep).weight
    return quantize


def _claq_weight_quantizer(cfg: QuantizeConfig, masks: dict[str, torch.Tensor] | None = None,
                           importance: dict[str, torch.Tensor] | None = None):
    def quantize(name: str, weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedWeight:
        # one generator seed per matrix, derived from the run's seed and the matrix name
        seed = (cfg.seed * 1_000_003 + sum(name.encode())) % (2**31)
        q = KMeansColumnQuantizer(cfg.bits, reserve_outliers=cfg.reserve_outliers, kmeans_init=cfg.kmeans_init,
                                  seed=seed)
        keep = _mask_of(masks, name)
        imp = None if importance is None else importance[name]
        return gptq_quantize(weight, hessian, q, blocksize=cfg.blocksize, percdamp=cfg.percdamp,
                             act_order=cfg.effective_act_order, keep_mask=keep, importance=imp).weight
    return quantize


def codebook_importance(cfg: QuantizeConfig, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The k-means weights of TACQ over CLAQ (``--codebook-weights``): G or G^2 per weight."""
    if cfg.codebook_weights == "none":
        return None
    return {n: g.to(torch.float32) if cfg.codebook_weights == "g" else g.to(torch.float32).square()
            for n, g in grads.items()}


def _base_weight_quantizer(cfg: QuantizeConfig, masks: dict[str, torch.Tensor] | None = None,
                           importance: dict[str, torch.Tensor] | None = None):
    """TACQ's quantizer of the non-kept weights: GPTQ's affine grid or CLAQ's codebooks."""
    if cfg.base == "claq":
        return _claq_weight_quantizer(cfg, masks, importance)
    return _gptq_weight_quantizer(cfg, masks)


def _rtn_weight_quantizer(cfg: QuantizeConfig):
    def quantize(name: str, weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedWeight:
        return rtn_quantize(weight, int(cfg.bits), cfg.group_size, clip_search=cfg.clip_search)
    return quantize


def _load_corrupt_weights(path: str, cfg: QuantizeConfig, calib: CalibrationData, names: list[str]) -> dict[str, torch.Tensor]:
    """Q(W) from a checkpoint of TACQ's base method (GPTQ or CLAQ) made with the same bits,
    quantizer settings and calibration data."""
    import dataclasses

    from tacq_kernels import load_layers
    from tacq_kernels.reference import dequantize

    try:
        with open(os.path.join(path, "config.json")) as f:
            qc = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"--corrupt-from {path}: cannot read config.json ({e})") from None
    args = qc.get("method_args") or {}
    base_cfg = dataclasses.replace(cfg, method=cfg.base, base="gptq", act_order=cfg.effective_act_order)
    expect = {k: v for k, v in base_cfg.method_args().items() if k != "method"}
    expect.update({"calib": calib.spec, "nsamples": int(calib.windows.shape[0]), "seqlen": int(calib.windows.shape[1])})
    if qc.get("method") != cfg.base:
        raise ConfigError(f"--corrupt-from {path}: expected a {cfg.base} checkpoint (TACQ's base), "
                          f"found method {qc.get('method')!r}")
    diff = {k: (args.get(k), v) for k, v in expect.items() if args.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"--corrupt-from {path} was made with other settings ({detail})")
    layers, _ = load_layers(path, qc)
    missing = [n for n in names if n not in layers]
    if missing:
        raise ConfigError(f"--corrupt-from {path} lacks layer {missing[0]}")
    return {n: dequantize(layers[n]) for n in names}


def quantize_model(
    model: nn.Module,
    calib: CalibrationData,
    cfg: QuantizeConfig,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    progress: bool = True,
    log=print,
    on_layer=None,
    work=None,
) -> QuantizeOutcome:
    """Quantize ``model`` in place (its linears end up holding the effective quantized weights).

    ``on_layer(name, QuantizedWeight)`` is called for every weight of the final pass (tests use it
    to see kept positions and values). ``work`` (a :class:`tacq_quant.progress.WorkDir`): save
    every finished piece there and reuse the pieces already there (the caller checks that the
    work directory belongs to this run); the result is the same as without it.
    """
    cfg.validate()
    t_start = time.perf_counter()
    args = cfg.method_args()
    args.update({"calib": calib.spec, "nsamples": int(calib.windows.shape[0]), "seqlen": int(calib.windows.shape[1])})
    stages: dict = {}
    run = dict(device=device, batch_size=batch_size, true_sequential=cfg.true_sequential, progress=progress,
               on_layer=on_layer)
    # the unquantized model, for the distillation at the end (the passes below change ``model``)
    teacher = copy.deepcopy(model) if cfg.finetune_steps else None
    stores = {}
    if work is not None:
        stores = {"qw": work.store("qw"), "final": work.store("final")}
        run["store"] = stores["final"]

    if cfg.method == "rtn":
        res = quantize_sequential(model, calib.windows, _rtn_weight_quantizer(cfg), **run)
    elif cfg.method == "gptq":
        res = quantize_sequential(model, calib.windows, _gptq_weight_quantizer(cfg), **run)
    elif cfg.method == "claq":
        res = quantize_sequential(model, calib.windows, _claq_weight_quantizer(cfg), **run)
    else:
        res = _quantize_tacq(model, calib, cfg, run, stages, args, log, work, stores)
    stages["sequential_seconds"] = res.seconds
    if teacher is not None:
        res.packed, stages["finetune"] = _finetune(model, teacher, res.packed, calib, cfg, run, log)
        stages["finetune_seconds"] = stages["finetune"]["seconds"]
        del teacher
    if stores:
        stages["progress_save_seconds"] = sum(st.save_seconds for st in stores.values())
        stages["progress_saved_bytes"] = sum(st.saved_bytes for st in stores.values())
    return QuantizeOutcome(res.packed, res.reports, args, time.perf_counter() - t_start, stages)


def _finetune(model, teacher, packed, calib, cfg, run, log):
    """Distil the unquantized model into the quantized layers' stored values; the model's linears
    then hold the trained effective weights, as after any pass."""
    from tacq_kernels.reference import dequantize

    from .progress import checkpoint

    checkpoint("the quantization passes (saved; the fine-tune starts again on resume)")
    log(f"fine-tune: {cfg.finetune_steps} steps of {cfg.finetune_batch_size} calibration windows, "
        "distilling the unquantized model into the codebooks, scales and kept weights")
    out, report = finetune_layers(model, teacher, packed, calib.windows, cfg.finetune_config(),
                                  device=run["device"], progress=run["progress"], log=log)
    linears = dict(model.named_modules())
    with torch.no_grad():
        for name, layer in out.items():
            w = linears[name].weight
            w.copy_(dequantize(layer).to(w.device, w.dtype))
    return out, report


def _quantize_tacq(model, calib, cfg, run, stages, args, log, work=None, stores=None):
    from .progress import checkpoint, test_point

    linears = target_linears(model)
    names = list(linears)
    n_weights = sum(m.weight.numel() for m in linears.values())
    k = keep_count(n_weights, cfg.outlier_frac)

    # (1) sum over samples of |per-sample gradient| on the unquantized model
    t0 = time.perf_counter()
    grads = {n: None for n in names}
    fp_hessians = {} if cfg.runs_qw_pass and cfg.qw_hessians == "fp" else None
    n_layers = len(find_decoder_layers(model)[1])
    qw_saved = stores.get("qw").completed() if stores else 0
    # a resumed run whose Q(W) layers are all saved needs no Hessians (no forwards for them)
    collect = fp_hessians if fp_hessians is not None and qw_saved < n_layers else None
    if cfg.saliency != "magnitude":
        samples = calib.gradient_samples()
        cache = cfg.grad_cache or (work.gradient_path() if work is not None else None)
        log(f"TACQ: |gradients| over {len(samples)} samples" + (f" (cache {cache})" if cache else ""))

        def on_batch(i):
            test_point(f"grad:{i}")
            checkpoint(f"batch {i} of the gradient pass (not saved: the gradient pass starts again on resume)")

        grads, ginfo = cached_abs_gradients(model, samples, cache, device=run["device"],
                                            progress=run["progress"], max_batch_tokens=cfg.grad_max_batch_tokens,
                                            on_batch=on_batch, hessians=collect)
        checkpoint("the gradient pass (saved)")
        stages["gradient_seconds"] = time.perf_counter() - t0
        stages["gradient_cache"] = ginfo.get("cache")
        if "write_seconds" in ginfo:
            stages["gradient_write_seconds"] = ginfo["write_seconds"]
        stages["gradient_samples"] = len(samples)

    importance = codebook_importance(cfg, grads)

    # (2) Q(W): the plain base quantizer at the same bits on the same data
    t0 = time.perf_counter()
    if cfg.saliency in ("magnitude", "msg"):
        corrupt = {n: None for n in names}  # the score does not use Q(W)
    elif cfg.corrupt_from:
        log(f"TACQ: Q(W) from the GPTQ checkpoint {cfg.corrupt_from}")
        corrupt = _load_corrupt_weights(cfg.corrupt_from, cfg, calib, names)
        stages["corrupt_from"] = cfg.corrupt_from
    elif fp_hessians is not None:
        log(f"TACQ: {cfg.base.upper()} of every matrix on its own for Q(W), Hessians of the unquantized model")
        qres, corrupt = quantize_independent(model, fp_hessians, _base_weight_quantizer(cfg, None, importance),
                                             workers=cfg.workers,
                                             device=run["device"], progress=run["progress"],
                                             store=stores.get("qw") if stores else None)
        del fp_hessians
        stages["corrupt_quantize_seconds"] = sum(r.seconds for r in qres.reports)
    else:
        log(f"TACQ: plain {cfg.base.upper()} pass for Q(W)")
        original = {n: m.weight.detach().to("cpu", copy=True) for n, m in linears.items()}
        qrun = {**run, "on_layer": None}
        if stores:
            qrun["store"] = stores["qw"]
        quantize_sequential(model, calib.windows, _base_weight_quantizer(cfg, None, importance), **qrun)
        corrupt = {n: m.weight.detach().to("cpu", copy=True) for n, m in linears.items()}
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(original[n].to(m.weight.device))
        del original
    stages["corrupt_seconds"] = time.perf_counter() - t0

    # (3) scores and the global top-k
    t0 = time.perf_counter()
    scores = {n: saliency(linears[n].weight.detach().cpu(), grads[n], corrupt[n], cfg.saliency) for n in names}
    del corrupt, grads
    masks = select_top_k(scores, k)
    del scores
    stages["select_seconds"] = time.perf_counter() - t0
    log(f"TACQ: keeping {k:,} of {n_weights:,} weights ({100 * k / n_weights:.3f} %) in 16 bits")
    args["kept"] = k
    args["kept_of"] = n_weights

    # (4) the base quantizer again from the original weights, with the mask
    return quantize_sequential(model, calib.windows, _base_weight_quantizer(cfg, masks, importance), **run)

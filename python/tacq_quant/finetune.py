"""Fine-tuning of a quantized model's continuous parameters by distillation from the unquantized one.

After any method (RTN, GPTQ, CLAQ, TACQ) the integer codes stay fixed; what a format-v1 layer
also stores in 16 bits (CLAQ's per-column codebooks, the affine scales and zeros, and the values
of the sparse correction, i.e. TACQ's kept weights) is continuous, and is trained here to make
the quantized model's next-token distribution match the unquantized model's on the calibration
windows: the loss is KL(teacher || student) per token, averaged. Only stored values change, so
the checkpoint keeps its format, its bits per weight and its kernels.

Each layer's effective weight ``D + S`` is rebuilt from its parameters in every forward
(:class:`TunableLinear`), so the gradient of a codebook entry is the sum of the weight gradients
at every position holding its code, and that of a kept weight is its own weight gradient.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tacq_kernels import PackedLayer
from tacq_kernels.hf import _resolve as resolve_module
from tacq_kernels.packing import unpack_codes


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class FinetuneConfig:
    """``steps`` Adam steps on batches of ``batch_size`` calibration windows (drawn without
    replacement, a fresh permutation per pass); learning rate ``lr`` (absolute: the parameters are
    weights of magnitude ~1e-2), linear warm-up over the first 10 % of steps, cosine decay to zero.
    ``precision``: the matmuls in fp32, or in bf16 autocast (parameters, gradients and the loss
    stay fp32); ``auto`` = bf16 where the device computes it natively."""

    steps: int = 32
    batch_size: int = 4
    lr: float = 1e-4
    precision: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 0:
            raise ValueError(f"fine-tune steps (--finetune-steps) must be >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"fine-tune batch size (--finetune-batch-size) must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"fine-tune learning rate (--finetune-lr) must be positive, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"fine-tune precision (--finetune-precision) must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` has bf16 matmuls in hardware (CUDA sm80+, or a CPU with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class TunableLinear(nn.Module):
    """A packed layer whose stored 16-bit values are trainable fp32 parameters (codes fixed).

    Parameters: ``lut{i}`` [k_i, 2^b] (LUT segments), ``scale{i}``/``zero{i}`` [groups, N] (affine
    segments), ``sparse_val`` [nnz]. :meth:`weight` is the effective weight fp32 [N, K] in original
    column order, as :func:`tacq_kernels.reference.dequantize` decodes it.
    """

    def __init__(self, layer: PackedLayer):
        super().__init__()
        self.layer = layer
        spec = layer.spec
        n = spec.out_features
        self.segments = []
        perm = layer.perm
        inv_perm = None if perm is None else torch.argsort(perm.long())
        self.all_lut = all(seg.decoder == "lut" for seg in spec.segments)
        self.lut_width = max(2 ** seg.bits for seg in spec.segments)
        lut_codes = []
        for i, seg in enumerate(spec.segments):
            t = layer.segment_tensors(i)
            codes = unpack_codes(t, seg.bits, seg.k)  # [N, k], storage column order
            if seg.decoder == "lut":
                self.register_parameter(f"lut{i}", nn.Parameter(t["lut"].float().clone()))
                lut_codes.append((i, codes.t()))
            else:
                self.register_buffer(f"codes{i}", codes.t().float().contiguous(), persistent=False)
                group = torch.arange(seg.k) // seg.group_size
                self.register_buffer(f"group{i}", group, persistent=False)
                self.register_parameter(f"scale{i}", nn.Parameter(t["scale"].float().clone()))
                self.register_parameter(f"zero{i}", nn.Parameter(t["zero"].float().clone()))
            self.segments.append((i, seg.decoder))
        if self.all_lut:
            # one gather for the whole layer, in original column order: row j of the stacked
            # codebooks [K, 2^bmax] (narrower ones zero-padded) is original column j's
            codes_t = torch.cat([c for _, c in lut_codes], 0)
            self.register_buffer("codes_t", codes_t if inv_perm is None else codes_t[inv_perm].contiguous(),
                                 persistent=False)
        else:
            for i, codes_t in lut_codes:
                self.register_buffer(f"codes{i}", codes_t.contiguous(), persistent=False)
        self.register_buffer("inv_perm", inv_perm, persistent=False)
        row_ptr = layer.tensors["sparse_row_ptr"].long()
        self.register_buffer("sparse_rows", torch.repeat_interleave(torch.arange(n), row_ptr.diff()), persistent=False)
        self.register_buffer("sparse_cols", layer.tensors["sparse_col"].long(), persistent=False)
        self.sparse_val = nn.Parameter(layer.tensors["sparse_val"].float().clone())
        bias = layer.bias
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)

    def weight_t(self) -> torch.Tensor:
        """The effective weight transposed, fp32 [K, N], original column order (a fresh tensor)."""
        if self.all_lut:
            luts = [getattr(self, f"lut{i}") for i, _ in self.segments]
            luts = [F.pad(l, (0, self.lut_width - l.shape[1])) if l.shape[1] < self.lut_width else l for l in luts]
            stacked = luts[0] if len(luts) == 1 else torch.cat(luts, 0)
            if self.inv_perm is not None:
                stacked = stacked[self.inv_perm]
            w_t = torch.gather(stacked, 1, self.codes_t)
        else:
            parts = []
            for i, decoder in self.segments:
                if decoder == "lut":
                    parts.append(torch.gather(getattr(self, f"lut{i}"), 1, getattr(self, f"codes{i}")))
                else:
                    g = getattr(self, f"group{i}")
                    parts.append((getattr(self, f"codes{i}") - getattr(self, f"zero{i}")[g]) * getattr(self, f"scale{i}")[g])
            w_t = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
            if self.inv_perm is not None:
                w_t = w_t[self.inv_perm]
        if self.sparse_val.numel():
            # in place: neither the gather nor the indexing above keeps its output for backward
            w_t = w_t.index_put_((self.sparse_cols, self.sparse_rows), self.sparse_val, accumulate=True)
        return w_t

    def weight(self) -> torch.Tensor:
        return self.weight_t().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def export(self) -> PackedLayer:
        """The layer with the trained values stored back in fp16 (codes, perm, CSR structure kept)."""
        tensors = dict(self.layer.tensors)
        for i, decoder in self.segments:
            names = ("lut",) if decoder == "lut" else ("scale", "zero")
            for nm in names:
                tensors[f"seg{i}_{nm}"] = getattr(self, f"{nm}{i}").detach().to(torch.float16).cpu()
        tensors["sparse_val"] = self.sparse_val.detach().to(torch.float16).cpu()
        return PackedLayer(self.layer.spec, tensors, self.layer.name)


def _swap_module(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` inside ``root``; return the module that was there."""
    parent, attr, old = resolve_module(root, name)
    setattr(parent, attr, module)
    return old


def finetune_layers(
    student: nn.Module,
    teacher: nn.Module,
    layers: dict[str, PackedLayer],
    windows: torch.Tensor,
    cfg: FinetuneConfig,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    log=print,
) -> tuple[dict[str, PackedLayer], dict]:
    """Train the packed layers' stored values inside ``student`` against ``teacher``.

    ``student``: the model whose linears named in ``layers`` are the quantized ones (they are
    swapped for :class:`TunableLinear` during training and put back afterwards; every other
    parameter is frozen and left as it was). ``teacher``: the unquantized model, same
    architecture. ``windows``: int64 [n, L] token ids (the calibration windows). Both models are
    moved to ``device`` for the run (default: where ``student`` is) and back. Returns the trained
    layers (same specs, codes, permutations and CSR structure; new fp16 codebooks, scales, zeros
    and sparse values) and a report (steps, KL at the start and end, seconds).
    """
    from tqdm.auto import tqdm

    cfg.validate()
    t0 = time.perf_counter()
    home = next(student.parameters()).device
    dev = torch.device(device) if device is not None else home
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and native_bf16(dev))
    tunables = {n: TunableLinear(l).to(dev) for n, l in layers.items()}
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    originals = {n: _swap_module(student, n, m) for n, m in tunables.items()}
    for p in student.parameters():
        p.requires_grad_(False)
    params = [p for m in tunables.values() for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    teacher_home = next(teacher.parameters()).device
    student.to(dev)
    teacher.to(dev)
    was_training = (student.training, teacher.training)
    teacher.eval()
    student.eval()  # no dropout: the student must see what the teacher sees
    gen = torch.Generator().manual_seed(cfg.seed)
    n = windows.shape[0]
    steps = cfg.steps
    warmup = max(1, steps // 10)

    def lr_at(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses: list[float] = []
    order = torch.empty(0, dtype=torch.long)
    try:
        bar = tqdm(range(steps), desc="fine-tune", unit="step", disable=not progress, dynamic_ncols=True)
        for _ in bar:
            if order.numel() < min(cfg.batch_size, n):
                order = torch.cat([order, torch.randperm(n, generator=gen)])
            take = min(cfg.batch_size, n)
            idx, order = order[:take], order[take:]
            x = windows[idx].to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                with torch.no_grad():
                    t_logp = F.log_softmax(teacher(input_ids=x, use_cache=False).logits.float(), -1)
                s_logp = F.log_softmax(student(input_ids=x, use_cache=False).logits.float(), -1)
            loss = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()  # KL(teacher || student) per token
            del t_logp, s_logp
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
    finally:
        for name, m in originals.items():
            _swap_module(student, name, m)
        for p in student.parameters():
            p.requires_grad_(id(p) in trainable)
        student.to(home)
        teacher.to(teacher_home)
        student.train(was_training[0])
        teacher.train(was_training[1])
    out = {name: m.export() for name, m in tunables.items()}
    tenth = max(1, len(losses) // 10)
    report = {"steps": steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "precision": "bf16" if bf16 else "fp32",
              "kl_first": sum(losses[:tenth]) / tenth if losses else None,
              "kl_last": sum(losses[-tenth:]) / tenth if losses else None,
              "losses": losses, "seconds": time.perf_counter() - t0}
    if losses:
        log(f"fine-tune: {steps} steps of {cfg.batch_size} windows ({report['precision']}), KL per token "
            f"{report['kl_first']:.4f} -> {report['kl_last']:.4f} (first / last tenth of the steps), "
            f"{report['seconds']:.0f} s")
    return out, report

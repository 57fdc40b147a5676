"""TACQ: task-circuit quantization (Xiao, Sung, Stengel-Eskin, Bansal 2025, arXiv 2504.07389).

Almost every weight goes to b bits with GPTQ; a global fraction p of the weights of all decoder
linears (q/k/v/o/gate/up/down; not embeddings, not lm_head) stays in 16 bits. Which ones is
decided by one saliency score per weight, as the authors' code computes it
(The-Inscrutable-X/TACQ: utils/gradient_attributors.py, make_quantization_configs.py, gptq/):

    score_ij = |W_ij| * G_ij * |Q(W)_ij - W_ij|,      G = sum_s |dL_s / dW|

* ``L_s`` is the ordinary next-token cross-entropy of calibration sample s (mean over its
  predicted tokens, no prompt masking) on the *unquantized* model, in fp32. The absolute value is
  taken per sample, then summed (|.| before the sum: per-sample gradients must not cancel).
* ``Q(W)`` is the weight after a plain GPTQ run at the same bit-width on the same calibration
  data (so W - Q(W) holds the rounding error and GPTQ's compensation drift), not RTN.
* Selection: exactly ``k = round(p * n)`` weights with the largest scores over all matrices
  together (n = number of weights of those matrices). Ties at the threshold are broken by
  position (matrices in model order, row-major), so the count is always exactly k.
* Then GPTQ runs again from the original weights with the mask: kept weights are excluded from
  the scale fit (replaced by the row mean of the non-kept ones), keep their GPTQ-updated value,
  and propagate no error (:func:`tacq_quant.gptq.gptq_quantize`).

The same forwards can also accumulate every linear's Hessian ``2/n sum x x^T`` on the unquantized
model (``hessians=``), which TACQ's Q(W) pass uses (:mod:`tacq_quant.parallel`).

Per-sample gradients are computed in batches: a forward hook keeps each linear's input x_s and a
hook on its output receives dL/dy_s; the per-sample weight gradient is ``dy_s^T x_s`` (one
``bmm`` per batch), whose absolute value is summed over the batch. Samples of a batch are
right-padded; padded positions carry no loss and, under the causal mask, influence no real
token, so each sample's gradient is exactly its batch-size-1 gradient. Weights themselves are
frozen, so autograd spends nothing on the (summed) weight gradients we do not need.
"""

from __future__ import annotations

import hashlib
import os
import time

import torch
from torch import nn

from .gptq import HessianAccumulator
from .sequential import find_decoder_layers, linear_names


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder linears TACQ scores and quantizes, by full name, in model order."""
    prefix, layers = find_decoder_layers(model)
    out = {}
    for i, layer in enumerate(layers):
        mods = dict(layer.named_modules())
        for n in linear_names(layer):
            out[f"{prefix}.{i}.{n}"] = mods[n]
    return out


def _pad_batch(samples: list[torch.Tensor], pad_id: int):
    lengths = [int(s.numel()) for s in samples]
    longest = max(lengths)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), longest, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, : lengths[b]] = s
        mask[b, : lengths[b]] = 1
    return ids, mask


def accumulate_abs_gradients(
    model: nn.Module,
    samples: list[torch.Tensor],
    *,
    max_batch_tokens: int = 2048,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_batch=None,
    hessians: dict | None = None,
    gradients: bool = True,
) -> dict[str, torch.Tensor]:
    """``G[name] = sum_s |dL_s/dW|`` (fp32, on the CPU) for every decoder linear of ``model``.

    ``on_batch(i)`` is called after batch ``i`` (the CLI stops there on Ctrl-C; nothing is returned
    or saved then). ``hessians``: a dict that receives, for every decoder linear, the Hessian
    ``2/n sum x x^T`` of its inputs on the unquantized model over the samples' real (not padded)
    tokens, accumulated in the same forwards. ``gradients=False`` runs the forwards only (no
    backward; returns an empty dict), for the Hessians alone.

    ``samples`` are 1-D token-id tensors (any lengths, each at least 2 tokens). The model runs in
    fp32 on ``device``; its parameters are left as they were (requires_grad restored). A batch
    holds as many samples (sorted by length) as fit ``max_batch_tokens`` padded tokens.
    """
    from tqdm.auto import tqdm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    samples = [s for s in samples if s.numel() >= 2]
    if not samples:
        raise ValueError("no calibration sample has 2 or more tokens")
    linears = target_linears(model)
    orig_dtype = next(model.parameters()).dtype
    orig_device = next(model.parameters()).device
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    model.to(device=device, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    grads = {n: torch.zeros(m.out_features, m.in_features, dtype=torch.float32, device=device)
             for n, m in linears.items()} if gradients else {}
    accs = {} if hessians is None else {n: HessianAccumulator(m.in_features, device) for n, m in linears.items()}
    valid_rows: list[torch.Tensor] = []  # the current batch's real-token positions, flattened
    xtx_cache: dict[tuple, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def fwd_hook(name):
        def hook(module, args, output):
            x = args[0].detach()
            if accs:
                # q/k/v (and gate/up) read the same tensor: its x^T x once per batch (the entry
                # holds x, so no later tensor of the batch can reuse its address)
                key = (x.data_ptr(), tuple(x.shape), x._version)
                if key not in xtx_cache:
                    x2 = x.reshape(-1, x.shape[-1])[valid_rows[0]].to(torch.float32)
                    xtx_cache[key] = (x2.t() @ x2, x2.shape[0], x)
                accs[name].add_xtx(*xtx_cache[key][:2])
            if not gradients:
                return

            def on_grad(g):
                # per-sample dL_s/dW = dy_s^T x_s ; |.| per sample, then summed over the batch
                grads[name].add_(torch.bmm(g.to(torch.float32).transpose(1, 2), x.to(torch.float32)).abs_().sum(0))

            if output.requires_grad:
                output.register_hook(on_grad)
        return hook

    embed = model.get_input_embeddings()
    embed_hook = embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True) if gradients else None)
    handles = [m.register_forward_hook(fwd_hook(n)) for n, m in linears.items()]
    # Sort by length so that padding is small; the sum does not depend on the order.
    order = sorted(range(len(samples)), key=lambda i: samples[i].numel())
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * samples[i].numel() > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    pad_id = 0
    desc = "gradients" if gradients else "fp Hessians"
    bar = tqdm(total=len(samples), desc=desc, unit="sample", disable=not progress, dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        for bi, batch_idx in enumerate(batches):
            batch = [samples[i] for i in batch_idx]
            ids, mask = _pad_batch(batch, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            valid_rows[:] = [mask.reshape(-1).bool()]
            xtx_cache.clear()
            if not gradients:
                with torch.no_grad():  # the decoder alone: no lm_head, no loss
                    getattr(model, "base_model", model)(input_ids=ids, attention_mask=mask, use_cache=False)
                bar.update(len(batch))
                if on_batch is not None:
                    on_batch(bi)
                continue
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = ids[:, 1:]
            valid = mask[:, 1:].to(torch.float32)
            nll = -torch.gather(logp, 2, target.unsqueeze(-1)).squeeze(-1) * valid
            # sum over samples of each sample's mean token loss: sample s's gradient is its own
            loss = (nll.sum(1) / valid.sum(1)).sum()
            loss.backward()
            bar.update(len(batch))
            del logits, logp, nll, loss
            if on_batch is not None:
                on_batch(bi)
    finally:
        bar.close()
        for h in handles:
            h.remove()
        embed_hook.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        model.to(device=orig_device, dtype=orig_dtype)
        model.train(was_training)
    if hessians is not None:
        hessians.update({n: acc.hessian().cpu() for n, acc in accs.items()})
    return {n: g.cpu() for n, g in grads.items()}


SALIENCY_KINDS = ("tacq", "qal", "msg", "magnitude")


def saliency(weight: torch.Tensor, abs_grad: torch.Tensor | None, quantized: torch.Tensor | None,
             kind: str = "tacq") -> torch.Tensor:
    """The TACQ score ``|W| * G * |Q(W) - W|`` (fp32), or one of its parts for ablations:
    ``qal`` = ``G * |Q(W) - W|`` (quantization-aware localization), ``msg`` = ``|W| * G``
    (magnitude-sharpened gradient), ``magnitude`` = ``|W|`` (no data at all)."""
    if kind not in SALIENCY_KINDS:
        raise ValueError(f"unknown saliency {kind!r}; choose one of {SALIENCY_KINDS}")
    w = weight.to(torch.float32)
    if kind == "magnitude":
        return w.abs()
    g = abs_grad.to(torch.float32)
    if kind == "msg":
        return w.abs() * g
    dq = (quantized.to(torch.float32) - w).abs()
    if kind == "qal":
        return g * dq
    return w.abs() * g * dq


def select_top_k(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean masks with exactly ``k`` True over all matrices: the k largest scores; ties at the
    threshold are taken in order (matrices in dict order, row-major inside a matrix)."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).to(torch.float32) for n in names])
    total = flat.numel()
    if not 0 <= k <= total:
        raise ValueError(f"cannot keep {k} of {total} weights")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("TACQ scores contain NaN or Inf (did the gradient pass diverge?)")
    selected = torch.zeros(total, dtype=torch.bool)
    if k:
        threshold = torch.topk(flat, k, sorted=False).values.min()
        above = flat > threshold
        selected |= above
        need = k - int(above.sum())
        tied = torch.nonzero(flat == threshold).flatten()
        selected[tied[:need]] = True
    masks, start = {}, 0
    for n in names:
        numel = scores[n].numel()
        masks[n] = selected[start:start + numel].reshape(scores[n].shape)
        start += numel
    return masks


def keep_count(n_weights: int, fraction: float) -> int:
    return int(round(fraction * n_weights))


# --------------------------------------------------------------------------------------------
# Gradient cache: the gradients depend on the model and the calibration samples only (not on the
# bit-width or the fraction), so they can be reused across runs, as the authors note.
# --------------------------------------------------------------------------------------------


def samples_fingerprint(model: nn.Module, samples: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, m in target_linears(model).items():
        h.update(name.encode())
        h.update(str(tuple(m.weight.shape)).encode())
        h.update(m.weight.detach().reshape(-1)[:: max(1, m.weight.numel() // 997)].float().cpu().numpy().tobytes())
    for s in samples:
        h.update(s.to(torch.int64).cpu().numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


def save_gradients(grads: dict[str, torch.Tensor], path: str, fingerprint: str) -> None:
    """Write the gradient sums atomically: a temporary file, fsync, rename (a concurrent or later
    run never reads a half-written file, and a crash leaves the old file or none)."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tacq-tmp-{os.getpid()}"
    try:
        save_file({k: v.contiguous() for k, v in grads.items()}, tmp, metadata={"fingerprint": fingerprint})
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cached_abs_gradients(model, samples, cache_path: str | None, **kwargs) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`accumulate_abs_gradients`, read from / written to ``cache_path`` (safetensors) when
    given; a cache made for other samples or another model is ignored and overwritten."""
    from safetensors.torch import load_file

    info = {"cache": None}
    fp = samples_fingerprint(model, samples) if cache_path else None
    if cache_path and os.path.exists(cache_path):
        cached = None
        try:
            from safetensors import safe_open

            with safe_open(cache_path, framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("fingerprint") == fp:
                cached = load_file(cache_path)
                info["cache"] = "hit"
            else:
                info["cache"] = "stale"
        except Exception:  # unreadable cache: recompute
            info["cache"] = "unreadable"
        if cached is not None:
            # the Hessians are not cached: forwards only (outside the try: a Ctrl-C there must stop)
            if kwargs.get("hessians") is not None:
                accumulate_abs_gradients(model, samples, **kwargs, gradients=False)
            return cached, info
    t0 = time.perf_counter()
    grads = accumulate_abs_gradients(model, samples, **kwargs)
    info["seconds"] = time.perf_counter() - t0
    if cache_path:
        t0 = time.perf_counter()
        save_gradients(grads, cache_path, fp)
        info["cache"] = info["cache"] or "written"
        info["write_seconds"] = time.perf_counter() - t0
    return grads, info

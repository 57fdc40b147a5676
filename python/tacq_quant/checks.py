"""Early checks of ``tacq quantize``: what would fail after minutes of work is checked first.

* ``--out`` (and the work directory) writable: a probe directory is created and removed next to
  where the checkpoint will go (the nearest existing ancestor when the parents do not exist yet).
* Free disk space against an estimate of what the run writes (:func:`estimate_disk`): the
  checkpoint, computed from the model's shapes and the method's settings with the format's own
  byte counts, plus the work directory's pieces, which coexist with the new checkpoint at its
  write. Compared with ``shutil.disk_usage`` of the file system holding them.
* Memory: an estimate of the peak beyond the loaded model (:func:`estimate_memory`), compared with
  ``MemAvailable`` (``/proc/meminfo``) on the CPU and ``torch.cuda.mem_get_info`` on a GPU.

The estimates are deliberately simple and slightly generous; their terms are printed with the
result so that a refusal can be checked by hand. ``TACQ_TEST_FREE_DISK`` and
``TACQ_TEST_AVAILABLE_MEMORY`` (bytes) replace the measured free space and memory, for tests.
"""

from __future__ import annotations

import math
import os
import shutil

import torch

from .sequential import find_decoder_layers, linear_names

GiB = 2**30
MiB = 2**20
# tokenizer files, config.json, README, the report files: a generous fixed allowance
SMALL_FILES_ALLOWANCE = 32 * MiB


class ResourceError(ValueError):
    """Not enough disk or memory for the run, or an unwritable output (one line for the user)."""


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / MiB:.1f} MiB"


def nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable(path: str, what: str) -> None:
    """A directory can be created next to ``path`` (where the atomic write puts its temporary one)."""
    import tempfile

    parent = nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(parent):
        raise ResourceError(f"{what} {path}: {parent} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tacq-probe-", dir=parent)
    except OSError as e:
        raise ResourceError(f"{what} {path}: cannot write in {parent} ({e.strerror or e})") from None
    os.rmdir(probe)


def _targets(model) -> list[torch.nn.Linear]:
    _, layers = find_decoder_layers(model)
    out = []
    for layer in layers:
        mods = dict(layer.named_modules())
        out.extend(mods[n] for n in linear_names(layer))
    return out


def _segments_bits(method: str, bits: float) -> list[tuple[float, int]]:
    """(share of columns, bit-width) of the code segments a method writes."""
    if method == "claq" and not float(bits).is_integer():
        hi = (bits - 2) / 2 if bits < 3 else bits - 3
        return [(hi, 4), (1 - hi, 2 if bits < 3 else 3)]
    return [(1.0, int(bits))]


def quantized_layer_bytes(lin: torch.nn.Linear, cfg) -> int:
    """Bytes of one linear in format v1 (codes with K padding, decoders, perm, CSR, bias)."""
    n, k = lin.out_features, lin.in_features
    total = 0
    for share, b in _segments_bits(cfg.method, cfg.bits):
        ks = max(1, math.ceil(share * k))
        total += math.ceil(ks / 32) * 32 * n * b // 8  # codes, K padded to 32 columns per segment
        if cfg.method == "claq":
            total += ks * 2**b * 2  # fp16 codebook per column
        else:
            groups = 1 if cfg.group_size == -1 else math.ceil(ks / cfg.group_size)
            total += 2 * 2 * groups * n  # fp16 scale and zero
    if cfg.effective_act_order:
        total += 4 * k
    frac = cfg.outlier_frac if cfg.method == "tacq" else (0.01 if cfg.reserve_outliers else 0.0)
    # TACQ's fraction is global: a layer can keep several times its share; the sum is what counts
    nnz = math.ceil(frac * n * k)
    total += nnz * (2 + (2 if k <= 2**15 else 4)) + 4 * (n + 1)
    if lin.bias is not None:
        total += 2 * n
    return total


def estimate_disk(model, cfg, dtype_bytes: int, save_progress: bool) -> dict:
    """Bytes the run writes: ``checkpoint`` and ``work`` (the work directory at its largest)."""
    targets = _targets(model)
    target_params = {id(m.weight) for m in targets} | {id(m.bias) for m in targets if m.bias is not None}
    quantized = sum(quantized_layer_bytes(m, cfg) for m in targets)
    rest = sum(p.numel() * dtype_bytes for p in model.parameters() if id(p) not in target_params)
    ckpt = quantized + rest + SMALL_FILES_ALLOWANCE
    work = 0
    if save_progress:
        work = quantized  # the final pass, layer by layer
        if cfg.method == "tacq":
            n_weights = sum(m.weight.numel() for m in targets)
            if cfg.saliency in ("tacq", "qal") and not cfg.corrupt_from:
                qw_cfg = type(cfg)(**{**cfg.__dict__, "outlier_frac": 0.0})
                work += sum(quantized_layer_bytes(m, qw_cfg) for m in targets)
            if cfg.saliency != "magnitude" and not cfg.grad_cache:
                work += 4 * n_weights  # fp32 |gradient| sums
    return {"checkpoint": ckpt, "work": work, "quantized": quantized, "rest": rest}


def free_disk(path: str) -> int:
    if os.environ.get("TACQ_TEST_FREE_DISK"):
        return int(os.environ["TACQ_TEST_FREE_DISK"])
    return shutil.disk_usage(nearest_existing(path)).free


def check_disk(out: str, work_dir: str | None, est: dict, work_present: int = 0, overwrite_bytes: int = 0) -> str:
    """Refuse when the file system cannot hold what the run writes; returns a one-line summary.

    ``work_present``: bytes already in the work directory (resume). The old checkpoint replaced by
    ``--overwrite`` is freed only after the new one is in place, so it does not count as free.
    """
    margin = 1.05
    need_ckpt = est["checkpoint"]
    need_work = max(0, est["work"] - work_present)
    out_fs = nearest_existing(out)
    same = work_dir is None or os.stat(nearest_existing(work_dir)).st_dev == os.stat(out_fs).st_dev
    places = [(out, need_ckpt + (need_work if same else 0))]
    if not same:
        places.append((work_dir, need_work))
    for path, need in places:
        free = free_disk(path)
        if need * margin > free:
            raise ResourceError(
                f"not enough disk space for {path}: the run writes about {fmt_bytes(need)} "
                f"(checkpoint {fmt_bytes(need_ckpt)}, saved progress {fmt_bytes(need_work)}; estimated from the "
                f"model's shapes and the method's settings) but {fmt_bytes(free)} is free; free some space, "
                "choose another --out or --work-dir, or pass --no-save-progress")
    return (f"disk: writes about {fmt_bytes(need_ckpt)} (checkpoint) + {fmt_bytes(need_work)} (saved progress), "
            f"{fmt_bytes(free_disk(out))} free")


def estimate_memory(model, cfg, nsamples: int, seqlen: int, device: torch.device) -> dict:
    """Peak bytes beyond the loaded (fp32, CPU) model, on the CPU (``host``) and on the device.

    Terms: the calibration activations (two fp32 copies of nsamples x seqlen x hidden, on the
    device); one layer's Hessians plus GPTQ's work copies (4 bytes x (sum K^2 + 3 K_max^2));
    TACQ: the |gradient| sums, Q(W), the original weights and the scores (4 bytes per quantized
    weight each; at most three at once) and the gradient pass's autograd activations for one
    batch of up to 2,048 tokens (per layer and token 12 x hidden + 4 x intermediate floats, plus
    three copies of the logits) with the model in fp32 on the device. With ``qw_hessians="fp"``
    the Hessians of all layers are held from the gradient pass to the end of the Q(W) pass, beside
    a CPU copy of the weights and Q(W), and each of up to two worker processes has one matrix's
    GPTQ work copies. A fine-tune (``finetune_steps``) adds the teacher's copy of the model and its
    own phase (codes, weights and gradients, one batch's activations and logits).
    """
    conf = model.config
    hidden = int(getattr(conf, "hidden_size", 0) or 0)
    inter = int(getattr(conf, "intermediate_size", 0) or 4 * hidden)
    vocab = int(getattr(conf, "vocab_size", 0) or 0)
    _, layers = find_decoder_layers(model)
    targets = _targets(model)
    n_weights = sum(m.weight.numel() for m in targets)
    per_layer = len(targets) // max(1, len(layers))
    ks = [m.in_features for m in targets[:per_layer]]
    hess = 4 * (sum(k * k for k in ks) + 3 * max(ks) ** 2)
    acts = 2 * nsamples * seqlen * hidden * 4
    seq_pass = acts + hess
    host, dev = seq_pass, seq_pass
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    if cfg.method == "tacq" and cfg.saliency != "magnitude":
        tokens = min(cfg.grad_max_batch_tokens, max(seqlen, 2))
        batch = max(1, cfg.grad_max_batch_tokens // max(seqlen, 1))
        biggest = max(m.weight.numel() for m in targets)
        grad_acts = len(layers) * tokens * (12 * hidden + 4 * inter) * 4 + 3 * tokens * vocab * 4 + 2 * batch * biggest * 4
        grad_phase = 4 * n_weights + grad_acts
        qw_phase = 8 * n_weights + seq_pass
        if cfg.runs_qw_pass and cfg.qw_hessians == "fp":
            all_hess = 4 * len(layers) * sum(k * k for k in ks)
            grad_phase += all_hess
            qw_phase = 12 * n_weights + all_hess + 2 * 4 * 4 * max(ks) ** 2
        select_phase = 12 * n_weights + 16 * biggest
        host = max(grad_phase, qw_phase, select_phase, n_weights + seq_pass)
        dev = max(dev, grad_phase + (model_bytes if device.type != "cpu" else 0))
    elif cfg.method == "tacq":
        host = max(host, 5 * n_weights)  # scores, flat copy and masks
    if cfg.finetune_steps:
        # the teacher copy is held from the start; the fine-tune itself holds the int64 codes, the
        # rebuilt fp32 weights and their gradients, one batch's activations and five logits tensors
        ft_tokens = cfg.finetune_batch_size * seqlen
        ft_phase = (model_bytes + 16 * n_weights + len(layers) * ft_tokens * (12 * hidden + 4 * inter) * 4
                    + 5 * ft_tokens * vocab * 4)
        host = max(host + model_bytes, ft_phase)
        dev = max(dev, ft_phase + (model_bytes if device.type != "cpu" else 0))
    return {"host": host, "device": dev if device.type != "cpu" else 0}


def available_memory() -> int:
    if os.environ.get("TACQ_TEST_AVAILABLE_MEMORY"):
        return int(os.environ["TACQ_TEST_AVAILABLE_MEMORY"])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 62  # unknown: do not refuse


def check_memory(est: dict, device: torch.device) -> str:
    avail = available_memory()
    hint = "use a smaller --nsamples or --seqlen, or a machine with more memory"
    if est["host"] > avail:
        raise ResourceError(f"not enough memory: the run needs about {fmt_bytes(est['host'])} beyond the loaded model "
                            f"(estimated from the model's shapes, --nsamples x --seqlen and the method) but "
                            f"{fmt_bytes(avail)} is available; {hint}")
    line = f"memory: about {fmt_bytes(est['host'])} at peak beyond the loaded model, {fmt_bytes(avail)} available"
    if device.type == "cuda" and est["device"]:
        free = int(os.environ.get("TACQ_TEST_AVAILABLE_MEMORY") or torch.cuda.mem_get_info(device)[0])
        if est["device"] > free:
            raise ResourceError(f"not enough GPU memory on {device}: the run needs about {fmt_bytes(est['device'])} "
                                f"but {fmt_bytes(free)} is free; {hint}")
        line += f"; {device}: about {fmt_bytes(est['device'])} of {fmt_bytes(free)} free"
    return line

"""Saved progress of a quantization run: the work directory, its manifest, resume, Ctrl-C.

A run of ``tacq quantize`` keeps what it has finished in a work directory (``<out>.work`` beside
``--out``, or ``--work-dir``)::

    manifest.json                 every setting the pieces depend on (see :func:`run_manifest`)
    gradients.safetensors         TACQ: the |gradient| sums (fingerprinted; written once, atomically)
    qw/layer-00007/               TACQ: decoder layer 7 of the plain GPTQ pass that gives Q(W)
    final/layer-00007/            decoder layer 7 of the final pass
        layers.safetensors        the packed format-v1 layers of that decoder layer
        layer.json                their specs and summary rows

Each layer directory is written into a temporary sibling, re-read and validated, then renamed
into place (:class:`LayerStore`), so a piece is either complete or absent. A resumed run loads
the finished layers of a pass, sets the model's weights to exactly what they decode to (the same
values the uninterrupted run had in memory), recomputes the next layer's inputs by running the
calibration activations through them, and carries on: the result is the same, tensor for tensor.

The work directory is reused only by ``--resume`` and only when its manifest equals the run's
(the first differing setting is named otherwise); after the checkpoint is written it is deleted.

Ctrl-C (:class:`InterruptGuard`): the first SIGINT asks the run to stop at the next safe point,
that is after the decoder layer being quantized is finished and saved (or after the current batch
of the gradient pass, which is not saved piecewise); a second SIGINT stops at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from typing import Callable

import torch

from tacq_kernels import CheckpointError, PackedLayer
from tacq_kernels.atomic import TMP_TAG, _pid_alive, test_point
from tacq_kernels.format import LayerSpec, layer_state_dict, read_safetensors, split_layer_state_dict

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1

# The modules whose code decides the numbers in a checkpoint: a change to any of them changes
# the code version, and a work directory written by other code is not resumed.
_QUANT_SOURCES = ("affine.py", "claq.py", "data.py", "gptq.py", "kmeans.py", "pipeline.py", "quantized_weight.py",
                  "rtn.py", "sequential.py", "tacq.py", "progress.py")
_KERNEL_SOURCES = ("format.py", "packing.py", "reference.py")


class WorkDirError(ValueError):
    """A work directory that cannot be used for this run (one line for the user)."""


class QuantizeInterrupted(Exception):
    """Raised at a safe point after Ctrl-C; ``where`` says what was finished."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


def code_version() -> str:
    """``tacq_kernels`` version + a short hash of the quantizer and format sources."""
    import tacq_kernels

    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    kdir = os.path.dirname(os.path.abspath(tacq_kernels.__file__))
    for d, names in ((here, _QUANT_SOURCES), (kdir, _KERNEL_SOURCES)):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                h.update(n.encode() + b"\0" + f.read())
    return f"{tacq_kernels.__version__}+{h.hexdigest()[:12]}"


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and a strided sample of its values
    (about 1,000 values per tensor: cheap for 70B models, and any re-trained or other model differs)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // 997)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def calibration_fingerprint(calib) -> str:
    h = hashlib.sha256(calib.windows.to(torch.int64).cpu().numpy().tobytes())
    if calib.items is not None:
        for s in calib.items:
            h.update(s.to(torch.int64).cpu().numpy().tobytes() + b"|")
    return h.hexdigest()[:24]


def run_settings(args, method_args: dict) -> dict:
    """The settings of a command that a work directory depends on, known before the model loads
    (compared first, so a mismatch is reported in seconds)."""
    s = {"manifest_version": MANIFEST_VERSION, "code_version": code_version(),
         "model": os.path.abspath(os.path.expanduser(args.model)) if args.model and os.path.exists(
             os.path.expanduser(args.model)) else (args.model or "default:SmolLM2-135M-Instruct")}
    s.update({f"method_args.{k}": v for k, v in method_args.items()})
    s.update({"calib": args.calib, "template": args.template, "nsamples": args.nsamples, "seqlen": args.seqlen,
              "corrupt_from": args.corrupt_from, "grad_cache": args.grad_cache,
              "device": args.device_type, "batch_size": args.batch_size})
    return s


def first_difference(saved: dict, wanted: dict) -> str | None:
    for k in list(wanted) + [k for k in saved if k not in wanted]:
        if saved.get(k, "<absent>") != wanted.get(k, "<absent>"):
            return f"{k}: work directory {saved.get(k, '<absent>')!r}, this run {wanted.get(k, '<absent>')!r}"
    return None


def _write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}{TMP_TAG}{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class WorkDir:
    """The work directory of one run (module docstring)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.path, MANIFEST)

    def exists(self) -> bool:
        return os.path.isdir(self.path) and bool(set(os.listdir(self.path)) - {"lock"})

    def read_manifest(self) -> dict:
        try:
            with open(self.manifest_path) as f:
                m = json.load(f)
        except FileNotFoundError:
            raise WorkDirError(f"work directory {self.path} has no {MANIFEST}; it was not made by tacq quantize "
                               "(delete it or choose another --work-dir)") from None
        except (OSError, ValueError) as e:
            raise WorkDirError(f"work directory {self.path}: cannot read {MANIFEST} ({e})") from None
        if not isinstance(m, dict):
            raise WorkDirError(f"work directory {self.path}: {MANIFEST} is not a JSON object")
        return m

    def check(self, wanted: dict) -> None:
        """Refuse a work directory made by another command, naming the first differing setting
        (only the keys of ``wanted`` and the ones saved without a counterpart are compared)."""
        saved = self.read_manifest()
        subset = {k: saved.get(k, "<absent>") for k in wanted}
        diff = first_difference(subset, wanted)
        if diff:
            raise WorkDirError(f"work directory {self.path} was made by a different run ({diff}); delete it, "
                               "or give this run another --work-dir")

    def create(self, manifest: dict) -> None:
        os.makedirs(self.path, exist_ok=True)
        for entry in os.listdir(self.path):
            if TMP_TAG in entry:  # a piece being written when an earlier run died
                p = os.path.join(self.path, entry)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
        _write_json_atomic(self.manifest_path, manifest)

    def update_manifest(self, **fields) -> None:
        m = self.read_manifest()
        m.update(fields)
        _write_json_atomic(self.manifest_path, m)

    def lock(self):
        """Hold an exclusive lock on the work directory for this process (released when the
        returned file is closed or the process dies): two runs never write the same pieces."""
        import fcntl

        os.makedirs(self.path, exist_ok=True)
        f = open(os.path.join(self.path, "lock"), "w")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise WorkDirError(f"work directory {self.path} is in use by another tacq quantize run") from None
        return f

    def gradient_path(self) -> str:
        return os.path.join(self.path, "gradients.safetensors")

    def store(self, stage: str) -> "LayerStore":
        return LayerStore(os.path.join(self.path, stage), stage)

    def summary(self) -> str:
        parts = []
        if os.path.exists(self.gradient_path()):
            parts.append("gradients")
        for stage in ("qw", "final"):
            n = self.store(stage).completed()
            if n:
                parts.append(f"{n} layer(s) of the {'Q(W) pass' if stage == 'qw' else 'final pass'}")
        return ", ".join(parts) or "nothing finished yet"

    def size_bytes(self) -> int:
        total = 0
        for root, _, files in os.walk(self.path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class LayerStore:
    """Finished decoder layers of one pass: ``<dir>/layer-00007/{layers.safetensors, layer.json}``."""

    def __init__(self, path: str, stage: str):
        self.path = path
        self.stage = stage
        self.save_seconds = 0.0
        self.saved_bytes = 0

    def _dir(self, li: int) -> str:
        return os.path.join(self.path, f"layer-{li:05d}")

    def completed(self) -> int:
        """How many decoder layers, from layer 0 on without a gap, are saved."""
        n = 0
        while os.path.isfile(os.path.join(self._dir(n), "layer.json")):
            n += 1
        return n

    def save(self, li: int, packed: dict[str, PackedLayer], reports: list[dict]) -> None:
        import time

        from safetensors.torch import save_file

        t0 = time.perf_counter()
        os.makedirs(self.path, exist_ok=True)
        final = self._dir(li)
        tmp = f"{final}{TMP_TAG}{os.getpid()}"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.mkdir(tmp)
        try:
            state = {k: v.detach().contiguous().cpu() for k, v in layer_state_dict(packed).items()}
            save_file(state, os.path.join(tmp, "layers.safetensors"))
            meta = {"layer": li, "specs": {n: p.spec.to_dict() for n, p in packed.items()}, "reports": reports}
            with open(os.path.join(tmp, "layer.json"), "w") as f:
                json.dump(meta, f)
            self._read(tmp)  # validation re-read: what resume will load
            for fname in ("layers.safetensors", "layer.json"):
                fd = os.open(os.path.join(tmp, fname), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if os.path.exists(final):  # a leftover without layer.json cannot be complete
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.save_seconds += time.perf_counter() - t0
        self.saved_bytes += sum(os.path.getsize(os.path.join(final, f)) for f in os.listdir(final))

    @staticmethod
    def _read(path: str) -> tuple[dict[str, PackedLayer], list[dict]]:
        with open(os.path.join(path, "layer.json")) as f:
            meta = json.load(f)
        specs = {n: LayerSpec.from_dict(d, n) for n, d in meta["specs"].items()}
        layers, rest = split_layer_state_dict(read_safetensors(os.path.join(path, "layers.safetensors")), specs)
        if rest:
            raise CheckpointError(f"{path}: unexpected tensors {sorted(rest)[:3]}")
        return layers, meta["reports"]

    def load(self, li: int) -> tuple[dict[str, PackedLayer], list[dict]]:
        try:
            return self._read(self._dir(li))
        except (OSError, ValueError, KeyError) as e:
            raise WorkDirError(f"saved layer {li} of the {self.stage} pass in {self._dir(li)} cannot be read ({e}); "
                               "delete the work directory and start again") from None


def stale_work_pieces(path: str) -> list[str]:
    """Temporary pieces of dead processes inside a work directory (named, then cleaned on create)."""
    out = []
    for root, dirs, files in os.walk(path):
        for e in dirs + files:
            if TMP_TAG in e and not _pid_alive(int(e.rsplit("-", 1)[1]) if e.rsplit("-", 1)[1].isdigit() else -1):
                out.append(os.path.join(root, e))
    return out


# --------------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------------

_STOP = {"requested": False, "guarded": False}


def stop_requested() -> bool:
    return _STOP["requested"]


def checkpoint(where: str) -> None:
    """A safe point: raise :class:`QuantizeInterrupted` when Ctrl-C was pressed (under an
    :class:`InterruptGuard`; without one, Ctrl-C is Python's KeyboardInterrupt)."""
    if _STOP["guarded"] and _STOP["requested"]:
        raise QuantizeInterrupted(where)


class InterruptGuard:
    """While active, the first SIGINT only asks the run to stop at the next :func:`checkpoint`."""

    def __init__(self, log: Callable[[str], None] | None = None):
        self.log = log or (lambda s: print(s, file=sys.stderr))
        self._old = None

    def _handler(self, signum, frame):
        if _STOP["requested"]:
            raise KeyboardInterrupt
        _STOP["requested"] = True
        self.log("\ntacq: Ctrl-C: finishing the current layer, then saving and stopping (Ctrl-C again to stop now)")

    def __enter__(self):
        _STOP["requested"] = False
        _STOP["guarded"] = True
        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old if self._old is not None else signal.default_int_handler)
        _STOP["guarded"] = False
        return False


__all__ = ["InterruptGuard", "LayerStore", "QuantizeInterrupted", "WorkDir", "WorkDirError", "checkpoint",
           "code_version", "test_point"]

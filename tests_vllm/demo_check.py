"""The demo check: vLLM's greedy answer (TP = 3 by default) to the demo prompt against `tacq generate`'s.

    .venv-vllm/bin/python tests_vllm/demo_check.py CHECKPOINT [--tp 3] [--max-new-tokens 32]

TP = 3, not 2: the default model (SmolLM2-135M) has 9 attention heads and 3 KV heads, and vLLM
requires both to divide by the TP size (TP = 2 is refused by vLLM's own config check). On a machine
with fewer cores than ranks the ranks share cores (VLLM_CPU_OMP_THREADS_BIND wraps around).

CHECKPOINT: the default model's TACQ checkpoint (`make demo` writes runs/demo). Both sides use
the chat template, greedy decoding and fp32 on the CPU (what `tacq generate` uses there);
`tacq generate`'s own function (tacq_quant.generate.generate) gives the reference. Prints the
prompt, both answers and the engine's seconds (the vLLM CPU settings come from conftest.VLLM_ENV); exit status 0 when the answers are equal, 1 if not.
tests_vllm/test_demo.py runs it when TACQ_VLLM_DEMO_CKPT is set.
"""

import argparse
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def check(ckpt: str, max_new_tokens: int = 32, workdir: str | None = None, tp: int = 3) -> tuple[str, str, dict]:
    """Returns (tacq generate's answer, vLLM's answer at TP = ``tp``, engine seconds)."""
    import torch

    import tacq_kernels
    from conftest import run_engine
    from tacq_quant.demo import DEFAULT_PROMPT
    from tacq_quant.generate import build_inputs, generate
    from transformers import AutoTokenizer

    ckpt = os.path.abspath(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = tacq_kernels.load(ckpt, dtype=torch.float32).eval()
    want = generate(model, tok, DEFAULT_PROMPT, max_new_tokens=max_new_tokens).text
    ids = build_inputs(tok, DEFAULT_PROMPT)["input_ids"][0].tolist()
    del model
    work = pathlib.Path(workdir or tempfile.mkdtemp(prefix="demo_check_"))
    ncpu = os.cpu_count() or 1
    bind = "|".join(str(rank % ncpu) for rank in range(tp))
    res = run_engine({"tp": tp, "checkpoints": {"demo": ckpt}, "prompts": [ids], "max_tokens": max_new_tokens,
                      "logprobs": 1, "ignore_eos": False}, work, timeout=1800, VLLM_CPU_OMP_THREADS_BIND=bind)
    got = tok.decode(res["demo"][0]["tokens"], skip_special_tokens=True)
    return want, got, res["_seconds"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--tp", type=int, default=3, help="tensor-parallel size (must divide the model's heads and KV heads)")
    args = p.parse_args(argv)
    from tacq_quant.demo import DEFAULT_PROMPT

    want, got, seconds = check(args.checkpoint, args.max_new_tokens, tp=args.tp)
    print(f"prompt:        {DEFAULT_PROMPT}")
    print(f"tacq generate: {want!r}")
    print(f"vLLM TP={args.tp}:     {got!r}")
    print(f"vLLM seconds:  {seconds}")
    print("EQUAL" if got == want else "DIFFERENT")
    return 0 if got == want else 1


if __name__ == "__main__":
    sys.exit(main())

"""What saving progress costs, timed on the pieces themselves (no quantization run needed).

Writes the work-directory pieces that `tacq quantize` writes for a TACQ run on the default model
(SmolLM2-135M: 30 decoder layers, hidden 576, intermediate 1536, 9/3 heads): one LayerStore piece
per decoder layer for the Q(W) pass (b-bit, no kept weights) and for the final pass (b-bit,
0.35 % kept weights), with the real shapes, through the same code (LayerStore.save: write,
validation re-read, fsync, rename), and the fp32 gradient sums through the gradient cache's writer (save_gradients: write,
fsync, rename). Prints seconds and bytes per piece kind.

    python benchmarks/progress_save_cost.py [--bits 3] [--dir /tmp/x] [--repeat 3]
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

from tacq_kernels.testing import random_layer
from tacq_quant.progress import WorkDir

SHAPES = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
          "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
          "mlp.down_proj": (576, 1536)}
LAYERS = 30


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="progress-cost-", dir=args.dir)
    try:
        for stage, frac in (("qw", 0.0), ("final", 0.0035)):
            layers = [{f"model.layers.{li}.{s}": random_layer(n, k, bits=args.bits, outlier_frac=frac, seed=li * 7 + j,
                                                              name=f"model.layers.{li}.{s}")
                       for j, (s, (n, k)) in enumerate(SHAPES.items())} for li in range(LAYERS)]
            runs = []
            for r in range(args.repeat):
                work = WorkDir(os.path.join(root, f"w{r}"))
                store = work.store(stage)
                for li, packed in enumerate(layers):
                    store.save(li, packed, [])
                runs.append(store.save_seconds)
                size = store.saved_bytes
                shutil.rmtree(work.path)
            print(f"{stage}: {LAYERS} layer pieces, {size / 2**20:.1f} MiB, {statistics.median(runs):.2f} s "
                  f"(median of {args.repeat}; {statistics.median(runs) / LAYERS * 1000:.0f} ms per layer)")
        from tacq_quant.tacq import save_gradients

        grads = {f"model.layers.{li}.{s}": torch.rand(n, k) for li in range(LAYERS) for s, (n, k) in SHAPES.items()}
        runs = []
        for r in range(args.repeat):
            path = os.path.join(root, "gradients.safetensors")
            t0 = time.perf_counter()
            save_gradients(grads, path, "x")
            runs.append(time.perf_counter() - t0)
            size = os.path.getsize(path)
            os.remove(path)
        print(f"gradients: {size / 2**20:.1f} MiB, {statistics.median(runs):.2f} s (median of {args.repeat})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

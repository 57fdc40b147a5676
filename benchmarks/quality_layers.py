"""Per-layer view of the quality runs: where GPTQ fails at 2 bits and where TACQ keeps its weights.

    python benchmarks/quality_layers.py [RESULTS_DIR] [BITS]     (defaults benchmarks/results/quality, 2)

Reads the quantize reports (relative output error ||XW^T - XW_hat^T|| / ||XW^T|| per linear, on the
calibration inputs that linear saw, and kept counts) of gptq{B}, tacq{B} and claq{B}.
"""

from __future__ import annotations

import collections
import json
import os
import sys


def layers(results, name):
    path = os.path.join(results, f"{name}.quantize.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return {r["name"]: r for r in json.load(f)["layers_report"]}


def main(results="benchmarks/results/quality", bits="2"):
    g, t, c = (layers(results, f"{m}{bits}") for m in ("gptq", "tacq", "claq"))
    if not g or not t:
        return f"need gptq{bits} and tacq{bits} reports in {results}"
    out = [f"## {bits}-bit: the 10 linears with the largest GPTQ error (relative output error)", "",
           "| linear | GPTQ | TACQ | CLAQ | TACQ kept here |", "|---|---|---|---|---|"]
    for r in sorted(g.values(), key=lambda r: -r["rel_error"])[:10]:
        n = r["name"]
        numel = r["out_features"] * r["in_features"]
        ce = f"{c[n]['rel_error']:.3f}" if c else "-"
        out.append(f"| `{n}` | {r['rel_error']:.3f} | {t[n]['rel_error']:.3f} | {ce} | "
                   f"{t[n]['nnz']:,} ({100 * t[n]['nnz'] / numel:.2f} %) |")
    mean = lambda d: sum(r["rel_error"] for r in d.values()) / len(d)  # noqa: E731
    med = lambda d: sorted(r["rel_error"] for r in d.values())[len(d) // 2]  # noqa: E731
    out += ["", f"Mean / median relative error over the 210 linears: GPTQ {mean(g):.3f} / {med(g):.3f}, "
                f"TACQ {mean(t):.3f} / {med(t):.3f}" + (f", CLAQ {mean(c):.3f} / {med(c):.3f}" if c else "")]
    kept_type, numel_type, kept_layer = collections.Counter(), collections.Counter(), collections.Counter()
    for n, r in t.items():
        kind = n.split(".")[-1]
        kept_type[kind] += r["nnz"]
        numel_type[kind] += r["out_features"] * r["in_features"]
        kept_layer[int(n.split(".")[2])] += r["nnz"]
    total = sum(kept_type.values())
    out += ["", "TACQ kept share by matrix type: " + ", ".join(
        f"{k} {100 * kept_type[k] / numel_type[k]:.2f} %" for k in sorted(kept_type))]
    layer_share = [100 * kept_layer[i] / total for i in sorted(kept_layer)]
    out += ["TACQ kept weights per decoder layer (% of all kept): " + " ".join(f"{s:.1f}" for s in layer_share)]
    return "\n".join(out)


if __name__ == "__main__":
    print(main(*sys.argv[1:]))

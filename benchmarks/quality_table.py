"""Markdown table of the quality runs (benchmarks/run_quality.sh) from their JSON results.

    python benchmarks/quality_table.py [RESULTS_DIR]     (default benchmarks/results/quality)

One row per run that has an evaluation: method, calibration, bits (weights only / all-inclusive),
kept share, quantization time, WikiText-2 perplexity and PIQA accuracy. TACQ's time includes the
GPTQ pass it took Q(W) from and its gradient pass (also when the gradients came from the cache).
Time is given three ways: the whole quantization (calibration passes included; for RTN the pass
only feeds the error report), the part spent inside the per-matrix quantizers, and the wall time
of the command (model loading and saving included).
"""

from __future__ import annotations

import json
import os
import re
import sys

ORDER = ["unquantized",
         "rtn2", "gptq2", "tacq2", "gptq2_piqa", "tacq2_piqa", "claq2", "claq2.1", "claq2.2", "claq2.1_or",
         "rtn3", "gptq3", "tacq3", "gptq3_piqa", "tacq3_piqa", "claq3", "claq3.1", "claq3.1_or",
         "tacq2_magnitude", "tacq2_msg", "tacq2_qal", "gptq2_g128", "gptq3_g128",
         "tacqclaq2", "tacqclaq2_piqa", "tacqclaq3", "tacqclaq3_piqa", "tacqclaq3_n64", "tacqclaq3_n32"]


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def label(name: str, q: dict | None) -> str:
    if q is None:
        return "unquantized (fp32)"
    a = q["method_args"]
    m = a["method"].upper()
    if a["method"] == "tacq" and a.get("base", "gptq") != "gptq":
        m += f" over {a['base'].upper()}"
    bits = f"{a['bits']:g}"
    extra = []
    if a["method"] == "tacq":
        extra.append(f"p={100 * a['outlier_frac']:g}%")
    if a["method"] == "claq" or a.get("base") == "claq":
        if float(a["bits"]) != int(float(a["bits"])):
            extra.append("AP")
        if a.get("reserve_outliers"):
            extra.append("OR")
    if a.get("group_size", -1) not in (-1, None):
        extra.append(f"g{a['group_size']}")
    if a.get("saliency", "tacq") != "tacq":
        extra.append(f"score={a['saliency']}")
    kmeans = a["method"] == "claq" or a.get("base") == "claq"
    if a.get("act_order") and not kmeans:  # on by default for CLAQ only
        extra.append("act-order")
    if a.get("qw_hessians") == "fp":  # rows made before the option had a sequential Q(W) pass
        extra.append("fp-Hessian Q(W)")
    if a.get("codebook_weights", "none") != "none":
        extra.append(f"k-means weights {a['codebook_weights'].replace('g2', 'G²').replace('g', 'G')}")
    if a.get("nsamples", 128) != 128 or a.get("seqlen", 256) != 256:
        extra.append(f"calib {a['nsamples']}x{a['seqlen']}")
    if a.get("finetune_steps"):
        extra.append(f"fine-tune {a['finetune_steps']} steps")
    return f"{m} {bits}" + (f" ({', '.join(extra)})" if extra else "")


def calib_name(q: dict | None) -> str:
    if q is None:
        return "-"
    spec = q["method_args"]["calib"]
    kind = spec.split(":")[0]
    return {"wikitext2": "WikiText-2 (calib half)", "piqa": "PIQA (calib half)"}.get(kind, spec)


def scan_run_log(results: str, pattern: str) -> dict[str, str]:
    """``{group 1: group 2}`` for every line of RESULTS/run.log that ``pattern`` matches (later lines win)."""
    out = {}
    log = os.path.join(results, "run.log")
    if os.path.exists(log):
        for line in open(log):
            m = re.search(pattern, line)
            if m:
                out[m.group(1)] = m.group(2)
    return out


def wall_times(results: str) -> dict[str, int]:
    return {name: int(s) for name, s in scan_run_log(results, r"done (\S+) in (\d+) s wall").items()}


def main(results: str = "benchmarks/results/quality") -> str:
    names = [n for n in ORDER if os.path.exists(os.path.join(results, f"{n}.eval.json"))]
    extra = sorted(f[: -len(".eval.json")] for f in os.listdir(results) if f.endswith(".eval.json"))
    names += [n for n in extra if n not in names]
    quant = {n: load(os.path.join(results, f"{n}.quantize.json")) for n in names}
    grad_seconds = {}
    for n, q in quant.items():
        if q and q.get("stages", {}).get("gradient_cache") in ("written", None) and "gradient_seconds" in q.get("stages", {}):
            grad_seconds.setdefault(q["method_args"]["calib"], q["stages"]["gradient_seconds"])
    walls = wall_times(results)
    rows = ["| run | method | calibration | bits: weights / all-incl. | kept | quantize time | "
            "WikiText-2 ppl | PIQA acc_norm | PIQA acc |",
            "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        q = quant[n]
        ev = load(os.path.join(results, f"{n}.eval.json"))
        ppl = ev.get("ppl", {}).get("ppl") if ev else None
        task = ev.get("task") if ev else None
        if q:
            bits = f"{q['bits_weights']:.3f} / {q['bits_total']:.3f}"
            kept = f"{100 * q['outlier_frac']:.2f} %"
            t = q["seconds"]
            note = ""
            st = q.get("stages", {})
            if q["method_args"]["method"] == "tacq":
                src = st.get("corrupt_from")
                if src:
                    base = quant.get(os.path.basename(src.rstrip("/"))) or load(
                        os.path.join(results, f"{os.path.basename(src.rstrip('/'))}.quantize.json"))
                    if base:
                        t += base["seconds"]
                        note = "+Q(W)"
                if st.get("gradient_cache") == "hit":
                    t = t - st.get("gradient_seconds", 0) + grad_seconds.get(q["method_args"]["calib"], 0)
                    note += "+grad"
            time_s = f"{t / 60:.1f} min" + (f" ({note.strip('+')} incl.)" if note else "")
            time_s += f"; {q['quantize_seconds'] / 60:.1f} in quantizers"
            if n in walls:
                time_s += f"; {walls[n] / 60:.1f} wall"
        else:
            bits, kept, time_s = "32 (fp32)", "-", "-"
        ppl_s = f"{ppl:.2f}" if ppl is not None else "-"
        acc_s = f"{100 * task['acc_norm']:.1f} ± {100 * task['stderr']:.1f}" if task else "-"
        acc2 = f"{100 * task['acc']:.1f}" if task else "-"
        rows.append(f"| `{n}` | {label(n, q)} | {calib_name(q)} | {bits} | {kept} | {time_s} | {ppl_s} | {acc_s} | {acc2} |")
    protocol = []
    for n in names:
        ev = load(os.path.join(results, f"{n}.eval.json"))
        if ev:
            protocol = [ev["ppl"]["protocol"], ev["task"]["protocol"]] if "ppl" in ev and "task" in ev else []
            break
    return "\n".join(rows) + ("\n\nProtocols: " + "; ".join(protocol) if protocol else "")


if __name__ == "__main__":
    print(main(*sys.argv[1:]))

"""Pareto view of the quality runs: WikiText-2 perplexity and PIQA against all-inclusive bits.

    python benchmarks/quality_pareto.py [RESULTS_DIR] [--png PATH]
        (default benchmarks/results/quality, PNG docs/quality_pareto.png)

Reads the same JSON results as ``quality_table.py`` (benchmarks/run_quality.sh writes them), the
commands from RESULTS_DIR/run.log and the commit each row ran at from RESULTS_DIR/commits.json
(``{"row": "commit or range"}``, kept by hand beside the runs: the JSON reports predate it).
Prints a markdown table of every row sorted by bits, marking the rows on the Pareto front of their calibration setting
(generic or PIQA; no other row of it has fewer or equal bits and a better or equal score, one
strictly better); the unquantized row is listed at 16 bits, and saves a
two-panel plot: one marker per method and recipe, the unquantized model as a line.
"""

from __future__ import annotations

import argparse
import os

from quality_table import calib_name, label, load, scan_run_log


def rows_of(results: str) -> list[dict]:
    commits = load(os.path.join(results, "commits.json")) or {}
    commands = {name: cmd.strip() for name, cmd in scan_run_log(results, r"\] quantize (\S+): (.*)$").items()}
    rows = []
    for f in sorted(os.listdir(results)):
        if not f.endswith(".eval.json"):
            continue
        name = f[: -len(".eval.json")]
        ev = load(os.path.join(results, f))
        q = load(os.path.join(results, f"{name}.quantize.json"))
        if not ev or "ppl" not in ev or "task" not in ev:
            continue
        rows.append({
            "name": name, "label": label(name, q), "calib": calib_name(q),
            "bits": q["bits_total"] if q else 16.0, "ppl": ev["ppl"]["ppl"], "acc_norm": 100 * ev["task"]["acc_norm"],
            "stderr": 100 * ev["task"]["stderr"], "fp": q is None,
            "family": family(q), "command": commands.get(name, "tacq eval (unquantized reference)" if q is None else "-"),
            "commit": commits.get(name, "-"),
        })
    return rows


def family(q: dict | None) -> str:
    if q is None:
        return "unquantized"
    a = q["method_args"]
    m = a["method"]
    if m == "tacq":
        m = f"tacq/{a.get('base', 'gptq')}"
        if a.get("saliency", "tacq") != "tacq":
            m += f" ({a['saliency']})"
        if a.get("act_order") and a.get("base", "gptq") == "gptq":
            m += " act-order"
        if a.get("codebook_weights", "none") != "none":
            m += f", {a['codebook_weights'].replace('g2', 'G²').replace('g', 'G')}-weighted k-means"
    elif m == "claq":
        if float(a["bits"]) != int(float(a["bits"])):
            m += " AP"
        if a.get("reserve_outliers"):
            m += "+OR"
    if a.get("group_size", -1) not in (-1, None):
        m += f" g{a['group_size']}"
    if a.get("finetune_steps"):
        m += f" + {a['finetune_steps']}-step distillation"
    if a["calib"].startswith("piqa"):
        m += ", PIQA calib"
    return m


def pareto(rows: list[dict], key: str, better) -> set[str]:
    """Names of the rows no other row dominates (fewer-or-equal bits and better-or-equal ``key``)."""
    front = set()
    for r in rows:
        dominated = any(
            o is not r and o["bits"] <= r["bits"] and not better(r[key], o[key])
            and (o["bits"] < r["bits"] or better(o[key], r[key]))
            for o in rows)
        if not dominated:
            front.add(r["name"])
    return front


def table(rows: list[dict]) -> str:
    quant = [r for r in rows if not r["fp"]]
    # generic and task (PIQA) calibration are two settings: each has its own front
    front_ppl, front_acc = set(), set()
    for calib in {r["calib"] for r in quant}:
        part = [r for r in quant if r["calib"] == calib]
        front_ppl |= pareto(part, "ppl", lambda a, b: a < b)
        front_acc |= pareto(part, "acc_norm", lambda a, b: a > b)
    out = ["| run | method | calibration | bits (all-incl.) | WikiText-2 ppl | PIQA acc_norm | front | commit | command |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["bits"], r["ppl"])):
        mark = "/".join(x for x, s in (("ppl", front_ppl), ("PIQA", front_acc)) if r["name"] in s)
        out.append(f"| `{r['name']}` | {r['label']} | {r['calib']} | {r['bits']:.3f} | {r['ppl']:.2f} | "
                   f"{r['acc_norm']:.1f} ± {r['stderr']:.1f} | {mark or '-'} | {r['commit']} | `{r['command']}` |")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = next((r for r in rows if r["fp"]), None)
    quant = [r for r in rows if not r["fp"]]
    fams = sorted({r["family"] for r in quant})
    markers = "osD^v<>pPX*hH8d"
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key, ylabel in ((axes[0], "ppl", "WikiText-2 perplexity (eval half, log)"),
                            (axes[1], "acc_norm", "PIQA acc_norm % (eval half)")):
        for i, fam in enumerate(fams):
            pts = sorted((r for r in quant if r["family"] == fam), key=lambda r: r["bits"])
            ax.plot([r["bits"] for r in pts], [r[key] for r in pts], markers[i % len(markers)], label=fam,
                    markersize=7, linestyle="none")
        if fp:
            ax.axhline(fp[key], color="k", linestyle="--", linewidth=1, label=f"unquantized ({fp[key]:.1f})")
        ax.set_xlabel("bits per weight, all-inclusive (codes, scales, codebooks, sparse part)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].set_ylim(top=max(r["ppl"] for r in quant if r["ppl"] < 1000) * 1.5)
    axes[1].axhline(50, color="grey", linestyle=":", linewidth=1, label="chance (50)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("SmolLM2-135M-Instruct: quality against all-inclusive bits (rows of docs/results.md)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", default="benchmarks/results/quality")
    p.add_argument("--png", default="docs/quality_pareto.png")
    args = p.parse_args(argv)
    rows = rows_of(args.results)
    if not rows:
        p.error(f"no evaluated runs in {args.results}")
    print(table(rows))
    plot(rows, args.png)
    print(f"\nplot: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""benchmarks/quality_pareto.py: the Pareto fronts, the table and the plot from a results folder."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import quality_pareto  # noqa: E402


def _write_row(d, name, method, bits_total, ppl, acc, calib="wikitext2:x", **args):
    ev = {"ppl": {"ppl": ppl, "protocol": "p"}, "task": {"acc_norm": acc, "acc": acc, "stderr": 0.016,
                                                            "protocol": "t"}}
    (d / f"{name}.eval.json").write_text(json.dumps(ev))
    if method is None:
        return
    q = {"method_args": {"method": method, "bits": 3, "calib": calib, **args}, "bits_total": bits_total,
         "bits_weights": 3.0, "outlier_frac": 0.0, "seconds": 1.0, "quantize_seconds": 1.0, "stages": {}}
    (d / f"{name}.quantize.json").write_text(json.dumps(q))


def test_fronts_table_and_plot(tmp_path):
    d = tmp_path / "res"
    d.mkdir()
    _write_row(d, "unquantized", None, 0, 30.0, 0.65)
    _write_row(d, "a", "gptq", 3.1, 100.0, 0.56)
    _write_row(d, "b", "tacq", 3.2, 50.0, 0.60, outlier_frac=0.0035, base="gptq")
    _write_row(d, "c", "tacq", 3.35, 42.0, 0.59, outlier_frac=0.0023, base="claq")  # ppl front, not PIQA
    _write_row(d, "d", "claq", 3.3, 60.0, 0.55)  # b has fewer bits and is better on both: dominated
    _write_row(d, "e", "tacq", 3.2, 70.0, 0.62, calib="piqa:y", outlier_frac=0.0035, base="gptq")
    (d / "run.log").write_text("[2026-12-02 10:00:00] quantize c: tacq quantize --method tacq --base claq\n")
    (d / "commits.json").write_text(json.dumps({"c": "abc1234"}))
    rows = quality_pareto.rows_of(str(d))
    assert {r["name"] for r in rows} == {"unquantized", "a", "b", "c", "d", "e"}
    generic = [r for r in rows if not r["fp"] and r["calib"].startswith("WikiText")]
    assert quality_pareto.pareto(generic, "ppl", lambda a, b: a < b) == {"a", "b", "c"}
    assert quality_pareto.pareto(generic, "acc_norm", lambda a, b: a > b) == {"a", "b"}
    table = quality_pareto.table(rows).splitlines()
    line_c = next(line for line in table if line.startswith("| `c`"))
    assert "TACQ over CLAQ 3" in line_c and "| ppl |" in line_c and "abc1234" in line_c and "--base claq" in line_c
    line_d = next(line for line in table if line.startswith("| `d`"))
    assert "| - |" in line_d
    # e is alone in its calibration setting: on both of its fronts
    assert "| ppl/PIQA |" in next(line for line in table if line.startswith("| `e`"))
    png = tmp_path / "p.png"
    assert quality_pareto.main([str(d), "--png", str(png)]) == 0
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"

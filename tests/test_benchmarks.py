"""The benchmark harness without a GPU, so that a lent GPU never runs an untested script.

``benchmarks/gpu_check.sh --dry-run`` runs every step in its CPU form (the install as pip's dry
run, the GPU tests skipping, both benchmarks on tiny shapes through the Triton interpreter); its
outputs are checked here against the issue's record schema, the byte accounting, the device's
8-file limit and each other. The step helper's isolation (a failing, a timed-out and an
out-of-budget step), the GPU subset's planned size and the decode check's sensitivity are tested
directly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
GPU_CHECK = os.path.join(BENCH, "gpu_check.sh")
sys.path.insert(0, BENCH)

import bench_e2e  # noqa: E402
import bench_kernels  # noqa: E402
import benchlib  # noqa: E402

# The record fields issue 12 names, written out here independently of benchlib's schema.
ISSUE_KERNEL_FIELDS = ["kernel", "path", "M", "N", "K", "bits", "decoder", "group_size", "perm", "outlier_frac",
                       "dtype", "us", "fp16_us", "speedup", "bytes", "gbps", "pct_of_copy_bw", "gpu", "commit"]
DEVICE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of the whole GPU check (about a minute on two free cores)."""
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    env = dict(os.environ, PYTHON=sys.executable, TACQ_COMMIT="testcommit")
    result = subprocess.run(["bash", GPU_CHECK, "--dry-run", str(out)], env=env, capture_output=True, text=True,
                            timeout=1200)
    return out, result


def load(out, name):
    with open(out / name) as f:
        return json.load(f)


def test_dry_run_passes_every_step(dry_run):
    out, result = dry_run
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = load(out, "summary.json")
    assert summary["dry_run"] is True and summary["commit"] == "testcommit"
    names = [s["name"] for s in summary["steps"]]
    ours = ["install", "gpu-tests", "bench-kernels", "bench-e2e"]  # other steps may run between them
    assert [n for n in names if n in ours] == ours, names
    assert all(s["status"] == "pass" and s["exit"] == 0 for s in summary["steps"]), summary["steps"]
    assert summary["not_passed"] == []
    log = (out / "gpu_check.log").read_text()
    for name in ("install", "gpu-tests", "bench-kernels", "bench-e2e"):
        assert f"===== {name}: pass" in log


def test_dry_run_output_fits_what_the_device_brings_back(dry_run):
    out, _ = dry_run
    entries = sorted(os.listdir(out))
    assert len(entries) <= 8, entries
    for name in entries:
        path = out / name
        assert path.is_file() and DEVICE_NAME.match(name), name
        assert path.stat().st_size < 16 << 20, name
    assert {"gpu_check.log", "summary.json", "kernels.json", "kernels.png", "e2e.json", "e2e.png"} <= set(entries)
    assert set(load(out, "summary.json")["files"]) == set(entries)


def test_kernel_records_follow_the_issue_schema(dry_run):
    out, _ = dry_run
    records = load(out, "kernels.json")
    assert benchlib.check_records(records, benchlib.KERNEL_FIELDS) == []
    for rec in records:
        assert set(ISSUE_KERNEL_FIELDS) <= set(rec), set(ISSUE_KERNEL_FIELDS) - set(rec)
        assert rec["commit"] == "testcommit" and rec["gpu"].startswith("cpu")
        assert math.isclose(rec["speedup"], rec["fp16_us"] / rec["us"], rel_tol=1e-9)
        assert math.isclose(rec["gbps"], rec["bytes"] / rec["us"] / 1e3, rel_tol=1e-9)
    quant = [r for r in records if r["kernel"] in bench_kernels.KERNELS]
    # Every value of every axis the dry suite covers, as on the GPU.
    assert {r["kernel"] for r in quant} == {"linear", "gemv", "gemm", "prefill"}
    assert {r["path"] for r in quant if r["kernel"] == "linear"} == {"gemv", "gemm", "prefill"}
    assert {r["bits"] for r in quant} == {2, 3, 4}
    assert {(r["decoder"], r["group_size"] == r["K"]) for r in quant} == {("affine", True), ("affine", False), ("lut", False)}
    assert {r["perm"] for r in quant} == {False, True}
    assert {r["outlier_frac"] for r in quant} == {0.0, 0.0035}
    assert {r["dtype"] for r in quant} == {"float16", "bfloat16"}
    assert {r["kernel"] for r in records} - set(bench_kernels.KERNELS) == {"torch.matmul", "copy"}
    for rec in quant:
        assert rec["rel_err"] < benchlib.TOL[rec["dtype"]]
        baseline = [b for b in records if b["kernel"] == "torch.matmul" and b["path"] == "cublas"
                    and (b["M"], b["N"], b["K"], b["dtype"]) == (rec["M"], rec["N"], rec["K"], rec["dtype"])]
        assert len(baseline) == 1 and baseline[0]["us"] == rec["fp16_us"]


def test_kernel_records_count_every_byte(dry_run):
    """bytes = the layer's stored tensors (codes with K padding, scales/zeros or tables, perm, CSR)
    + x + y, recomputed here from the format's own tensor list."""
    from tacq_kernels.format import LayerSpec, SegmentSpec

    out, _ = dry_run
    for rec in load(out, "kernels.json"):
        if rec["kernel"] not in bench_kernels.KERNELS:
            continue
        k, n, m = rec["K"], rec["N"], rec["M"]
        seg = SegmentSpec(0, k, rec["bits"], rec["decoder"], rec["group_size"])
        spec = LayerSpec(k, n, (seg,), has_perm=rec["perm"], nnz=rec["nnz"])
        stored = sum(math.prod(shape) * dtype.itemsize for shape, dtype in spec.tensor_specs().values())
        act = {"float16": 2, "bfloat16": 2}[rec["dtype"]]
        assert rec["bytes"] == stored + (m * k + m * n) * act, rec
        assert (rec["nnz"] > 0) == (rec["outlier_frac"] > 0)


def test_e2e_records(dry_run):
    out, _ = dry_run
    records = load(out, "e2e.json")
    assert benchlib.check_records(records, benchlib.E2E_FIELDS) == []
    assert {(r["variant"], r["phase"], r["batch"]) for r in records} == {
        (v, p, b) for v in ("fp16", "tacq-2bit") for p, b in (("decode", 1), ("decode", 2), ("prefill", 1))}
    fp16 = {(r["phase"], r["batch"]): r["tokens_per_s"] for r in records if r["variant"] == "fp16"}
    for rec in records:
        assert math.isclose(rec["fp16_tokens_per_s"], fp16[(rec["phase"], rec["batch"])])
        assert math.isclose(rec["speedup"], rec["tokens_per_s"] / rec["fp16_tokens_per_s"], rel_tol=1e-9)
        if rec["phase"] == "decode":
            assert rec["logits_rel_err"] < bench_e2e.LOGITS_TOL
            assert rec["bytes_per_step"] > 0 and rec["floor_tokens_per_s"] > 0
        else:
            assert rec["seq_len"] > 1024  # the prefill path, as at 2048 on the GPU


def test_plots_are_pngs(dry_run):
    out, _ = dry_run
    for name in ("kernels.png", "e2e.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def good_record():
    return dict(kernel="linear", path="gemv", M=1, N=64, K=96, bits=2, decoder="affine", group_size=96, perm=False,
                outlier_frac=0.0035, dtype="float16", us=3.0, fp16_us=9.0, speedup=3.0, bytes=2000, gbps=0.6,
                pct_of_copy_bw=20.0, gpu="x", commit="y")


@pytest.mark.parametrize("change", [
    {"M": True},  # a bool is not an int
    {"us": 0.0},
    {"gbps": float("nan")},
    {"group_size": "row"},
    {"perm": 0},
])
def test_schema_check_rejects_bad_records(change, tmp_path):
    assert benchlib.check_records([good_record()], benchlib.KERNEL_FIELDS) == []
    bad = dict(good_record(), **change)
    assert benchlib.check_records([good_record(), bad], benchlib.KERNEL_FIELDS)
    missing = good_record()
    del missing["commit"]
    assert "missing 'commit'" in benchlib.check_records([missing], benchlib.KERNEL_FIELDS)[0]
    assert benchlib.check_records([], benchlib.KERNEL_FIELDS)
    with pytest.raises(ValueError, match="schema"):
        benchlib.write_records(str(tmp_path / "r.json"), [bad], benchlib.KERNEL_FIELDS)
    assert not (tmp_path / "r.json").exists()


def run_bash(script: str, tmp_path, **env):
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, PYTHON=sys.executable, TACQ_COMMIT="c", **env))


def test_step_helper_isolates_failures_and_keeps_the_file_limit(tmp_path):
    out = tmp_path / "out"
    script = f"""
        source {GPU_CHECK}
        DRY=1
        init_run {out}
        step ok        10 true
        step broken    10 false
        step slow       1 sleep 30
        step writer    10 bash -c 'for i in $(seq 1 9); do echo $i > "$OUTDIR/r$i.json"; done; echo extra > "$MORE/x.txt"'
        step after     10 "$PY" -c "print('still running after failures')"
        DEADLINE=$(( $(date +%s) + 5 ))  # less than MIN_STEP_S left
        step late      10 true
        finish
    """
    result = run_bash(script, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == {"ok": "pass", "broken": "fail", "slow": "timeout", "writer": "pass", "after": "pass",
                      "late": "skipped"}
    assert summary["not_passed"] == ["broken", "slow", "late"]
    assert "still running after failures" in (out / "gpu_check.log").read_text()
    entries = sorted(os.listdir(out))
    assert len(entries) == 8 and "more.tar.gz" in entries and all(DEVICE_NAME.match(e) for e in entries)
    with tarfile.open(out / "more.tar.gz") as tar:
        archived = {os.path.basename(n) for n in tar.getnames() if n != "more"}
    loose = {e for e in entries if e.startswith("r")}
    assert len(loose) == 5 and loose | archived == {f"r{i}.json" for i in range(1, 10)} | {"x.txt"}
    assert not os.path.exists(out / "more")
    assert "NOT PASSED: broken slow late" in result.stdout


def test_gpu_check_skip_leaves_named_steps_out(tmp_path):
    out = tmp_path / "out"
    script = f"""
        source {GPU_CHECK}
        DRY=1
        init_run {out}
        step first     10 true
        step heavy-one 10 bash -c 'echo ran > "$OUTDIR/heavy.json"'
        step last      10 true
        finish
    """
    result = run_bash(script, tmp_path, GPU_CHECK_SKIP="heavy-one other")
    assert result.returncode == 1, result.stdout + result.stderr  # a skipped step is not a pass
    status = {s["name"]: s["status"] for s in json.loads((out / "summary.json").read_text())["steps"]}
    assert status == {"first": "pass", "heavy-one": "skipped", "last": "pass"}
    assert not (out / "heavy.json").exists()


def test_gpu_only_commands_are_checked_not_run(tmp_path):
    marker = tmp_path / "ran"
    good = tmp_path / "gpu_job.py"
    good.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    broken = tmp_path / "broken.py"
    broken.write_text("def (:\n")
    ok = run_bash(f"{GPU_CHECK} --check-command {sys.executable} {good}", tmp_path)
    assert ok.returncode == 0 and "not run" in ok.stdout and not marker.exists()
    assert run_bash(f"{GPU_CHECK} --check-command {sys.executable} {broken}", tmp_path).returncode != 0
    assert run_bash(f"{GPU_CHECK} --check-command no-such-program-xyz", tmp_path).returncode != 0
    assert run_bash(f"{GPU_CHECK}", tmp_path).returncode == 2  # usage


def test_gpu_subset_is_sized_for_the_lease():
    """The check suite covers every headline goal and, by the plan's own estimate (12 compile
    workers, as on a 16-core device), fits its gpu_check step; the full suite does not pretend to."""
    cases = bench_kernels.expand(bench_kernels.SUITES["check"])
    plan = bench_kernels.plan(cases)
    est = plan.estimate_s(workers=12, timed_cases=len(cases))
    assert est["total_s"] < 240, est
    have = {(c.kernel, c.n, c.k, c.m, c.flavor.bits, c.flavor.outlier_frac) for c in cases
            if c.flavor.decoder == "affine" and c.flavor.group is None and not c.flavor.perm
            and c.flavor.dtype == "float16"}
    needed = [(n, k, m, bits, frac) for (n, k) in [(28672, 8192)] + bench_kernels.L3_8B for m in (1, 16, 2048)
              for bits in (2, 3) for frac in [0.0035]] + [
        (n, k, m, bits, 0.0) for (n, k) in [(28672, 8192), (14336, 4096)] for m in (1, 16) for bits in (2, 3)]
    missing = [x for x in needed if ("linear", *x) not in have]
    assert not missing, missing
    e2e_args = argparse.Namespace(models=["llama3-8b", "llama2-7b"], batch=[1, 8], prompt_len=128, check_steps=4,
                                  warm_steps=2, prefill_len=2048, variants=["fp16", "tacq-2bit", "tacq-3bit"])
    e2e_plan, _ = bench_e2e.plan(e2e_args)
    e2e_s = e2e_plan.estimate_s(workers=12, timed_cases=0)["total_s"] + bench_e2e.estimate_phases(e2e_args)
    assert e2e_s < 240, e2e_s
    full = bench_kernels.plan(bench_kernels.expand(bench_kernels.SUITES["full"]))
    assert full.estimate_s(workers=12, timed_cases=full.cases)["total_s"] > 600  # make bench: not a lease's job


def test_headline_ratios_weight_each_role_by_its_count():
    def rec(n, k, m, us, fp16_us, frac=0.0035, bits=2):
        return dict(good_record(), N=n, K=k, M=m, group_size=k, us=us, fp16_us=fp16_us, speedup=fp16_us / us,
                    outlier_frac=frac, bits=bits)

    records = [rec(4096, 4096, 1, 2.0, 10.0), rec(1024, 4096, 1, 1.0, 3.0), rec(14336, 4096, 1, 6.0, 30.0),
               rec(4096, 14336, 1, 7.0, 30.0), rec(28672, 8192, 1, 20.0, 120.0),
               rec(28672, 8192, 1, 18.0, 120.0, frac=0.0)]
    # q,o: 2 x (10 / 2); k,v: 2 x (3 / 1); gate, up: 2 x (30 / 6); down: 1 x (30 / 7)
    expect = (2 * 10 + 2 * 3 + 2 * 30 + 30) / (2 * 2 + 2 * 1 + 2 * 6 + 7)
    assert math.isclose(bench_kernels.layer_speedup(records, "llama3-8b", 1, 2), expect)
    rows = {r["goal"]: r for r in bench_kernels.headline(records)}
    assert rows["M=1 2-bit +0.35% 28672x8192 vs fp16"]["value"] == 6.0
    assert rows["M=1 2-bit +0.35% 28672x8192 vs fp16"]["met"] is True
    cost = rows["outlier cost M=1 2-bit 28672x8192: us(0.35%)/us(0) - 1"]
    assert math.isclose(cost["value"], 20 / 18 - 1) and cost["met"] is False
    assert rows["M=16 2-bit 28672x8192 vs fp16"]["value"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed when there is no GPU")
@pytest.mark.parametrize("script", [bench_kernels, bench_e2e])
def test_benchmarks_without_a_gpu_point_to_the_dry_run(script, capsys):
    with pytest.raises(SystemExit) as stop:
        script.main([])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--dry-run" in err and "CUDA" in err, err


def test_decode_check_catches_a_wrong_mask(monkeypatch):
    """The teacher-forced check is what proves the graph-replayed decode right on the GPU: a step
    that never reveals the new position to attention must fail it by far."""
    model = bench_e2e.build_model("tiny", torch.device("cpu"))
    args = argparse.Namespace(prompt_len=8, warm_steps=1, check_steps=2, decode_steps=1)
    good = bench_e2e.measure_decode(model, 2, args, torch.device("cpu"))
    assert good["logits_rel_err"] < bench_e2e.LOGITS_TOL and good["mode"] == "cpu-eager"

    def step_without_mask_update(self):
        out = self.model(input_ids=self.ids, attention_mask=self.mask,
                         position_ids=self.pos.view(1, 1).expand(self.batch, 1), cache_position=self.pos,
                         use_cache=True, **{self.cache_arg: self.cache})
        self.logits.copy_(out.logits[:, -1])
        self.ids.copy_(self.logits.argmax(-1, keepdim=True))
        self.pos.add_(1)

    monkeypatch.setattr(bench_e2e.GreedyDecoder, "step", step_without_mask_update)
    bad = bench_e2e.measure_decode(model, 2, args, torch.device("cpu"))
    assert bad["logits_rel_err"] > 3 * bench_e2e.LOGITS_TOL  # measured 0.21 on the tiny model


def test_decode_step_reads_nothing_back_to_the_host():
    model = bench_e2e.build_model("tiny", torch.device("cpu"))
    dec = bench_e2e.GreedyDecoder(model, 1, 12)
    with torch.no_grad():
        dec.prefill(torch.randint(0, 256, (1, 4)))
        with bench_e2e.NoHostSync():
            dec.step()
        with pytest.raises(RuntimeError, match="host"):
            with bench_e2e.NoHostSync():
                dec.pos.item()


def test_random_layer_drawn_on_the_device_is_a_valid_layer():
    from tacq_kernels import reference
    from tacq_kernels.format import validate_layer
    from tacq_kernels.testing import random_layer

    layer = random_layer(72, 200, bits=3, group_size=64, outlier_frac=0.01, perm=True, seed=3, generate_on_device=True)
    validate_layer("x", layer.spec, layer.tensors)
    assert layer.spec.nnz == round(0.01 * 72 * 200)
    again = random_layer(72, 200, bits=3, group_size=64, outlier_frac=0.01, perm=True, seed=3, generate_on_device=True)
    assert torch.equal(reference.dequantize(layer), reference.dequantize(again))
    w = reference.dequantize_dense(layer)
    assert 0.005 < float(w.std()) < 0.05  # a trained LLM's scale, as random_layer promises

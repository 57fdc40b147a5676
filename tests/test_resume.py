"""Issue 17: `tacq quantize` never loses work or a checkpoint.

Runs are interrupted at named points with the TACQ_TEST_KILL_AT hook (the process signals itself
there: deterministic, no sleeps), by SIGKILL in a subprocess and by SIGINT (Ctrl-C) in-process,
then resumed with --resume; the result must equal an uninterrupted run tensor for tensor.
"""

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import tacq_kernels
from tacq_kernels.atomic import OLD_TAG, TMP_TAG, recover_stale
from tacq_quant.cli import main
from tacq_quant.progress import WorkDir
from tacq_quant.tiny import save_tiny_model

TEXT = ("The quick brown fox jumps over the lazy dog. Quantization maps weights to a few levels; "
        "outliers stay in sixteen bits. Lorem ipsum dolor sit amet, consectetur adipiscing elit. ") * 40

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model, calibration text, the command and an uninterrupted run's checkpoint."""
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny_model(str(root / "tiny"))
    calib = root / "calib.txt"
    calib.write_text(TEXT)
    base = ["quantize", "--model", model, "--method", "tacq", "--bits", "2", "--outlier-frac", "0.02",
            "--calib", str(calib), "--nsamples", "8", "--seqlen", "64", "--quiet", "--threads", "1"]
    ref = str(root / "reference")
    assert main(base + ["--out", ref]) == 0
    assert not os.path.exists(ref + ".work")  # removed once the checkpoint is written
    return {"root": root, "base": base, "ref": ref, "calib": str(calib), "model": model}


def run_sub(argv, kill_at=None, extra_env=None):
    env = dict(os.environ)
    env.pop("TACQ_TEST_KILL_AT", None)
    if kill_at:
        env["TACQ_TEST_KILL_AT"] = kill_at
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "tacq_quant", *argv], capture_output=True, text=True, env=env)


def run_in(argv, capsys, monkeypatch, kill_at=None):
    if kill_at:
        monkeypatch.setenv("TACQ_TEST_KILL_AT", kill_at)
    else:
        monkeypatch.delenv("TACQ_TEST_KILL_AT", raising=False)
    rc = main(argv)
    monkeypatch.delenv("TACQ_TEST_KILL_AT", raising=False)
    return rc, capsys.readouterr().err


def dir_hashes(path):
    return {f: hashlib.sha256(open(os.path.join(path, f), "rb").read()).hexdigest() for f in sorted(os.listdir(path))}


def assert_same_checkpoint(got, want):
    with open(os.path.join(got, "config.json")) as f, open(os.path.join(want, "config.json")) as g:
        assert json.load(f) == json.load(g)
    a, b = load_file(os.path.join(got, "model.safetensors")), load_file(os.path.join(want, "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k

    def rows(path):
        with open(os.path.join(path, "quantize_report.json")) as f:
            return [{k: v for k, v in r.items() if k not in ("seconds", "peak_mem_mb")} for r in json.load(f)["layers_report"]]
    assert rows(got) == rows(want)


def siblings(path, tag):
    parent, name = os.path.split(path)
    return [e for e in os.listdir(parent) if e.startswith(f".{name}{tag}")]


def test_sigkill_at_each_stage_then_resume_is_identical(setup):
    """SIGKILL in the gradient pass, in the Q(W) pass (mid-layer), between final-pass layers and during
    the final write of an --overwrite; each run resumes the last; the end result equals the reference,
    and the checkpoint that --overwrite replaces stays complete and loadable until then."""
    out = str(setup["root"] / "killed")
    shutil.copytree(setup["ref"], out)  # an old checkpoint for --overwrite to replace
    with open(os.path.join(out, "README.md"), "a") as f:
        f.write("\nthe OLD checkpoint\n")
    old = dir_hashes(out)
    argv = setup["base"] + ["--out", out, "--overwrite"]
    work = WorkDir(out + ".work")

    p = run_sub(argv, "grad:0")
    assert p.returncode == -9, p.stderr
    assert work.exists() and not os.path.exists(work.gradient_path())  # the gradient pass had not finished

    p = run_sub(argv + ["--resume"], "qw:1:self_attn.o_proj")
    assert p.returncode == -9, p.stderr
    assert os.path.exists(work.gradient_path())
    assert work.store("qw").completed() == 1 and work.store("final").completed() == 0

    p = run_sub(argv + ["--resume"], "final-saved:0")
    assert p.returncode == -9, p.stderr
    assert "resuming from" in p.stderr and "1 layer(s) of the Q(W) pass" in p.stderr
    assert work.store("qw").completed() == 2 and work.store("final").completed() == 1

    p = run_sub(argv + ["--resume"], "write:before-rename")
    assert p.returncode == -9, p.stderr
    assert dir_hashes(out) == old  # the old checkpoint, untouched
    assert siblings(out, TMP_TAG)  # the new one, complete but never renamed in
    assert len(tacq_kernels.quantized_layers(tacq_kernels.load(out))) == 14

    p = run_sub(argv + ["--resume"])
    assert p.returncode == 0, p.stderr
    assert "incomplete checkpoint left by an interrupted write" in p.stderr
    assert not siblings(out, TMP_TAG) and not work.exists()
    assert_same_checkpoint(out, setup["ref"])
    assert dir_hashes(out)["README.md"] != old["README.md"]


def test_ctrl_c_at_each_stage_saves_and_prints_the_resume_command(setup, capsys, monkeypatch):
    out = str(setup["root"] / "ctrl-c")
    argv = setup["base"] + ["--out", out]
    work = WorkDir(out + ".work")

    t0 = time.perf_counter()
    rc, err = run_in(argv, capsys, monkeypatch, "grad:0@INT")
    assert rc == 130 and "stopped after batch 0 of the gradient pass" in err
    cmd = shlex.split(err.split("resume with:")[1].strip().splitlines()[0])
    assert cmd[:3] == [sys.executable, "-m", "tacq_quant"] and cmd[3:] == argv + ["--resume"]
    resume = cmd[3:]  # the printed command, run as printed

    rc, err = run_in(resume, capsys, monkeypatch, "qw:0:self_attn.q_proj@INT")  # Ctrl-C early in a layer
    assert rc == 130 and "stopped after layer 0 of 2 of the Q(W) pass" in err
    assert work.store("qw").completed() == 1  # the layer was finished and saved

    rc, err = run_in(resume, capsys, monkeypatch, "final:1:mlp.up_proj@INT")
    assert rc == 130 and "stopped after layer 1 of 2 of the final pass" in err
    assert work.store("final").completed() == 2

    rc, err = run_in(resume, capsys, monkeypatch, "write:safetensors@INT")  # Ctrl-C during the write: it finishes
    assert rc == 0 and "Ctrl-C came during the checkpoint write, which was finished" in err
    assert not work.exists()
    assert_same_checkpoint(out, setup["ref"])
    assert time.perf_counter() - t0 < 120


def test_interrupted_overwrite_without_rename_exchange_is_recovered(setup, tmp_path):
    """Where directories cannot be swapped in one call, the old checkpoint is renamed aside first; a
    SIGKILL between the two renames leaves it complete there, and the next writer puts it back."""
    out = str(tmp_path / "ckpt")
    shutil.copytree(setup["ref"], out)
    old = dir_hashes(out)
    code = ("import shutil, sys; from tacq_kernels.atomic import atomic_directory\n"
            "with atomic_directory(sys.argv[1], overwrite=True) as tmp:\n"
            "    shutil.copytree(sys.argv[2], tmp, dirs_exist_ok=True)\n")
    env = dict(os.environ, TACQ_TEST_KILL_AT="write:old-aside", TACQ_NO_RENAME_EXCHANGE="1")
    p = subprocess.run([sys.executable, "-c", code, out, setup["ref"]], capture_output=True, text=True, env=env)
    assert p.returncode == -9, p.stderr
    assert not os.path.exists(out) and siblings(out, OLD_TAG) and siblings(out, TMP_TAG)
    msgs = recover_stale(out, log=lambda m: None)
    assert any("restored the previous checkpoint" in m for m in msgs), msgs
    assert dir_hashes(out) == old and not siblings(out, OLD_TAG) and not siblings(out, TMP_TAG)
    tacq_kernels.load(out)


def test_overwrite_through_a_symlink_replaces_its_target(setup, tmp_path):
    from tacq_kernels.atomic import atomic_directory

    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(real)
    with atomic_directory(str(link), overwrite=True) as tmp:
        shutil.copytree(setup["ref"], tmp, dirs_exist_ok=True)
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    assert dir_hashes(str(real)) == dir_hashes(setup["ref"])
    assert not siblings(str(real), TMP_TAG)


def one_line_error(rc, err, *fragments):
    assert rc == 2, err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("tacq: error: ") and "Traceback" not in err
    for f in fragments:
        assert f in last, last
    return last


def test_mismatched_work_dir_is_refused_naming_the_setting(setup, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "q")
    argv = setup["base"] + ["--out", out]
    assert run_in(argv, capsys, monkeypatch, "grad:0@INT")[0] == 130
    changed = [a if a != "2" else "3" for a in argv]  # --bits 3
    t0 = time.perf_counter()
    rc, err = run_in(changed + ["--resume"], capsys, monkeypatch)
    one_line_error(rc, err, "was made by a different run", "method_args.bits: work directory 2, this run 3")
    assert "loaded" not in err and time.perf_counter() - t0 < 20  # refused before the model loads
    rc, err = run_in(changed, capsys, monkeypatch)
    one_line_error(rc, err, "holds saved progress of an earlier run", "pass --resume")
    # the same path with other text: found by the calibration's fingerprint once it is tokenized
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT.replace("fox", "cat"))
    other = [str(calib) if a == setup["calib"] else a for a in argv]
    shutil.move(out + ".work", str(tmp_path / "w"))
    rc, err = run_in(other + ["--work-dir", str(tmp_path / "w")], capsys, monkeypatch)
    one_line_error(rc, err, "pass --resume")
    rc, err = run_in(other + ["--work-dir", str(tmp_path / "w"), "--resume"], capsys, monkeypatch)
    one_line_error(rc, err, "calib: work directory")
    # same calibration settings but another file content
    calib2 = tmp_path / "calib_same_path.txt"
    shutil.copy(setup["calib"], calib2)
    argv2 = [str(calib2) if a == setup["calib"] else a for a in argv] + ["--work-dir", str(tmp_path / "w2")]
    assert run_in(argv2, capsys, monkeypatch, "grad:0@INT")[0] == 130
    calib2.write_text(TEXT.replace("fox", "cat"))
    rc, err = run_in(argv2 + ["--resume"], capsys, monkeypatch)
    one_line_error(rc, err, "calibration_fingerprint")


def _read_only_out(tmp_path):
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return str(ro / "q")
    # root writes through permission bits: use a read-only file system instead
    for d in ("/sys", "/proc"):
        try:
            os.mkdir(os.path.join(d, "tacq-probe"))
            os.rmdir(os.path.join(d, "tacq-probe"))
        except OSError:
            return os.path.join(d, "tacq-test-out")
    raise AssertionError("no read-only location found for the read-only --out check")


def test_early_checks_fail_in_seconds_with_the_problem_named(setup, tmp_path, capsys, monkeypatch):
    base = setup["base"]
    checks = []

    def check(argv, *fragments, env=None):
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        t0 = time.perf_counter()
        rc, err = run_in(argv, capsys, monkeypatch)
        checks.append(time.perf_counter() - t0)
        for k in env or {}:
            monkeypatch.delenv(k)
        return one_line_error(rc, err, *fragments)

    check(base + ["--out", _read_only_out(tmp_path)], "--out", "cannot write in")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    check([str(short) if a == setup["calib"] else a for a in base] + ["--out", str(tmp_path / "a")],
          "fewer than seqlen")
    msg = check(base + ["--out", str(tmp_path / "b")], "not enough disk space", "is free",
                env={"TACQ_TEST_FREE_DISK": "4096"})
    assert "checkpoint" in msg and "saved progress" in msg
    check(base + ["--out", str(tmp_path / "c")], "not enough memory", "--nsamples",
          env={"TACQ_TEST_AVAILABLE_MEMORY": "4096"})
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    check(base + ["--out", str(junk), "--overwrite"], "not a tacq-kernels checkpoint")
    assert (junk / "notes.txt").read_text() == "mine"
    check(base + ["--out", str(tmp_path / "d"), "--resume", "--no-save-progress"], "cannot be combined")
    for name in ("a", "b", "c", "d"):  # nothing was started
        assert not os.path.exists(tmp_path / name) and not os.path.exists(tmp_path / f"{name}.work")
    assert max(checks) < 30, checks


def test_work_dir_in_use_is_refused(setup, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "q")
    assert run_in(setup["base"] + ["--out", out], capsys, monkeypatch, "grad:0@INT")[0] == 130
    held = WorkDir(out + ".work").lock()  # as another live run would hold it
    try:
        rc, err = run_in(setup["base"] + ["--out", out, "--resume"], capsys, monkeypatch)
        one_line_error(rc, err, "is in use by another tacq quantize run")
    finally:
        held.close()
    assert run_in(setup["base"] + ["--out", out, "--resume"], capsys, monkeypatch)[0] == 0
    assert_same_checkpoint(out, setup["ref"])


def test_no_save_progress_gives_the_same_checkpoint(setup, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "plain")
    rc, err = run_in(setup["base"] + ["--out", out, "--no-save-progress"], capsys, monkeypatch)
    assert rc == 0 and not os.path.exists(out + ".work")
    assert_same_checkpoint(out, setup["ref"])

"""The tacq CLI's error handling: bad arguments and unreadable data give one line and exit 2."""

import os
import subprocess
import sys

import pytest

from tacq_quant.cli import SUBCOMMANDS, main


def run_main(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def assert_one_line_error(rc, err, *fragments, after_progress=False):
    """Exactly one line on stderr; with ``after_progress`` (errors that can only show up once the
    model is loaded), the error is the one last line after the progress messages."""
    assert rc == 2
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    if after_progress:
        lines = lines[-1:]
        assert sum("tacq: error" in line for line in err.splitlines()) == 1
    assert len(lines) == 1, err
    assert lines[0].startswith("tacq: error: ")
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello world " * 100)
    return str(p)


BAD_ARGS = [
    (["quantize", "--bits", "2"], "required"),
    (["quantize", "--method", "awq", "--bits", "2", "--calib", "x", "--out", "o"], "invalid choice"),
    (["quantize", "--method", "gptq", "--bits", "two", "--calib", "x", "--out", "o"], "invalid float"),
    (["quantize", "--method", "gptq", "--bits", "2.5", "--calib", "x", "--out", "o"], "integer bits"),
    (["quantize", "--method", "tacq", "--base", "gptq", "--bits", "5", "--calib", "x", "--out", "o"], "integer bits"),
    (["quantize", "--method", "tacq", "--bits", "5", "--calib", "x", "--out", "o"], "CLAQ bits must be in"),
    (["quantize", "--method", "tacq", "--bits", "3", "--group-size", "64", "--calib", "x", "--out", "o"],
     "--base gptq"),
    (["quantize", "--method", "gptq", "--bits", "3", "--base", "claq", "--calib", "x", "--out", "o"], "TACQ option"),
    (["quantize", "--method", "claq", "--bits", "4.5", "--calib", "x", "--out", "o"], "[2, 4]"),
    (["quantize", "--method", "tacq", "--bits", "2", "--outlier-frac", "1.5", "--calib", "x", "--out", "o"], "outlier-frac"),
    (["quantize", "--method", "gptq", "--bits", "2", "--group-size", "0", "--calib", "x", "--out", "o"], "group-size"),
    (["quantize", "--method", "claq", "--bits", "2", "--group-size", "64", "--calib", "x", "--out", "o"], "group-size"),
    (["quantize", "--method", "gptq", "--bits", "2", "--nsamples", "0", "--calib", "x", "--out", "o"], "positive integer"),
    (["quantize", "--method", "gptq", "--bits", "2", "--reserve-outliers", "--calib", "x", "--out", "o"], "CLAQ option"),
    (["quantize", "--method", "gptq", "--bits", "2", "--grad-cache", "g", "--calib", "x", "--out", "o"], "TACQ options"),
    (["quantize", "--method", "tacq", "--bits", "2", "--saliency", "magnitude", "--grad-cache", "g", "--calib", "x",
      "--out", "o"], "uses no gradients"),
    (["quantize", "--method", "tacq", "--bits", "2", "--saliency", "msg", "--corrupt-from", "c", "--calib", "x",
      "--out", "o"], "does not use Q(W)"),
    (["quantize", "--method", "tacq", "--bits", "2", "--saliency", "bogus", "--calib", "x", "--out", "o"],
     "invalid choice"),
    (["frobnicate"], "invalid choice"),
    ([], "give a command"),
    (["eval"], "nothing to evaluate"),
    (["eval", "--ppl", "x", "--ppl-windows", "-3"], "positive integer"),
    (["inspect"], "required"),
]


@pytest.mark.parametrize("argv,fragment", BAD_ARGS, ids=[" ".join(a[0][:4]) or "empty" for a in BAD_ARGS])
def test_bad_arguments_one_line_exit_2(argv, fragment, capsys):
    assert_one_line_error(*run_main(argv, capsys), fragment)


def test_unreadable_data_one_line_exit_2(tmp_path, text_file, capsys):
    binary = tmp_path / "b.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    empty_dir = tmp_path / "d"
    empty_dir.mkdir()
    base = ["quantize", "--method", "gptq", "--bits", "2", "--out", str(tmp_path / "o"), "--calib"]
    assert_one_line_error(*run_main(base + [str(tmp_path / "missing.txt")], capsys), "not found")
    assert_one_line_error(*run_main(base + [str(empty_dir)], capsys), "directory")
    assert_one_line_error(*run_main(base + ["piqa:" + text_file], capsys), "labels")
    assert_one_line_error(*run_main(base + ["bogus:" + text_file], capsys), "unknown data kind")
    # data that fails when read (checked before the model loads): binary text, a bad JSONL line
    from tacq_quant.tiny import save_tiny_model

    model = save_tiny_model(str(tmp_path / "tiny"))
    capsys.readouterr()
    assert_one_line_error(*run_main(base + [str(binary), "--model", model, "--overwrite"], capsys), "not UTF-8")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"question": "q", "answer": "a"}\nnot json\n')
    assert_one_line_error(*run_main(base + ["gsm8k:" + str(bad_jsonl), "--model", model, "--overwrite"], capsys),
                          "line 2 is not JSON")
    tiny_text = tmp_path / "short.txt"
    tiny_text.write_text("hi")
    assert_one_line_error(*run_main(base + [str(tiny_text), "--model", model, "--overwrite"], capsys),
                          "fewer than seqlen", after_progress=True)
    # evaluation data
    assert_one_line_error(*run_main(["eval", "--model", model, "--ppl", str(binary)], capsys), "not UTF-8")
    assert_one_line_error(*run_main(["eval", "--model", model, "--task", "gsm8k:" + str(bad_jsonl)], capsys),
                          "piqa")


def test_bad_model_and_output_one_line_exit_2(tmp_path, text_file, capsys):
    base = ["quantize", "--method", "gptq", "--bits", "2", "--calib", text_file]
    assert_one_line_error(*run_main(base + ["--out", str(tmp_path / "o"), "--model", str(tmp_path / "nope")], capsys),
                          "no such file")
    assert_one_line_error(*run_main(base + ["--out", str(tmp_path / "o"), "--model", text_file], capsys),
                          "neither a model directory")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert_one_line_error(*run_main(base + ["--out", str(full)], capsys), "not empty")
    assert_one_line_error(*run_main(base + ["--out", text_file], capsys), "not a directory")
    assert_one_line_error(*run_main(["inspect", str(tmp_path)], capsys), "no config.json")
    (tmp_path / "config.json").write_text("{}")
    assert_one_line_error(*run_main(["inspect", str(tmp_path)], capsys), "no quantization_config")
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "tacq_kernels", "format_version": 9}}')
    assert_one_line_error(*run_main(["inspect", str(tmp_path)], capsys), "upgrade")


def test_console_script_and_module_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tacq_quant", "quantize", "--method", "gptq", "--bits", "7",
                           "--calib", "x", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("tacq: error:")
    proc = subprocess.run([sys.executable, "-m", "tacq_quant", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "quantize" in proc.stdout and "inspect" in proc.stdout


def test_subcommand_registry_leaves_room_for_more(capsys):
    from tacq_quant import cli

    assert list(SUBCOMMANDS)[:3] == ["quantize", "eval", "inspect"]
    seen = {}
    cli.register_subcommand("echo-test", "test only", lambda p: p.add_argument("word"),
                            lambda args: seen.setdefault("word", args.word) and 0)
    try:
        assert main(["echo-test", "hello"]) == 0 and seen["word"] == "hello"
        with pytest.raises(ValueError):
            cli.register_subcommand("echo-test", "again", lambda p: None, lambda a: 0)
    finally:
        del SUBCOMMANDS["echo-test"]
    assert os.path.basename(sys.executable)

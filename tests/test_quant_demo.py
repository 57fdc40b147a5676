"""`make demo` (tacq_quant.demo) and `tacq generate`, end to end on a tiny random Llama.

The default model's demo takes minutes (it is run by `make demo`, not here); the tiny model goes
through the same code: sampling the calibration text, TACQ, save, `from_pretrained`, the table and
generation.
"""

import torch

import pytest
from transformers import AutoModelForCausalLM

import tacq_kernels
from tacq_quant import demo
from tacq_quant.cli import main as tacq_main
from tacq_quant.generate import generate
from tacq_quant.tiny import byte_tokenizer, save_tiny_model, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sampled_calibration_is_seeded_and_starts_with_bos():
    model, tok = tiny_llama(), byte_tokenizer()
    a = demo.sample_from_model(model, tok, n=5, seqlen=12, seed=1, batch_size=2)
    b = demo.sample_from_model(model, tok, n=5, seqlen=12, seed=1, batch_size=2)
    c = demo.sample_from_model(model, tok, n=5, seqlen=12, seed=2)
    assert a.shape == (5, 12) and a.dtype == torch.long
    assert bool((a[:, 0] == tok.eos_token_id).all())  # no BOS in this vocabulary: EOS starts
    assert int(a.max()) < model.config.vocab_size
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_demo_end_to_end_on_a_tiny_model(tmp_path, capsys):
    src = save_tiny_model(str(tmp_path / "tiny"))
    out = tmp_path / "demo-ckpt"
    rc = demo.main(["--model", src, "--nsamples", "6", "--heldout", "2", "--seqlen", "24", "--out", str(out),
                    "--prompt", "hello", "--max-new-tokens", "4", "--outlier-frac", "0.01"])
    assert rc == 0
    text = capsys.readouterr().out
    for row in ("size on disk", "bits/weight", "weights kept in fp16", "perplexity, held-out sampled text",
                "next-token agreement", "tokens/s", "-- unquantized:", "-- TACQ 3-bit:"):
        assert row in text, row
    assert "tiny: 14 linear layers quantized with TACQ 3-bit" in text

    loaded = AutoModelForCausalLM.from_pretrained(out)
    layers = tacq_kernels.quantized_layers(loaded)
    assert len(layers) == 14
    n = sum(m.spec.numel for m in layers.values())
    assert sum(m.spec.nnz for m in layers.values()) == round(0.01 * n)
    assert {m.spec.segments[0].bits for m in layers.values()} == {3}


def test_generate_command_streams_the_greedy_answer(tmp_path, capsys):
    src = save_tiny_model(str(tmp_path / "tiny"))
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    expected = generate(model, byte_tokenizer(), "abc", max_new_tokens=6)
    assert expected.new_tokens > 0

    rc = tacq_main(["generate", "--model", src, "--prompt", "abc", "--max-new-tokens", "6", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert expected.text in out
    assert f"[{expected.new_tokens} tokens in" in out and "tokens/s on cpu]" in out


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--max-new-tokens", "0"], "expected a positive integer, got 0"),
        (["--device", "bogus"], "--device 'bogus'"),
        (["--model", "/nonexistent/ckpt"], "--model /nonexistent/ckpt: no such file or directory"),
    ]
    + ([(["--device", "cuda"], "CUDA is not available")] if not torch.cuda.is_available() else []),
)
def test_generate_command_rejects_bad_arguments(argv, fragment, capsys):
    assert tacq_main(["generate", "--prompt", "x", *argv]) == 2
    err = capsys.readouterr().err
    assert "tacq: error:" in err and fragment in err and "Traceback" not in err


def test_demo_refuses_to_replace_what_is_not_a_checkpoint(tmp_path, capsys):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(precious)])
    assert e.value.code == 2
    assert "is not an empty directory or a tacq-kernels checkpoint" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep me"

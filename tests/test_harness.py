"""lm-evaluation-harness: the local task configs, `lm_eval` itself on a tacq_kernels checkpoint
(a process that never imports tacq_kernels: the autoload hook), and `tacq eval --harness`,
each checked item by item against tacq eval's own log-likelihoods."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (make test installs lm_eval)")

from tacq_quant.cli import main  # noqa: E402
from tacq_quant.data import DataError, split_item_indices, split_rows  # noqa: E402
from tacq_quant.harness import TASKS_DIR, compare_piqa  # noqa: E402
from tacq_quant.harness import main as compare_main  # noqa: E402

WIKI = (
    " \n = Alpha = \n \n Alpha is the first letter of the Greek alphabet @-@ it comes first , always .\n \n"
    " = = History = = \n \n It was used by the Greeks ( and others ) for 3 @,@ 000 years .\n \n"
    " = Beta = \n \n Beta is the second letter . Its name is \" beta \" .\n \n"
    " = = Use = = \n \n Beta means 2 in Greek numerals ; it is used in science .\n \n"
)


def tacq_data():
    spec = importlib.util.spec_from_file_location("tacq_data", os.path.join(TASKS_DIR, "tacq_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness_case(tmp_path_factory):
    """A tiny RTN 3-bit checkpoint, a 12-item PIQA in the layout of ../shared/data and a
    two-article WikiText file."""
    from tacq_quant.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("harness")
    data = root / "data"
    (data / "piqa").mkdir(parents=True)
    (data / "wikitext-2-raw").mkdir()
    goals = ["keep bread fresh", "open a jar", "dry wet shoes", "cool soup fast", "clean a pan", "light a fire",
             "sharpen a knife", "water a plant", "fold a shirt", "boil an egg", "tie a knot", "cut an onion"]
    with open(data / "piqa" / "valid.jsonl", "w") as f:
        for i, g in enumerate(goals):
            f.write(json.dumps({"goal": f"How do I {g}?", "sol1": f"Do it with care {i}.",
                                "sol2": f"Use a hammer and shout {'loudly ' * (i % 3)}."}) + "\n")
    (data / "piqa" / "valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(len(goals))))
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text(WIKI)
    model = save_tiny_model(str(root / "tiny"))
    calib = root / "calib.txt"
    calib.write_text(WIKI * 20)
    ckpt = root / "ckpt"
    assert main(["quantize", "--model", model, "--method", "rtn", "--bits", "3", "--calib", f"text:{calib}",
                 "--nsamples", "4", "--seqlen", "64", "--device", "cpu", "--quiet", "--out", str(ckpt)]) == 0
    return root, data, ckpt


def tacq_eval_json(ckpt, data, out, *extra):
    argv = ["eval", "--model", str(ckpt), "--task", f"piqa:{data / 'piqa' / 'valid.jsonl'}", "--device", "cpu",
            "--quiet", "--json", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def rolling_loglikelihood(model, token_ids, prefix_id):
    """Summed log-probability of every token of a document shorter than the model's context,
    predicted from ``prefix_id`` (lm-eval's start token) and the tokens before it."""
    ids = torch.tensor([[prefix_id] + token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    return float(logp[torch.arange(len(token_ids)), torch.tensor(token_ids)].sum())


def test_lm_eval_command_on_checkpoint_agrees_with_tacq_eval(harness_case, tmp_path, capsys):
    """`lm_eval --model hf` in a fresh process (no `import tacq_kernels`) on a tacq_kernels checkpoint
    with the local tasks: the PIQA decisions of tacq eval, item by item, and WikiText documents
    scored as lm-eval's rolling log-likelihood of the detokenized page."""
    root, data, ckpt = harness_case
    out_dir = tmp_path / "lm_eval_out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={ckpt},dtype=float32",
           "--tasks", "tacq_piqa,tacq_wikitext_all", "--include_path", TASKS_DIR,
           "--metadata", json.dumps({"data_dir": str(data)}), "--device", "cpu", "--batch_size", "4",
           "--output_path", str(out_dir), "--log_samples"]
    env = {k: v for k, v in os.environ.items() if k != "TACQ_KERNELS_AUTOLOAD"}
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Unknown quantization type" not in run.stderr
    results = json.loads(open(glob.glob(str(out_dir / "*" / "results_*.json"))[0]).read())["results"]
    files = {t: glob.glob(str(out_dir / "*" / f"samples_{t}_*.jsonl"))[0] for t in ("tacq_piqa", "tacq_wikitext_all")}
    samples = {t: [json.loads(line) for line in open(f)] for t, f in files.items()}

    ours = tacq_eval_json(ckpt, data, tmp_path / "tacq.json")["task"]
    piqa = samples["tacq_piqa"]
    assert sorted(s["doc"]["index"] for s in piqa) == split_item_indices("piqa", 12, "eval")
    agree = compare_piqa(ours, piqa)
    assert agree["items"] == ours["items"] == 6
    assert agree["same_decisions"]["acc"] == 6 and agree["same_decisions"]["acc_norm_same_normalisation"] == 6
    assert agree["max_abs_loglik_diff"] < 1e-3, agree
    assert results["tacq_piqa"]["acc,none"] == pytest.approx(ours["acc"])
    capsys.readouterr()
    assert compare_main([str(tmp_path / "tacq.json"), files["tacq_piqa"]]) == 0  # python -m tacq_quant.harness
    assert "6 common items, the same decision on acc 6/6" in capsys.readouterr().out

    import tacq_kernels

    model = tacq_kernels.load(ckpt, dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    pages = tacq_data().wikitext_pages(WIKI.splitlines())
    docs = samples["tacq_wikitext_all"]
    assert [d["doc"]["page"] for d in docs] == pages and len(pages) == 2
    for d in docs:
        target = tacq_data().wikitext_detokenizer(d["doc"])
        expected = rolling_loglikelihood(model, tok(target, add_special_tokens=False)["input_ids"], tok.eos_token_id)
        assert float(d["resps"][0][0]) == pytest.approx(expected, abs=1e-2)
    assert 1 < results["tacq_wikitext_all"]["byte_perplexity,none"] < 257  # a byte model, at most uniform-ish


def test_tacq_eval_harness_flag(harness_case, tmp_path):
    """`tacq eval --harness` runs the tasks on the model tacq eval loaded and reports agreement."""
    root, data, ckpt = harness_case
    res = tacq_eval_json(ckpt, data, tmp_path / "both.json", "--harness", "piqa,wikitext",
                         "--ppl", f"wikitext2:{data / 'wikitext-2-raw' / 'wiki.test.raw'}", "--ppl-seqlen", "32")
    harness = res["harness"]
    agree = harness["agreement"]["tacq_piqa"]
    assert agree["items"] == 6 and agree["same_decisions"]["acc"] == 6, agree
    assert agree["same_decisions"]["acc_norm_same_normalisation"] == 6
    assert harness["data"]["piqa"].endswith("valid.jsonl") and harness["data"]["wikitext"].endswith("wiki.test.raw")
    assert harness["results"]["tacq_piqa"]["acc,none"] == pytest.approx(res["task"]["acc"])
    assert harness["results"]["tacq_wikitext"]["word_perplexity,none"] > 1


def test_task_data_parts_match_tacq_eval(harness_case, tmp_path, monkeypatch):
    root, data, _ = harness_case
    td = tacq_data()
    for part in ("eval", "all", "calib"):
        docs = td.piqa(part=part, data_dir=str(data))["validation"]
        assert list(docs["index"]) == split_item_indices("piqa", 12, part)
    lines = WIKI.splitlines()
    assert td.wikitext_pages(split_rows(lines, "all")) == td.wikitext_pages(lines)
    eval_pages = td.wikitext(part="eval", wikitext=str(data / "wikitext-2-raw" / "wiki.test.raw"))["test"]["page"]
    assert "\n".join(eval_pages).strip() == "\n".join(split_rows(lines, "eval")).strip()  # the eval rows, no more
    monkeypatch.delenv("TACQ_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="TACQ_DATA_DIR"):
        td.piqa(part="eval")
    monkeypatch.setenv("TACQ_DATA_DIR", str(data))
    assert len(td.piqa(part="eval")["validation"]) == 6


def test_wikitext_articles_of_the_offline_copy(data_dir):
    """The whole WikiText-2 raw test file groups into the 62 articles of lm-eval's document-level copy."""
    td = tacq_data()
    assert len(td.wikitext(part="all", data_dir=data_dir)["test"]) == 62

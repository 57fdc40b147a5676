"""Calibration sources, the spec syntax and the disjoint calibration/evaluation split."""

import json
import os

import pytest
import torch

from tacq_quant.data import (DataError, SourceSpec, load_calibration, parse_spec, piqa_items, split_item_indices,
                             split_rows, text_of)
from tacq_quant.evaluate import task_items
from tacq_quant.tiny import byte_tokenizer


def test_spec_syntax():
    assert parse_spec("text:/a/b.txt") == SourceSpec("text", "/a/b.txt", None)
    assert parse_spec("/a/b.txt") == SourceSpec("text", "/a/b.txt", None)
    assert parse_spec("piqa:/d/valid.jsonl@calib") == SourceSpec("piqa", "/d/valid.jsonl", "calib")
    assert parse_spec("wikitext2:w.raw@all").part == "all"
    assert parse_spec("hf:wikitext:wikitext-2-raw-v1:train") == SourceSpec("hf", "wikitext:wikitext-2-raw-v1:train")
    assert parse_spec("notes@home.txt").path == "notes@home.txt"  # '@' only counts before a part name
    with pytest.raises(DataError, match="unknown data kind"):
        parse_spec("bogus:/x")
    with pytest.raises(DataError, match="no path"):
        parse_spec("piqa:")
    # evaluation sets are split by default; plain text is not
    assert parse_spec("piqa:x").resolve_part("calib") == "calib"
    assert parse_spec("piqa:x").resolve_part("eval") == "eval"
    assert parse_spec("wikitext2:x").resolve_part("eval") == "eval"
    assert parse_spec("text:x").resolve_part("calib") == "all"
    assert parse_spec("gsm8k:x@all").resolve_part("calib") == "all"


def test_item_split_is_disjoint_complete_and_fixed():
    for n in (1, 2, 11, 1838):
        calib = split_item_indices("piqa", n, "calib")
        ev = split_item_indices("piqa", n, "eval")
        assert not set(calib) & set(ev)
        assert sorted(calib + ev) == list(range(n))
        assert len(calib) == n // 2
    # independent of any RNG state: the same every time
    torch.manual_seed(123)
    assert split_item_indices("piqa", 20, "calib") == split_item_indices("piqa", 20, "calib")
    assert split_item_indices("piqa", 20, "calib") != split_item_indices("gsm8k", 20, "calib")
    assert split_rows(list(range(7)), "calib") == [0, 1, 2] and split_rows(list(range(7)), "eval") == [3, 4, 5, 6]


def write_piqa(tmp_path, n=40):
    items = [{"goal": f"goal {i}", "sol1": f"first {i}", "sol2": f"second {i}"} for i in range(n)]
    path = tmp_path / "valid.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    (tmp_path / "valid-labels.lst").write_text("".join(f"{(i * 7) % 2}\n" for i in range(n)))
    return str(path)


def test_piqa_calibration_uses_only_calib_items_with_the_labelled_solution(tmp_path):
    path = write_piqa(tmp_path)
    tok = byte_tokenizer()
    calib = load_calibration("piqa:" + path, tok, nsamples=4, seqlen=64, seed=0)
    assert calib.windows.shape == (4, 64) and calib.items is not None
    text = "".join(tok.decode(w) for w in calib.windows)
    calib_idx = set(split_item_indices("piqa", 40, "calib"))
    eval_items, _ = task_items("piqa:" + path)
    assert {it.index for it in eval_items} == set(range(40)) - calib_idx
    for it in eval_items:
        assert f"goal {it.index}\n" not in text  # no evaluated item leaks into calibration
    decoded_items = [tok.decode(x) for x in calib.items]
    for d in decoded_items:
        i = int(d.split("goal ")[1].split("\n")[0])
        assert i in calib_idx
        label = (i * 7) % 2
        assert d == f"Question: goal {i}\nAnswer: {'first' if label == 0 else 'second'} {i}<eos>"
    # the windows are the items' tokens concatenated
    stream = torch.cat(calib.items)
    assert torch.equal(calib.windows.flatten(), stream[: 4 * 64])


def test_item_calibration_repeats_when_the_part_is_short(tmp_path):
    path = write_piqa(tmp_path, n=6)
    calib = load_calibration("piqa:" + path, byte_tokenizer(), nsamples=8, seqlen=64)
    assert calib.info["passes"] > 1 and "repeat" in calib.description


def test_text_windows_are_seeded(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("".join(f"line {i} of some text\n" for i in range(300)))
    tok = byte_tokenizer()
    a = load_calibration(str(p), tok, nsamples=5, seqlen=20, seed=3)
    b = load_calibration("text:" + str(p), tok, nsamples=5, seqlen=20, seed=3)
    c = load_calibration(str(p), tok, nsamples=5, seqlen=20, seed=4)
    assert torch.equal(a.windows, b.windows) and not torch.equal(a.windows, c.windows)
    assert a.items is None and len(a.gradient_samples()) == 5
    # @calib reads the first half of the lines only
    first = load_calibration(str(p) + "@calib", tok, nsamples=20, seqlen=20)
    import re

    numbers = [int(m) for w in first.windows for m in re.findall(r"line (\d+) of", tok.decode(w))]
    assert numbers and max(numbers) < 150


def test_gsm8k_and_jsonl_templates(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text('{"question": "1+1?", "answer": "2 #### 2"}\n' * 30)
    calib = load_calibration("gsm8k:" + str(p) + "@all", byte_tokenizer(), nsamples=2, seqlen=16)
    assert byte_tokenizer().decode(calib.items[0]) == "Question: 1+1?\nAnswer: 2 #### 2<eos>"
    calib = load_calibration("jsonl:" + str(p), byte_tokenizer(), nsamples=2, seqlen=16, template="{answer}")
    assert byte_tokenizer().decode(calib.items[0]) == "2 #### 2<eos>"
    with pytest.raises(DataError, match="template"):
        load_calibration("jsonl:" + str(p), byte_tokenizer(), nsamples=2, seqlen=16, template="{nope}")


def test_real_data_splits(data_dir):
    """The offline PIQA and WikiText-2 files: halves are disjoint and cover everything."""
    piqa = os.path.join(data_dir, "piqa", "valid.jsonl")
    items = piqa_items(piqa)
    assert len(items) == 1838 and {it.label for it in items} == {0, 1}
    calib = split_item_indices("piqa", len(items), "calib")
    ev, _ = task_items("piqa:" + piqa)
    assert len(calib) == 919 and len(ev) == 919 and not set(calib) & {it.index for it in ev}
    wiki = os.path.join(data_dir, "wikitext-2-raw", "wiki.test.raw")
    spec = parse_spec("wikitext2:" + wiki)
    whole, first, second = text_of(spec, "all"), text_of(spec, "calib"), text_of(spec, "eval")
    assert whole == first + "\n\n" + second  # the two halves are the joined text cut at one row
    assert whole.startswith("\n\n = Robert Boulter = \n")  # GPTQ join: row "" first, then the title


def test_evaluation_reads_the_complementary_half(tmp_path):
    from tacq_quant.evaluate import perplexity
    from tacq_quant.tiny import tiny_llama

    p = tmp_path / "wiki.test.raw"
    p.write_text("".join(f" = Title {i} = \n \n Some text number {i} .\n" for i in range(60)))
    tok = byte_tokenizer()
    spec = "wikitext2:" + str(p)
    calib = load_calibration(spec, tok, nsamples=3, seqlen=16)
    assert calib.spec.endswith("@calib")
    res = perplexity(tiny_llama(), tok, spec, seqlen=16, progress=False)
    assert res["source"].endswith("@eval")
    second_half = text_of(parse_spec(spec), "eval")
    assert res["windows_available"] == len(tok(second_half)["input_ids"]) // 16
    res_all = perplexity(tiny_llama(), tok, spec + "@all", seqlen=16, max_windows=2, progress=False)
    assert res_all["source"].endswith("@all") and res_all["windows"] == 2

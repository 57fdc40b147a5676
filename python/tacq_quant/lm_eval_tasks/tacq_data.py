"""Datasets of the ``tacq_*`` lm-eval tasks, read from local files (no hub).

lm-eval calls ``custom_dataset(**metadata, **dataset_kwargs)``: ``dataset_kwargs`` carries the
part (``eval``, ``all`` or ``calib``) and ``metadata`` (``lm_eval --metadata '{...}'``, merged
with the model arguments) where the data is: ``data_dir`` (a directory laid out like
``../shared/data``: ``piqa/valid.jsonl``, ``wikitext-2-raw/wiki.test.raw``), or ``piqa`` /
``wikitext`` for the files themselves; otherwise the environment variable ``TACQ_DATA_DIR``.

The parts are those of ``tacq eval`` (:mod:`tacq_quant.data`), so both tools score the same items.
"""

from __future__ import annotations

import os

from lm_eval.tasks.wikitext.preprocess_wikitext import process_results as wikitext_process_results  # noqa: F401
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer  # noqa: F401

from tacq_quant.data import DataError, _read_jsonl, _read_text_file, piqa_items, split_item_indices, split_rows

DATA_DIR_ENV = "TACQ_DATA_DIR"
FILES = {"piqa": os.path.join("piqa", "valid.jsonl"), "wikitext": os.path.join("wikitext-2-raw", "wiki.test.raw")}


def data_file(name: str, kwargs: dict) -> str:
    """The local file of dataset ``name`` ("piqa" or "wikitext") from the task's keyword arguments."""
    if kwargs.get(name):
        return os.path.expanduser(str(kwargs[name]))
    root = kwargs.get("data_dir") or os.environ.get(DATA_DIR_ENV)
    if not root:
        raise DataError(
            f"tacq_{name}: where is the data? pass --metadata '{{\"data_dir\": \"DIR\"}}' (DIR/{FILES[name]}) "
            f"or '{{\"{name}\": \"PATH\"}}', or set {DATA_DIR_ENV}=DIR"
        )
    return os.path.join(os.path.expanduser(str(root)), FILES[name])


def _dataset(split: str, docs: list[dict]):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})


def piqa(part: str = "eval", **kwargs):
    """PIQA validation docs (goal, sol1, sol2, label; ``index`` = 0-based line) of ``part``."""
    path = data_file("piqa", kwargs)
    records = _read_jsonl(path)
    labels = [it.label for it in piqa_items(path)]  # checks the labels file and every record
    docs = [{"index": i, "goal": records[i]["goal"], "sol1": records[i]["sol1"], "sol2": records[i]["sol2"],
             "label": labels[i]} for i in split_item_indices("piqa", len(records), part)]
    return _dataset("validation", docs)


def is_article_title(line: str) -> bool:
    """A level-1 heading (`` = Title = ``) of WikiText: where a new article starts."""
    text = line.replace("= = =", "===").replace("= =", "==").strip()
    return text.startswith("= ") and text.endswith(" =")


def wikitext_pages(lines: list[str]) -> list[str]:
    """Group WikiText lines into articles, as lm-eval's document-level WikiText does: a page is
    its lines joined with ``"\\n"``, from one title to the next (the whole test file gives 62)."""
    pages, current = [], []
    for line in lines:
        if is_article_title(line) and current:
            pages.append("\n".join(current))
            current = []
        current.append(line)
    if current:
        pages.append("\n".join(current))
    return [p for p in pages if p.strip()]


def wikitext(part: str = "eval", **kwargs):
    """WikiText-2 raw test pages of ``part`` (the rows of ``tacq eval``'s split, then articles)."""
    path = data_file("wikitext", kwargs)
    lines = _read_text_file(path).splitlines()
    pages = wikitext_pages(split_rows(lines, part))
    if not pages:
        raise DataError(f"{path}@{part} holds no text")
    return _dataset("test", [{"page": p} for p in pages])

"""Calibration and evaluation data: sources, the spec syntax, and the calibration/evaluation split.

Spec syntax (``--calib``, ``--ppl``, ``--task``): ``KIND:PATH[@PART]``, or a bare path (= ``text``).

====================  ===============================================================================
kind                  what it reads
====================  ===============================================================================
``text:PATH``         a plain UTF-8 text file, used as one token stream
``wikitext2:PATH``    WikiText-2 raw (``wiki.test.raw`` etc.) joined as the GPTQ recipe does: the
                      file's lines are the HF dataset rows (a blank line `` \\n`` is the row ``""``)
                      joined with ``"\\n\\n"``
``piqa:PATH``         PIQA ``valid.jsonl`` (goal, sol1, sol2); labels from ``valid-labels.lst`` next
                      to it (``X.jsonl`` -> ``X-labels.lst``)
``gsm8k:PATH``        GSM8K ``test.jsonl`` / ``train.jsonl`` (question, answer)
``jsonl:PATH``        any JSONL file; each record is formatted with ``--template`` (default ``{text}``)
``hf:NAME[:CONFIG[:SPLIT]]``  a Hugging Face dataset's ``text`` column (needs ``datasets`` and a
                      reachable hub), used like ``text``
====================  ===============================================================================

``PART`` is ``all``, ``calib`` or ``eval``. The known evaluation sets (``wikitext2``, ``piqa``,
``gsm8k``) are split in two disjoint halves, and by default calibration reads the ``calib`` half
and evaluation reads the ``eval`` half, so that a model is never evaluated on what it was
calibrated on. Other sources default to ``all``. The split rules (fixed, independent of ``--seed``):

* text sources (``wikitext2``, and ``text``/``jsonl`` when a part is asked for): the rows (lines)
  are cut in the middle, ``calib = rows[:n // 2]``, ``eval = rows[n // 2:]``;
* item sources (``piqa``, ``gsm8k``): item i gets the key ``sha256(f"{kind}-split-v1:{i}")`` (i is
  the 0-based line number); items sorted by key, the first ``n // 2`` are ``calib`` and the rest
  ``eval``. This is reproducible anywhere (no RNG implementation involved).

Calibration samples:

* text: ``nsamples`` windows of ``seqlen`` tokens at random offsets of the part's token stream
  (``random.Random(seed)``, the GPTQ recipe);
* items: the part's items in a seeded random order, each formatted with its template and followed
  by the EOS token, concatenated and cut into ``nsamples`` windows of ``seqlen`` tokens (a second
  pass in a new order is used if the part is shorter than ``nsamples * seqlen`` tokens, and the
  data's description says so). The items themselves (natural length) are also returned: TACQ
  takes its per-sample gradients per item, as its authors do with task data.

Templates: PIQA ``"Question: {goal}\\nAnswer: {solution}"`` with the labelled solution (the
evaluation scores the continuation ``" {solution}"`` after ``"Question: {goal}\\nAnswer:"``);
GSM8K ``"Question: {question}\\nAnswer: {answer}"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field

import torch

TEXT_KINDS = ("text", "wikitext2", "hf")
ITEM_KINDS = ("piqa", "gsm8k", "jsonl")
KINDS = TEXT_KINDS + ITEM_KINDS
PARTS = ("all", "calib", "eval")
#: sources that are evaluation sets: split by default
SPLIT_BY_DEFAULT = ("wikitext2", "piqa", "gsm8k")


class DataError(ValueError):
    """Bad data spec or unreadable data; the message is one line meant for the user."""


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    path: str
    part: str | None = None  # None: the default for the use (see resolve_part)

    def resolve_part(self, use: str) -> str:
        """The part to read for ``use`` in {"calib", "eval"}."""
        if self.part is not None:
            return self.part
        return use if self.kind in SPLIT_BY_DEFAULT else "all"

    def describe(self, use: str) -> str:
        return f"{self.kind}:{self.path}@{self.resolve_part(use)}"


def parse_spec(spec: str) -> SourceSpec:
    """Parse ``KIND:PATH[@PART]`` or a bare path (``text``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("empty data spec")
    spec = spec.strip()
    part = None
    head, sep, tail = spec.rpartition("@")
    if sep and tail in PARTS:
        spec, part = head, tail
    kind, sep, rest = spec.partition(":")
    if sep and kind in KINDS:
        if not rest:
            raise DataError(f"data spec {spec!r} has no path after '{kind}:'")
        return SourceSpec(kind, rest, part)
    if sep and kind.isalpha() and len(kind) > 1 and not os.path.exists(spec):
        raise DataError(f"unknown data kind {kind!r} in {spec!r}; known kinds: {', '.join(KINDS)} (or a bare text path)")
    return SourceSpec("text", spec, part)


def _read_text_file(path: str) -> str:
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        raise DataError(f"{path} is a directory, expected a text file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _read_jsonl(path: str) -> list[dict]:
    records = []
    for lineno, line in enumerate(_read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path} line {lineno} is not JSON: {e}") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object")
        records.append(rec)
    if not records:
        raise DataError(f"{path} holds no JSON records")
    return records


def _rows(spec: SourceSpec) -> list[str]:
    """The rows of a text source (lines with their newlines; WikiText: the HF dataset rows)."""
    if spec.kind == "hf":
        return _hf_rows(spec.path)
    text = _read_text_file(spec.path)
    if not text.strip():
        raise DataError(f"{spec.path} is empty")
    lines = text.splitlines(keepends=True)
    if spec.kind == "wikitext2":
        return ["" if line.strip() == "" else line for line in lines]
    return lines


def _join(spec: SourceSpec, rows: list[str]) -> str:
    return "\n\n".join(rows) if spec.kind in ("wikitext2", "hf") else "".join(rows)


def _hf_rows(name: str) -> list[str]:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DataError("hf: sources need the 'datasets' package (pip install datasets) and a reachable hub") from None
    from datasets import load_dataset

    parts = name.split(":")
    ds_name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        ds = load_dataset(ds_name, config, split=split)
    except Exception as e:  # the hub raises many kinds; the user needs one line
        raise DataError(f"cannot load dataset {name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if "text" not in ds.column_names:
        raise DataError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    return list(ds["text"])


def split_rows(rows: list, part: str) -> list:
    h = len(rows) // 2
    return {"all": rows, "calib": rows[:h], "eval": rows[h:]}[part]


def split_key(kind: str, index: int) -> str:
    return hashlib.sha256(f"{kind}-split-v1:{index}".encode()).hexdigest()


def split_item_indices(kind: str, n: int, part: str) -> list[int]:
    """Indices of the items of ``part`` (in original order)."""
    if part == "all":
        return list(range(n))
    order = sorted(range(n), key=lambda i: split_key(kind, i))
    h = n // 2
    chosen = order[:h] if part == "calib" else order[h:]
    return sorted(chosen)


def text_of(spec: SourceSpec, part: str) -> str:
    rows = split_rows(_rows(spec), part)
    text = _join(spec, rows)
    if not text.strip():
        raise DataError(f"{spec.kind}:{spec.path}@{part} holds no text")
    return text


# --------------------------------------------------------------------------------------------
# Items (PIQA, GSM8K, generic JSONL)
# --------------------------------------------------------------------------------------------


@dataclass
class ChoiceItem:
    """A multiple-choice item: the context, the candidate continuations, the right one."""

    index: int
    context: str
    choices: list[str]
    label: int


def piqa_labels_path(path: str) -> str:
    base = path[: -len(".jsonl")] if path.endswith(".jsonl") else path
    return base + "-labels.lst"


def piqa_items(path: str) -> list[ChoiceItem]:
    records = _read_jsonl(path)
    labels_path = piqa_labels_path(path)
    labels_text = _read_text_file(labels_path) if os.path.exists(os.path.expanduser(labels_path)) else None
    if labels_text is None:
        raise DataError(f"PIQA labels not found: expected {labels_path} next to {path}")
    labels = [line.strip() for line in labels_text.splitlines() if line.strip()]
    if len(labels) != len(records):
        raise DataError(f"{labels_path} has {len(labels)} labels but {path} has {len(records)} items")
    items = []
    for i, (rec, lab) in enumerate(zip(records, labels)):
        try:
            items.append(ChoiceItem(i, f"Question: {rec['goal']}\nAnswer:", [" " + rec["sol1"], " " + rec["sol2"]],
                                    int(lab)))
        except (KeyError, ValueError) as e:
            raise DataError(f"{path} item {i}: expected goal/sol1/sol2 and a 0/1 label ({e})") from None
    return items


def item_texts(spec: SourceSpec, template: str | None = None) -> list[str]:
    """Calibration text of every item of an item source (all items, original order)."""
    if spec.kind == "piqa":
        return [it.context + it.choices[it.label] for it in piqa_items(spec.path)]
    records = _read_jsonl(spec.path)
    if spec.kind == "gsm8k":
        template = "Question: {question}\nAnswer: {answer}"
    template = template or "{text}"
    out = []
    for i, rec in enumerate(records):
        try:
            out.append(template.format(**rec))
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(f"{spec.path} record {i}: template {template!r} does not fit it ({e!r})") from None
    return out


# --------------------------------------------------------------------------------------------
# Calibration sets
# --------------------------------------------------------------------------------------------


@dataclass
class CalibrationData:
    """``windows``: [nsamples, seqlen] token ids (for the Hessians). ``items``: for item sources,
    the token ids of every item that the windows contain, at natural length (TACQ's gradient
    samples); None for text sources (the windows are the samples)."""

    windows: torch.Tensor
    items: list[torch.Tensor] | None
    description: str
    spec: str
    info: dict = field(default_factory=dict)

    def gradient_samples(self) -> list[torch.Tensor]:
        return self.items if self.items is not None else list(self.windows)


def _tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_calibration(
    spec: str | SourceSpec,
    tokenizer,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    template: str | None = None,
) -> CalibrationData:
    """Build the calibration set described by ``spec`` (see the module docstring)."""
    if nsamples <= 0 or seqlen <= 1:
        raise DataError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} x {seqlen}")
    src = parse_spec(spec) if isinstance(spec, str) else spec
    part = src.resolve_part("calib")
    rng = random.Random(seed)
    if src.kind in TEXT_KINDS:
        ids = torch.tensor(_tokenize(tokenizer, text_of(src, part)), dtype=torch.long)
        if ids.numel() < seqlen + 1:
            raise DataError(f"{src.describe('calib')} has {ids.numel()} tokens, fewer than seqlen+1 = {seqlen + 1}")
        starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
        windows = torch.stack([ids[s:s + seqlen] for s in starts])
        desc = (f"{nsamples} random windows of {seqlen} tokens from {src.describe('calib')} "
                f"({ids.numel():,} tokens, seed {seed})")
        return CalibrationData(windows, None, desc, src.describe("calib"), {"tokens": int(ids.numel())})

    texts = item_texts(src, template)
    indices = split_item_indices(src.kind, len(texts), part)
    if not indices:
        raise DataError(f"{src.describe('calib')} has no items")
    eos = tokenizer.eos_token_id
    tokenized = {i: _tokenize(tokenizer, texts[i]) + ([eos] if eos is not None else []) for i in indices}
    need = nsamples * seqlen
    stream: list[int] = []
    used: list[int] = []
    passes = 0
    while len(stream) < need:
        passes += 1
        order = list(indices)
        rng.shuffle(order)
        for i in order:
            used.append(i)
            stream.extend(tokenized[i])
            if len(stream) >= need:
                break
    windows = torch.tensor(stream[:need], dtype=torch.long).reshape(nsamples, seqlen)
    items = [torch.tensor(tokenized[i], dtype=torch.long) for i in used]
    desc = (f"{len(used)} items of {src.describe('calib')} ({len(indices)} in the part) packed into "
            f"{nsamples} windows of {seqlen} tokens (seed {seed})")
    if passes > 1:
        desc += f"; the part is shorter than {need:,} tokens, so items repeat ({passes} passes)"
    return CalibrationData(windows, items, desc, src.describe("calib"),
                           {"items_used": len(used), "items_in_part": len(indices), "passes": passes})


def check_readable(spec: str, template: str | None = None) -> SourceSpec:
    """Parse a spec and read its files once (decode, parse JSON, match labels), so that bad data
    is reported before anything slow (loading a model) happens. hf: sources are not checked."""
    src = parse_spec(spec)
    if src.kind == "hf":
        return src
    path = os.path.expanduser(src.path)
    if not os.path.exists(path):
        raise DataError(f"data file not found: {src.path}")
    if os.path.isdir(path):
        raise DataError(f"{src.path} is a directory, expected a file")
    if not os.access(path, os.R_OK):
        raise DataError(f"cannot read {src.path}: permission denied")
    if src.kind == "piqa" and not os.path.exists(os.path.expanduser(piqa_labels_path(src.path))):
        raise DataError(f"PIQA labels not found: expected {piqa_labels_path(src.path)} next to {src.path}")
    if src.kind in TEXT_KINDS:
        _rows(src)
    else:
        item_texts(src, template)
    return src

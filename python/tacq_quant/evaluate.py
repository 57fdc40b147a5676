"""Evaluation: perplexity and multiple-choice accuracy, for a float model or a checkpoint.

Perplexity protocol (:func:`perplexity`, the GPTQ recipe). The text of the source's part (for
``wikitext2:wiki.test.raw`` the default part is ``eval``: the second half of the dataset rows, the
half that calibration never reads; see :mod:`tacq_quant.data`) is tokenized as one stream without
special tokens and cut into non-overlapping windows of ``seqlen`` tokens (the tail shorter than a
window is dropped). Optionally only the first ``max_windows`` windows are used. Each window is an
independent sequence; every token after the first is predicted from the tokens before it in the
same window, and ``ppl = exp(mean NLL over all predicted tokens)``. The protocol actually run
(source, part, tokens, window length, windows used of available) is returned with the number.

Multiple-choice protocol (:func:`multiple_choice`, as lm-evaluation-harness does PIQA). For each
item and each candidate continuation, ``context + continuation`` is tokenized, the context's own
tokenization is removed from the front, and the log-likelihood of the continuation tokens given
everything before them is summed. Reported: ``acc`` (argmax of the summed log-likelihood),
``acc_norm`` (argmax of log-likelihood divided by the continuation's length in characters, the
harness's length normalisation up to one character, tokenizer-independent; this is the headline number) and
``acc_token_norm`` (divided by the continuation's token count). ``per_item`` keeps, for every
item, its index (0-based line), label, the log-likelihood, characters and tokens of each choice.
lm-eval's ``acc_norm`` divides by the characters of the choice *without* the leading space (one
fewer); :func:`tacq_quant.harness.compare_piqa` measures what that changes.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .data import ChoiceItem, DataError, parse_spec, piqa_items, split_item_indices, text_of


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def perplexity(
    model,
    tokenizer,
    spec: str,
    *,
    seqlen: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` on the text source ``spec`` (see the module docstring)."""
    src = parse_spec(spec)
    if src.kind in ("piqa", "gsm8k", "jsonl"):
        raise DataError(f"perplexity needs a text source (text:, wikitext2:, hf: or a path), got {src.kind}:")
    part = src.resolve_part("eval")
    ids = torch.tensor(tokenizer(text_of(src, part), add_special_tokens=False)["input_ids"], dtype=torch.long)
    available = ids.numel() // seqlen
    if available == 0:
        raise DataError(f"{src.describe('eval')} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    n = available if not max_windows else min(available, max_windows)
    windows = ids[: n * seqlen].reshape(n, seqlen)
    t0 = time.perf_counter()
    nll_sum, count = windows_nll(model, windows, batch_size, progress)
    nll = nll_sum / count
    protocol = (f"{src.describe('eval')}: {ids.numel():,} tokens, non-overlapping windows of {seqlen} tokens, "
                f"{n} of {available} windows, {count:,} predicted tokens")
    return {"ppl": math.exp(nll), "nll": nll, "source": src.describe("eval"), "seqlen": seqlen, "windows": n,
            "windows_available": available, "tokens_predicted": count, "seconds": time.perf_counter() - t0,
            "protocol": protocol}


def windows_nll(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False,
                on_logits=None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of ``windows`` [n, L] (token ids, each window on
    its own, no cache) and the number of predicted tokens, n * (L - 1). ``on_logits(logits)`` sees
    each batch's logits [b, L, vocab]."""
    from tqdm.auto import tqdm

    device = _device_of(model)
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for b in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", unit="batch", disable=not progress,
                      dynamic_ncols=True):
            x = windows[b:b + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                                   reduction="sum")
            nll_sum += float(loss)
            count += x[:, 1:].numel()
            if on_logits is not None:
                on_logits(logits)
    return nll_sum, count


def task_items(spec: str, limit: int | None = None) -> tuple[list[ChoiceItem], str]:
    """The evaluated items of a multiple-choice task spec (the ``eval`` part by default)."""
    src = parse_spec(spec)
    if src.kind != "piqa":
        raise DataError(f"multiple-choice evaluation supports piqa:PATH, got {src.kind}:")
    part = src.resolve_part("eval")
    items = piqa_items(src.path)
    chosen = [items[i] for i in split_item_indices(src.kind, len(items), part)]
    if limit:
        chosen = chosen[:limit]
    return chosen, src.describe("eval")


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if whole[: len(ctx)] != ctx or len(whole) == len(ctx):  # boundary merged: encode separately
        return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def continuation_logprobs(model, requests: list[tuple[list[int], list[int]]], *, max_batch_tokens: int = 4096,
                          progress: bool = True) -> list[float]:
    """Summed log-probability of each continuation given its context (batched, right-padded).

    The output layer is applied only at the positions that predict continuation tokens.
    """
    from tqdm.auto import tqdm

    device = _device_of(model)
    base = model.base_model
    head = model.get_output_embeddings()
    seqs = [(ctx + cont, len(ctx), len(cont)) for ctx, cont in requests]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out = [0.0] * len(seqs)
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(seqs[i][0]) > max_batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    with torch.no_grad():
        for batch in tqdm(batches, desc="choices", unit="batch", disable=not progress, dynamic_ncols=True):
            longest = max(len(seqs[i][0]) for i in batch)
            ids = torch.zeros(len(batch), longest, dtype=torch.long)
            mask = torch.zeros(len(batch), longest, dtype=torch.long)
            rows, pos, targets = [], [], []
            for b, i in enumerate(batch):
                seq, n_ctx, n_cont = seqs[i]
                ids[b, : len(seq)] = torch.tensor(seq)
                mask[b, : len(seq)] = 1
                for t in range(n_ctx, n_ctx + n_cont):  # position t-1 predicts token t
                    rows.append(b)
                    pos.append(t - 1)
                    targets.append(seq[t])
            hidden = base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
            sel = hidden[torch.tensor(rows, device=device), torch.tensor(pos, device=device)]
            logp = torch.log_softmax(head(sel).float(), dim=-1)
            lp = logp[torch.arange(len(targets), device=device), torch.tensor(targets, device=device)].cpu()
            start = 0
            for b, i in enumerate(batch):
                n_cont = seqs[i][2]
                out[i] = float(lp[start:start + n_cont].sum())
                start += n_cont
    return out


def multiple_choice(model, tokenizer, spec: str, *, limit: int | None = None, max_batch_tokens: int = 4096,
                    progress: bool = True) -> dict:
    """Accuracy on a multiple-choice task (PIQA); see the module docstring for the protocol."""
    items, source = task_items(spec, limit)
    if not items:
        raise DataError(f"{source} has no items to evaluate")
    t0 = time.perf_counter()
    requests, owners = [], []
    for it in items:
        for c in it.choices:
            requests.append(_encode_pair(tokenizer, it.context, c))
            owners.append(it)
    lls = continuation_logprobs(model, requests, max_batch_tokens=max_batch_tokens, progress=progress)
    correct = {"acc": 0, "acc_norm": 0, "acc_token_norm": 0}
    per_item = []
    r = 0
    for it in items:
        k = len(it.choices)
        ll = lls[r:r + k]
        n_tok = [len(requests[r + j][1]) for j in range(k)]
        r += k
        per_item.append({"index": it.index, "label": it.label, "ll": ll, "chars": [len(c) for c in it.choices],
                         "tokens": n_tok})
        scores = {
            "acc": ll,
            "acc_norm": [ll[j] / max(1, len(it.choices[j])) for j in range(k)],
            "acc_token_norm": [ll[j] / max(1, n_tok[j]) for j in range(k)],
        }
        for key, s in scores.items():
            correct[key] += int(max(range(k), key=lambda j: s[j]) == it.label)
    n = len(items)
    res = {key: v / n for key, v in correct.items()}
    res["stderr"] = math.sqrt(res["acc_norm"] * (1 - res["acc_norm"]) / n)
    res.update({"items": n, "source": source, "seconds": time.perf_counter() - t0, "per_item": per_item,
                "protocol": f"{source}: {n} items, length-normalised log-likelihood "
                            f"(acc_norm: per character of the continuation)"})
    return res

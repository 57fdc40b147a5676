"""lm-evaluation-harness (``lm_eval``) on local data, side by side with ``tacq eval``.

The task configs in ``lm_eval_tasks/`` (:data:`TASKS_DIR`) are lm-eval's own ``piqa`` and
``wikitext`` tasks (same prompt, choices, metrics, detokenizer), read from local files instead of
the hub and, by default, on the evaluation half that ``tacq eval`` reads (``@all``: every item):

==================  ======================  ==============================================
``--harness``       lm-eval task            documents
==================  ======================  ==============================================
``piqa``            ``tacq_piqa``           PIQA validation, evaluation half (919 items)
``piqa@all``        ``tacq_piqa_all``       PIQA validation, all 1,838 items
``wikitext``        ``tacq_wikitext``       WikiText-2 raw test rows [n // 2, n), as articles
``wikitext@all``    ``tacq_wikitext_all``   WikiText-2 raw test, all 62 articles
==================  ======================  ==============================================

They also run from lm-eval's own command line (``lm_eval --include_path TASKS_DIR --tasks
tacq_piqa --metadata '{"data_dir": DIR}'``); docs/integrations.md has the commands and what
differs from ``tacq eval``'s protocols. lm_eval is imported only when a harness task runs.
"""

from __future__ import annotations

import logging
import os

from .data import DataError

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
TASKS = {"piqa": "tacq_piqa", "piqa@all": "tacq_piqa_all", "wikitext": "tacq_wikitext",
         "wikitext@all": "tacq_wikitext_all"}


def task_names(spec: str) -> list[str]:
    """lm-eval task names for ``--harness`` (e.g. ``"piqa,wikitext@all"``)."""
    names = []
    for part in (p.strip() for p in spec.split(",")):
        if part not in TASKS:
            raise DataError(f"--harness: unknown task {part!r}; known: {', '.join(TASKS)}")
        names.append(TASKS[part])
    if not names:
        raise DataError("--harness: no task given")
    return names


def import_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise DataError("--harness needs lm-evaluation-harness: pip install 'lm_eval>=0.4.13,<0.5' "
                        "(or the package's [harness] extra)") from None
    return lm_eval


def run_harness(model, tokenizer, tasks: list[str], *, data: dict | None = None, limit: int | None = None,
                batch_size: int = 4) -> dict:
    """Run lm-eval ``tasks`` (from :data:`TASKS_DIR`) on an already loaded model.

    ``data``: where the files are (``data_dir``, ``piqa``, ``wikitext``; see
    ``lm_eval_tasks/tacq_data.py``). ``limit``: the first N documents of each task. Returns
    lm-eval's result dict (``results`` per task, ``samples`` per task: every document with its
    log-likelihoods).
    """
    import_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=TASKS_DIR, include_defaults=False, metadata=dict(data or {}))
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=True)


def summary(results: dict) -> list[str]:
    """One line per task and metric (value and standard error)."""
    lines = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name in ("alias", "samples", "sample_len", "sample_count") or name.endswith("_stderr") \
                    or not isinstance(value, (int, float)):
                continue
            err = metrics.get(f"{name}_stderr,{filt}")
            lines.append(f"{task} {name} {value:.4f}" + (f" +-{err:.4f}" if isinstance(err, (int, float)) else ""))
    return lines


def compare_piqa(tacq_task: dict, samples: list[dict]) -> dict:
    """Per-item agreement between ``tacq eval``'s PIQA result (``per_item``) and lm-eval's samples.

    Decisions compared, on the items both evaluated: ``acc`` (larger log-likelihood) and
    ``acc_norm`` (larger log-likelihood per character). lm-eval divides by the length of the
    solution, ``tacq eval`` by the length of the continuation it scores (the solution after a
    space, one character more); ``acc_norm_same_normalisation`` applies lm-eval's divisor to
    ``tacq eval``'s log-likelihoods, so only the log-likelihoods themselves can differ there.
    """
    ours = {it["index"]: it for it in tacq_task["per_item"]}
    rows = []
    for s in samples:
        it = ours.get(s["doc"]["index"])
        if it is not None:
            rows.append((it, s))
    if not rows:
        raise DataError("tacq eval and lm-eval evaluated no common PIQA item")

    def argmax(xs):
        return max(range(len(xs)), key=lambda j: xs[j])

    same = {"acc": 0, "acc_norm": 0, "acc_norm_same_normalisation": 0}
    max_dll = 0.0
    for it, s in rows:
        theirs = [float(r[0]) for r in s["filtered_resps"]]
        sols = [s["doc"]["sol1"], s["doc"]["sol2"]]
        ll = it["ll"]
        max_dll = max(max_dll, max(abs(a - b) for a, b in zip(ll, theirs)))
        harness_norm = argmax([theirs[j] / len(sols[j]) for j in range(2)])
        same["acc"] += argmax(ll) == argmax(theirs)
        same["acc_norm"] += argmax([ll[j] / it["chars"][j] for j in range(2)]) == harness_norm
        same["acc_norm_same_normalisation"] += argmax([ll[j] / len(sols[j]) for j in range(2)]) == harness_norm
    return {"items": len(rows), "same_decisions": same, "max_abs_loglik_diff": max_dll}


def agreement_line(agree: dict) -> str:
    n, same = agree["items"], agree["same_decisions"]
    return (f"{n} common items, the same decision on acc {same['acc']}/{n}, acc_norm {same['acc_norm']}/{n} "
            f"({same['acc_norm_same_normalisation']}/{n} with lm-eval's divisor); "
            f"max |log-likelihood difference| {agree['max_abs_loglik_diff']:.2e}")


def eval_harness(args, model, tokenizer, results: dict) -> None:
    """``tacq eval --harness``: run the tasks, print their numbers and, next to a ``--task piqa``
    result, the per-item agreement; store all of it under ``results["harness"]``."""
    from .data import parse_spec

    data = {}
    if args.data_dir:
        data["data_dir"] = os.path.abspath(os.path.expanduser(args.data_dir))
    for spec, kind, key in ((args.task, "piqa", "piqa"), (args.ppl, "wikitext2", "wikitext")):
        if spec and parse_spec(spec).kind == kind:  # the files tacq eval reads: the same items
            data[key] = os.path.abspath(os.path.expanduser(parse_spec(spec).path))
    names = task_names(args.harness)
    out = run_harness(model, tokenizer, names, data=data, limit=args.harness_limit, batch_size=args.batch_size)
    report = {"tasks": names, "data": data, "limit": args.harness_limit, "results": out["results"]}
    for line in summary(out):
        print(f"lm-eval {line}")
    for name in names:
        if not name.startswith("tacq_piqa"):
            continue
        samples = out["samples"][name]
        report.setdefault("per_item", {})[name] = [
            {"index": s["doc"]["index"], "ll": [float(r[0]) for r in s["filtered_resps"]]} for s in samples]
        if "task" in results:
            agree = compare_piqa(results["task"], samples)
            report.setdefault("agreement", {})[name] = agree
            print(f"per-item agreement of {name} with tacq eval: {agreement_line(agree)}")
    results["harness"] = report


def main(argv: list[str] | None = None) -> int:
    """``python -m tacq_quant.harness TACQ_JSON SAMPLES_JSONL``: per-item PIQA agreement between a
    ``tacq eval --task piqa:... --json`` result and an ``lm_eval --log_samples`` samples file."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m tacq_quant.harness", description=main.__doc__.split("\n")[0])
    p.add_argument("tacq_json", help="tacq eval --json output with a --task piqa result")
    p.add_argument("samples", help="lm_eval's samples_tacq_piqa*_*.jsonl (from --log_samples)")
    args = p.parse_args(argv)
    with open(args.tacq_json) as f:
        task = json.load(f)["task"]
    with open(args.samples) as f:
        samples = [json.loads(line) for line in f if line.strip()]
    print(agreement_line(compare_piqa(task, samples)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

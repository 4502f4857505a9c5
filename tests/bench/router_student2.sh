#!/usr/bin/env bash
# Issue #20 item 2: today's router student against a contiguous-span + healed + T=1 student, each step
# timed in process CPU seconds (GNU time: user + sys), so the two recipes can be held to one CPU budget.
# Usage: tests/bench/router_student2.sh R RECIPE   (RECIPE: today | span; env: TEACHER, STEPS, SPAN, HEAL, KD)
# R must hold train_answers.jsonl (the teacher's greedy answers; tests/bench/router_student.sh steps 1-2).
#   today: compress prune --drop-layers 6, then logit KD T=2 on the fly, STEPS (25) steps
#   span:  compress prune --contiguous SPAN (7) --heal-steps HEAL (200): 24 of 30 blocks, like today's;
#          then a top-k teacher cache and logit KD T=1 from it, KD (25) steps
# A step whose output exists is skipped (run the prune alone first, then pick KD to fit the budget).
# The span recipe's distill step builds the top-k cache when none matches (its time then includes it);
# the run of record built it in its own timed process, logged as `shared-cache` (a cache is built once
# per data set and reused by every student, as the teacher's answers are; neither is charged to a recipe).
# Each step appends "NAME user sys wall" to R/cpu_RECIPE.txt. OMP_NUM_THREADS=1 throughout.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=$1
RECIPE=$2
T=${TEACHER:-/root/.cache/slimserve/models/smollm2-135m-instruct}
PY=${PY:-.venv/bin/python}
SS="$PY -m server"   # this checkout's code, whatever the installed entry point points at
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
timed() { local name=$1; shift; /usr/bin/time -f "$name %U %S %e" -a -o "$R/cpu_$RECIPE.txt" "$@"; }
KD_ARGS=(--data "$R/train_answers.jsonl" --loss forward_kl --alpha 1 --batch-size 8 --seq-len 128 --lr 1e-4)
case $RECIPE in
  today)
    [ -e "$R/today-pruned/config.json" ] || timed prune $SS compress prune "$T" "$R/today-pruned" --drop-layers 6 --calib "$R/train_answers.jsonl"
    timed distill $SS compress distill "$R/today-kd" --teacher "$T" --student "$R/today-pruned" \
      --temperature 2 --max-steps "${STEPS:-25}" "${KD_ARGS[@]}" ;;
  span)
    [ -e "$R/span-healed/config.json" ] || timed prune-heal $SS compress prune "$T" "$R/span-healed" --contiguous "${SPAN:-7}" --heal-steps "${HEAL:-200}" \
      --calib "$R/train_answers.jsonl"
    timed distill $SS compress distill "$R/span-kd" --teacher "$T" --student "$R/span-healed" \
      --cache-teacher "$R/teacher-top32" --temperature 1 --max-steps "${KD:-25}" "${KD_ARGS[@]}" ;;
  *) echo "RECIPE must be today or span" >&2; exit 2 ;;
esac
cat "$R/cpu_$RECIPE.txt"

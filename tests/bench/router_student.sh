#!/usr/bin/env bash
# Teacher/student pair and prompt sets for the router measurement (issue #7).
# Usage: tests/bench/router_student.sh [OUT_DIR]   (env: TEACHER, STEPS=150, SANITY=20, SKIP_EVAL=1)
# Every step skips work already done, so a rerun resumes.
# Measured on the shared 2-core dev box (roughly half a core free): teacher answers to 700 prompts
# ~20 min (1.4-3.5 s/prompt), prune ~2.5 min, KD 30-90 s/step plus a held-out eval (50 rows) before
# and after of 1.5-6 min each, so STEPS=150 takes 1.5-4 h there; the run of record used STEPS=25
# (10, then resumed to 25). On a GPU the full recipe takes minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=${1:-/tmp/router}
T=${TEACHER:-/root/.cache/slimserve/models/smollm2-135m-instruct}
STEPS=${STEPS:-150}
N=${SANITY:-20}
PY=.venv/bin/python
SS=.venv/bin/slimserve
export HF_HUB_OFFLINE=1
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }

# 1. prompts: ~700 seeded, offline chat prompts -> train (500) / heldout (200)
stamp prompts
$PY -m tests.bench.router_prompts "$R"

# 2. teacher answers: greedy, 48 new tokens, batched (1 thread per process is faster on a busy 2-core box)
stamp teacher answers
OMP_NUM_THREADS=1 $PY -m tests.bench.teacher_answers "$T" "$R/train.jsonl" "$R/train_answers.jsonl" --batch-size 32
OMP_NUM_THREADS=1 $PY -m tests.bench.teacher_answers "$T" "$R/heldout.jsonl" "$R/heldout_answers.jsonl" --batch-size 32

# 3. student: drop 6 of 30 blocks (block influence on the teacher's train answers), then logit KD
stamp prune
[ -e "$R/student-pruned/config.json" ] || \
  $SS compress prune "$T" "$R/student-pruned" --drop-layers 6 --calib "$R/train_answers.jsonl"
stamp distill
# no LR schedule and max-steps is not part of the resume fingerprint, so STEPS may grow across reruns
done_steps=$($PY -c "import json,sys; print(json.load(open(sys.argv[1])).get('steps', 0))" \
  "$R/student-kd/slimserve.json" 2>/dev/null || echo 0)
if [ "$done_steps" -lt "$STEPS" ]; then
  rm -f "$R/sanity_student-kd.jsonl"   # answers of an older student
  $SS compress distill "$R/student-kd" --teacher "$T" --student "$R/student-pruned" \
    --data "$R/train_answers.jsonl" --loss forward_kl --temperature 2 --alpha 1 \
    --max-steps "$STEPS" --batch-size 8 --seq-len 128 --lr 1e-4 --save-every 50 --eval-every 75 \
    $( [ -d "$R/student-kd/checkpoints" ] && echo --resume )
fi

# 4. sanity: greedy answers of pruned and KD student to the first N held-out prompts, side by side
stamp sanity
for m in student-pruned student-kd; do
  OMP_NUM_THREADS=1 $PY -m tests.bench.teacher_answers "$R/$m" "$R/heldout.jsonl" "$R/sanity_$m.jsonl" \
    --batch-size 32 --limit "$N"
done
$PY -m tests.bench.router_side_by_side "$R/heldout_answers.jsonl" "$R/sanity_student-pruned.jsonl" \
  "$R/sanity_student-kd.jsonl" --limit "$N" --show 6 | tee "$R/sanity.txt"
if [ -z "${SKIP_EVAL:-}" ]; then
  stamp eval
  $PY -c "import json,sys; print('\n\n'.join(json.loads(l)['messages'][1]['content'] for l in open(sys.argv[1])))" \
    "$R/heldout_answers.jsonl" > "$R/heldout_answers.txt"
  $SS compress eval "$T" "$R/student-pruned" "$R/student-kd" --text "$R/heldout_answers.txt" \
    --out "$R/eval" --max-tokens 4096
  cat "$R/eval/eval.md"
fi
stamp done

#!/usr/bin/env bash
# pipeline.sh: every stage on the built-in data, from nothing to the results table.
#
#   bash pipeline.sh                  # CPU defaults: data/ and out/, about 7 minutes on 2 cores
#   bash pipeline.sh --seed 1         # another seed: data.py's training data and every stage's seed
#   bash pipeline.sh --quick          # tiny sizes in data/quick/ and out/quick/, about 1 minute
#   bash pipeline.sh --data D --out O # other directories (for --quick too)
#   bash pipeline.sh --one-at-a-time  # every stage alone on all the cores, one after another
#   PYTHON=python3.11 bash pipeline.sh
#
# data -> tokenizer -> pretrain -> sft -> (grpo -> student -> distill | reward -> ppo -> dpo ->
# baseline) -> eval; "|": two lanes side by side, each on half the cores, a stage waiting for the
# other lane's stages it reads. student: a quarter-size pretrain; baseline: sft.py on the student
# with distill's budget. Each stage's output goes to O/logs/STAGE.log, and to the terminal but for
# the lane right of the "|"; the first failing stage stops the pipeline and is named; the end
# prints each stage's wall time and headline.
# Every stage runs with its own defaults (the CPU defaults); only paths and the seed are passed (and
# a 1k vocabulary to the tokenizer, the student's size and steps, distill's budget to the
# baseline), plus tiny sizes with --quick. Flags: `python STAGE.py --help`.
set -eo pipefail  # (no -u: empty "${ARRAY[@]}" is an error under -u in bash < 4.4, macOS's bash)
PYTHON=${PYTHON:-python}
QUICK=0 ONE_AT_A_TIME=0 DATA="" OUT="" SEED=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --one-at-a-time) ONE_AT_A_TIME=1 ;;
    --seed)
      case "$2" in ''|*[!0-9]*) echo "pipeline: --seed needs a whole number" >&2; exit 2 ;; esac
      SEED=$2
      shift ;;
    --data|--out)
      [ $# -ge 2 ] || { echo "pipeline: $1 needs a directory" >&2; exit 2; }
      case "$2" in /*) dir=$2 ;; *) dir=$PWD/$2 ;; esac  # relative to where you are, not the repo
      if [ "$1" = --data ]; then DATA=$dir; else OUT=$dir; fi
      shift ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "pipeline: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$DATA$OUT" in
  *[[:space:]]*) echo "pipeline: --data and --out must not contain spaces" >&2; exit 2 ;;
esac
cd "$(dirname "$0")"
if [ "$QUICK" = 1 ]; then
  DATA=${DATA:-data/quick} OUT=${OUT:-out/quick}
else
  DATA=${DATA:-data} OUT=${OUT:-out}
fi
mkdir -p "$OUT/logs"

# --quick: a tiny world (2 % of the data, 60 held-out prompts), a 2-layer 32-wide model, a few steps
# per stage. DISTILL_BUDGET is what distill and its baseline share: the same steps, batch, schedule,
# optimizer and seed, from the same student (the comparison that shows what the teacher adds).
if [ "$QUICK" = 1 ]; then
  Q_DATA=(--scale 0.02 --eval-per-family 10)
  Q_TOKENIZER=(--vocab-size 400)
  Q_PRETRAIN=(--hidden-size 32 --num-layers 2 --context 64 --batch-size 8 --steps 30 --warmup 5
              --log-every 10 --eval-every 30 --eval-batches 2)
  Q_SFT=(--steps 20 --batch-size 8 --warmup 5 --log-every 10 --max-new-tokens 4)
  Q_REWARD=(--steps 5 --batch-size 8 --warmup 2 --log-every 5 --stats-pairs 16)
  Q_PPO=(--steps 2 --prompts-per-step 8 --max-new-tokens 4 --warmup 1 --log-every 1)
  Q_GRPO=(--steps 2 --prompts-per-step 4 --group-size 4 --max-new-tokens 4 --warmup 1 --log-every 1)
  Q_DPO=(--steps 5 --batch-size 8 --warmup 2 --log-every 5 --max-new-tokens 4)
  Q_STUDENT=(--hidden-size 16 --num-layers 2 --context 64 --batch-size 8 --steps 20 --warmup 5
             --log-every 10 --eval-every 20 --eval-batches 2)
  DISTILL_BUDGET=(--steps 10 --batch-size 8 --grad-accum 1 --lr 3e-3 --warmup 2 --weight-decay 0.1
                  --grad-clip 1.0)
  Q_DISTILL=(--log-every 5 --max-new-tokens 4 --no-keep-correct)
  Q_BASELINE=(--log-every 5 --max-new-tokens 4)
  Q_EVAL=(--max-new-tokens 4 --val-tokens 2048)
else
  Q_DATA=() Q_TOKENIZER=(--vocab-size 1024) Q_PRETRAIN=() Q_SFT=() Q_REWARD=() Q_PPO=() Q_GRPO=()
  Q_DPO=() Q_DISTILL=() Q_BASELINE=() Q_EVAL=()
  Q_STUDENT=(--hidden-size 64 --num-layers 4 --steps 500)  # a quarter of the default's parameters
  DISTILL_BUDGET=(--steps 400 --batch-size 32 --grad-accum 2 --lr 3e-3 --warmup 30
                  --weight-decay 0.1 --grad-clip 1.0)  # distill.py's defaults
fi

# After SFT, two lanes of stages side by side, OMP_NUM_THREADS=1 each on 2 cores (half the cores
# each on more): at these sizes a stage on two threads runs ~1.5x as fast as on one, so two stages
# side by side get ~1.4x the work done. A stage that reads a checkpoint of the other lane waits
# until that stage is done (`after`). Pretraining and SFT, which set the ceiling, run alone on
# every core, in the floating-point order their heights were measured in. The first lane's output
# goes to the terminal, the second's to its logs only. --one-at-a-time: every stage alone, the
# first lane and then the second.
CORES=${OMP_NUM_THREADS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}
HALF=$(( CORES > 1 ? CORES / 2 : 1 ))
rm -f "$OUT/logs/failed" "$OUT"/logs/*.done
run() {  # run NAME COMMAND...: time it, log it, stop the pipeline if it fails
  local name=$1 start rc=0
  shift
  [ ! -e "$OUT/logs/failed" ] || exit 1  # the other lane failed: go no further
  echo "pipeline | $name: $*"
  start=$(date +%s.%N)
  if [ "$LOG_ONLY" = 1 ]; then
    "$@" > "$OUT/logs/$name.log" 2>&1 || rc=$?
  else
    "$@" 2>&1 | tee "$OUT/logs/$name.log" || rc=${PIPESTATUS[0]}
  fi
  local seconds
  seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" != 0 ]; then
    echo "pipeline: stage $name failed (exit $rc) after ${seconds}s;" \
      "its output is in $OUT/logs/$name.log" >&2
    echo "$rc" > "$OUT/logs/failed"  # (for beside: the failed stage's exit code)
    exit "$rc"
  fi
  echo "pipeline | $name took ${seconds}s${BESIDE:+ (beside another, OMP_NUM_THREADS=$BESIDE)}" \
    | tee -a "$OUT/logs/$name.log"
  touch "$OUT/logs/$name.done"
}
after() {  # after NAME...: wait until the other lane's stages NAME are done
  local name
  for name in "$@"; do
    until [ -e "$OUT/logs/$name.done" ]; do
      [ ! -e "$OUT/logs/failed" ] || exit 1
      sleep 0.5
    done
  done
}
beside() {  # beside LANE1 LANE2: two functions of stages at once, on half the cores each
  if [ "$ONE_AT_A_TIME" = 1 ]; then "$1"; "$2"; return; fi
  (export OMP_NUM_THREADS=$HALF BESIDE=$HALF; "$1") &
  local first=$!
  (export OMP_NUM_THREADS=$HALF BESIDE=$HALF LOG_ONLY=1; "$2") &
  wait $first || true
  wait $! || true
  [ ! -e "$OUT/logs/failed" ] || exit "$(cat "$OUT/logs/failed")"
}

T0=$(date +%s.%N)
S=(--seed "$SEED")
run data      $PYTHON data.py --out "$DATA" "${S[@]}" "${Q_DATA[@]}"
run tokenizer $PYTHON tokenizer.py --data "$DATA/pretrain.txt" --out "$OUT/tokenizer.json" \
  "${Q_TOKENIZER[@]}"
run pretrain  $PYTHON pretrain.py --data "$DATA/pretrain.txt" --tokenizer "$OUT/tokenizer.json" \
  --out "$OUT/pretrain.pt" "${S[@]}" "${Q_PRETRAIN[@]}"
run sft       $PYTHON sft.py --init "$OUT/pretrain.pt" --data "$DATA/sft.jsonl,$DATA/chat.jsonl" \
  --ptx-data "$DATA/pretrain.txt" --eval-data "$DATA/eval.jsonl" --out "$OUT/sft.pt" "${S[@]}" \
  "${Q_SFT[@]}"
grpo_student_distill() {
  run grpo      $PYTHON grpo.py --init "$OUT/sft.pt" --data "$DATA/prompts.jsonl" \
    --eval-data "$DATA/eval.jsonl" --out "$OUT/grpo.pt" "${S[@]}" "${Q_GRPO[@]}"
  run student   $PYTHON pretrain.py --data "$DATA/pretrain.txt" --tokenizer "$OUT/tokenizer.json" \
    --out "$OUT/student.pt" "${S[@]}" "${Q_STUDENT[@]}"
  run distill   $PYTHON distill.py --teacher "$OUT/grpo.pt" --init "$OUT/student.pt" \
    --data "$DATA/prompts.jsonl" --chat-data "$DATA/chat.jsonl" --eval-data "$DATA/eval.jsonl" \
    --out "$OUT/distill.pt" "${S[@]}" "${DISTILL_BUDGET[@]}" "${Q_DISTILL[@]}"
}
reward_ppo_dpo_baseline() {
  run reward    $PYTHON reward.py --init "$OUT/sft.pt" --data "$DATA/prefs.jsonl" \
    --eval-pairs "$DATA/prefs_eval.jsonl" --out "$OUT/reward.pt" "${S[@]}" "${Q_REWARD[@]}"
  run ppo       $PYTHON ppo.py --init "$OUT/sft.pt" --reward-model "$OUT/reward.pt" \
    --data "$DATA/prompts.jsonl" --eval-data "$DATA/eval.jsonl" --out "$OUT/ppo.pt" "${S[@]}" \
    "${Q_PPO[@]}"
  run dpo       $PYTHON dpo.py --init "$OUT/sft.pt" --data "$DATA/prefs.jsonl" \
    --eval-pairs "$DATA/prefs_eval.jsonl" --eval-data "$DATA/eval.jsonl" --out "$OUT/dpo.pt" \
    "${S[@]}" "${Q_DPO[@]}"
  # the baseline: the same student, budget and seed as distill, fine-tuned on the SFT demos, not
  # the teacher's replies (and, as distill, on the chats of chat.jsonl, with no pretraining text)
  after student
  run baseline  $PYTHON sft.py --init "$OUT/student.pt" --data "$DATA/sft.jsonl,$DATA/chat.jsonl" \
    --ptx-share 0 --eval-data "$DATA/eval.jsonl" --out "$OUT/distill_baseline.pt" "${S[@]}" \
    "${DISTILL_BUDGET[@]}" "${Q_BASELINE[@]}"
}
beside grpo_student_distill reward_ppo_dpo_baseline
run eval      $PYTHON eval.py --checkpoints "$OUT/*.pt" --eval-data "$DATA/eval.jsonl" \
  --val-data "$DATA/pretrain_val.txt" --chat-data "$DATA/chat_eval.jsonl" \
  --reference "$OUT/sft.pt" --reward-model "$OUT/reward.pt" \
  --out "$OUT/eval.json" "${S[@]}" "${Q_EVAL[@]}"

echo
TOTAL=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
echo "pipeline | done in ${TOTAL}s$([ "$QUICK" = 1 ] && echo " (--quick)")"
for name in data tokenizer pretrain sft reward ppo grpo dpo student distill baseline eval; do
  took=$(sed -n "s/^pipeline | $name took //p" "$OUT/logs/$name.log")
  printf "pipeline | %-9s %7ss%s\n" "$name" "${took%%s*}" "${took#*s}"
  # the headline of each training stage: the before/after lines it ends with (eval's table is above)
  sed -n "/^[a-z]* | done in/,\$p" "$OUT/logs/$name.log" \
    | grep -E "before|after|teacher:|student:|val bpb" | sed 's/^/    /' || true
done

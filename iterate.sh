#!/usr/bin/env bash
# iterate.sh: iterative RL with the labeler in the loop (DeepSeekMath 4.1.4; Llama 2's iterative
# RLHF), from the sft.pt and reward.pt that pipeline.sh wrote.
#
#   bash iterate.sh --rounds 2                               # PPO; out/iter/, data/
#   bash iterate.sh --rounds 2 --seed 1 -- --kl-coef 0.05    # flags after -- go to the RL stage
#   bash iterate.sh --stage grpo --out out/iter_grpo         # GRPO with the reward model added
#   bash iterate.sh --process --reward-model out/prm.pt      # a process reward model, steps judged
#   bash iterate.sh --quick                                  # tiny sizes, after pipeline.sh --quick
#   (--data D, --init sft.pt, --reward-model reward.pt: other inputs; PYTHON=... as pipeline.sh)
#
# Round r = 1..K: the stage (ppo.py, or grpo.py) trains policy r-1 (sft.pt first), its reference
# too, against reward model r-1 (reward.pt first), and (but in the last round) writes 4 of its own
# replies to each training prompt; data.py's labeler judges them as pairs, the worked reply joining
# them (every tenth prompt's pairs held out, among the policy's replies only); reward.py trains
# reward model r-1 further on them, 400 steps, a tenth of its pairs replayed from D/prefs.jsonl:
# reward model r, whose accuracy on the held-out pairs it prints before and after. Round r runs at
# seed --seed + 1000 (r-1), on other prompts. eval.py then puts sft and each round side by side
# (O/eval.json). Writes O/STAGE_rN.pt, samples_rN.jsonl, prefs_rN(_eval).jsonl, reward_rN.pt, logs/.
# --process: the reward model is a process reward model (reward.py --process; grpo.py takes it as
# --process-reward); the labeler judges every step of each sampled reply (steps_rN(_eval).jsonl),
# and reward.py --process trains it further, replaying D/steps.jsonl.
set -eo pipefail
PYTHON=${PYTHON:-python}
ROUNDS=2 STAGE=ppo SEED=0 QUICK=0 PROCESS=0 DATA="" OUT="" INIT="" REWARD=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds|--seed)
      case "$2" in ''|*[!0-9]*) echo "iterate: $1 needs a whole number" >&2; exit 2 ;; esac
      if [ "$1" = --rounds ]; then ROUNDS=$2; else SEED=$2; fi
      shift ;;
    --stage)
      case "$2" in ppo|grpo) STAGE=$2 ;; *) echo "iterate: --stage is ppo or grpo" >&2; exit 2 ;;
      esac
      shift ;;
    --data|--out|--init|--reward-model)
      [ $# -ge 2 ] || { echo "iterate: $1 needs a path" >&2; exit 2; }
      case "$1" in --data) DATA=$2 ;; --out) OUT=$2 ;; --init) INIT=$2 ;; *) REWARD=$2 ;; esac
      shift ;;
    --quick) QUICK=1 ;;
    --process) PROCESS=1 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "iterate: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
[ "$ROUNDS" -ge 1 ] || { echo "iterate: --rounds must be at least 1" >&2; exit 2; }
STAGE_FLAGS=("$@")
if [ "$QUICK" = 1 ]; then  # pipeline.sh --quick's sizes, and its directories
  DATA=${DATA:-data/quick} BASE=out/quick OUT=${OUT:-out/quick/iter}
  Q_RL=(--steps 2 --prompts-per-step 8 --max-new-tokens 8 --warmup 1 --log-every 1)
  [ "$STAGE" = grpo ] && Q_RL=(--steps 2 --prompts-per-step 4 --group-size 4 --max-new-tokens 8
                               --warmup 1 --log-every 1)
  SAMPLES=40
  Q_REWARD=(--steps 3 --batch-size 4 --warmup 1 --log-every 1 --stats-pairs 16)
  Q_EVAL=(--max-new-tokens 8 --val-tokens 2048)
else
  DATA=${DATA:-data} BASE=out OUT=${OUT:-out/iter}
  Q_RL=() Q_EVAL=() SAMPLES=100000  # every prompt of D/prompts.jsonl
  Q_REWARD=(--steps 400 --warmup 20 --log-every 100)  # ~6 passes over the ~2k new pairs
fi
POLICY=${INIT:-$BASE/sft.pt} RM=${REWARD:-$BASE/reward.pt}
for input in "$POLICY" "$RM" "$DATA/prompts.jsonl"; do
  [ -f "$input" ] || { echo "iterate: $input not found: run pipeline.sh first" >&2; exit 2; }
done
mkdir -p "$OUT/logs"
REFERENCE=$POLICY FIRST_RM=$RM

run() {  # run NAME COMMAND...: log it, stop at the first failure
  local name=$1 rc=0
  shift
  echo "iterate | $name: $*"
  "$@" 2>&1 | tee "$OUT/logs/$name.log" || rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then
    echo "iterate: $name failed (exit $rc); its output is in $OUT/logs/$name.log" >&2
    exit "$rc"
  fi
}

CHECKPOINTS=("$REFERENCE")
RM_FLAG=--reward-model KIND=prefs LABEL=() EVAL_RM=$FIRST_RM
if [ "$PROCESS" = 1 ]; then
  [ "$STAGE" = grpo ] && RM_FLAG=--process-reward
  KIND=steps LABEL=(--steps)
  EVAL_RM=$BASE/reward.pt  # eval's reward column: the outcome model's, as pipeline.sh's
fi
for r in $(seq 1 "$ROUNDS"); do
  SAVE=(--save-samples "$OUT/samples_r$r.jsonl" --sample-prompts "$SAMPLES")
  [ "$r" = "$ROUNDS" ] && SAVE=()  # the last round's policy needs no new reward model
  run "${STAGE}_r$r" $PYTHON "$STAGE.py" --init "$POLICY" "$RM_FLAG" "$RM" \
    --data "$DATA/prompts.jsonl" --eval-data "$DATA/eval.jsonl" --out "$OUT/${STAGE}_r$r.pt" \
    --seed $((SEED + 1000 * (r - 1))) "${SAVE[@]}" "${Q_RL[@]}" "${STAGE_FLAGS[@]}"
  POLICY=$OUT/${STAGE}_r$r.pt
  CHECKPOINTS+=("$POLICY")
  [ "$r" = "$ROUNDS" ] && break
  run "label_r$r" $PYTHON data.py label "${LABEL[@]}" --samples "$OUT/samples_r$r.jsonl" \
    --out "$OUT/${KIND}_r$r.jsonl" --eval-out "$OUT/${KIND}_r${r}_eval.jsonl"
  HELD_OUT=$OUT/${KIND}_r${r}_eval.jsonl
  if [ ! -s "$HELD_OUT" ]; then  # a policy whose held-out replies all tie (a tiny one, --quick)
    echo "iterate: nothing held out among round $r's replies; reward_r$r is judged on" \
      "$DATA/${KIND}_eval.jsonl"
    HELD_OUT=$DATA/${KIND}_eval.jsonl
  fi
  if [ "$PROCESS" = 1 ]; then
    TRAIN=(--process --step-data "$OUT/steps_r$r.jsonl" --replay-data "$DATA/steps.jsonl"
           --eval-steps "$HELD_OUT" --eval-pairs "$DATA/prefs_eval.jsonl")
  else
    TRAIN=(--data "$OUT/prefs_r$r.jsonl" --replay-data "$DATA/prefs.jsonl" --eval-pairs "$HELD_OUT")
  fi
  run "reward_r$r" $PYTHON reward.py --init "$RM" "${TRAIN[@]}" --out "$OUT/reward_r$r.pt" \
    --seed "$SEED" "${Q_REWARD[@]}"
  RM=$OUT/reward_r$r.pt
done
run eval $PYTHON eval.py --checkpoints "${CHECKPOINTS[*]}" --eval-data "$DATA/eval.jsonl" \
  --val-data "$DATA/pretrain_val.txt" --chat-data "$DATA/chat_eval.jsonl" \
  --reference "$REFERENCE" --reward-model "$EVAL_RM" --out "$OUT/eval.json" --seed "$SEED" \
  "${Q_EVAL[@]}"
echo
for r in $(seq 1 "$ROUNDS"); do  # each round's headline: the before/after lines it ends with
  for name in "${STAGE}_r$r" "reward_r$r"; do
    [ -f "$OUT/logs/$name.log" ] || continue
    sed -n "/^[a-z]* | done in/,\$p" "$OUT/logs/$name.log" | grep -E "before|after" \
      | sed "s/^/round $r: /" || true
  done
done

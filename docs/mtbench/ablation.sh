#!/usr/bin/env bash
# Every number in README "Results on real human votes": MT-Bench human votes, 5 folds grouped by
# question, SmolLM2-135M-Instruct. Each row is `python -m train` / `python -m infer` with overrides.
# Usage (one GPU; the runs of a phase share it side by side):
#   bash docs/mtbench/ablation.sh DATA_DIR RUNS_DIR plain|ablate|prestage|objective|merge|combine|all
# DATA_DIR holds mtbench_human.csv and alpacaeval_gpt4.csv.gz (../shared/data in this workspace).
# PYTHON names the interpreter (default: python). A finished fold is reused when a phase is rerun.
set -euo pipefail
DATA=${1:?DATA_DIR}; RUNS=${2:?RUNS_DIR}; PHASE=${3:-all}; PY=${PYTHON:-python}
MT=$DATA/mtbench_human.csv; AE=$DATA/alpacaeval_gpt4.csv.gz
mkdir -p "$RUNS"
[ -f "$RUNS/mtbench-folds.csv" ] || $PY -m data.folds csv="$MT" out="$RUNS/mtbench-folds.csv" group_col=question_id
[ -d "$RUNS/length" ] || $PY -m train.length csv="$MT" folds="$RUNS/mtbench-folds.csv" out="$RUNS/length"

MTB="data.train_csv=$MT data.folds_csv=$RUNS/mtbench-folds.csv output_dir=$RUNS fold=all"
mt() {  # mt NAME SEED overrides...: one 5-fold MT-Bench run in the background, log in RUNS/NAME-seedS[-foldK].log
  local name=$1 seed=$2; shift 2
  local log=$RUNS/$name-seed$seed$(printf '%s\n' "$@" | sed -n 's/^fold=\([0-9]\)$/-fold\1/p').log
  $PY -m train configs/smollm2-mtbench.yaml name="$name" seed="$seed" $MTB "$@" > "$log" 2>&1 &
}

case $PHASE in plain|all)
  mt plain 42
  mt plain 7
  # the seed notebook's choices: LoRA on q/k/v only, head at the LoRA learning rate, keep the start
  mt naive 42 model.lora_targets=q_proj,k_proj,v_proj train.head_lr=0 format.truncation=head train.warmup=0.05
  wait ;; esac
case $PHASE in ablate|all)
  mt plain-noswap 42 train.swap_aug=false
  mt plain-len512 42 format.max_length=512
  wait ;; esac
case $PHASE in objective|all)
  # The 3-class head against a Bradley-Terry reward model (trl RewardTrainer, train.objective=bradley_terry),
  # on every vote and on the decisive votes alone (same folds: the decisive rows keep their question's fold).
  # Each fold runs in its own process, all side by side; fold=all then reuses them and prints the CV table.
  DEC=$RUNS/mtbench-decisive.csv
  [ -f "$DEC" ] || $PY -c "import pandas as pd, sys; d = pd.read_csv(sys.argv[1]); d[d.winner_tie == 0].to_csv(sys.argv[2], index=False)" "$MT" "$DEC"
  specs=("bt train.objective=bradley_terry" "bt-decisive data.train_csv=$DEC train.objective=bradley_terry"
         "plain-decisive data.train_csv=$DEC" "plain")  # NAME then its overrides
  # At most PAR folds at once: a SmolLM2 fold at batch 16 x 1024 tokens takes 10-25 GB of GPU memory.
  for spec in "${specs[@]}"; do for k in 0 1 2 3 4; do
    while [ "$(jobs -rp | wc -l)" -ge "${PAR:-8}" ]; do wait -n || true; done
    set -- $spec; mt "$1" 42 "${@:2}" fold=$k
  done; done
  wait
  for spec in "${specs[@]}"; do set -- $spec; mt "$1" 42 "${@:2}"; wait; done ;; esac
case $PHASE in merge|all)
  # --merge-folds measured: 16 of the 80 questions (every fifth) kept out of every fold; on them, each fold's
  # run alone, the ensemble of the five, and the merged adapter (the folds' mean LoRA update) are scored.
  HO=$RUNS/mtbench-heldout.csv; TR=$RUNS/mtbench-train64.csv
  [ -f "$HO" ] || $PY -c "import pandas as pd, sys; d = pd.read_csv(sys.argv[1]); q = sorted(d.question_id.unique())[::5]
d[d.question_id.isin(q)].to_csv(sys.argv[2], index=False); d[~d.question_id.isin(q)].to_csv(sys.argv[3], index=False)" "$MT" "$HO" "$TR"
  [ -f "$RUNS/train64-folds.csv" ] || $PY -m data.folds csv="$TR" out="$RUNS/train64-folds.csv" group_col=question_id
  for k in 0 1 2 3 4; do
    $PY -m train configs/smollm2-mtbench.yaml name=train64 seed=42 data.train_csv="$TR" \
      data.folds_csv="$RUNS/train64-folds.csv" output_dir="$RUNS" fold=$k > "$RUNS/train64-seed42-fold$k.log" 2>&1 &
  done
  wait
  $PY -m train.export runs="$RUNS/train64" dataset_id=local/merge-check out="$RUNS/train64-export" --merge-folds \
    verify_rows=0 overwrite=true
  held() { $PY -m infer predict runs="$1" csv="$HO" out="$RUNS/heldout-$2.csv" overwrite=true | grep "log loss" | sed "s/^/$2: /"; }
  for k in 0 1 2 3 4; do held "$RUNS/train64/fold$k-seed42" "fold$k"; done
  held "$(ls -d "$RUNS"/train64/fold*-seed42 | paste -sd, -)" ensemble
  held "$RUNS/train64-export/members/train64/merged" merged ;; esac
case $PHASE in prestage|all)
  # AlpacaEval (GPT-4 judge) pre-stage, then the MT-Bench folds start from it (train.init_from)
  [ -f "$RUNS/alpaca-folds.csv" ] || $PY -m data.folds csv="$AE" out="$RUNS/alpaca-folds.csv" n_folds=20
  $PY -m train configs/smollm2-alpaca.yaml seed=42 fold=0 data.train_csv="$AE" \
    data.folds_csv="$RUNS/alpaca-folds.csv" data.exclude_prompts_of="[$MT]" output_dir="$RUNS" > "$RUNS/alpaca-seed42.log" 2>&1
  mt prestaged 42 train.init_from="$RUNS/smollm2-alpaca/fold0-seed42"
  wait ;; esac
case $PHASE in combine|all)  # CPU: stacking on the length model, nested over the folds, and the report
  for s in 42 7; do
    $PY -m infer ensemble members="$RUNS/plain@$s,$RUNS/length" labels="$MT" folds="$RUNS/mtbench-folds.csv" \
      method=stack out="$RUNS/stack-seed$s"
  done
  $PY -m infer ensemble members="$RUNS/plain@42,$RUNS/plain@7" labels="$MT" folds="$RUNS/mtbench-folds.csv" \
    method=logprob_avg out="$RUNS/seeds"
  $PY -m infer report oof="$RUNS/stack-seed42/oof.csv,$RUNS/plain/oof-seed42.csv,$RUNS/length/oof.csv" labels="$MT" \
    folds="$RUNS/mtbench-folds.csv" out="$RUNS/report" overwrite=true passes="$RUNS/plain/fold*-seed42/oof_passes.csv"
  cp "$RUNS"/report/*.md "$RUNS"/report/*.png docs/mtbench/ ;; esac
grep -h "^  all" "$RUNS"/*.log || true

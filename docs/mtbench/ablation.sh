#!/usr/bin/env bash
# Every number in README "Results on real human votes": MT-Bench human votes, 5 folds grouped by
# question, SmolLM2-135M-Instruct. Each row is `python -m train` / `python -m infer` with overrides.
# Usage (one GPU; the runs of a phase share it side by side):
#   bash docs/mtbench/ablation.sh DATA_DIR RUNS_DIR plain|ablate|objective|methods|combine|all
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
case $PHASE in methods|all)
  # Issue 17's methods on one GPU, every step in a queue of at most PAR processes (a finished fold is
  # reused on a rerun, so the phase resumes where a cut command left it). Timeline: RUNS/methods-timeline.log.
  # STEPS (default: plain distill pseudo prestaged merge; also: smooth, prestage, pdistill, distill64):
  #   plain      the recipe; its folds score the pseudo-label pool and its stack with the length model is the teacher
  #   distill    the recipe with KL to TEACHER (default: that stack's nested OOF; train.distill_from, α 0.5)
  #   smooth     the recipe with label smoothing 0.1: what soft targets alone buy, beside distill
  #   pseudo     pool = POOL_ROWS AlpacaEval pairs (labels ignored, no MT-Bench prompt); fold k trains with the
  #              pool as fold k's run alone scored it (POOL_PREDS, default RUNS/pool-pred{fold}.csv; weight 0.5)
  #   prestage   AlpacaEval (GPT-4 judge), PRE_ROWS rows, 1 epoch (also run for the two steps below)
  #   prestaged  the recipe started from the pre-stage
  #   pdistill   the recipe started from the pre-stage and distilled from TEACHER
  #   merge      the recipe on 64 questions; on the 16 others (every fifth, held out of every fold) each fold,
  #              the fold ensemble and the merged adapter (train.export --merge-folds) are scored
  #   distill64  distillation without the leak: the 64-question recipe's stack is the teacher of 64-question
  #              students; both five-fold ensembles are scored on the 16 held-out questions
  # distill@7 (likewise plain, smooth, pseudo, prestaged, pdistill): that method's folds with another seed; each
  # seed is stacked on the length model, and a method with two seeds also both seeds with the length model.
  # SEED64 (default 42): the seed of the 64-question runs of merge and distill64 (named train64-s<SEED64> and
  # distill64-s<SEED64> when not 42, so each export and ensemble holds one seed's folds).
  # A phase with a failed job reruns itself once (one process fewer), so only what failed trains again.
  # TEACHER and POOL_PREDS may name files of an earlier pass (docs/mtbench/methods-pass1/: the stack's
  # OOF, pool-pred{fold}.csv), so a later GPU session need not train `plain` again for them.
  # PAR: 8 on one H200 (a fold takes about 15 GB, the pre-stage 19 GB: at 9 the pre-stage and a fold ran out of
  # GPU memory in the third pass and another fold failed in cuDNN attention, at 10 three folds in the second). Starting the CUDA multi-process service first
  # (nvidia-cuda-mps-control -d) cut a fold from about 460 s to 340-370 s side by side (docs/mtbench/methods-pass2/).
  STEPS=" ${STEPS:-plain distill pseudo prestaged merge} "; has() { [[ $STEPS == *" $1 "* ]]; }
  wants() { has "$1" || [[ $STEPS == *" $1@"* ]]; }  # the step at any seed
  seeds() { has "$1" && echo 42; for s in $STEPS; do [[ $s == "$1@"* ]] && echo "${s#*@}"; done; true; }
  TEACHER=${TEACHER:-$RUNS/stack-seed42}; POOL_PREDS=${POOL_PREDS:-$RUNS/pool-pred\{fold\}.csv}
  HO=$RUNS/mtbench-heldout.csv; TR=$RUNS/mtbench-train64.csv; POOL=$RUNS/pool.csv; TL=$RUNS/methods-timeline.log
  TL0=$( [ -f "$TL" ] && wc -l < "$TL" || echo 0)  # this run's timeline lines start after TL0
  [ -f "$HO" ] || $PY -c "import pandas as pd, sys; d = pd.read_csv(sys.argv[1]); q = sorted(d.question_id.unique())[::5]
d[d.question_id.isin(q)].to_csv(sys.argv[2], index=False); d[~d.question_id.isin(q)].to_csv(sys.argv[3], index=False)" "$MT" "$HO" "$TR"
  [ -f "$RUNS/train64-folds.csv" ] || $PY -m data.folds csv="$TR" out="$RUNS/train64-folds.csv" group_col=question_id
  [ -f "$RUNS/alpaca-folds.csv" ] || $PY -m data.folds csv="$AE" out="$RUNS/alpaca-folds.csv" n_folds=20
  [ -f "$POOL" ] || $PY -c "import sys, pandas as pd
from data.io import prompt_key
ae, mt, folds = pd.read_csv(sys.argv[1]), pd.read_csv(sys.argv[2]), pd.read_csv(sys.argv[3])
ae = ae[ae.id.isin(folds.id[folds.fold == 1]) & ~ae.prompt.map(prompt_key).isin(set(mt.prompt.map(prompt_key)))]
ae.head(int(sys.argv[5])).to_csv(sys.argv[4], index=False)" "$AE" "$MT" "$RUNS/alpaca-folds.csv" "$POOL" "${POOL_ROWS:-1000}"
  job() {  # job NAME cmd...: run in the background once a slot is free; its start and end go to the timeline
    local name=$1; shift
    while [ "$(jobs -rp | wc -l)" -ge "${PAR:-8}" ]; do wait -n || true; done
    ( echo "$(date +%s) start $name" >> "$TL"; if "$@" > "$RUNS/$name.log" 2>&1; then r=ok; else r=FAILED; fi
      echo "$(date +%s) end $name $r" >> "$TL" ) &
  }
  recipe() { echo configs/smollm2-mtbench.yaml seed=42 $MTB ${EXTRA:-}; }  # EXTRA: overrides for a smoke test
  # each method's overrides, written once: its folds and its fold=all collection must ask for the same settings
  declare -A ARGS=([plain]="" [distill]="train.distill_from=$TEACHER" [smooth]="train.label_smoothing=0.1"
    [pseudo]="data.extra_csv=$RUNS/pseudo{fold}.csv train.soft_labels=true"
    [prestaged]="train.init_from=$RUNS/smollm2-alpaca/fold0-seed42")
  ARGS[pdistill]="${ARGS[prestaged]} ${ARGS[distill]}"
  folds() {  # folds NAME [SEED]
    local s=${2:-42}; PIDS=()
    for k in 0 1 2 3 4; do job "$1-seed$s-fold$k" $PY -m train $(recipe) seed=$s name="$1" fold=$k ${ARGS[$1]}; PIDS+=($!); done
  }
  collect() { $PY -m train $(recipe) seed=${2:-42} name="$1" ${ARGS[$1]} > "$RUNS/$1-seed${2:-42}.log" 2>&1 || true; }  # folds reused: CV, oof
  SEEDED=$(for s in $STEPS; do case $s in plain@*|distill@*|smooth@*|pseudo@*|prestaged@*|pdistill@*) echo "$s";; *@*) echo "no seeded step $s" >&2; exit 2;; esac; done)
  PRE=; P42=(); T64=(); PS=()
  PRESTEPS=$(for s in $STEPS; do case $s in prestaged|pdistill|prestaged@*|pdistill@*) echo "$s";; esac; done)
  if has prestage || [ -n "$PRESTEPS" ]; then
    job prestage $PY -m train configs/smollm2-alpaca.yaml seed=42 fold=0 data.train_csv="$AE" data.max_train_rows="${PRE_ROWS:-6000}" \
      data.folds_csv="$RUNS/alpaca-folds.csv" data.exclude_prompts_of="[$MT]" output_dir="$RUNS" train.save_steps=100 ${EXTRA:-}
    PRE=$!
  fi
  if has plain; then folds plain; P42=("${PIDS[@]}"); fi
  S64=${SEED64:-42}; X64=; [ "$S64" = 42 ] || X64=-s$S64; N64=train64$X64; D64=distill64$X64  # seed 42 keeps the names
  t64() { echo configs/smollm2-mtbench.yaml seed=$S64 data.train_csv=$TR data.folds_csv=$RUNS/train64-folds.csv output_dir=$RUNS ${EXTRA:-}; }
  if has merge || has distill64; then for k in 0 1 2 3 4; do
    job $N64-fold$k $PY -m train $(t64) name=$N64 fold=$k; T64+=($!)
  done; fi
  if has plain; then
    wait "${P42[@]}" || true  # (a job reaped by a slot wait reads as not a child)
    collect plain
    $PY -m infer ensemble members="$RUNS/plain@42,$RUNS/length" labels="$MT" folds="$RUNS/mtbench-folds.csv" \
      method=stack out="$RUNS/stack-seed42" > "$RUNS/stack-seed42.log" 2>&1 || true
    if wants pseudo && [ "$POOL_PREDS" = "$RUNS/pool-pred{fold}.csv" ]; then for k in 0 1 2 3 4; do
      # the pool as fold k's run alone sees it: that run never trained on fold k
      job pool-fold$k $PY -m infer predict runs="$RUNS/plain/fold$k-seed42" csv="$POOL" out="$RUNS/pool-pred$k.csv" overwrite=true
      PS+=($!)
    done; fi
  fi
  has distill && folds distill
  for s in $SEEDED; do case $s in pseudo@*|prestaged@*|pdistill@*) ;; *) folds "${s%@*}" "${s#*@}";; esac; done
  has smooth && folds smooth
  if wants pseudo; then
    [ ${#PS[@]} -eq 0 ] || wait "${PS[@]}" || true  # (wait without ids would wait for every job)
    for k in 0 1 2 3 4; do
      $PY -m train.pseudo preds="${POOL_PREDS//\{fold\}/$k}" csv="$POOL" out="$RUNS/pseudo$k.csv" weight=0.5 overwrite=true \
        > "$RUNS/pseudo-labels$k.log" 2>&1 || true
    done
    for s in $(seeds pseudo); do folds pseudo "$s"; done
  fi
  if has merge || has distill64; then wait "${T64[@]}" || true; fi
  if has distill64; then  # distillation measured without the leak: teacher and students never see the 16 held-out questions
    [ -d "$RUNS/length64" ] || $PY -m train.length csv="$TR" folds="$RUNS/train64-folds.csv" out="$RUNS/length64" \
      > "$RUNS/length64.log" 2>&1 || true
    $PY -m train $(t64) name=$N64 fold=all > "$RUNS/$N64-seed$S64.log" 2>&1 || true  # folds reused: oof-seed$S64.csv
    $PY -m infer ensemble members="$RUNS/$N64@$S64,$RUNS/length64" labels="$TR" folds="$RUNS/train64-folds.csv" \
      method=stack out="$RUNS/stack64$X64" > "$RUNS/stack64$X64.log" 2>&1 || true
    for k in 0 1 2 3 4; do job $D64-fold$k $PY -m train $(t64) name=$D64 fold=$k train.distill_from="$RUNS/stack64$X64"; done
  fi
  if has merge && ls -d "$RUNS/$N64"/fold*-seed$S64 > /dev/null 2>&1; then  # (no fold at all: the rerun below)
    held="$(ls -d "$RUNS/$N64"/fold*-seed$S64 | tr '\n' ' ')$(ls -d "$RUNS/$N64"/fold*-seed$S64 | paste -sd, -)"
    held="$held $RUNS/$N64-export/members/$N64/merged"
    job merge$X64 sh -c "$PY -m train.export runs=$RUNS/$N64 dataset_id=local/merge-check out=$RUNS/$N64-export --merge-folds \
      verify_rows=0 overwrite=true; for r in $held; do echo \"== \$r\"; $PY -m infer predict runs=\$r csv=$HO \
      out=$RUNS/heldout$X64.csv overwrite=true; done"
  fi
  if [ -n "$PRESTEPS" ]; then
    wait $PRE || true
    for s in $PRESTEPS; do if [[ $s == *@* ]]; then folds "${s%@*}" "${s#*@}"; else folds "$s"; fi; done
  fi
  wait
  for m in distill smooth pseudo; do has $m && collect $m; done
  for s in $SEEDED; do collect "${s%@*}" "${s#*@}"; done  # (prestaged@S, pdistill@S too)
  for s in $PRESTEPS; do [[ $s == *@* ]] || collect "$s"; done
  if has distill64; then  # the five folds of each on the held-out questions
    : > "$RUNS/heldout64.log"
    for m in $N64 $D64; do
      echo "== $m" >> "$RUNS/heldout64.log"
      $PY -m infer predict runs="$(ls -d "$RUNS/$m"/fold*-seed$S64 | paste -sd, -)" csv="$HO" out="$RUNS/heldout-$m.csv" \
        overwrite=true >> "$RUNS/heldout64.log" 2>&1 || true
    done
  fi
  # each method stacked on the length model (nested), then all of them together
  all=
  stack() { $PY -m infer ensemble members="$2$RUNS/length" labels="$MT" folds="$RUNS/mtbench-folds.csv" method=stack \
    out="$RUNS/$1" > "$RUNS/$1.log" 2>&1 || true; }  # stack OUT_NAME "members,"
  for m in plain distill smooth pseudo prestaged pdistill; do
    [ -f "$RUNS/$m/oof-seed42.csv" ] && all="$all$RUNS/$m@42,"
    ms=
    for f in "$RUNS/$m"/oof-seed*.csv; do
      [ -f "$f" ] || continue
      s=${f##*oof-seed}; s=${s%.csv}; ms="$ms$RUNS/$m@$s,"
      if [ $s = 42 ]; then [ $m = plain ] || stack "stack-$m" "$RUNS/$m@42,"; else stack "stack-$m-seed$s" "$RUNS/$m@$s,"; fi
    done
    [ "$(echo "$ms" | tr -cd , | wc -c)" -ge 2 ] && stack "stack-$m-seeds" "$ms"
  done
  $PY -m infer ensemble members="${all}$RUNS/length" labels="$MT" folds="$RUNS/mtbench-folds.csv" method=stack \
    out="$RUNS/stack-methods" > "$RUNS/stack-methods.log" 2>&1 || true
  # A job that failed (out of GPU memory, most often) gets one more chance: the phase once more, one process fewer,
  # in dependency order; it reuses every finished fold, so only what failed trains again.
  if [ -z "${METHODS_RETRY:-}" ] && tail -n +$((TL0 + 1)) "$TL" | grep -q " FAILED$"; then
    echo "$(date +%s) rerun for the failed jobs" >> "$TL"  # the rerun writes `end methods`
    PAR=$(( ${PAR:-8} > 1 ? ${PAR:-8} - 1 : 1 )) METHODS_RETRY=1 bash "$0" "$DATA" "$RUNS" methods || true
  else
    echo "$(date +%s) end methods" >> "$TL"
  fi ;; esac
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

"""docs/mtbench/ablation.sh's methods queue (the source of README's MT-Bench method figures) run with a stub
interpreter that records every call instead of training: which runs start, with which overrides and seeds, in
which order, and the one rerun after a failed job. No model, no data: DATA only names files."""
from __future__ import annotations

import os
import shutil
import subprocess
import textwrap

import pytest

from conftest import REPO

SCRIPT = REPO / "docs" / "mtbench" / "ablation.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# The stub: every call is logged; `-m train` makes the run folder (a fold) or oof-seed<s>.csv (fold=all), `out=` is
# created; a fold of FAIL_NAME fails the first time it runs (as an out-of-memory fold would).
STUB = textwrap.dedent("""\
    #!/usr/bin/env bash
    echo "$*" >> "$LOG"
    arg() { printf '%s\\n' "$@" | sed -n "s/^$1=//p" | tail -1; }
    out=$(arg out "$@"); name=$(arg name "$@"); seed=$(arg seed "$@"); fold=$(arg fold "$@")
    if [ "$2" = train ]; then
      if [ "$fold" = all ]; then mkdir -p "$RUNS/$name" && touch "$RUNS/$name/oof-seed$seed.csv"
      elif [ -n "${FAIL_NAME:-}" ] && [ "$name" = "$FAIL_NAME" ] && mkdir "$RUNS/.failed-$name-$fold" 2>/dev/null; then exit 1
      else mkdir -p "$RUNS/$name/fold$fold-seed$seed"; fi
    fi
    case "$out" in "") ;; *.csv) touch "$out" ;; *) mkdir -p "$out" ;; esac
    """)


def run_methods(tmp_path, steps: str, **env) -> tuple[list[str], list[str]]:
    """(the stub's calls, the timeline's events) of `ablation.sh DATA RUNS methods` with these STEPS."""
    stub, runs, log = tmp_path / "python", tmp_path / "runs", tmp_path / "calls.log"
    stub.write_text(STUB)
    stub.chmod(0o755)
    data = tmp_path / "data"
    data.mkdir()
    env = {**os.environ, "PYTHON": str(stub), "LOG": str(log), "RUNS": str(runs), "STEPS": steps,
           "TEACHER": "teacher.csv", "POOL_PREDS": "pool-pred{fold}.csv", **env}
    done = subprocess.run(["bash", str(SCRIPT), str(data), str(runs), "methods"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    events = [" ".join(line.split()[1:]) for line in (runs / "methods-timeline.log").read_text().splitlines()]
    return log.read_text().splitlines(), events


def train_calls(calls: list[str], name: str) -> list[str]:
    return [c for c in calls if c.startswith("-m train ") and f" name={name} " in f"{c} "]


def test_second_seeds_queue(tmp_path):
    """README's command for the missing second seeds: every fold at seed 7 with its method's overrides, the
    pre-stage before the pre-staged folds, the 64-question runs under their own names, one end."""
    calls, events = run_methods(tmp_path, "pdistill@7 smooth@7 pseudo@7 merge", SEED64="7")
    runs = tmp_path / "runs"
    folds = [c for c in train_calls(calls, "pdistill") if any(f"fold={k}" in c.split() for k in range(5))]
    assert len(folds) == 5
    last_seed = lambda c: [w for w in c.split() if w.startswith("seed=")][-1]  # noqa: E731 (the CLI's last one wins)
    assert all(f"train.init_from={runs}/smollm2-alpaca/fold0-seed42" in c.split() and "train.distill_from=teacher.csv"
               in c.split() and last_seed(c) == "seed=7" for c in folds)
    assert all("train.label_smoothing=0.1" in c for c in train_calls(calls, "smooth"))
    assert all(f"data.extra_csv={runs}/pseudo{{fold}}.csv" in c for c in train_calls(calls, "pseudo"))
    assert len(train_calls(calls, "train64-s7")) == 5 and not train_calls(calls, "train64")
    starts = [e.split()[1] for e in events if e.startswith("start ")]
    assert starts.index("prestage") < min(starts.index(f"pdistill-seed7-fold{k}") for k in range(5))
    assert starts.index("merge-s7") > max(starts.index(f"train64-s7-fold{k}") for k in range(5))
    assert events[-1] == "end methods" and events.count("end methods") == 1 and not any("FAILED" in e for e in events)
    assert {"stack-smooth-seed7", "stack-pseudo-seed7", "stack-pdistill-seed7"} <= {p.name for p in runs.iterdir()}


def test_a_failed_fold_reruns_the_phase_once(tmp_path):
    """One smooth fold fails: the phase reruns itself once (one process fewer), the failed fold trains again, the
    finished ones are asked for again (the real `python -m train` reuses them), and the timeline ends once."""
    calls, events = run_methods(tmp_path, "smooth", FAIL_NAME="smooth", PAR="3")
    assert sum(e.endswith("FAILED") for e in events) == 5  # each fold's first try
    assert events.count("rerun for the failed jobs") == 1 and events.count("end methods") == 1
    assert events[-1] == "end methods"
    assert all((tmp_path / "runs" / "smooth" / f"fold{k}-seed42").is_dir() for k in range(5))
    assert len([c for c in train_calls(calls, "smooth") if c.endswith("train.label_smoothing=0.1")]) == 2 * (5 + 1)

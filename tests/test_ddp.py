"""Data-parallel training through torchrun: 2 CPU processes (gloo) on a tiny 4-bit Llama."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd

from conftest import ENV, REPO, SAMPLE, train_args


def test_two_ranks_train_and_rank0_writes_the_oof_once(tmp_path, tiny_llama, sample_folds):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
           *train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path, "fold=all", "train.max_steps=2",
                       "train.batch_size=8", "infer.tta=false")]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for fold in range(5):
        for rank in (0, 1):
            assert f"fold {fold}: rank {rank}/2 done, 2 optimizer steps" in done.stdout
    assert done.stdout.count("CV (OOF log loss") == 1
    oof = pd.read_csv(tmp_path / "tiny-llama" / "oof-seed42.csv")
    ids = pd.read_csv(SAMPLE / "train.csv")["id"]
    assert oof["id"].is_unique and set(oof["id"]) == set(ids)
    for fold in range(5):
        assert (tmp_path / "tiny-llama" / f"fold{fold}-seed42" / "metrics.json").is_file()

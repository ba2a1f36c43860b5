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


def test_balanced_order_gives_the_ranks_equal_tokens_per_step():
    """accelerate deals batch k to rank k % world; the rows those ranks train together hold nearly
    equal tokens, every row comes exactly once, and a random order would be far less even."""
    import numpy as np
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from bench.infer import random_rows
    from train.distributed import RankBalancedSampler, balanced_order

    lengths = [len(r) for r in random_rows(8 * 2 * 50, 1024, 100)]
    sampler = RankBalancedSampler(lengths, batch_size=8, world=2, seed=3)
    shards = [list(BatchSamplerShard(BatchSampler(sampler, 8, drop_last=False), 2, r)) for r in (0, 1)]
    assert sorted(i for shard in shards for b in shard for i in b) == list(range(len(lengths)))

    def imbalance(per_rank):
        full = [(sum(lengths[i] for i in a), sum(lengths[i] for i in b)) for a, b in zip(*per_rank) if len(a) == len(b) == 8]
        return np.mean([abs(x - y) / (x + y) * 2 for x, y in full])

    random = np.random.default_rng(3).permutation(len(lengths)).tolist()
    random_shards = [[random[k:k + 8] for k in range(8 * r, len(random), 16)] for r in (0, 1)]
    assert imbalance(shards) < 0.02 and imbalance(random_shards) > 5 * imbalance(shards)
    sampler.set_epoch(1)
    assert list(sampler) != balanced_order(lengths, 8, 2, 3) and sorted(sampler) == list(range(len(lengths)))
    assert sorted(balanced_order(lengths[:37], 8, 2, 0)) == list(range(37))  # a short last group is kept

"""The benchmark's CPU-checkable parts: its inputs, and the exactness comparison on a tiny model."""
from __future__ import annotations

import numpy as np

from conftest import SAMPLE
from infer.bench import BenchConfig, random_rows
from infer.bench_checks import exact


def test_random_rows_have_arena_like_lengths():
    lengths = np.array([len(r) for r in random_rows(20000, 10**6, vocab=1000)])
    assert abs(np.median(lengths) - 500) < 15 and abs(lengths.mean() - 675) < 20
    capped = [len(r) for r in random_rows(500, 2048, vocab=1000)]
    assert max(capped) <= 2048 and min(min(r) for r in random_rows(50, 2048, vocab=1000)) >= 1  # 0 is the pad id


def test_exactness_report_on_a_tiny_model(tiny_llama):
    cfg = BenchConfig(out="unused", model_path=str(tiny_llama), gguf_file="", csv=str(SAMPLE / "train.csv"),
                      exact_rows=16, dtypes=["float32"], token_budget=2048, device="cpu")
    results = exact(cfg)
    paths = {(r["path"], r["against"]) for r in results}
    assert ("packed, merged", "packed, unmerged") in paths and ("packed, merged, compiled", "plain") in paths
    for r in results:  # fp32: every fast path computes the plain forward's function
        assert r["rows"] == 16 and r["max_abs"] < 1e-5, r

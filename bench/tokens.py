"""Tokenisation benchmark: the wall time `fold=all` spends formatting and tokenising, before and after the token cache.

Usage:
    python -m bench.tokens configs/smollm2-demo.yaml
    python -m bench.tokens configs/smollm2-mtbench.yaml data.folds_csv=runs/mtbench-folds.csv

For every fold it makes the calls training and OOF scoring make: the training rows (and their
swapped copies with train.swap_aug) at the training length, the held-out rows both ways at the
inference length (swap TTA). "before" runs them as the code did before the cache (Formatter.encode_batch
on each fold's rows); "cold" runs the real path (model.tokens.encode_rows) with an empty cache
folder, "warm" runs it again (a second `fold=all`, or predict on rows already seen). The ids of the
three are compared. Base weights are never loaded: only the tokenizer.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import pandas as pd

from cli.config import cli_config, run_cli
from data.folds import attach_folds, read_folds
from data.formatter import Formatter
from data.io import read_competition_csv
from model.factory import load_tokenizer
from model.tokens import encode_rows
from train.config import TrainConfig


def fold_calls(df: pd.DataFrame, swap_aug: bool, tta: bool) -> list[tuple[pd.DataFrame, bool, bool]]:
    """(rows, swap, inference) of every tokenisation one fold=all makes."""
    calls = []
    for fold in sorted(set(df["fold"])):
        train, valid = df[df["fold"] != fold], df[df["fold"] == fold]
        calls += [(train, swap, False) for swap in ([False, True] if swap_aug else [False])]
        calls += [(valid, swap, True) for swap in ([False, True] if tta else [False])]
    return calls


def main(argv: list[str] | None = None) -> None:
    cfg = cli_config(TrainConfig, __doc__, sys.argv[1:] if argv is None else argv)
    df, _ = read_competition_csv(cfg.data.train_csv, labels=True)
    df = attach_folds(df, read_folds(cfg.data.folds_csv), cfg.data.folds_csv)
    formatter = Formatter(load_tokenizer(cfg.model), cfg.format)
    calls = fold_calls(df, cfg.train.swap_aug, cfg.infer.tta)
    start = time.perf_counter()
    before = [formatter.encode_batch(d["prompt"], d["response_a"], d["response_b"], swap=s, inference=i) for d, s, i in calls]
    timings = {"before": time.perf_counter() - start}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ARENA_PREF_CACHE"] = cache  # an empty cache: "cold" tokenises every row once
        for name in ("cold", "warm"):
            start = time.perf_counter()
            after = [encode_rows(formatter, d, swap=s, inference=i, desc=f"{name} pass") for d, s, i in calls]
            timings[name] = time.perf_counter() - start
            if after != before:
                raise SystemExit(f"{name}: token ids differ from Formatter.encode_batch's")
    rows = sum(len(d) for d, _, _ in calls)
    print(f"\n{cfg.data.train_csv}: {len(df)} rows, {df['fold'].nunique()} folds, {len(calls)} tokenisation calls "
          f"({rows} row-passes), max_length {cfg.format.max_length}, {os.cpu_count()} CPU(s)")
    print("| path | seconds | vs before |\n|---|---|---|")
    for name, sec in timings.items():
        print(f"| {name} | {sec:.1f} | {timings['before'] / sec:.1f}x |")


if __name__ == "__main__":
    run_cli(main)

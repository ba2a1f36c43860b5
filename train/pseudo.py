"""Pseudo-labels: `python -m infer predict` output on an unlabelled pool -> soft-labelled training data with a weight.

Usage:
    python -m train.pseudo preds=runs/pool-pred.csv csv=pool.csv out=runs/pseudo.csv weight=0.5 [min_confidence=0.5]
    python -m train <cfg> fold=all data.extra_csv=runs/pseudo.csv train.soft_labels=true name=<cfg>-pseudo

The predictions are joined to the pool's rows by id, never by position: every pool id must have
exactly one prediction and every prediction a pool row (else an error naming the ids), and the
probabilities must be valid (no NaN or negatives, rows summing to 1: infer.metrics.check_probs).
The output is the pool in competition format, its rows in the pool's order and its text cells
exactly as read, with the winner columns replaced by the predicted probabilities (any labels the
pool had are ignored; when they are there, the pseudo-labels' log loss against them is printed)
and a `weight` column that the training loss multiplies each row's loss by (rows without one weigh 1).
`min_confidence` keeps only rows whose largest probability reaches it (dropped rows counted).

It lives in train/, not data/: it validates with infer.metrics, and imports go cli -> data -> model
-> infer -> train; its output is training data, read only by `python -m train`.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from cli.config import ConfigError, cli_config, opt, run_cli
from cli.output import check_output, write_file
from data.io import LABEL_COLS, TEXT_COLS, TEST_COLS, WEIGHT_COL, read_checked_csv, read_competition_csv
from infer.metrics import log_loss, read_probs
from train.distill import probs_for_ids


@dataclasses.dataclass
class PseudoConfig:
    preds: str = opt("", "predictions on the pool (id + 3 probabilities), from `python -m infer predict csv=<pool>`")
    csv: str = opt("", "the pool: the competition-format CSV the predictions were made on (its labels, if any, are ignored)")
    out: str = opt("pseudo.csv", "where to write the pseudo-labelled CSV (competition format + weight column)")
    overwrite: bool = opt(False, "replace `out` if it exists")
    weight: float = opt(1.0, "training weight of every pseudo-labelled row: its loss is multiplied by it (real rows weigh 1)")
    min_confidence: float = opt(0.0, "keep only rows whose largest probability is at least this (0: keep all)")
    drop_bad_rows: bool = opt(False, "drop pool rows that fail validation (as infer predict drop_bad_rows=true did)")


def pseudo_labels(pool: pd.DataFrame, pred: pd.DataFrame, weight: float, min_confidence: float = 0.0,
                  source: str = "preds") -> tuple[pd.DataFrame, dict]:
    """The pool with its winner columns set to the predictions (joined by id; the id sets must be
    equal) and a weight column; rows under `min_confidence` dropped. Returns (frame, counts)."""
    probs = probs_for_ids(pred, pool["id"], source, "pool", exact=True)
    out = pool.drop(columns=[c for c in (*LABEL_COLS, WEIGHT_COL) if c in pool.columns])
    for j, col in enumerate(LABEL_COLS):
        out[col] = probs[:, j]
    out[WEIGHT_COL] = float(weight)
    keep = probs.max(axis=1) >= min_confidence
    counts = {"pool_rows": len(pool), "dropped_low_confidence": int((~keep).sum()), "written": int(keep.sum()),
              "mean_confidence": round(float(probs[keep].max(axis=1).mean()), 4) if keep.any() else None,
              "class_shares": [round(float(x), 4) for x in probs[keep].mean(axis=0)] if keep.any() else None}
    return out[keep].reset_index(drop=True), counts


def against_pool_labels(pool: pd.DataFrame, frame: pd.DataFrame) -> str | None:
    """Log loss of the written pseudo-labels against the winner columns the pool came with, where it has valid ones."""
    if not all(c in pool.columns for c in LABEL_COLS):
        return None
    truth = pool.set_index("id").loc[frame["id"], list(LABEL_COLS)].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    if np.isnan(truth).any() or (truth < 0).any() or (np.abs(truth.sum(axis=1) - 1) > 1e-6).any():
        return None
    probs = frame[list(LABEL_COLS)].to_numpy(float)
    hits = probs.argmax(axis=1) == truth.argmax(axis=1)
    return (f"pseudo-labels vs the pool's own winner columns: log loss {log_loss(truth, probs):.4f}, "
            f"argmax agreement {hits.mean():.3f} on {len(frame)} rows")


def main(argv: list[str] | None = None) -> None:
    cfg = cli_config(PseudoConfig, __doc__, argv)
    if not cfg.preds or not cfg.csv:
        raise ConfigError("preds= and csv= are required (see python -m train.pseudo --help)")
    if not (math.isfinite(cfg.weight) and cfg.weight > 0):
        raise ConfigError(f"weight must be a finite number > 0, got {cfg.weight}")
    if not 0 <= cfg.min_confidence <= 1:
        raise ConfigError(f"min_confidence must be in [0, 1], got {cfg.min_confidence}")
    out = check_output(cfg.out, cfg.overwrite)  # before any work
    parsed, report = read_competition_csv(cfg.csv, labels=False, drop_bad_rows=cfg.drop_bad_rows,
                                          drop_hint="drop_bad_rows=true")  # every cell must parse as training reads it
    print(report.summary())
    # The same file again, cells as text, so the output holds them exactly as the pool has them.
    pool = read_checked_csv(cfg.csv, TEST_COLS, what="competition CSV", dtype={c: "str" for c in TEXT_COLS},
                            keep_default_na=False, na_values=[])
    pool = pool[pool["id"].isin(set(parsed["id"]))].reset_index(drop=True)
    frame, counts = pseudo_labels(pool, read_probs(cfg.preds), cfg.weight, cfg.min_confidence, source=cfg.preds)
    if counts["written"] == 0:
        raise ConfigError(f"min_confidence={cfg.min_confidence}: no row of {cfg.preds} reaches it; nothing to write")
    write_file(out, lambda tmp: frame.to_csv(tmp, index=False, float_format="%.9g"), cfg.overwrite)
    print(f"pseudo-labels: {counts}")
    if (line := against_pool_labels(pool, frame)) is not None:
        print(line)
    print(f"wrote {len(frame)} rows (weight {cfg.weight}) to {out}; train with data.extra_csv={out} train.soft_labels=true")


if __name__ == "__main__":
    run_cli(main)

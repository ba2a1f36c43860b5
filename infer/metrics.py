"""Metrics and probability checks: log loss, a fold's metrics, the CV table, and the one validator of
prediction files (id + 3 probabilities) that every reader and writer of them uses."""
from __future__ import annotations

import numpy as np
import pandas as pd

from data.io import LABEL_COLS, DataError, check_columns, read_checked_csv

PRED_COLS = ("id", *LABEL_COLS)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def log_loss(targets: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class log loss with soft or one-hot targets, probabilities clipped like Kaggle's metric."""
    probs = np.clip(probs, 1e-15, 1 - 1e-15)
    probs = probs / probs.sum(axis=1, keepdims=True)
    return float(-(targets * np.log(probs)).sum(axis=1).mean())


def has_ties(targets: np.ndarray) -> bool:
    """Whether any row of (n, 3) targets puts weight on winner_tie."""
    return bool((np.asarray(targets)[:, LABEL_COLS.index("winner_tie")] > 0).any())


def two_class_metrics(truth: np.ndarray, probs: np.ndarray) -> dict:
    """For tie-free truth: accuracy of the argmax over A/B, and the log loss of P(A wins) / (P(A) + P(B)).

    Neither moves with the probability a model spends on ties, which the 3-class log loss charges for.
    """
    truth, probs = np.asarray(truth, float), np.asarray(probs, float)
    hits = probs[:, :2].argmax(axis=1) == truth[:, :2].argmax(axis=1)
    return {"accuracy": float(hits.mean()), "log_loss_2class": log_loss(truth[:, :2], probs[:, :2])}  # log_loss renormalises


def fold_metrics(fold: int, truth: np.ndarray, probs: np.ndarray, train_targets: np.ndarray) -> dict:
    """A held-out fold's log loss next to the class prior of its training rows; when the fold's truth
    has no ties, also `accuracy` and `log_loss_2class` (two_class_metrics)."""
    prior = train_targets.mean(axis=0)
    metrics = {
        "fold": fold,
        "rows": len(truth),
        "log_loss": log_loss(truth, probs),
        "prior_log_loss": log_loss(truth, np.tile(prior, (len(truth), 1))),
        "prior": prior.tolist(),
    }
    if not has_ties(truth):
        metrics.update(two_class_metrics(truth, probs))
    return metrics


TWO_CLASS_COLUMNS = {"accuracy": 9, "log_loss_2class": 15}  # CV table column -> width, tie-free truth only
NO_TIES_NOTE = "no ties in these labels: accuracy and 2-class log loss (P(A wins) / (P(A)+P(B))) beside the 3-class log loss"


def cv_table(results: list[dict], overall: float, rows: int) -> tuple[str, float]:
    """(the CV table every trainer prints, overall prior log loss) from fold_metrics results.

    When every fold's truth is tie-free (each result has `accuracy`), a first line says so and two
    columns follow the 3-class ones: accuracy and log_loss_2class, overall row-weighted like the prior
    (each fold's number is a mean over its rows, so that is the number over all rows).
    """
    tie_free = bool(results) and all("accuracy" in m for m in results)
    extra = TWO_CLASS_COLUMNS if tie_free else {}
    lines = [NO_TIES_NOTE] if tie_free else []
    lines.append(f"{'fold':>5} {'rows':>6} {'log_loss':>9} {'prior':>9}" + "".join(f" {k:>{w}}" for k, w in extra.items()))
    for m in results:
        lines.append(f"{m['fold']:>5} {m['rows']:>6} {m['log_loss']:>9.4f} {m['prior_log_loss']:>9.4f}"
                     + "".join(f" {m[k]:>{w}.4f}" for k, w in extra.items()))
    # Each fold's prior comes from its own training folds, so the overall prior is row-weighted.
    prior = sum(m["prior_log_loss"] * m["rows"] for m in results) / rows
    totals = {k: sum(m[k] * m["rows"] for m in results) / rows for k in extra}
    lines.append(f"{'all':>5} {rows:>6} {overall:>9.4f} {prior:>9.4f}"
                 + "".join(f" {totals[k]:>{w}.4f}" for k, w in extra.items()))
    return "\n".join(lines), prior


def some_ids(values, limit: int = 20) -> list:
    return sorted(set(values), key=str)[:limit]


def check_probs(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """`frame` if it is id + 3 probabilities with unique ids, no NaN or negatives, rows summing to 1."""
    check_columns(frame, PRED_COLS, source)
    problems = []
    dup = frame["id"][frame["id"].duplicated(keep=False)]
    if len(dup):
        problems.append(f"duplicate ids {some_ids(dup)}")
    values = frame[list(LABEL_COLS)].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    ids = frame["id"].to_numpy()
    nan = np.isnan(values).any(axis=1)
    for what, bad in (("NaN or non-numeric probabilities", nan),
                      ("negative probabilities", ~nan & (values < 0).any(axis=1)),
                      ("rows not summing to 1 (within 1e-6)", ~nan & (np.abs(values.sum(axis=1) - 1) > 1e-6))):
        if bad.any():
            problems.append(f"{what} for {bad.sum()} id(s) {some_ids(ids[bad])}")
    if problems:
        raise DataError(f"{source}: " + "; ".join(problems))
    return frame


def read_probs(path) -> pd.DataFrame:
    """A prediction file (id + 3 probabilities), read by the one CSV reader and checked by check_probs."""
    return check_probs(read_checked_csv(path, PRED_COLS, what="prediction file (id + 3 probabilities)"), str(path))



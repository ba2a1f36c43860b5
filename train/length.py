"""Length-feature baseline: multinomial logistic regression on data.features.length_features.

Usage:
    python -m train.length csv=input/train.csv folds=input/folds.csv out=runs/length [C=1.0]

Trained per fold like any run (fit on the other folds, predict the held-out one), so its OOF can
join an ensemble (`python -m infer ensemble members=...,runs/length`). Writes into `out`:
oof.csv (id + 3 probabilities, every row with fold >= 0), metrics.json (per-fold and overall
log loss next to the class prior of each fold's training folds) and length_model.json, a model
fitted on all rows, stored as JSON (scaler + coefficients) so test predictions need only numpy
(`infer.length.predict_length`). Rows with fold < 0 in the folds file are only ever trained on.
Tie-free data (chosen/rejected pairs, no winner_tie row) fits the classes present only: the
printed report says so, length_model.json lists `fitted_classes` and `absent_class_prob`, and
predictions give the absent class that floor (infer.length.ABSENT_CLASS_PROB).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from cli.config import ConfigError, cli_config, opt, run_cli
from cli.output import check_output, output_folder
from data.features import FEATURES, length_features
from data.folds import attach_folds, read_folds
from data.io import LABEL_COLS, DataError, read_competition_csv, targets_by_id
from infer.length import MODEL_FILE, MODEL_VERSION, absent_class_note, absent_classes, fit_logistic, predict_length
from infer.metrics import cv_table, fold_metrics, log_loss
from infer.predict import write_predictions


@dataclasses.dataclass
class LengthConfig:
    csv: str = opt("", "competition-format CSV with winner columns (train.csv)")
    folds: str = opt("", "folds file (id,fold), the same one every other ensemble member was trained with")
    out: str = opt("runs/length", "member directory to write: oof.csv, metrics.json, length_model.json")
    overwrite: bool = opt(False, "replace `out` if it holds files")
    C: float = opt(1.0, "inverse L2 regularisation strength of the logistic regression (larger = weaker)")
    drop_bad_rows: bool = opt(False, "drop unparseable rows (counted) instead of stopping at them")


def fit_length_model(df: pd.DataFrame, C: float = 1.0) -> dict:
    """Length model fitted on every row of `df` (read_competition_csv output with `label`); classes with
    no row in `df` are left out of the fit (its `fitted_classes`) and get `absent_class_prob`."""
    params = fit_logistic(length_features(df).to_numpy(), df["label"].to_numpy(), list(FEATURES), C)
    return {"version": MODEL_VERSION, "kind": "length", "classes": list(LABEL_COLS), **params, "C": C, "rows": len(df)}


def cross_validate(df: pd.DataFrame, C: float) -> tuple[pd.DataFrame, list[dict]]:
    """OOF predictions for rows with fold >= 0 and per-fold metrics; each fold sees only the others.

    A class with no row at all (tie-free data) is said once; one missing only from some folds'
    training rows is said per fold. Either way those fits give it the floor probability.
    """
    parts, results = [], []
    everywhere = sorted(set(range(len(LABEL_COLS))) - set(df["label"]))
    if everywhere:
        print(absent_class_note(everywhere))
    for fold in sorted(int(k) for k in set(df["fold"]) if k >= 0):
        train, held = df[df["fold"] != fold], df[df["fold"] == fold]
        model = fit_length_model(train, C)
        only_here = [c for c in absent_classes(model) if c not in everywhere]
        if only_here:
            print(f"fold {fold}: {absent_class_note(only_here)} (the other folds hold none)")
        pred = predict_length(model, held)
        truth = targets_by_id(held, pred["id"])
        train_targets = np.stack(train["target"].to_numpy())
        results.append(fold_metrics(fold, truth, pred[list(LABEL_COLS)].to_numpy(), train_targets))
        parts.append(pred)
    if not parts:
        raise DataError("the folds file assigns no row to a fold >= 0; nothing to cross-validate")
    oof = pd.concat(parts, ignore_index=True)
    order = df.loc[df["fold"] >= 0, "id"]
    return oof.set_index("id").loc[order].reset_index(), results


def run(cfg: LengthConfig) -> dict:
    if not cfg.csv or not cfg.folds:
        raise ConfigError("csv= and folds= are required (see python -m train.length --help)")
    if cfg.C <= 0:
        raise ConfigError(f"C must be > 0, got {cfg.C}")
    check_output(cfg.out, cfg.overwrite, folder=True)  # before the work, not after it
    df, report = read_competition_csv(cfg.csv, labels=True, drop_bad_rows=cfg.drop_bad_rows)
    print(report.summary())
    df = attach_folds(df, read_folds(cfg.folds), cfg.folds)
    oof, results = cross_validate(df, cfg.C)
    truth = targets_by_id(df, oof["id"])
    overall = log_loss(truth, oof[list(LABEL_COLS)].to_numpy())
    table, prior = cv_table(results, overall, len(oof))
    metrics = {"folds": results, "oof_log_loss": overall, "prior_log_loss": prior, "rows": len(oof), "C": cfg.C}
    model = fit_length_model(df, cfg.C)
    with output_folder(cfg.out, cfg.overwrite) as out:  # the member appears whole, or not at all
        write_predictions(oof, out / "oof.csv")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / MODEL_FILE).write_text(json.dumps(model, indent=2))
    out = Path(cfg.out)
    print("\nCV (OOF log loss vs class prior of the training folds)\n" + table)
    print(f"wrote {out / 'oof.csv'}, {out / 'metrics.json'}, {out / MODEL_FILE} (final model on {len(df)} rows)")
    return metrics


def main(argv: list[str] | None = None) -> None:
    run(cli_config(LengthConfig, __doc__, argv))


if __name__ == "__main__":
    run_cli(main)

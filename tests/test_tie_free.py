"""Tie-free preference data (no winner_tie row: the chosen/rejected reward-model case) end to end:
folds -> length model -> a tiny fold=all run -> stacked ensemble -> report -> Kaggle export (and the
Kaggle entry on it); plus the logistic fit on two classes, the CV table and the report on their own."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from conftest import SAMPLE, train_args
from data.folds import FoldsConfig, read_folds
from data.folds import run as folds_run
from data.io import LABEL_COLS, DataError, read_competition_csv
from infer.ensemble import apply_recipe, load_recipe
from infer.ensemble import main as ensemble_main
from infer.kaggle import main as kaggle_main
from infer.length import ABSENT_CLASS_PROB, fit_logistic, logistic_proba, predict_length
from infer.metrics import NO_TIES_NOTE, cv_table, fold_metrics, softmax
from infer.report import main as report_main
from infer.report import write_report
from train.__main__ import main as train_main
from train.export import main as export_main
from train.length import main as length_main

FLOOR_NOTE = f"no training row of class winner_tie: it gets the floor probability {ABSENT_CLASS_PROB:g}"
COLS = list(LABEL_COLS)


def blobs(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features whose class means differ, labels 0/1/2, unstandardised (fit_logistic standardises)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.normal(size=(n, 4)) * [1, 5, 0.1, 2] + [3, -2, 0, 1] + np.eye(3, 4)[y] * 1.5
    return X, y


@pytest.mark.parametrize("present", [(0, 1), (0, 2), (1, 2)])
def test_two_class_fit_equals_sklearn_with_floor(present):
    X, y = blobs()
    keep = np.isin(y, present)
    X, y = X[keep], y[keep]
    params = fit_logistic(X, y, ["f0", "f1", "f2", "f3"], C=0.5)
    assert params["fitted_classes"] == list(present) and params["absent_class_prob"] == ABSENT_CLASS_PROB
    assert len(params["coef"]) == len(params["intercept"]) == 2  # one row per fitted class
    params = json.loads(json.dumps(params))  # as length_model.json / recipe.json store it
    probs = logistic_proba(params, X)
    (absent,) = set(range(3)) - set(present)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-12)
    assert (probs[:, absent] == ABSENT_CLASS_PROB).all()
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000)).fit(X, y)
    shares = probs[:, list(present)] / probs[:, list(present)].sum(axis=1, keepdims=True)
    np.testing.assert_allclose(shares, reference.predict_proba(X), atol=1e-6)


def test_three_class_params_old_and_new_give_the_same_probabilities():
    X, y = blobs(seed=1)
    params = fit_logistic(X, y, ["f0", "f1", "f2", "f3"])
    assert params["fitted_classes"] == [0, 1, 2] and "absent_class_prob" not in params
    old = {k: v for k, v in params.items() if k != "fitted_classes"}  # as earlier versions wrote them
    z = (X - np.asarray(old["mean"])) / np.asarray(old["scale"])
    before = softmax(z @ np.asarray(old["coef"]).T + np.asarray(old["intercept"]))  # the formula before fitted_classes
    np.testing.assert_array_equal(logistic_proba(old, X), before)
    np.testing.assert_array_equal(logistic_proba(params, X), before)
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(X, y)
    np.testing.assert_allclose(before, reference.predict_proba(X), atol=1e-6)


def test_one_class_is_an_error_naming_the_missing_ones():
    X, y = blobs()
    with pytest.raises(DataError, match=r"no row of class\(es\) \['winner_model_b', 'winner_tie'\].*every row is winner_model_a"):
        fit_logistic(X[y == 0], y[y == 0], ["f0", "f1", "f2", "f3"])


def test_cv_table_with_and_without_ties():
    rng = np.random.default_rng(0)
    truth = np.eye(3)[rng.integers(0, 3, 40)]
    probs = rng.dirichlet([2, 2, 1], 40)
    tied = [fold_metrics(k, truth[k::2], probs[k::2], truth) for k in range(2)]
    table, _ = cv_table(tied, 1.2345, 40)
    lines = table.splitlines()
    assert lines[0] == " fold   rows  log_loss     prior" and "accuracy" not in table and len(lines) == 4
    assert all("accuracy" not in m for m in tied)

    truth = np.eye(3)[rng.integers(0, 2, 40)]
    free = [fold_metrics(k, truth[k::2], probs[k::2], truth) for k in range(2)]
    table, _ = cv_table(free, 1.2345, 40)
    lines = table.splitlines()
    assert lines[0] == NO_TIES_NOTE and lines[1].split() == ["fold", "rows", "log_loss", "prior", "accuracy", "log_loss_2class"]
    hits = probs[:, :2].argmax(1) == truth[:, :2].argmax(1)
    p_a = probs[:, 0] / probs[:, :2].sum(1)
    two_class = -np.mean(np.where(truth[:, 0] == 1, np.log(p_a), np.log(1 - p_a)))
    assert lines[-1].split() == ["all", "40", "1.2345", f"{sum(m['prior_log_loss'] * 20 for m in free) / 40:.4f}",
                                 f"{hits.mean():.4f}", f"{two_class:.4f}"]


def test_report_without_tie_rows(sample_folds, tmp_path):
    labels = read_competition_csv(SAMPLE / "train.csv")[0]
    labels = labels[labels["label"] != 2].reset_index(drop=True)
    rng = np.random.default_rng(5)
    probs = softmax(2.0 * np.stack(labels["target"]) + rng.normal(size=(len(labels), 3)))
    pd.DataFrame({"id": labels["id"], **{c: probs[:, k] for k, c in enumerate(COLS)}}).to_csv(tmp_path / "oof.csv", index=False)
    text = write_report([tmp_path / "oof.csv"], labels, read_folds(sample_folds), tmp_path / "rep").read_text()
    assert "nan" not in text.lower() and NO_TIES_NOTE in text and "accuracy" in text
    assert "No rows of class tie in the truth" in text and f"{probs[:, 2].mean():.4f}" in text
    assert "Expected calibration error: A wins " in text and ", tie " not in text
    assert "| tie |" not in text  # no confusion row for a class that never occurs


@pytest.fixture(scope="module")
def tie_free(tmp_path_factory) -> dict:
    """The committed sample without its tie rows, and a 5-fold folds file made from it by data.folds."""
    root = tmp_path_factory.mktemp("tie-free")
    train = pd.read_csv(SAMPLE / "train.csv")
    train[train["winner_tie"] == 0].to_csv(root / "train.csv", index=False)
    folds_run(FoldsConfig(csv=str(root / "train.csv"), out=str(root / "folds.csv")))
    return {"root": root, "csv": root / "train.csv", "folds": root / "folds.csv", "runs": root / "runs"}


def oof_probs(path) -> np.ndarray:
    probs = pd.read_csv(path)[COLS].to_numpy()
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-6)
    return probs


def test_end_to_end(tie_free, tiny_llama, capsys):
    csv, folds, runs = tie_free["csv"], tie_free["folds"], tie_free["runs"]
    rows = read_competition_csv(csv)[0]
    assert len(rows) == 227 and not (rows["label"] == 2).any()
    capsys.readouterr()

    length_main([f"csv={csv}", f"folds={folds}", f"out={runs / 'length'}"])
    printed = capsys.readouterr().out
    assert printed.count(FLOOR_NOTE) == 1 and printed.count(NO_TIES_NOTE) == 1
    assert "accuracy" in printed[printed.index(NO_TIES_NOTE):]
    model = json.loads((runs / "length" / "length_model.json").read_text())
    assert model["fitted_classes"] == [0, 1] and model["absent_class_prob"] == ABSENT_CLASS_PROB
    np.testing.assert_allclose(oof_probs(runs / "length" / "oof.csv")[:, 2], ABSENT_CLASS_PROB, rtol=1e-9)
    assert all("accuracy" in m for m in json.loads((runs / "length" / "metrics.json").read_text())["folds"])

    train_main(train_args("tiny-llama.yaml", tiny_llama, folds, runs, "fold=all", "train.max_steps=2", "infer.tta=false",
                          f"data.train_csv={csv}"))  # the later data.train_csv wins over train_args' sample
    printed = capsys.readouterr().out
    table = printed[printed.index("CV (OOF"):]
    assert table.splitlines()[1] == NO_TIES_NOTE and "accuracy" in table.splitlines()[2]
    assert table.splitlines()[-1].split()[:2] == ["all", "227"]
    oof_probs(runs / "tiny-llama" / "oof-seed42.csv")

    ensemble_main([f"members={runs / 'tiny-llama'},{runs / 'length'}", f"labels={csv}", f"folds={folds}",
                   "method=stack", f"out={runs / 'ensemble'}"])
    assert "Stacker: " + FLOOR_NOTE in capsys.readouterr().out
    nested = oof_probs(runs / "ensemble" / "oof.csv")
    np.testing.assert_allclose(nested[:, 2], ABSENT_CLASS_PROB, rtol=1e-9)  # the stacker never saw a tie either
    recipe = load_recipe(runs / "ensemble" / "recipe.json")
    assert recipe["stacker"]["fitted_classes"] == [0, 1] and np.isfinite(list(recipe["oof_log_loss"].values())).all()
    test_rows = read_competition_csv(SAMPLE / "test.csv", labels=False)[0]
    uniform = pd.DataFrame({"id": test_rows["id"], **{c: 1 / 3 for c in COLS}})
    test = apply_recipe(recipe, {"tiny-llama": uniform, "length": predict_length(model, test_rows)}, test_rows)
    np.testing.assert_allclose(test[COLS].sum(axis=1), 1, atol=1e-12)

    oofs = [runs / "ensemble" / "oof.csv", runs / "length" / "oof.csv", runs / "tiny-llama" / "oof-seed42.csv"]
    report_main([f"oof={','.join(map(str, oofs))}", f"labels={csv}", f"folds={folds}", f"out={tie_free['root'] / 'report'}"])
    text = (tie_free["root"] / "report" / "report.md").read_text()
    assert "nan" not in text.lower() and text.count("No rows of class tie in the truth") == 3

    out = tie_free["root"] / "export"
    export_main([f"runs={runs / 'tiny-llama'}", f"recipe={runs / 'ensemble' / 'recipe.json'}",
                 "dataset_id=tester/tie-free-test", f"out={out}", "verify_rows=0"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"] == "recipe.json" and "recipe.json" in manifest["files"]
    assert set(manifest["members"]) == {"tiny-llama", "length"}

    sub = tie_free["root"] / "submission.csv"
    kaggle_main([f"dataset={out}", f"competition={SAMPLE}", f"base={tiny_llama}", f"out={sub}", "infer.workers=1",
                 "infer.tta=false"])
    probs = oof_probs(sub)
    assert len(probs) == 60
    np.testing.assert_allclose(probs[:, 2], ABSENT_CLASS_PROB, rtol=1e-9)

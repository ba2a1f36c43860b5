"""Applying logistic models: the length-feature baseline (length_model.json) and the stacker of an
ensemble recipe, with numpy only at inference. Fitting the length model is train.length's job."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from data.features import FEATURES, length_features
from data.io import LABEL_COLS, DataError
from infer.metrics import softmax

MODEL_FILE = "length_model.json"
MODEL_VERSION = 1
ALL_CLASSES = list(range(len(LABEL_COLS)))
# What a class with no training row (winner_tie in chosen/rejected reward-model data) is given at
# prediction time. Not 0: a tie that does occur later (test rows, another data set) then costs
# -log(1e-3) = 6.9 nats, not -log(0) = inf (34.5 under Kaggle's 1e-15 clip). Small, so the fitted
# classes keep 99.9% of every row (one class absent).
ABSENT_CLASS_PROB = 1e-3


def fit_logistic(X: np.ndarray, y: np.ndarray, features: list[str], C: float = 1.0) -> dict:
    """Standardise X, fit a multinomial (lbfgs) logistic regression; parameters as JSON-ready lists.

    Only the classes present in y are fitted (`fitted_classes`, indices into LABEL_COLS), one
    coefficient row and intercept per fitted class; logistic_proba gives the others
    `absent_class_prob`. Params without `fitted_classes` (written before it existed) mean all three.
    """
    y = np.asarray(y)
    present = sorted(set(y.tolist()))
    absent = [c for c in ALL_CLASSES if c not in present]
    if len(present) < 2:
        raise DataError(f"logistic fit: needs training rows of at least two classes; there is no row of class(es) "
                        f"{[LABEL_COLS[c] for c in absent]}"
                        + (f" (every row is {LABEL_COLS[present[0]]})" if present else " (no rows)"))
    scaler = StandardScaler().fit(X)
    lr = LogisticRegression(C=C, max_iter=2000).fit(scaler.transform(X), y)
    coef, intercept = lr.coef_, lr.intercept_
    if len(present) == 2:
        # sklearn's binary fit has one row w: P(second class) = sigmoid(z), z = w.x + b. Rows -w/2 and +w/2
        # give softmax([-z/2, z/2]) = [sigmoid(-z), sigmoid(z)], the same probabilities, one row per class.
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    params = {
        "features": list(features),
        "mean": scaler.mean_.tolist(),
        "scale": scaler.scale_.tolist(),
        "coef": coef.tolist(),
        "intercept": intercept.tolist(),
        "fitted_classes": [int(c) for c in lr.classes_],
    }
    if absent:
        params["absent_class_prob"] = ABSENT_CLASS_PROB  # stored: predictions do not move if the constant does
    return params


def fitted_classes(params: dict) -> list[int]:
    """Indices into LABEL_COLS of the classes the params were fitted on (all three for old params)."""
    fitted = [int(c) for c in params.get("fitted_classes", ALL_CLASSES)]
    if len(fitted) < 2 or sorted(set(fitted)) != fitted or not set(fitted) <= set(ALL_CLASSES):
        raise DataError(f"logistic params: fitted_classes {fitted} must be 2 or 3 distinct increasing indices of {list(LABEL_COLS)}")
    if len(params["coef"]) != len(fitted) or len(params["intercept"]) != len(fitted):
        raise DataError(f"logistic params: {len(params['coef'])} coefficient rows and {len(params['intercept'])} "
                        f"intercepts for {len(fitted)} fitted classes")
    return fitted


def logistic_proba(params: dict, X: np.ndarray) -> np.ndarray:
    """(n, 3) class probabilities from fit_logistic's parameters with numpy only (no sklearn objects).

    Classes absent from the fit get `absent_class_prob` each; the fitted ones share the rest in
    their fitted proportions, so every row sums to 1.
    """
    fitted = fitted_classes(params)
    z = (np.asarray(X, float) - np.asarray(params["mean"])) / np.asarray(params["scale"])
    probs = softmax(z @ np.asarray(params["coef"]).T + np.asarray(params["intercept"]))
    if fitted == ALL_CLASSES:
        return probs
    floor = float(params.get("absent_class_prob", ABSENT_CLASS_PROB))
    out = np.full((len(probs), len(LABEL_COLS)), floor)
    out[:, fitted] = probs * (1 - floor * (len(LABEL_COLS) - len(fitted)))
    return out


def absent_classes(params: dict) -> list[int]:
    """Indices into LABEL_COLS of the classes the params were not fitted on."""
    return [c for c in ALL_CLASSES if c not in fitted_classes(params)]


def absent_class_note(absent: list[int], floor: float = ABSENT_CLASS_PROB) -> str:
    """One line naming classes (indices into LABEL_COLS) without a training row and what they get."""
    return f"no training row of class {', '.join(LABEL_COLS[c] for c in absent)}: it gets the floor probability {floor:g}"


def predict_length(model: dict, df: pd.DataFrame) -> pd.DataFrame:
    """id + 3 probabilities for the rows of `df` (in df's order) from a length_model.json dict."""
    if model.get("version") != MODEL_VERSION or list(model.get("classes", [])) != list(LABEL_COLS):
        raise DataError(f"length model: expected version {MODEL_VERSION} with classes {list(LABEL_COLS)}, "
                        f"got version {model.get('version')!r}, classes {model.get('classes')!r}")
    unknown = sorted(set(model["features"]) - set(FEATURES))
    if unknown:
        raise DataError(f"length model uses features {unknown} that data.features does not compute")
    probs = logistic_proba(model, length_features(df)[model["features"]].to_numpy())
    return pd.DataFrame({"id": df["id"].to_numpy(), **{c: probs[:, k] for k, c in enumerate(LABEL_COLS)}})


def load_length_model(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: length model not found (write it with `python -m train.length`)")
    return json.loads(path.read_text())



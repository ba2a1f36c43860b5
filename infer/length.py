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


def fit_logistic(X: np.ndarray, y: np.ndarray, features: list[str], C: float = 1.0) -> dict:
    """Standardise X, fit a multinomial (lbfgs) logistic regression; parameters as JSON-ready lists."""
    absent = sorted(set(range(len(LABEL_COLS))) - set(np.asarray(y).tolist()))
    if absent:
        # sklearn would silently fit fewer classes and the coefficient rows would no longer match LABEL_COLS.
        raise DataError(f"logistic fit: no training row of class(es) {[LABEL_COLS[c] for c in absent]}")
    scaler = StandardScaler().fit(X)
    lr = LogisticRegression(C=C, max_iter=2000).fit(scaler.transform(X), y)
    return {
        "features": list(features),
        "mean": scaler.mean_.tolist(),
        "scale": scaler.scale_.tolist(),
        "coef": lr.coef_.tolist(),
        "intercept": lr.intercept_.tolist(),
    }


def logistic_proba(params: dict, X: np.ndarray) -> np.ndarray:
    """Class probabilities from fit_logistic's parameters with numpy only (no sklearn objects)."""
    z = (np.asarray(X, float) - np.asarray(params["mean"])) / np.asarray(params["scale"])
    return softmax(z @ np.asarray(params["coef"]).T + np.asarray(params["intercept"]))


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



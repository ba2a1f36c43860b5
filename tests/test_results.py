"""README's figures from the methods phase's first pass, recomputed from the files it brought back
(docs/mtbench/methods-pass1/) and the MT-Bench votes; skipped where ../shared/data is absent."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, SHARED_DATA
from data.io import LABEL_COLS, read_competition_csv
from infer.metrics import log_loss, read_probs

PASS1 = REPO / "docs" / "mtbench" / "methods-pass1"
MT = SHARED_DATA / "mtbench_human.csv"
pytestmark = pytest.mark.skipif(not MT.is_file(), reason=f"{MT} absent")


@pytest.fixture(scope="module")
def truth() -> pd.DataFrame:
    df, _ = read_competition_csv(MT, labels=True)
    return df.set_index("id")


def loss(truth: pd.DataFrame, pred: pd.DataFrame) -> float:
    return log_loss(np.stack(truth.loc[pred["id"], "target"].to_numpy()), pred[list(LABEL_COLS)].to_numpy())


def test_recipe_and_stack(truth):
    plain, stack = read_probs(PASS1 / "plain-oof-seed42.csv"), read_probs(PASS1 / "stack-seed42-oof.csv")
    assert len(plain) == len(stack) == len(truth) == 1689
    assert round(loss(truth, plain), 4) == 0.9272
    assert round(json.loads((PASS1 / "plain-cv-seed42.json").read_text())["oof_log_loss"], 4) == 0.9272
    assert round(loss(truth, stack), 4) == 0.9182


def test_distillation_on_folds_0_and_1(truth):
    distill = pd.concat([read_probs(PASS1 / f"distill-fold{k}-oof.csv") for k in (0, 1)], ignore_index=True)
    assert len(distill) == 679 and distill["id"].is_unique
    same = lambda name: read_probs(PASS1 / name).set_index("id").loc[distill["id"]].reset_index()  # noqa: E731
    assert round(loss(truth, distill), 4) == 0.9000
    assert round(loss(truth, same("plain-oof-seed42.csv")), 4) == 0.9204
    assert round(loss(truth, same("stack-seed42-oof.csv")), 4) == 0.9216


def test_pool_predictions_against_gpt4_labels():
    ae = SHARED_DATA / "alpacaeval_gpt4.csv.gz"
    if not ae.is_file():
        pytest.skip(f"{ae} absent")
    judge, _ = read_competition_csv(ae, labels=True)
    judge = judge.set_index("id")
    losses, agreement = [], []
    for k in range(5):
        pred = read_probs(PASS1 / f"pool-pred{k}.csv")
        assert len(pred) == 997
        losses.append(loss(judge, pred))
        target = np.stack(judge.loc[pred["id"], "target"].to_numpy())
        agreement.append((pred[list(LABEL_COLS)].to_numpy().argmax(1) == target.argmax(1)).mean())
    assert (round(min(losses), 3), round(max(losses), 3)) == (0.598, 0.647)
    assert (round(min(agreement), 3), round(max(agreement), 3)) == (0.816, 0.823)

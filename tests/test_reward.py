"""train.objective=bradley_terry: trl's RewardTrainer on the factory's model, a normal run folder, one reward per side."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import ENV, REPO, SAMPLE, train_args
from data.io import LABEL_COLS
from infer.predict import load_run, predict_frame, reward_probs, score_run
from model.files import AdapterError
from model.run import write_manifest
from train.__main__ import main as train_main


@pytest.fixture(scope="module")
def bt_run(tmp_path_factory, tiny_llama, sample_folds):
    out = tmp_path_factory.mktemp("bt")
    train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, out, "fold=0", "train.objective=bradley_terry",
                          "train.epochs=3", "train.lr=2e-3"))
    return out / "tiny-llama" / "fold0-seed42"


def test_reward_run_records_its_objective_and_learns(bt_run, sample_rows):
    manifest = json.loads((bt_run / "manifest.json").read_text())
    objective = manifest["objective"]
    assert objective["name"] == "bradley_terry" and manifest["head"]["shape"][0] == 1
    train = sample_rows[~sample_rows["id"].isin(pd.read_csv(bt_run / "oof.csv")["id"])]
    ties = int((np.stack(train["target"].to_numpy())[:, 2] == 1).sum())
    assert objective["ties_dropped"] == ties and objective["tie_rate"] == pytest.approx(ties / len(train))
    assert manifest["rows"]["sequences"] == 2 * (len(train) - ties)
    metrics = manifest["metrics"]
    assert metrics["log_loss"] < metrics["prior_log_loss"], metrics


def test_reward_oof_equals_infer_predict_and_sides_are_exchangeable(bt_run, sample_folds, sample_rows, tmp_path):
    out = tmp_path / "pred.csv"
    subprocess.run([sys.executable, "-m", "infer", "predict", f"runs={bt_run}", f"csv={SAMPLE / 'train.csv'}",
                    f"folds={sample_folds}", "fold=0", f"out={out}"], check=True, cwd=REPO, env=ENV, capture_output=True)
    assert out.read_bytes() == (bt_run / "oof.csv").read_bytes()
    run = load_run(bt_run)
    rows = sample_rows.iloc[:20]
    per_pass = score_run(run, rows)
    assert len(per_pass) == len(rows) and not per_pass["swap"].any()  # each side once; TTA would repeat it
    p = predict_frame([run], rows)[list(LABEL_COLS)].to_numpy()
    q = predict_frame([run], rows.assign(response_a=rows["response_b"], response_b=rows["response_a"]))
    np.testing.assert_allclose(p, q[list(LABEL_COLS)].to_numpy()[:, [1, 0, 2]], atol=1e-12)
    np.testing.assert_allclose(p[:, 2], run.objective["tie_rate"])


def test_reward_probabilities():
    probs = reward_probs(np.array([0.0, 2.0, -40.0]), np.array([0.0, 0.0, 0.0]), 0.2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(probs[0], [0.4, 0.4, 0.2])
    assert probs[1, 0] == pytest.approx(0.8 / (1 + np.exp(-2.0)))
    # Trained without ties: the tie class gets the floor every absent class gets, never 0
    assert reward_probs(np.zeros(1), np.zeros(1), 0.0)[0, 2] > 0


def test_objective_that_does_not_match_the_head_is_refused(bt_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(bt_run, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    write_manifest(copy, {**manifest, "objective": {"name": "classify"}})
    with pytest.raises(AdapterError, match="objective 'classify' with a head of 1 output"):
        load_run(copy)

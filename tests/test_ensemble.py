"""Ensembling: fitted weights and temperature, out-of-fold stacking, id validation, applying a
recipe, the length-feature member, and `python -m infer ensemble` end to end. Synthetic and fast."""
from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from data.features import length_features
from data.folds import attach_folds, read_folds
from data.io import LABEL_COLS, DataError, read_competition_csv
from infer.ensemble import apply_recipe, fit_ensemble, load_recipe
from infer.metrics import log_loss, softmax
from infer.length import predict_length
from train.length import cross_validate, fit_length_model
from train.length import main as length_main

from conftest import ENV, REPO, SAMPLE, sealed_run

N, K = 400, 5
RECIPE_KEYS = ["version", "method", "members", "weights", "temperature", "stacker", "oof_log_loss"]


def preds(ids, probs) -> pd.DataFrame:
    return pd.DataFrame({"id": ids, **{c: probs[:, j] for j, c in enumerate(LABEL_COLS)}})


def synth(seed: int = 0, n: int = N):
    """Rows whose labels are drawn from softmax(true logits); `good` sees those logits through noise,
    `bad` is near-uniform noise. Folds are assigned by (shuffled) id, not by row position."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(10_000, 99_999), n, replace=False)
    logits = rng.normal(0, 1.5, (n, 3))
    labels = np.array([rng.choice(3, p=p) for p in softmax(logits)])

    def text():  # only the lengths matter (length features)
        return [["w " * int(rng.integers(0, 300))] for _ in range(n)]

    rows = pd.DataFrame({"id": ids, "prompt": text(), "response_a": text(), "response_b": text(),
                         "target": list(np.eye(3)[labels]), "label": labels, "fold": ids % K})
    members = {"good": preds(ids, softmax(logits + rng.normal(0, 0.8, (n, 3)))),
               "bad": preds(ids, softmax(rng.normal(0, 0.3, (n, 3))))}
    return rows, members, logits


def truth(rows: pd.DataFrame) -> np.ndarray:
    return np.stack(rows["target"].to_numpy())


@pytest.mark.parametrize("method", ["prob_avg", "logprob_avg"])
def test_weights_favour_the_informative_member(method):
    rows, members, _ = synth()
    recipe, nested = fit_ensemble(members, rows, method, temperature=False)
    losses = recipe["oof_log_loss"]
    # logprob_avg keeps some weight on near-uniform log-probs: without temperature that is its only way to soften
    assert recipe["weights"][0] > 0.5 > recipe["weights"][1]
    assert sum(recipe["weights"]) == pytest.approx(1) and min(recipe["weights"]) >= 0
    assert losses["ensemble"] <= min(losses["good"], losses["bad"]) + 1e-6
    assert losses["ensemble_nested"] < losses["bad"] and losses["ensemble_nested"] < losses["prior"]
    assert recipe["temperature"] == 1.0 and recipe["stacker"] is None
    assert nested["id"].tolist() == rows["id"].tolist()
    assert log_loss(truth(rows), nested[list(LABEL_COLS)].to_numpy()) == pytest.approx(losses["ensemble_nested"])


@pytest.mark.parametrize("method", ["prob_avg", "logprob_avg"])
def test_temperature_undoes_overconfidence(method):
    rows, _, logits = synth()
    sharp = {"sharp": preds(rows["id"], softmax(3 * logits))}  # the true logits, three times too confident
    recipe, _ = fit_ensemble(sharp, rows, method, temperature=True)
    losses = recipe["oof_log_loss"]
    assert 2 < recipe["temperature"] < 4.5
    assert losses["ensemble"] < losses["sharp"] - 0.1
    assert losses["ensemble_nested"] < losses["sharp"] - 0.1


@pytest.mark.parametrize("method", ["stack", "logprob_avg"])
def test_nested_cv_never_sees_the_held_out_labels(method):
    rows, _, _ = synth()
    rng = np.random.default_rng(1)
    noise = {f"noise{j}": preds(rows["id"], rng.dirichlet([1, 1, 1], N)) for j in range(3)}
    recipe, nested = fit_ensemble(noise, rows, method, C=10.0)
    if method == "stack":  # 18 features of pure noise: fitted on all rows looks better than it is
        assert recipe["oof_log_loss"]["ensemble"] < recipe["oof_log_loss"]["ensemble_nested"]
        assert len(recipe["stacker"]["features"]) == 3 * 3 + 9 and recipe["weights"] is None
    permuted = rows.copy()
    held = np.flatnonzero(rows["fold"].to_numpy() == 0)
    permuted.loc[held, "target"] = pd.Series(list(truth(rows)[rng.permutation(held)]), index=held)
    permuted.loc[held, "label"] = rows["label"].to_numpy()[rng.permutation(held)]
    _, nested2 = fit_ensemble(noise, permuted, method, C=10.0)
    cols = list(LABEL_COLS)
    np.testing.assert_array_equal(nested2.loc[held, cols].to_numpy(), nested.loc[held, cols].to_numpy())
    others = rows["fold"].to_numpy() != 0
    assert not np.allclose(nested2.loc[others, cols].to_numpy(), nested.loc[others, cols].to_numpy())


def corrupt(frame: pd.DataFrame, how: str, victim) -> pd.DataFrame:
    if how == "extra_id":
        return pd.concat([frame, preds([victim], np.array([[0.2, 0.3, 0.5]]))], ignore_index=True)
    frame = frame.copy()
    at = frame.index[frame["id"] == victim][0]
    if how == "missing_id":
        return frame.drop(index=at)
    if how == "duplicate_id":
        return pd.concat([frame, frame.loc[[at]]], ignore_index=True)
    frame.loc[at, list(LABEL_COLS)] = {"nan": [np.nan, 0.5, 0.5], "negative": [-0.1, 0.6, 0.5],
                                       "not_summing": [0.4, 0.4, 0.4]}[how]
    return frame


@pytest.mark.parametrize("how,message", [
    ("missing_id", "id set differs"), ("extra_id", "id set differs"), ("duplicate_id", "duplicate ids"),
    ("nan", "NaN"), ("negative", "negative"), ("not_summing", "not summing to 1"),
])
def test_refusals_name_the_ids(how, message):
    rows, members, _ = synth()
    victim = 123 if how == "extra_id" else int(rows["id"].iloc[17])
    members["bad"] = corrupt(members["bad"], how, victim)
    with pytest.raises(DataError, match=rf"'bad'.*{message}.*\b{victim}\b"):
        fit_ensemble(members, rows, "prob_avg")


def test_joined_by_id_not_by_position():
    rows, members, _ = synth()
    shuffled = {n: f.sample(frac=1, random_state=3).reset_index(drop=True) for n, f in members.items()}
    for method in ("prob_avg", "stack"):
        a, nested_a = fit_ensemble(members, rows, method)
        b, nested_b = fit_ensemble(shuffled, rows, method)
        assert a == b
        pd.testing.assert_frame_equal(nested_a, nested_b)


@pytest.mark.parametrize("method", ["prob_avg", "logprob_avg", "stack"])
def test_apply_recipe_is_the_oof_transform(method, tmp_path):
    rows, members, _ = synth()
    recipe, _ = fit_ensemble(members, rows, method)
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    recipe = load_recipe(tmp_path / "recipe.json")  # what the Kaggle entry sees
    full = apply_recipe(recipe, members, rows)
    assert log_loss(truth(rows), full[list(LABEL_COLS)].to_numpy()) == pytest.approx(recipe["oof_log_loss"]["ensemble"])
    # "test" rows: a subset in another order, member files in yet another order
    test_rows = rows.sample(60, random_state=5).reset_index(drop=True)
    test_preds = {n: f[f["id"].isin(test_rows["id"])].sample(frac=1, random_state=6) for n, f in members.items()}
    out = apply_recipe(recipe, test_preds, test_rows)
    assert out["id"].tolist() == test_rows["id"].tolist()
    np.testing.assert_allclose(out[list(LABEL_COLS)].sum(axis=1), 1, atol=1e-12)
    expected = full.set_index("id").loc[test_rows["id"]].to_numpy()
    np.testing.assert_allclose(out[list(LABEL_COLS)].to_numpy(), expected, atol=1e-12)
    with pytest.raises(DataError, match="missing for member"):
        apply_recipe(recipe, {"good": test_preds["good"]}, test_rows)
    with pytest.raises(DataError, match="id set differs"):
        apply_recipe(recipe, test_preds, test_rows.iloc[1:])


def test_length_member_on_the_sample(tmp_path, sample_folds):
    out = tmp_path / "length"
    length_main([f"csv={SAMPLE / 'train.csv'}", f"folds={sample_folds}", f"out={out}"])
    df, _ = read_competition_csv(SAMPLE / "train.csv")
    oof = pd.read_csv(out / "oof.csv")
    assert sorted(oof["id"]) == sorted(df["id"])
    probs = oof[list(LABEL_COLS)].to_numpy()
    assert np.isfinite(probs).all() and np.allclose(probs.sum(axis=1), 1, atol=1e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["folds"]) == 5
    assert metrics["oof_log_loss"] < metrics["prior_log_loss"]  # 1.048 vs 1.078: length carries some signal here
    model = json.loads((out / "length_model.json").read_text())
    assert model["classes"] == list(LABEL_COLS) and model["rows"] == len(df)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    reference.fit(length_features(df).to_numpy(), df["label"])
    ours = predict_length(model, df)
    assert ours["id"].tolist() == df["id"].tolist()
    np.testing.assert_allclose(ours[list(LABEL_COLS)].to_numpy(), reference.predict_proba(length_features(df).to_numpy()), atol=1e-9)
    # fold 0's OOF depends on the other folds only
    df = attach_folds(df, read_folds(sample_folds))
    held = np.flatnonzero(df["fold"].to_numpy() == 0)
    shuffled = df.copy()
    shuffled.loc[held, "label"] = df["label"].to_numpy()[np.random.default_rng(0).permutation(held)]
    a, b = cross_validate(df, 1.0)[0], cross_validate(shuffled, 1.0)[0]
    pd.testing.assert_frame_equal(a[a["id"].isin(df["id"][held])], b[b["id"].isin(df["id"][held])])
    assert fit_length_model(df) == model


def write_competition_csv(rows: pd.DataFrame, path, labels: bool = True) -> None:
    table = rows[["id"]].copy()
    for col in ("prompt", "response_a", "response_b"):
        table[col] = rows[col].map(json.dumps)
    if labels:
        for j, col in enumerate(LABEL_COLS):
            table[col] = (rows["label"] == j).astype(int)
    table.to_csv(path, index=False)


def member_runs(member: Path, oof: pd.DataFrame, rows: pd.DataFrame, seed: int) -> None:
    """fold<k>-seed<seed> runs holding each fold's rows of `oof`, and the fold=all file oof-seed<seed>.csv."""
    for k in range(K):
        sealed_run(member / f"fold{k}-seed{seed}", oof[oof["id"].isin(rows["id"][rows["fold"] == k])])
    oof.sample(frac=1, random_state=1).to_csv(member / f"oof-seed{seed}.csv", index=False)


def test_cli(tmp_path):
    rows, members, _ = synth()
    test_rows = synth(seed=9, n=30)[0]
    write_competition_csv(rows, tmp_path / "train.csv")
    write_competition_csv(test_rows, tmp_path / "test.csv", labels=False)
    rows[["id", "fold"]].to_csv(tmp_path / "folds.csv", index=False)
    rng = np.random.default_rng(2)
    test_preds = {}
    for name, oof in members.items():
        member_runs(tmp_path / "runs" / name, oof, rows, 42)
        test_preds[name] = preds(test_rows["id"], rng.dirichlet([2, 2, 2], len(test_rows)))
    length_main([f"csv={tmp_path / 'train.csv'}", f"folds={tmp_path / 'folds.csv'}", f"out={tmp_path / 'runs/length'}"])
    model = json.loads((tmp_path / "runs/length/length_model.json").read_text())
    test_preds["length"] = predict_length(model, test_rows)
    for name, frame in test_preds.items():
        frame.to_csv(tmp_path / f"sub_{name}.csv", index=False)
    args = [f"members={','.join(str(tmp_path / 'runs' / n) for n in test_preds)}", f"labels={tmp_path / 'train.csv'}",
            f"folds={tmp_path / 'folds.csv'}", "method=logprob_avg", "temperature=true", f"out={tmp_path / 'ens'}",
            f"test={','.join(str(tmp_path / f'sub_{n}.csv') for n in test_preds)}", f"test_csv={tmp_path / 'test.csv'}"]
    cmd = [sys.executable, "-m", "infer", "ensemble"]
    done = subprocess.run(cmd + args, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "nested CV" in done.stdout
    recipe = json.loads((tmp_path / "ens" / "recipe.json").read_text())
    assert list(recipe) == RECIPE_KEYS and recipe["method"] == "logprob_avg"
    assert recipe["members"][0] == {"name": "good", "dir": "good", "kind": "runs", "runs": [f"fold{k}-seed42" for k in range(K)]}
    assert recipe["members"][2] == {"name": "length", "kind": "length", "model": "length_model.json"}
    assert len(recipe["weights"]) == 3 and recipe["stacker"] is None and recipe["temperature"] > 0
    assert set(recipe["oof_log_loss"]) == {"good", "bad", "length", "prior", "ensemble", "ensemble_nested"}
    oof = pd.read_csv(tmp_path / "ens" / "oof.csv")
    assert oof["id"].tolist() == rows["id"].tolist()
    assert log_loss(truth(rows), oof[list(LABEL_COLS)].to_numpy()) == pytest.approx(recipe["oof_log_loss"]["ensemble_nested"], abs=1e-6)
    assert (tmp_path / "ens" / "report.md").read_text().startswith("# Ensemble: method=logprob_avg")
    sub = pd.read_csv(tmp_path / "ens" / "submission.csv")
    assert sub["id"].tolist() == test_rows["id"].tolist()
    parsed_test, _ = read_competition_csv(tmp_path / "test.csv", labels=False)
    expected = apply_recipe(recipe, test_preds, parsed_test)
    np.testing.assert_allclose(sub[list(LABEL_COLS)].to_numpy(), expected[list(LABEL_COLS)].to_numpy(), atol=1e-8)

    bad = pd.read_csv(tmp_path / "runs/bad/oof-seed42.csv")
    bad.iloc[1:].to_csv(tmp_path / "runs/bad/oof-seed42.csv", index=False)
    done = subprocess.run(cmd + args, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 1 and "ens: exists; pass overwrite=true" in done.stderr  # a finished ensemble is kept
    done = subprocess.run(cmd + args + ["overwrite=true"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "oof-seed42.csv: not the rows of its verified fold runs' oof.csv" in done.stderr


def test_member_at_seed_reads_that_seeds_runs(tmp_path):
    from infer.ensemble import read_member

    rows, members, _ = synth()
    member = tmp_path / "plain"
    for seed, name in ((42, "good"), (7, "bad")):
        member_runs(member, members[name], rows, seed)
    entry, oof = read_member(f"{member}@7", 42, list(range(K)))
    assert entry == {"name": "plain-seed7", "dir": "plain", "kind": "runs", "runs": [f"fold{k}-seed7" for k in range(K)]}
    pd.testing.assert_frame_equal(oof.sort_values("id", ignore_index=True), members["bad"].sort_values("id", ignore_index=True))
    assert read_member(str(member), 42, list(range(K)))[0]["name"] == "plain"


def test_a_member_whose_fold_runs_do_not_verify_is_refused(tmp_path):
    from infer.ensemble import read_member
    from model.files import AdapterError

    rows, members, _ = synth()
    member = tmp_path / "plain"
    member_runs(member, members["good"], rows, 42)
    oof = member / "fold2-seed42" / "oof.csv"
    oof.write_text(oof.read_text().replace("0.", "0.1", 1))  # a fold's OOF changed after it was sealed
    with pytest.raises(AdapterError, match="fold2-seed42/oof.csv: .*(truncated or replaced)"):
        read_member(str(member), 42, list(range(K)))


def test_length_member_with_a_seed_is_refused(tmp_path, sample_folds):
    from cli.config import ConfigError
    from infer.ensemble import read_member

    length_main([f"csv={SAMPLE / 'train.csv'}", f"folds={sample_folds}", f"out={tmp_path / 'length'}"])
    with pytest.raises(ConfigError, match="has no seeds"):
        read_member(f"{tmp_path / 'length'}@7", 42, list(range(K)))

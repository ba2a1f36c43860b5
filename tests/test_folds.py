"""Folds: grouping by prompt, stratification, determinism, the folds file, extra training rows, the CLI."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cli.config import load_config
from data.folds import (
    EXTRA_FOLD,
    FoldsConfig,
    add_extra_training_rows,
    attach_folds,
    make_folds,
    read_folds,
    run,
)
from cli.output import OutputError
from data.io import DataError, prompt_key, read_competition_csv

from conftest import REPO, SAMPLE


def frame(prompts: list[list[str]], labels: list[int], start_id: int = 1, **extra) -> pd.DataFrame:
    n = len(prompts)
    return pd.DataFrame({
        "id": range(start_id, start_id + n),
        "prompt": prompts,
        "response_a": [[f"a{i}"] for i in range(n)],
        "response_b": [[f"b{i}"] for i in range(n)],
        "label": labels,
        **extra,
    })


@pytest.fixture(scope="module")
def sample() -> pd.DataFrame:
    return read_competition_csv(SAMPLE / "train.csv", labels=True)[0]


def test_rows_sharing_a_normalised_prompt_share_a_fold():
    rng = np.random.default_rng(0)
    prompts, labels = [], []
    for g in range(40):
        for variant in (f"topic {g} please", f"  Topic {g}   PLEASE ", f"topic {g} please\t"):
            prompts.append([variant])
            labels.append(int(rng.integers(0, 3)))
    df = frame(prompts, labels)
    folds = make_folds(df, n_folds=5, seed=1)
    assert folds["id"].tolist() == df["id"].tolist()
    per_group = folds.groupby(df["prompt"].map(prompt_key))["fold"].nunique()
    assert len(per_group) == 40 and (per_group == 1).all()
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]


def test_folds_are_stratified_and_grouped_on_the_sample(sample):
    folds = make_folds(sample, n_folds=5, seed=42)
    joined = attach_folds(sample, folds)
    assert (joined.groupby(joined["prompt"].map(prompt_key))["fold"].nunique() == 1).all()
    overall = np.bincount(sample["label"], minlength=3) / len(sample)
    for _, part in joined.groupby("fold"):
        assert 0.15 * len(sample) < len(part) < 0.25 * len(sample)
        shares = np.bincount(part["label"], minlength=3) / len(part)
        assert np.abs(shares - overall).max() < 0.08


def test_same_seed_same_file_and_another_seed_differs(tmp_path):
    def make(name: str, seed: int) -> bytes:
        run(FoldsConfig(csv=str(SAMPLE / "train.csv"), out=str(tmp_path / name), seed=seed))
        return (tmp_path / name).read_bytes()

    first, again, other = make("a.csv", 42), make("b.csv", 42), make("c.csv", 7)
    assert first == again
    assert first != other
    assert first.startswith(b"id,fold\n")


def test_group_col_groups_by_that_column_instead_of_the_prompt():
    # Every prompt is different, but question_id ties rows together (as in MT-Bench).
    n = 60
    qid = [i // 4 for i in range(n)]
    df = frame([[f"prompt {i}"] for i in range(n)], [i % 3 for i in range(n)], question_id=qid)
    folds = make_folds(df, n_folds=3, seed=0, group_col="question_id")
    assert (folds.groupby(df["question_id"])["fold"].nunique() == 1).all()
    by_prompt = make_folds(df, n_folds=3, seed=0)
    assert (by_prompt.groupby(df["question_id"])["fold"].nunique() > 1).any()


def test_group_col_errors_name_the_problem():
    df = frame([["p"], ["q"]], [0, 1], question_id=[1.0, np.nan])
    with pytest.raises(DataError, match="group_col 'nope' is not a column"):
        make_folds(df, n_folds=2, group_col="nope")
    with pytest.raises(DataError, match=r"group_col 'question_id' is empty for row id\(s\) \[2\]"):
        make_folds(df, n_folds=2, group_col="question_id")


def test_more_folds_than_groups_is_an_error():
    df = frame([["same"], ["SAME "], ["other"]], [0, 1, 2])
    with pytest.raises(DataError, match=r"n_folds=3 needs .* number of groups \(2\)"):
        make_folds(df, n_folds=3)


def test_attach_folds_joins_on_id_not_position(sample):
    folds = make_folds(sample, n_folds=5, seed=42)
    shuffled = folds.sample(frac=1.0, random_state=0)
    joined = attach_folds(sample, shuffled)
    expected = dict(zip(folds["id"], folds["fold"]))
    assert joined["id"].tolist() == sample["id"].tolist()
    assert joined["fold"].tolist() == [expected[i] for i in sample["id"]]


def test_attach_folds_names_ids_missing_from_the_folds_file(sample):
    folds = make_folds(sample, n_folds=5, seed=42)
    missing = sample["id"].iloc[[3, 10]].tolist()
    with pytest.raises(DataError, match=rf"folds.csv: 2 row id\(s\) have no fold, e.g. \[{missing[0]}, {missing[1]}\]"):
        attach_folds(sample, folds[~folds["id"].isin(missing)], "folds.csv")
    with pytest.raises(DataError, match="already has a 'fold' column"):
        attach_folds(attach_folds(sample, folds), folds)


def test_read_folds_validates_the_file(tmp_path):
    path = tmp_path / "folds.csv"
    path.write_text("id,fold\n1,0\n2,1\n")
    assert read_folds(path).to_dict("list") == {"id": [1, 2], "fold": [0, 1]}
    for text, message in [
        ("id,split\n1,0\n", r"missing column\(s\) \['fold'\]"),
        ("id,fold\n1,0\n1,1\n", r"duplicate ids \[1\]"),
        ("id,fold\n1,0\n2,1.5\n", r"field fold must be an integer; bad row id\(s\) \[2\]"),
        ("id,fold\n1,0\n3,\n", r"bad row id\(s\) \[3\]"),
    ]:
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_folds(path)
    with pytest.raises(DataError, match="folds file not found"):
        read_folds(tmp_path / "none.csv")


def test_existing_folds_file_is_not_overwritten_without_overwrite(tmp_path):
    out = tmp_path / "folds.csv"
    cfg = FoldsConfig(csv=str(SAMPLE / "train.csv"), out=str(out), seed=1)
    run(cfg)
    before = out.read_bytes()
    with pytest.raises(OutputError, match="already exists.*overwrite=true"):
        run(FoldsConfig(csv=str(SAMPLE / "train.csv"), out=str(out), seed=2))
    assert out.read_bytes() == before
    run(FoldsConfig(csv=str(SAMPLE / "train.csv"), out=str(out), seed=2, overwrite=True))
    assert out.read_bytes() != before


def test_cli_on_the_committed_sample(tmp_path):
    out = tmp_path / "folds.csv"
    cmd = [sys.executable, "-m", "data.folds", f"csv={SAMPLE / 'train.csv'}", f"out={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fold   rows" in done.stdout and f"wrote {out}" in done.stdout
    folds = read_folds(out)
    sample = read_competition_csv(SAMPLE / "train.csv")[0]
    assert folds.equals(make_folds(sample, n_folds=5, seed=42))

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1
    assert "already exists" in again.stderr and "overwrite=true" in again.stderr


def test_cli_spelling_of_drop_bad_rows_reaches_the_config():
    cfg = load_config(FoldsConfig, ["csv=x.csv", "out=y.csv", "--drop-bad-rows", "n_folds=3", "group_col=question_id"])
    assert cfg.drop_bad_rows is True and cfg.n_folds == 3 and cfg.group_col == "question_id"


def test_extra_rows_drop_prompt_overlaps_and_duplicate_pairs():
    train = frame([["What is Rust?"], ["hello there"]], [0, 1], start_id=1)
    extra = pd.DataFrame({
        "id": [101, 102, 103, 104, 105],
        "prompt": [["what is  RUST?"], ["new question"], ["New Question "], ["new question"], ["another one"]],
        "response_a": [["x"], ["good"], ["bad"], ["good"], ["y"]],
        "response_b": [["y"], ["bad"], ["good"], ["other"], ["z"]],
        "label": [0, 0, 1, 2, 2],
    })
    kept, stats = add_extra_training_rows(train, extra)
    # 101 repeats a competition prompt; 103 is 102 with A and B swapped.
    assert kept["id"].tolist() == [102, 104, 105]
    assert (kept["fold"] == EXTRA_FOLD).all()
    assert stats == {"extra_rows": 5, "dropped_prompt_overlap": 1, "dropped_duplicate_pairs": 1, "kept": 3}
    assert "fold" not in extra.columns


def test_extra_rows_reject_id_collisions():
    train = frame([["a"], ["b"]], [0, 1], start_id=1)
    extra = frame([["c"], ["d"]], [0, 1], start_id=2)
    with pytest.raises(DataError, match=r"reuses 1 competition id\(s\), e.g. \[2\]"):
        add_extra_training_rows(train, extra)

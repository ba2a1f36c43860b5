"""Reading competition CSVs: JSON-list cells, nulls, surrogates, turns, labels, bad rows; the committed sample."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data.io import (
    LABEL_COLS,
    DataError,
    clean_surrogates,
    pair_key,
    prompt_key,
    read_competition_csv,
    read_sample_submission,
)
from data.synth import BAD, GOOD, SynthConfig, write_sample

from conftest import SAMPLE, SHARED_DATA


def cell(*turns) -> str:
    return json.dumps(list(turns), ensure_ascii=False)


def row(row_id, prompt=None, a=None, b=None, winner=(1, 0, 0), **extra) -> dict:
    out = {
        "id": row_id,
        "prompt": prompt if prompt is not None else cell("hello"),
        "response_a": a if a is not None else cell("answer a"),
        "response_b": b if b is not None else cell("answer b"),
    }
    if winner is not None:
        out.update(zip(LABEL_COLS, winner))
    out.update(extra)
    return out


def write(tmp_path: Path, rows: list[dict], name: str = "train.csv") -> Path:
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def write_text(tmp_path: Path, text: str, name: str = "train.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


HEADER = "id,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n"


def test_null_turn_becomes_empty_string_and_is_counted(tmp_path):
    path = write(tmp_path, [row(1, a='[null]'), row(2, prompt='["q1", null]', a=cell("x", "y"), b=cell("z", "w"))])
    df, report = read_competition_csv(path)
    assert df["response_a"][0] == [""]
    assert df["prompt"][1] == ["q1", ""]
    assert report.null_turns == 2
    assert report.dropped_rows == 0


def test_lone_surrogate_becomes_replacement_char_and_is_counted(tmp_path):
    # The CSV holds the JSON escapes as text, exactly as the competition files do.
    text = HEADER + '1,"[""hi \\ud83d""]","[""ok""]","[""fine""]",1,0,0\n'
    df, report = read_competition_csv(write_text(tmp_path, text))
    assert df["prompt"][0] == ["hi \ufffd"]
    assert report.surrogate_cells == 1


def test_valid_surrogate_pair_is_joined_into_the_emoji(tmp_path):
    text = HEADER + '1,"[""smile \\ud83d\\ude00""]","[""ok""]","[""fine""]",1,0,0\n'
    df, report = read_competition_csv(write_text(tmp_path, text))
    assert df["prompt"][0] == ["smile \U0001F600"]
    assert report.surrogate_cells == 0
    assert clean_surrogates("a\ud83d\ude00b") == "a\U0001F600b"
    assert clean_surrogates("a\ude00\ud83db") == "a\ufffd\ufffdb"


def test_multi_turn_cells_keep_every_turn(tmp_path):
    path = write(tmp_path, [row(1, prompt=cell("q1", "q2", "q3"), a=cell("a1", "a2", "a3"), b=cell("b1", "b2", "b3")),
                            row(2)])
    df, report = read_competition_csv(path)
    assert df["prompt"][0] == ["q1", "q2", "q3"]
    assert df["response_b"][0] == ["b1", "b2", "b3"]
    assert report.multi_turn_rows == 1
    assert report.mismatched_turn_rows == 0


def test_mismatched_turn_counts_are_counted_not_errors(tmp_path):
    path = write(tmp_path, [row(1, prompt=cell("q1", "q2"), a=cell("a1"), b=cell("b1", "b2")), row(2)])
    df, report = read_competition_csv(path)
    assert len(df) == 2
    assert df["response_a"][0] == ["a1"]
    assert report.mismatched_turn_rows == 1
    assert report.multi_turn_rows == 1


def test_bad_json_names_file_row_id_and_field(tmp_path):
    path = write(tmp_path, [row(1), row(77, b='["unterminated'), row(3)])
    with pytest.raises(DataError, match=r"row id=77 field response_b: not valid JSON") as err:
        read_competition_csv(path)
    assert str(path) in str(err.value)
    assert "--drop-bad-rows" in str(err.value)


@pytest.mark.parametrize("bad_cell, message", [
    ('"just a string"', "expected a JSON list of strings, got str"),
    ('{"a": 1}', "expected a JSON list of strings, got dict"),
    ("[1, 2]", "turn 0 is int"),
    ("", "not valid JSON"),
])
def test_cells_that_are_not_lists_of_strings_are_errors(tmp_path, bad_cell, message):
    path = write(tmp_path, [row(5, prompt=bad_cell)])
    with pytest.raises(DataError, match=rf"row id=5 field prompt: {message}"):
        read_competition_csv(path)


def test_missing_column_is_named(tmp_path):
    path = write(tmp_path, [row(1)])
    pd.read_csv(path).drop(columns="response_b").to_csv(path, index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) \['response_b'\]"):
        read_competition_csv(path)


def test_missing_label_column_is_named_when_labels_required(tmp_path):
    path = write(tmp_path, [row(1, winner=None)])
    with pytest.raises(DataError, match="winner_model_a"):
        read_competition_csv(path, labels=True)
    df, _ = read_competition_csv(path)  # labels=None: a test file, no label columns expected
    assert "label" not in df.columns


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_competition_csv(tmp_path / "nope.csv")


def test_duplicate_ids_are_an_error(tmp_path):
    path = write(tmp_path, [row(1), row(2), row(1)])
    with pytest.raises(DataError, match=r"duplicate ids \[1\]"):
        read_competition_csv(path)


@pytest.mark.parametrize("winner", [(1, 1, 0), (0, 0, 0), (2, -1, 0), (0.5, 0.5, 0), ("x", 0, 1)])
def test_winner_columns_must_hold_exactly_one_1(tmp_path, winner):
    path = write(tmp_path, [row(1), row(42, winner=winner)])
    with pytest.raises(DataError, match=r"row id=42 field winner_model_a/winner_model_b/winner_tie"):
        read_competition_csv(path)


def test_labels_and_targets_follow_the_winner_columns(tmp_path):
    path = write(tmp_path, [row(1, winner=(1, 0, 0)), row(2, winner=(0, 1, 0)), row(3, winner=(0, 0, 1))])
    df, _ = read_competition_csv(path)
    assert df["label"].tolist() == [0, 1, 2]
    assert np.array_equal(np.stack(df["target"]), np.eye(3))


def test_drop_bad_rows_drops_counts_and_keeps_the_good_rows(tmp_path):
    rows = [row(1), row(2, a="not json"), row(3, winner=(1, 1, 0)), row(4, prompt=cell("q1", "q2")), row(5)]
    path = write(tmp_path, rows)
    df, report = read_competition_csv(path, drop_bad_rows=True)
    assert df["id"].tolist() == [1, 4, 5]
    assert report.dropped_rows == 2
    assert report.rows == 5
    # The unparseable row must not count as a row with differing turn counts.
    assert report.mismatched_turn_rows == 1
    assert df["prompt"][1] == ["q1", "q2"]
    assert "bad rows dropped: 2" in report.summary()


def test_soft_labels_accept_fractions_that_sum_to_one(tmp_path):
    path = write(tmp_path, [row(1, winner=(0.2, 0.5, 0.3)), row(2, winner=(1, 0, 0))])
    df, _ = read_competition_csv(path, soft_labels=True)
    assert np.allclose(df["target"][0], [0.2, 0.5, 0.3])
    assert df["label"].tolist() == [1, 0]
    with pytest.raises(DataError, match="row id=1 .*exactly one winner"):
        read_competition_csv(path)


@pytest.mark.parametrize("winner", [(0.2, 0.2, 0.2), (1.5, -0.5, 0)])
def test_soft_labels_still_reject_rows_that_are_not_distributions(tmp_path, winner):
    path = write(tmp_path, [row(9, winner=winner)])
    with pytest.raises(DataError, match=r"row id=9 .*soft labels must be >= 0 and sum to 1"):
        read_competition_csv(path, soft_labels=True)


def test_prompt_key_ignores_case_and_spacing_but_not_turn_structure():
    assert prompt_key(["Hello  World "]) == prompt_key(["hello world"])
    assert prompt_key(["hello", "world"]) != prompt_key(["hello world"])
    assert prompt_key(["hello"]) != prompt_key(["goodbye"])


def test_pair_key_is_the_same_in_either_order():
    assert pair_key(["q"], ["a"], ["b"]) == pair_key(["Q"], ["b"], ["A "])
    assert pair_key(["q"], ["a"], ["b"]) != pair_key(["q"], ["a"], ["c"])


def test_committed_sample_parses_and_has_the_awkward_cases():
    train, report = read_competition_csv(SAMPLE / "train.csv", labels=True)
    assert report.dropped_rows == 0 and len(train) == 300
    assert report.null_turns > 0
    assert report.surrogate_cells > 0
    assert report.multi_turn_rows > 0
    assert report.mismatched_turn_rows > 0
    assert train["id"].is_unique
    assert train["prompt"].map(prompt_key).nunique() < len(train)  # prompts repeat: grouping matters
    assert (train["response_a"].map(tuple) == train["response_b"].map(tuple)).any()
    assert train["response_a"].map(lambda t: "".join(t) == "").any() or train["response_b"].map(
        lambda t: "".join(t) == "").any()
    shares = np.bincount(train["label"], minlength=3) / len(train)
    assert 0.3 < shares[0] < 0.45 and 0.3 < shares[1] < 0.45 and 0.18 < shares[2] < 0.3

    test, test_report = read_competition_csv(SAMPLE / "test.csv", labels=False)
    assert test_report.dropped_rows == 0 and len(test) == 60
    assert not set(test["id"]) & set(train["id"])
    sub = read_sample_submission(SAMPLE / "sample_submission.csv")
    assert sub["id"].tolist() == test["id"].tolist()
    assert np.allclose(sub[list(LABEL_COLS)].to_numpy(), 1 / 3)


def test_committed_sample_is_what_the_generator_writes(tmp_path):
    paths = write_sample(SynthConfig(out=str(tmp_path)))
    assert sorted(paths) == ["sample_submission", "test", "train"]
    for name, path in paths.items():
        assert path.read_bytes() == (SAMPLE / f"{name}.csv").read_bytes(), f"data/sample/{name}.csv is stale"


def test_sample_signal_is_readable_from_the_words():
    # A rule that only counts quality words must beat the class prior by far, or tiny models learn nothing.
    train, _ = read_competition_csv(SAMPLE / "train.csv", labels=True)

    def quality(turns: list[str]) -> int:
        words = " ".join(turns).split()
        return (sum(w in GOOD for w in words) > sum(w in BAD for w in words)) if words else -1

    qa, qb = train["response_a"].map(quality), train["response_b"].map(quality)
    rule = np.where(qa == qb, 2, np.where(qa > qb, 0, 1))
    assert (rule == train["label"]).mean() > 0.85


@pytest.mark.skipif(not (SHARED_DATA / "mtbench_human.csv").is_file(), reason="shared MT-Bench data not present")
def test_shared_mtbench_file_parses_cleanly():
    df, report = read_competition_csv(SHARED_DATA / "mtbench_human.csv", labels=True)
    assert report.dropped_rows == 0
    assert len(df) == report.rows > 0
    assert "question_id" in df.columns

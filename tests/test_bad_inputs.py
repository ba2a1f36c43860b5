"""Every entry point that reads a CSV, fed every kind of malformed file, at the command-line level.

Each case runs the entry point's main() in-process under cli.config.run_cli, the wrapper `python -m`
uses, and expects exit code 1 with one `error:` message that names the offending file (and the line
or field, where there is one) and no traceback. Entry points that load a model must stop before
they do: loading a base, building a trainable model or scoring fails the test. The malformed files
are built from the committed sample (its first 40 rows) into tmp_path.

Also: a gzip-compressed `.csv` and a UTF-8 file with a BOM read as the plain file does.
"""
from __future__ import annotations

import gzip
import os
import random
import re
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

from cli.config import run_cli
from conftest import SAMPLE, forbid_model_loading, train_args
from data.folds import main as folds_main
from data.io import DataError, read_competition_csv
from infer.ensemble import main as ensemble_main
from infer.plan import main as plan_main
from infer.predict import main as predict_main
from train.__main__ import main as train_main
from train.length import main as length_main

ROWS = 40
BAD_ROW = 3  # 0-based data row that gets the bad id: line 5 of the file (the header is line 1)
BAD_LINE = f"line {BAD_ROW + 2}"


# ---------------------------------------------------------------- building the files

def sample_frame(name: str) -> pd.DataFrame:
    """The first ROWS rows of a committed sample file, every cell kept as its exact text."""
    return pd.read_csv(SAMPLE / name, dtype=str, keep_default_na=False).head(ROWS)


def with_id(df: pd.DataFrame, value: str) -> pd.DataFrame:
    df = df.copy()
    df.loc[BAD_ROW, "id"] = value
    return df


def write(path: Path, content: pd.DataFrame | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        content.to_csv(path, index=False)
    return path


def header_only(df: pd.DataFrame) -> bytes:
    return (",".join(df.columns) + "\n").encode()


def random_bytes() -> bytes:
    # Not UTF-8 (and with odds of 1 in 65536 a gzip magic number, which must fail just the same).
    return os.urandom(4096)


# name -> (content built from the good frame, what the message must say besides the path)
BAD_DATA = {
    "blank id": (lambda df: with_id(df, ""), BAD_LINE),
    "id abc": (lambda df: with_id(df, "abc"), BAD_LINE),
    "id 1.5": (lambda df: with_id(df, "1.5"), BAD_LINE),
    "id nan": (lambda df: with_id(df, "nan"), BAD_LINE),
    "header only": (header_only, "no rows"),
    "0 bytes": (lambda df: b"", "empty file"),
    "random bytes": (lambda df: random_bytes(), ""),
    # A train-format file missing one label column (whichever format the entry point expects):
    # neither train nor test format, so never guessed to be one.
    "no winner_tie": (lambda df: sample_frame("train.csv").drop(columns="winner_tie"), "winner_tie"),
}
BAD_FOLDS = {k: BAD_DATA[k] for k in ("0 bytes", "header only", "blank id", "random bytes")}
BAD_SUBMISSION = {
    **{k: BAD_DATA[k] for k in ("0 bytes", "random bytes", "header only")},
    # One id the rows to score do not have (and so one of theirs it lacks): caught before scoring.
    "ids differ": (lambda df: with_id(df, "999999999"), "999999999"),
}


def cases_for(role: str) -> dict:
    return {"folds": BAD_FOLDS, "sample_submission": BAD_SUBMISSION}.get(role, BAD_DATA)


class Inputs:
    """Good input files for one test (the first ROWS rows of the sample), any of which a case replaces."""

    def __init__(self, folder: Path, sample_folds: Path):
        self.folder = folder
        self.train = write(folder / "train.csv", sample_frame("train.csv"))
        self.test = write(folder / "test.csv", sample_frame("test.csv"))
        self.sample_submission = write(folder / "sample_submission.csv", sample_frame("sample_submission.csv"))
        ids = set(pd.read_csv(self.train)["id"])
        folds = pd.read_csv(sample_folds)
        self.folds = write(folder / "folds.csv", folds[folds["id"].isin(ids)])
        assert 0 in set(pd.read_csv(self.folds)["fold"]), "fold=0 must hold some of the rows"

    def replace(self, role: str, case: str) -> Path:
        """Write the malformed variant `case` of the input `role` and return its path."""
        build, _ = cases_for(role)[case]
        good = getattr(self, role)
        bad = write(self.folder / f"bad-{good.name}", build(pd.read_csv(good, dtype=str, keep_default_na=False)))
        setattr(self, role, bad)
        return bad


# ---------------------------------------------------------------- the entry points


def folds_entry(files: Inputs, tmp: Path, request) -> Callable[[], None]:
    return lambda: folds_main([f"csv={files.train}", f"out={tmp / 'out-folds.csv'}"])


def length_entry(files: Inputs, tmp: Path, request) -> Callable[[], None]:
    return lambda: length_main([f"csv={files.train}", f"folds={files.folds}", f"out={tmp / 'length'}"])


def train_entry(files: Inputs, tmp: Path, request) -> Callable[[], None]:
    argv = train_args("tiny-llama.yaml", request.getfixturevalue("tiny_llama"), files.folds, tmp / "runs",
                      f"data.train_csv={files.train}", "fold=0")
    return lambda: train_main(argv)


def predict_test_entry(files: Inputs, tmp: Path, request) -> Callable[[], None]:
    run = request.getfixturevalue("llama_run")
    return lambda: predict_main([f"runs={run}", f"csv={files.test}", f"sample_submission={files.sample_submission}",
                                 f"out={tmp / 'pred.csv'}"])


def predict_train_entry(files: Inputs, tmp: Path, request) -> Callable[[], None]:
    run = request.getfixturevalue("llama_run")
    return lambda: predict_main([f"runs={run}", f"csv={files.train}", f"folds={files.folds}", "fold=0",
                                 f"out={tmp / 'oof0.csv'}"])


def ensemble_entry(files: Inputs, tmp: Path, request) -> Callable[[], None]:
    # labels= and folds= are read before any member, so the member need not exist.
    return lambda: ensemble_main([f"members={tmp / 'member'}", f"labels={files.train}", f"folds={files.folds}",
                                  f"out={tmp / 'ensemble'}"])


def plan_entry(files: Inputs, tmp: Path, request) -> Callable[[], None]:
    run = request.getfixturevalue("llama_run")
    return lambda: plan_main([f"runs={run}", f"csv={files.test}", "throughput=100"])


# entry point -> (how to call it, {role: the malformed classes it is checked against});
# the `csv` role is the train-format file where the entry point wants labels, the test file otherwise.
DATA_ONLY = [k for k in BAD_DATA if k != "no winner_tie"]
ENTRIES = {
    "data.folds": (folds_entry, {"train": list(BAD_DATA)}),
    "train.length": (length_entry, {"train": list(BAD_DATA), "folds": list(BAD_FOLDS)}),
    "train": (train_entry, {"train": list(BAD_DATA), "folds": list(BAD_FOLDS)}),
    "infer predict (test.csv)": (predict_test_entry, {"test": list(BAD_DATA), "sample_submission": list(BAD_SUBMISSION)}),
    "infer predict (train.csv fold=0)": (predict_train_entry, {"train": list(BAD_DATA), "folds": list(BAD_FOLDS)}),
    "infer ensemble": (ensemble_entry, {"train": list(BAD_DATA), "folds": list(BAD_FOLDS)}),
    # plan reads csv= with labels=False: label columns, complete or not, are not its business.
    "infer plan": (plan_entry, {"test": DATA_ONLY}),
}
MATRIX = [
    pytest.param(entry, role, case, id=f"{entry} | {role} | {case}")
    for entry, (_, roles) in ENTRIES.items()
    for role, cases in roles.items()
    for case in cases
]


@pytest.mark.parametrize("entry, role, case", MATRIX)
def test_malformed_input_is_one_error_line_naming_the_file(entry, role, case, tmp_path, sample_folds, request,
                                                           monkeypatch, capsys):
    files = Inputs(tmp_path, sample_folds)
    bad = files.replace(role, case)
    call = ENTRIES[entry][0](files, tmp_path, request)
    forbid_model_loading(monkeypatch)  # a malformed input must stop the entry point before any of that
    capsys.readouterr()  # fixture set-up (a tiny training run) may have printed

    with pytest.raises(SystemExit) as exit_info:
        run_cli(call)

    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert exit_info.value.code == 1, output
    assert "Traceback" not in output
    message = captured.err.strip().splitlines()[0] if captured.err.strip() else ""
    assert message.startswith("error: ") and str(bad) in message, output
    assert cases_for(role)[case][1] in captured.err, output  # the line or field, where there is one


# ---------------------------------------------------------------- encodings that are fine, and one that is not

@pytest.mark.parametrize("encode", [gzip.compress, lambda raw: b"\xef\xbb\xbf" + raw], ids=["gzip", "utf-8 BOM"])
def test_gzip_and_bom_csv_read_as_the_plain_file(encode, tmp_path):
    plain = write(tmp_path / "plain.csv", sample_frame("train.csv"))
    encoded = tmp_path / "train.csv"  # a gzip file named .csv: recognised by its content
    encoded.write_bytes(encode(plain.read_bytes()))
    expected, _ = read_competition_csv(plain)
    got, report = read_competition_csv(encoded)
    pd.testing.assert_frame_equal(got, expected)
    assert report.rows == ROWS


def gzip_header() -> bytes:
    """A valid 10-byte gzip member header (deflate, no flags), so the body is what gets decompressed."""
    return gzip.compress(b"")[:10]


@pytest.mark.parametrize("content", [
    # gzip of random bytes: decompresses fine, to something that is not UTF-8
    lambda: gzip.compress(os.urandom(4096)),
    # a gzip header over a random deflate stream: fails inside zlib (fixed seed: an invalid block type)
    lambda: gzip_header() + random.Random(0).randbytes(4096),
    # a truncated gzip stream
    lambda: gzip.compress(b"id,prompt,response_a,response_b\n" * 100)[:-20],
], ids=["gzip of random bytes", "gzip header + random stream", "truncated gzip"])
def test_gzip_with_garbage_inside_is_an_error_naming_the_file(content, tmp_path, capsys):
    bad = tmp_path / "test.csv"
    bad.write_bytes(content())
    with pytest.raises(DataError, match=re.escape(str(bad))):
        read_competition_csv(bad)
    # and through a CLI: one error line, no traceback
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: length_main([f"csv={bad}", f"folds={bad}", f"out={tmp_path / 'length'}"]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith(f"error: {bad}") and "Traceback" not in err

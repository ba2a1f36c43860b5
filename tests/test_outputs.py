"""Outputs: checked before any work, never replaced without overwrite=true, and written whole.

An output that cannot be written (read-only folder, a path under an existing file) stops
`infer predict` in one error line naming it before any model loads; an existing output is refused
without overwrite=true (predict and data.folds) and replaced with it. cli.output.write_file lets
two racing writers leave exactly one whole file, and cli.output.output_folder leaves nothing behind
when the block that fills it fails.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pandas as pd
import pytest

from cli.config import run_cli
from cli.output import OutputError, output_folder, write_file
from conftest import SAMPLE, forbid_model_loading
from data.folds import main as folds_main
from data.io import LABEL_COLS
from infer.predict import main as predict_main


def cli(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of an entry point run in-process the way `python -m` runs it."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return exit_info.value.code, captured.err



# ---------------------------------------------------------------- unwritable outputs, before any work

def read_only_output(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through chmod 555; nothing can create a folder in /proc
        return Path("/proc/arena-pref-test/out.csv")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "out.csv"


def under_a_file(tmp_path: Path) -> Path:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    return blocker / "sub" / "x.csv"


@pytest.mark.parametrize("make_out", [read_only_output, under_a_file], ids=["read-only folder", "under a file"])
def test_unwritable_output_fails_before_any_model_loads(make_out, tmp_path, llama_run, monkeypatch, capsys):
    out = make_out(tmp_path)
    forbid_model_loading(monkeypatch)
    capsys.readouterr()
    try:
        code, err = cli(predict_main, [f"runs={llama_run}", f"csv={SAMPLE / 'test.csv'}", f"out={out}"], capsys)
    finally:
        if out.parent.name == "read-only":
            out.parent.chmod(0o755)  # so that pytest can clean tmp_path up
    assert code == 1 and err.startswith("error: ") and str(out) in err, err
    assert not out.exists()


# ---------------------------------------------------------------- existing outputs

def test_predict_refuses_an_existing_output_and_replaces_it_with_overwrite(tmp_path, llama_run, monkeypatch, capsys):
    rows = tmp_path / "four.csv"
    pd.read_csv(SAMPLE / "test.csv", dtype=str, keep_default_na=False).head(4).to_csv(rows, index=False)
    out = tmp_path / "pred.csv"
    out.write_text("keep me\n")
    argv = [f"runs={llama_run}", f"csv={rows}", f"out={out}", "infer.tta=false"]

    with monkeypatch.context() as patched:  # the refusal comes before any model loads
        forbid_model_loading(patched)
        code, err = cli(predict_main, argv, capsys)
    assert code == 1 and str(out) in err and "overwrite=true" in err, err
    assert out.read_text() == "keep me\n"

    run_cli(lambda: predict_main([*argv, "overwrite=true"]))  # the real prediction, 4 rows on CPU
    pred = pd.read_csv(out)
    assert pred["id"].tolist() == pd.read_csv(rows)["id"].tolist()
    assert pred[list(LABEL_COLS)].sum(axis=1).round(6).eq(1).all()


def test_folds_refuse_an_existing_output_and_replace_it_with_overwrite(tmp_path, capsys):
    out = tmp_path / "folds.csv"
    out.write_text("id,fold\n1,0\n")
    code, err = cli(folds_main, [f"csv={SAMPLE / 'train.csv'}", f"out={out}"], capsys)
    assert code == 1 and str(out) in err and "overwrite=true" in err, err
    assert out.read_text() == "id,fold\n1,0\n"

    run_cli(lambda: folds_main([f"csv={SAMPLE / 'train.csv'}", f"out={out}", "overwrite=true"]))
    assert len(pd.read_csv(out)) == len(pd.read_csv(SAMPLE / "train.csv"))


# ---------------------------------------------------------------- racing writers

def race(path: Path, payloads: list[bytes], overwrite: bool) -> list[BaseException | None]:
    """Two threads write_file() their payload to `path`; the outcome of each (None = success).

    A barrier inside the write callback holds both writers until each has passed the up-front
    check and written its temporary file, so they really meet at the final move into place.
    """
    barrier = threading.Barrier(len(payloads), timeout=60)
    outcomes: list[BaseException | None] = [None] * len(payloads)

    def writer(k: int) -> None:
        def fill(tmp: Path) -> None:
            tmp.write_bytes(payloads[k])
            barrier.wait()
        try:
            write_file(path, fill, overwrite)
        except BaseException as err:  # reported to the test below
            outcomes[k] = err

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


@pytest.fixture
def payloads() -> list[bytes]:
    return [os.urandom(5 * 2**20), os.urandom(5 * 2**20)]


def test_racing_writers_without_overwrite_leave_the_winners_whole_file(tmp_path, payloads):
    path = tmp_path / "out" / "x.csv"
    outcomes = race(path, payloads, overwrite=False)
    winners = [k for k, err in enumerate(outcomes) if err is None]
    losers = [err for err in outcomes if err is not None]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert isinstance(losers[0], OutputError) and str(path) in str(losers[0])
    assert path.read_bytes() == payloads[winners[0]]
    assert [p.name for p in path.parent.iterdir()] == ["x.csv"]  # no temporary files left beside it


def test_racing_writers_with_overwrite_leave_one_whole_payload(tmp_path, payloads):
    path = tmp_path / "x.csv"
    path.write_bytes(b"old\n")
    outcomes = race(path, payloads, overwrite=True)
    assert outcomes == [None, None]
    assert path.read_bytes() in payloads  # one of them, byte for byte: never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["x.csv"]


# ---------------------------------------------------------------- output folders

def test_output_folder_failing_block_leaves_nothing_behind(tmp_path):
    target = tmp_path / "runs" / "member"
    with pytest.raises(RuntimeError, match="boom"):
        with output_folder(target, overwrite=False) as work:
            (work / "oof.csv").write_text("id\n1\n")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no .member.*.partial left either


def test_output_folder_failing_block_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "member"
    target.mkdir()
    (target / "oof.csv").write_text("old\n")
    with pytest.raises(RuntimeError, match="boom"):
        with output_folder(target, overwrite=True) as work:
            (work / "oof.csv").write_text("new\n")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["member"]
    assert (target / "oof.csv").read_text() == "old\n"

    with output_folder(target, overwrite=True) as work:  # and a block that ends well replaces it
        (work / "oof.csv").write_text("new\n")
    assert [p.name for p in tmp_path.iterdir()] == ["member"]
    assert (target / "oof.csv").read_text() == "new\n"

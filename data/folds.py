"""Assign every training row to a cross-validation fold, once, and write the folds file.

Usage:
  python -m data.folds csv=data/sample/train.csv out=data/sample/folds.csv
  python -m data.folds csv=../shared/data/mtbench_human.csv out=runs/mtbench-folds.csv group_col=question_id

Folds are StratifiedGroupKFold on the label: rows with the same normalised prompt (case and
spacing ignored, see data.io.prompt_key) or, with group_col set, the same value of that column
always share a fold, so no held-out prompt reappears verbatim in training. The output holds only
`id,fold`; everything else (training, OOF scoring, blending) joins on id. An existing folds file
is never overwritten unless overwrite=true: changing folds silently invalidates every OOF score
computed with the old ones.

Extra training data (same CSV format, e.g. AlpacaEval) is added with `add_extra_training_rows`:
it only ever goes into training folds (fold = -1), minus rows whose prompt is also in the
competition data and minus duplicate comparisons.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from cli.config import cli_config, opt, run_cli
from cli.output import OutputError, check_output, write_file
from data.io import DataError, pair_key, prompt_key, read_checked_csv, read_competition_csv

FOLD_COLS = ("id", "fold")
EXTRA_FOLD = -1


@dataclasses.dataclass
class FoldsConfig:
    csv: str = opt("", "competition-format CSV with labels (train.csv or the like)")
    out: str = opt("", "where to write the id,fold CSV")
    n_folds: int = opt(5, "number of folds")
    seed: int = opt(42, "random_state of StratifiedGroupKFold; same seed and data give the same file")
    group_col: str = opt("", "group by this column (e.g. question_id) instead of the normalised prompt hash")
    overwrite: bool = opt(False, "replace an existing folds file (every OOF score made with the old one is void)")
    drop_bad_rows: bool = opt(False, "drop unparseable rows (counted) instead of stopping at them")


def _groups(df: pd.DataFrame, group_col: str) -> pd.Series:
    if not group_col:
        return df["prompt"].map(prompt_key)
    if group_col not in df.columns:
        raise DataError(f"group_col {group_col!r} is not a column; columns are {list(df.columns)}")
    values = df[group_col]
    missing = df["id"][values.isna() | (values.astype(str).str.strip() == "")]
    if len(missing):
        raise DataError(f"group_col {group_col!r} is empty for row id(s) {missing.tolist()[:20]}")
    return values.astype(str)


def make_folds(df: pd.DataFrame, n_folds: int = 5, seed: int = 42, group_col: str = "") -> pd.DataFrame:
    """`id,fold` for every row of `df` (as read by read_competition_csv, with `label`), in df's order."""
    for col in ("id", "label"):
        if col not in df.columns:
            raise DataError(f"make_folds needs column {col!r}; columns are {list(df.columns)}")
    groups = _groups(df, group_col)
    n_groups = groups.nunique()
    if n_folds < 2 or n_groups < n_folds:
        raise DataError(f"n_folds={n_folds} needs 2 <= n_folds <= number of groups ({n_groups})")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(len(df), -1, dtype=int)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(df)), df["label"].to_numpy(), groups.to_numpy())):
        fold[held_out] = k
    return pd.DataFrame({"id": df["id"].to_numpy(), "fold": fold})


def read_folds(path: str | Path) -> pd.DataFrame:
    """Read and check an `id,fold` file: both columns present, ids unique, folds integers."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: folds file not found (make it once with `python -m data.folds csv=... out={path}`)")
    folds = read_checked_csv(path, FOLD_COLS)
    if not pd.api.types.is_integer_dtype(folds["fold"]):
        as_num = pd.to_numeric(folds["fold"], errors="coerce")
        bad = folds["id"][as_num.isna() | (as_num != as_num.round())]
        if len(bad):
            raise DataError(f"{path}: field fold must be an integer; bad row id(s) {bad.tolist()[:20]}")
        folds["fold"] = as_num.astype(int)
    return folds[list(FOLD_COLS)]


def attach_folds(df: pd.DataFrame, folds: pd.DataFrame, path: str | Path = "folds") -> pd.DataFrame:
    """`df` with a `fold` column joined on id; ids of df missing from the folds file are an error."""
    if "fold" in df.columns:
        raise DataError("attach_folds: the frame already has a 'fold' column; refusing to guess which is right")
    missing = df["id"][~df["id"].isin(folds["id"])]
    if len(missing):
        raise DataError(
            f"{path}: {len(missing)} row id(s) have no fold, e.g. {missing.tolist()[:20]}; "
            "the folds file was made from different data (remake it with overwrite=true)"
        )
    out = df.merge(folds[list(FOLD_COLS)], on="id", how="left", validate="one_to_one")
    if not out["id"].equals(df["id"].reset_index(drop=True)):
        raise DataError(f"{path}: join on id changed the row order")
    return out


def add_extra_training_rows(train_df: pd.DataFrame, extra_df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Extra rows fit for training next to `train_df`, with fold = -1, and counts of what was dropped.

    Dropped: rows whose normalised prompt occurs in train_df (else a held-out prompt would be trained
    on through the back door) and repeated comparisons (same prompt and unordered response pair).
    An extra id that is also a competition id is an error: predictions and folds join on id.
    """
    clash = sorted(set(extra_df["id"]) & set(train_df["id"]))
    if clash:
        raise DataError(f"extra data reuses {len(clash)} competition id(s), e.g. {clash[:20]}; ids must be unique")
    seen_prompts = set(train_df["prompt"].map(prompt_key))
    overlap = extra_df["prompt"].map(prompt_key).isin(seen_prompts)
    kept = extra_df[~overlap]
    pairs = [pair_key(p, a, b) for p, a, b in zip(kept["prompt"], kept["response_a"], kept["response_b"])]
    dup = pd.Series(pairs, index=kept.index).duplicated()
    kept = kept[~dup].copy()
    kept["fold"] = EXTRA_FOLD
    stats = {
        "extra_rows": len(extra_df),
        "dropped_prompt_overlap": int(overlap.sum()),
        "dropped_duplicate_pairs": int(dup.sum()),
        "kept": len(kept),
    }
    return kept.reset_index(drop=True), stats


def fold_table(df: pd.DataFrame, folds: pd.DataFrame) -> str:
    """Rows and class shares per fold, for the log."""
    joined = attach_folds(df[["id", "label"]], folds)
    lines = ["fold   rows  a_win  b_win    tie"]
    for k, part in joined.groupby("fold"):
        shares = np.bincount(part["label"], minlength=3) / len(part)
        lines.append(f"{k:>4} {len(part):>6} " + " ".join(f"{s:>6.1%}" for s in shares))
    shares = np.bincount(joined["label"], minlength=3) / len(joined)
    lines.append(f"{'all':>4} {len(joined):>6} " + " ".join(f"{s:>6.1%}" for s in shares))
    return "\n".join(lines)


def _refuse_overwrite(out: Path, overwrite: bool) -> Path:
    try:
        return check_output(out, overwrite)
    except OutputError:
        if out.is_file() and not overwrite:  # say what replacing it costs
            raise OutputError(f"{out} already exists; folds are made once and read by everything. "
                              "Pass overwrite=true to replace it (and redo every OOF score made with it).") from None
        raise


def write_folds(folds: pd.DataFrame, out: Path, overwrite: bool) -> None:
    _refuse_overwrite(out, overwrite)
    # Written next to the target, then renamed: a crash never leaves a half-written folds file.
    write_file(out, lambda tmp: folds.to_csv(tmp, index=False, lineterminator="\n"), overwrite)


def run(cfg: FoldsConfig) -> pd.DataFrame:
    if not cfg.csv or not cfg.out:
        raise DataError("both csv= and out= are required (see --help)")
    out = Path(cfg.out)
    _refuse_overwrite(out, cfg.overwrite)  # before the slow part, not after it
    df, report = read_competition_csv(cfg.csv, labels=True, drop_bad_rows=cfg.drop_bad_rows)
    print(report.summary())
    folds = make_folds(df, cfg.n_folds, cfg.seed, cfg.group_col)
    write_folds(folds, out, cfg.overwrite)
    groups = _groups(df, cfg.group_col).nunique()
    print(f"{len(df)} rows in {groups} groups ({cfg.group_col or 'normalised prompt'}) -> {cfg.n_folds} folds")
    print(fold_table(df, folds))
    print(f"wrote {out}")
    return folds


def main(argv: list[str] | None = None) -> None:
    run(cli_config(FoldsConfig, __doc__, argv))


if __name__ == "__main__":
    run_cli(main)

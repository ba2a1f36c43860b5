"""Reading and validating every CSV the repo takes in: competition files, folds, sample submissions, predictions.

Files are UTF-8 (a BOM is fine) or gzip (recognised by content, whatever the name); empty,
header-only, undecodable or unparseable files, missing columns, and blank, non-integer or repeated
ids are errors that name the file (and the lines), raised before any model loads.

prompt / response cells are JSON lists with one string per turn. They are parsed with
`json.loads` (never `eval`); `null` turns become "" and lone UTF-16 surrogates become U+FFFD,
both counted in the returned `ParseReport`. Turns stay turns: the formatter sees every one.
Bad rows are collected and reported together, naming file, row id and field; they are only
dropped when the caller asks for it (`drop_bad_rows=True`), and then counted.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from cli.config import UserError

TEXT_COLS = ("prompt", "response_a", "response_b")
LABEL_COLS = ("winner_model_a", "winner_model_b", "winner_tie")
TRAIN_COLS = ("id", *TEXT_COLS, *LABEL_COLS)
TEST_COLS = ("id", *TEXT_COLS)
# Swapping A and B maps class [a wins, b wins, tie] -> [b wins, a wins, tie].
SWAP_PERM = [1, 0, 2]
# Optional per-row training weight (pseudo-labels: python -m train.pseudo); rows without it weigh 1.
WEIGHT_COL = "weight"


class DataError(UserError, ValueError):
    """Input data that cannot be used as is; the message names file, row id and field."""


@dataclasses.dataclass
class ParseReport:
    path: str
    rows: int = 0
    null_turns: int = 0
    surrogate_cells: int = 0
    mismatched_turn_rows: int = 0
    multi_turn_rows: int = 0
    dropped_rows: int = 0

    def summary(self) -> str:
        return (
            f"{self.path}: {self.rows} rows ({self.multi_turn_rows} multi-turn, "
            f"{self.mismatched_turn_rows} with differing turn counts); null turns -> '': {self.null_turns}; "
            f"cells with lone surrogates cleaned: {self.surrogate_cells}; bad rows dropped: {self.dropped_rows}"
        )


def clean_surrogates(text: str) -> str:
    """Join valid surrogate pairs into their character and replace lone ones with U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def parse_turns(cell: object) -> tuple[list[str], int, bool]:
    """Parse one JSON-list cell -> (turns, null count, surrogates cleaned). Raises ValueError."""
    if not isinstance(cell, str):
        raise ValueError(f"expected a JSON list string, got {type(cell).__name__} {cell!r}")
    try:
        value = json.loads(cell)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at char {err.pos}): {cell[:80]!r}") from None
    if not isinstance(value, list):
        raise ValueError(f"expected a JSON list of strings, got {type(value).__name__}: {cell[:80]!r}")
    turns, nulls, cleaned = [], 0, False
    for i, turn in enumerate(value):
        if turn is None:
            nulls += 1
            turn = ""
        elif not isinstance(turn, str):
            raise ValueError(f"turn {i} is {type(turn).__name__}, expected string or null")
        fixed = clean_surrogates(turn)
        cleaned |= fixed != turn
        turns.append(fixed)
    return turns, nulls, cleaned


def read_competition_csv(
    path: str | Path,
    *,
    labels: bool | None = None,
    soft_labels: bool = False,
    drop_bad_rows: bool = False,
    drop_hint: str = "--drop-bad-rows",
) -> tuple[pd.DataFrame, ParseReport]:
    """Read a train/test CSV into a frame with list-valued text columns.

    labels: require the winner columns (True), ignore them (False), or use them when present (None).
    soft_labels: accept fractional winner columns that sum to 1 (pseudo-labels) instead of one-hot.
    drop_hint: how the caller's CLI spells "drop bad rows", quoted in the error message.
    Returns the frame (extra columns kept, `label` = int class, `target` = 3 floats) and the report.
    A `weight` column (WEIGHT_COL) of a labelled file is read as a finite number >= 0 per row.
    """
    path = Path(path)
    df = read_checked_csv(path, ["id", *TEXT_COLS], what="competition CSV", dtype={c: "str" for c in TEXT_COLS},
                          keep_default_na=False, na_values=[])
    present = [c for c in LABEL_COLS if c in df.columns]
    if labels is None and 0 < len(present) < len(LABEL_COLS):
        raise DataError(f"{path}: label column(s) {[c for c in LABEL_COLS if c not in present]} missing while "
                        f"{present} are there; give all three (train format) or none (test format)")
    has_labels = len(present) == len(LABEL_COLS) if labels is None else labels
    if has_labels:
        check_columns(df, TRAIN_COLS, path)

    report = ParseReport(path=str(path), rows=len(df))
    errors: list[str] = []
    bad: set[int] = set()
    parsed = {c: [] for c in TEXT_COLS}
    for pos, row in enumerate(df[["id", *TEXT_COLS]].itertuples(index=False)):
        turn_counts = []
        for col, cell in zip(TEXT_COLS, row[1:]):
            try:
                turns, nulls, cleaned = parse_turns(cell)
            except ValueError as err:
                errors.append(f"{path}: row id={row[0]} field {col}: {err}")
                bad.add(pos)
                turns, nulls, cleaned = [], 0, False
            report.null_turns += nulls
            report.surrogate_cells += cleaned
            parsed[col].append(turns)
            turn_counts.append(len(turns))
        if pos not in bad:  # an unparseable cell stands in as [], which is no real turn count
            report.mismatched_turn_rows += len(set(turn_counts)) > 1
            report.multi_turn_rows += max(turn_counts) > 1
    for col in TEXT_COLS:
        df[col] = pd.Series(parsed[col], index=df.index, dtype=object)

    if has_labels:
        target, label_errors = _read_labels(df, soft_labels)
        for pos, message in label_errors:
            errors.append(f"{path}: row id={df['id'].iloc[pos]} field {'/'.join(LABEL_COLS)}: {message}")
            bad.add(pos)
        df["target"] = list(target)
        df["label"] = target.argmax(1)
        if WEIGHT_COL in df.columns:
            weight = pd.to_numeric(df[WEIGHT_COL], errors="coerce").to_numpy(dtype=float)
            for pos in np.flatnonzero(~np.isfinite(weight) | (weight < 0)):
                errors.append(f"{path}: row id={df['id'].iloc[pos]} field {WEIGHT_COL}: must be a finite number >= 0, "
                              f"got {df[WEIGHT_COL].iloc[pos]!r}")
                bad.add(pos)
            df[WEIGHT_COL] = weight

    if errors and not drop_bad_rows:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DataError(
            f"{path}: {len(bad)} bad row(s); fix them or pass {drop_hint} to drop them:\n  {shown}{more}"
        )
    if bad:
        df = df.drop(index=df.index[sorted(bad)])
        report.dropped_rows = len(bad)
    return df.reset_index(drop=True), report


def _read_labels(df: pd.DataFrame, soft: bool) -> tuple[np.ndarray, list[tuple[int, str]]]:
    raw = df[list(LABEL_COLS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    errors = []
    for pos, values in enumerate(raw):
        if any(math.isnan(v) for v in values):
            errors.append((pos, f"non-numeric value in {df[list(LABEL_COLS)].iloc[pos].tolist()}"))
        elif soft:
            if values.min() < 0 or abs(values.sum() - 1) > 1e-6:
                errors.append((pos, f"soft labels must be >= 0 and sum to 1, got {values.tolist()}"))
        elif not (set(values.tolist()) <= {0.0, 1.0} and values.sum() == 1):
            errors.append((pos, f"exactly one winner column must be 1, got {values.tolist()}"))
    return np.nan_to_num(raw), errors


def check_columns(df: pd.DataFrame, required, path: Path) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")


GZIP_MAGIC = b"\x1f\x8b"


def csv_text(path: Path) -> str:
    """The text of a CSV file: UTF-8 with or without a BOM, gzip recognised by its content (whatever its
    name); anything else is a DataError naming the file."""
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: gzip-compressed but cannot be decompressed ({err})") from None
    if not raw.strip():
        raise DataError(f"{path}: empty file; expected a CSV with a header row")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not a UTF-8 CSV (byte {err.start}: {raw[err.start:err.start + 8]!r}); "
                        "save it as UTF-8, or gzip it") from None


def read_checked_csv(path: str | Path, required, what: str = "CSV", **read_kwargs) -> pd.DataFrame:
    """A CSV with the `required` columns and at least one row, whose ids are unique integers; every
    error names the file (and the rows, where there are some)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: " + ("a folder, not a file" if path.is_dir() else "file not found") + f" (expected a {what})")
    text = csv_text(path)
    read_kwargs = {**read_kwargs, "dtype": {**read_kwargs.get("dtype", {}), "id": str}}  # see integer_ids
    try:
        df = pd.read_csv(io.StringIO(text), **read_kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise DataError(f"{path}: not a readable CSV ({str(err).strip().splitlines()[-1]})") from None
    check_columns(df, required, path)
    if df.empty:
        raise DataError(f"{path}: a header ({', '.join(map(str, df.columns))}) but no rows")
    df["id"] = integer_ids(df["id"], path)
    dup = df["id"][df["id"].duplicated(keep=False)]
    if len(dup):
        raise DataError(f"{path}: duplicate ids {sorted(set(dup.tolist()))[:20]} ({dup.nunique()} ids repeated)")
    return df


def integer_ids(ids: pd.Series, path: Path) -> pd.Series:
    """ids (read as text) as int64; blank, NaN, non-integer or out-of-range ids are an error naming their
    lines (the header is line 1). Read as text, so no id passes through a float and loses digits."""
    text = ids.astype(str).str.strip()
    digits = text.str.extract(r"^([+-]?\d+)(?:\.0*)?$", expand=False)  # 12 or 12.0; not 1.5, 1e3, nan, ''
    values = [int(d) if isinstance(d, str) and -2**63 <= int(d) < 2**63 else None for d in digits]
    bad = pd.Series([v is None for v in values], index=ids.index)
    if bad.any():
        raw = ["" if pd.isna(v) else v for v in ids[bad].tolist()[:10]]  # a blank cell reads as NaN
        shown = [f"line {pos + 2}: {value!r}" for pos, value in zip(np.flatnonzero(bad)[:10], raw)]
        raise DataError(f"{path}: field id must be an integer in every row; {int(bad.sum())} row(s) are not: "
                        + ", ".join(shown))
    return pd.Series(values, index=ids.index, dtype="int64")


def read_sample_submission(path: str | Path, ids: pd.Series | None = None) -> pd.DataFrame:
    """sample_submission.csv; with `ids` (the rows to be scored) its id set must equal theirs, checked
    before any scoring."""
    df = read_checked_csv(path, ("id", *LABEL_COLS), what="sample submission")
    if ids is not None:
        missing, extra = set(ids) - set(df["id"]), set(df["id"]) - set(ids)
        if missing or extra:
            raise DataError(f"{path}: ids differ from the rows to score: {len(extra)} not among them "
                            f"{sorted(extra)[:10]}, {len(missing)} of them absent {sorted(missing)[:10]}")
    return df


def targets_by_id(df: pd.DataFrame, ids) -> np.ndarray:
    """The (n, 3) target rows of `df` for `ids`, looked up by id (never by position)."""
    return np.stack(df.set_index("id").loc[list(ids), "target"].to_numpy())


def prompt_key(turns: list[str]) -> str:
    """Hash of a prompt normalised for grouping: case and whitespace inside a turn do not matter
    (turn boundaries do). Only prompts equal after this normalisation share a group."""
    text = "\n".join(" ".join(t.lower().split()) for t in turns)
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def pair_key(prompt: list[str], a: list[str], b: list[str]) -> str:
    """Hash of (prompt, unordered response pair): the same comparison in either A/B order."""
    sides = sorted(prompt_key(r) for r in (a, b))
    return hashlib.sha1("|".join([prompt_key(prompt), *sides]).encode()).hexdigest()[:16]

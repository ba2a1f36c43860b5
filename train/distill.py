"""Teacher probabilities for distillation (`train.distill_from`), and the one join of probabilities to rows by id.

A teacher is a CSV of id + 3 probabilities (an `infer predict` output, an OOF file, `infer ensemble`'s
out/oof.csv), or a member directory: `runs/<name>` / `runs/<name>@<seed>` from `python -m train
<cfg> fold=all` gives its `oof-seed<seed>.csv` (the seed may be left out when there is only one),
a `python -m train.length` or `python -m infer ensemble` folder its `oof.csv`. Only out-of-fold
files are read, never a fold run's predictions on its own training rows: a training row's teacher
probability must come from a model that did not train on that row, or the student learns the
teacher's memorised labels (over-confident, near the hard label) instead of its judgement. The
all-fold `oof-seed<seed>.csv` is used rather than the fold runs' `oof.csv` files because it holds
the same numbers and exists only once every fold finished, so a half-trained teacher cannot be
picked up. Every training row must have a teacher probability: missing ids stop the run, named.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from cli.config import ConfigError
from data.io import LABEL_COLS, DataError
from infer.ensemble import verified_member_oof
from infer.metrics import read_probs, some_ids
from model.files import sha256_file


def teacher_file(spec: str) -> Path:
    """The out-of-fold probability file `train.distill_from` names (a file, or a member directory)."""
    head, sep, tail = spec.rpartition("@")
    seed = int(tail) if sep and tail.isdigit() else None
    path = Path(head if seed is not None else spec)
    if path.is_file() and seed is None:
        return path
    if not path.is_dir():
        raise ConfigError(f"train.distill_from={spec}: no such file or member directory")
    if seed is not None:
        oof = path / f"oof-seed{seed}.csv"
        if not oof.is_file():
            raise ConfigError(f"train.distill_from={spec}: {oof} not found (run `python -m train <cfg> fold=all seed={seed}`)")
        return oof
    seeds = sorted(path.glob("oof-seed*.csv"), key=lambda p: p.name)
    seeds = [p for p in seeds if re.fullmatch(r"oof-seed\d+\.csv", p.name)]
    if len(seeds) == 1:
        return seeds[0]
    if len(seeds) > 1:
        raise ConfigError(f"train.distill_from={spec}: holds {[p.name for p in seeds]}; pick one as {spec}@<seed>")
    if (path / "oof.csv").is_file():  # train.length or infer ensemble folder: out of fold by construction
        return path / "oof.csv"
    raise ConfigError(f"train.distill_from={spec}: a folder without oof-seed<seed>.csv (a finished fold=all) or oof.csv "
                      "(train.length, infer ensemble); a single fold run's oof.csv covers only its held-out rows")


def teacher_digest(spec: str) -> str:
    """The teacher file by content, for the fold's recorded settings (a changed teacher retrains)."""
    return f"sha256:{sha256_file(teacher_file(spec))}"


def probs_for_ids(pred: pd.DataFrame, ids, source: str, what: str, exact: bool = False) -> np.ndarray:
    """(n, 3) probabilities of `pred` for `ids`, looked up by id (never by position). Ids of `ids` that
    `pred` lacks are an error naming them; with exact=True so are ids of `pred` not among `ids`."""
    ids = pd.Series(ids)
    have = set(pred["id"])
    missing = ids[~ids.isin(have)]
    extra = sorted(have - set(ids)) if exact else []
    if len(missing) or extra:
        parts = []
        if len(missing):
            parts.append(f"{len(missing)} {what} id(s) have no probabilities there: {some_ids(missing)}")
        if extra:
            parts.append(f"{len(extra)} id(s) there are not {what} ids: {extra[:20]}")
        raise DataError(f"{source}: " + "; ".join(parts))
    values = pred.set_index("id").loc[ids.tolist(), list(LABEL_COLS)].to_numpy(dtype=np.float64)
    return values / values.sum(axis=1, keepdims=True)


def attach_teacher(frames: list[pd.DataFrame], spec: str, needed: pd.Series) -> list[pd.DataFrame]:
    """`frames` with a `teacher` column (3 probabilities per row, None where the teacher has no row);
    the ids in `needed` (the rows that will be trained on) must all have one, else the run stops here."""
    path = teacher_file(spec)
    seed = re.fullmatch(r"oof-seed(\d+)\.csv", path.name)
    runs = sorted(p.name for p in path.parent.glob(f"fold*-seed{seed[1]}") if p.is_dir()) if seed else []
    # a run member's fold=all file: taken only once its fold runs verify and it holds exactly their OOF rows
    teacher = verified_member_oof(path.parent, runs, path) if runs else read_probs(path)
    probs_for_ids(teacher, needed, f"train.distill_from={spec} ({path})", "training row")
    table = dict(zip(teacher["id"], teacher[list(LABEL_COLS)].to_numpy(dtype=np.float64)))
    out = []
    for frame in frames:
        frame = frame.copy()
        frame["teacher"] = [None if (p := table.get(i)) is None else p / p.sum() for i in frame["id"]]
        out.append(frame)
    print(f"train.distill_from: teacher probabilities from {path} for {len(needed)} training row(s)")
    return out

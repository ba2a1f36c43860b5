"""Score a competition CSV with one or more run folders: the same code for CV (OOF) and Kaggle.

Usage:
    python -m infer predict runs=runs/gemma2-9b-qlora/fold0-seed42 csv=test.csv \\
        sample_submission=sample_submission.csv out=submission.csv [infer.workers=2] [infer.tta=true]
    python -m infer predict runs=RUN csv=train.csv folds=folds.csv fold=0 out=oof0.csv

Every run folder is verified file by file against its manifest before any model loads. Rows are
formatted by the run's own saved formatter settings and tokenizer, sorted by length, cut into
token-budget batches, spread over N workers (one per GPU, or N CPU processes) by token count, and
scored. `infer.KEY=VALUE` overrides the inference settings each run saved (the ones its OOF was
scored with), key by key. On Ampere or newer GPUs batches are packed (rows end to end, no padding,
attention kept inside each row: model/packing.py) and LoRA is merged into bf16/fp16 weights; on
CPU and T4 rows are right-padded (infer.layout=packed|padded overrides); on compute capability 7.x
(or infer.profile=t4) only sm75 kernels run (model/hardware.py prints what was chosen and why). Swap TTA scores each row a
second time with A and B exchanged. Everything is merged by id (never by position): swapped
probabilities are permuted back, TTA passes and runs are averaged, rows are renormalised to sum to
1. With winner columns present the log loss is printed; with `sample_submission` the output
follows its id order and must cover the same ids.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import expit

from cli.config import ConfigError, UserError, cli_config, opt, run_cli
from cli.output import check_output, write_file
from data.io import LABEL_COLS, SWAP_PERM, DataError, read_competition_csv, read_sample_submission, targets_by_id
from infer.length import ABSENT_CLASS_PROB
from infer.metrics import log_loss, softmax
from infer.scoring import plan_batches, run_shares, split_batches, unbatch
from model.factory import base_model_type, pick_device
from model.hardware import device_capability, resolve_components
from model.run import Run, load_run
from model.settings import InferSettings
from model.tokens import encode_rows


@dataclasses.dataclass
class PredictConfig:
    runs: list[str] = opt([], "run folders (each holds adapter/, tokenizer/, config.yaml, manifest.json)")
    csv: str = opt("", "competition-format CSV to score (test.csv, or train.csv with folds/fold)")
    out: str = opt("submission.csv", "where to write id + 3 probabilities")
    overwrite: bool = opt(False, "replace `out` if it exists")
    sample_submission: str = opt("", "if set, output follows its id order and must cover exactly its ids")
    folds: str = opt("", "folds file (id,fold): with `fold`, score only that fold's rows")
    fold: int = opt(-1, "fold to score (needs `folds`); -1 scores every row")
    infer_max_length: int | None = opt(None, "max tokens per row at inference; unset: as the run's format config says")
    drop_bad_rows: bool = opt(False, "drop rows that fail validation (counted) instead of stopping")
    infer: InferSettings = dataclasses.field(default_factory=InferSettings, metadata={
        "help": "inference settings; only the keys given override each run's saved ones"})


class ScoringError(UserError, RuntimeError):
    """A model produced unusable scores (e.g. NaN from fp16 overflow)."""


def score_run(run: Run, df: pd.DataFrame) -> pd.DataFrame:
    """Per-(id, swap) probabilities of one run, already mapped back to the unswapped order.

    A Bradley-Terry run scores each side alone (prompt + one response): its rows have no A/B order,
    so swap TTA would repeat the same numbers and is not run (swap is False on every row).
    """
    formatter = run.formatter()
    reward = run.objective["name"] == "bradley_terry"
    passes = score_passes(run)
    seqs, ids = [], []
    for kw in passes:
        seqs += encode_rows(formatter, df, inference=True, desc="rows to score", **kw)
        ids += df["id"].tolist()
    lengths = list(map(len, seqs))
    device = pick_device(run.infer.device)
    components = resolve_components(device_capability(device), base_model_type(run.model), run.model, run.infer)
    print(f"{run.path}: {components.describe()}\n  " + "\n  ".join(components.notes))
    layout = components.layout
    batches, costs = plan_batches(lengths, components.infer, layout)
    per_worker = components.infer.pipeline  # GPUs one worker's model spans
    n_workers = run.infer.workers or (max(1, torch.cuda.device_count() // per_worker) if device.type == "cuda" else 1)
    if device.type == "cuda" and n_workers * per_worker > torch.cuda.device_count():
        raise ConfigError(f"infer.workers={n_workers} x infer.pipeline={per_worker} GPUs but only "
                          f"{torch.cuda.device_count()} GPU(s) are visible")
    shares = [s for s in split_batches(batches, costs, n_workers) if s]
    results = run_shares(run.path, components.model, components.infer, [[[seqs[i] for i in b] for b in share] for share in shares],
                         formatter.pad_id, layout, device.type)
    logits = unbatch([b for share in shares for b in share], [p for parts, _ in results for p in parts], len(seqs))
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        raise ScoringError(
            f"{run.path}: non-finite logits for {bad.sum()} row(s), ids {sorted(set(np.asarray(ids)[bad].tolist()))[:10]}; "
            f"with compute_dtype={components.model.compute_dtype} this is usually fp16 overflow: try infer.compute_dtype=bfloat16 or float32"
        )
    if reward:
        rewards = logits[:, 0].astype(np.float64)
        probs = reward_probs(rewards[: len(df)], rewards[len(df):], run.objective["tie_rate"])
        return pd.DataFrame({"id": df["id"].tolist(), "swap": False, **{c: probs[:, k] for k, c in enumerate(LABEL_COLS)}})
    probs = softmax(logits.astype(np.float64))
    swapped = np.repeat([kw["swap"] for kw in passes], len(df)).astype(bool)
    probs[swapped] = probs[swapped][:, SWAP_PERM]
    return pd.DataFrame({"id": ids, "swap": swapped, **{c: probs[:, k] for k, c in enumerate(LABEL_COLS)}})


def score_passes(run: Run) -> list[dict]:
    """encode_rows' arguments for each pass over the rows: plain (+ swapped with TTA), or a reward run's two sides."""
    if run.objective["name"] == "bradley_terry":
        return [{"side": "a"}, {"side": "b"}]
    return [{"swap": swap} for swap in ([False, True] if run.infer.tta else [False])]


def reward_probs(reward_a: np.ndarray, reward_b: np.ndarray, tie_rate: float) -> np.ndarray:
    """Bradley-Terry: P(A) = (1-τ)σ(r_A - r_B), P(B) = (1-τ)σ(r_B - r_A), P(tie) = τ, the training rows' tie
    rate (ABSENT_CLASS_PROB when they had none, as for any class a model never saw)."""
    tau = max(tie_rate, ABSENT_CLASS_PROB)
    p_a = expit(reward_a - reward_b)
    return np.stack([(1 - tau) * p_a, (1 - tau) * (1 - p_a), np.full_like(p_a, tau)], axis=1)


def merge_by_id(frames: list[pd.DataFrame], ids: pd.Series) -> pd.DataFrame:
    """Average probability rows sharing an id; output in the order of `ids`, each id exactly once."""
    stacked = pd.concat(frames, ignore_index=True)
    merged = stacked.groupby("id", sort=False)[list(LABEL_COLS)].mean()
    missing = set(ids) - set(merged.index)
    extra = set(merged.index) - set(ids)
    if missing or extra:
        raise DataError(f"predictions do not cover the requested ids: missing {sorted(missing)[:10]}, extra {sorted(extra)[:10]}")
    merged = merged.loc[list(ids)]
    merged = merged.div(merged.sum(axis=1), axis=0)
    return merged.reset_index()


def predict_frame(runs: list[Run], df: pd.DataFrame, passes: list[pd.DataFrame] | None = None) -> pd.DataFrame:
    """id + 3 probabilities for every row of `df` (rows as returned by read_competition_csv).

    If `passes` is a list, each run's per-(id, swap) scores are appended to it (position-bias reports).
    """
    if not runs:
        raise ConfigError("no run folders given (runs=DIR[,DIR...])")
    per_run = []
    for run in runs:
        scored = score_run(run, df)
        if passes is not None:
            passes.append(scored)
        # TTA passes are averaged within each run first, so a run scored with TTA weighs as much as one without.
        per_run.append(merge_by_id([scored], df["id"]))
    return merge_by_id(per_run, df["id"])


def select_fold(df: pd.DataFrame, folds_path: str, fold: int) -> pd.DataFrame:
    from data.folds import attach_folds, read_folds

    df = attach_folds(df, read_folds(folds_path), folds_path)
    if fold not in set(df["fold"]):
        raise DataError(f"fold {fold} not in {folds_path} (folds: {sorted(set(df['fold']))})")
    return df[df["fold"] == fold].reset_index(drop=True)


def write_predictions(pred: pd.DataFrame, path: Path, overwrite: bool = True) -> None:
    """id + 3 probabilities, written atomically (cli.output.write_file); overwrite=False never replaces a file."""
    write_file(path, lambda tmp: pred.to_csv(tmp, index=False, float_format="%.9g"), overwrite)


def main(argv: list[str] | None = None) -> None:
    cfg, given = cli_config(PredictConfig, __doc__, argv, given=True)
    if not cfg.csv or not cfg.runs:
        raise ConfigError("csv= and runs= are required (see python -m infer predict --help)")
    if (cfg.folds != "") != (cfg.fold >= 0):
        raise ConfigError("folds= and fold= go together")
    if cfg.drop_bad_rows and cfg.sample_submission:
        raise ConfigError("drop_bad_rows cannot be combined with sample_submission: every id needs a prediction")
    out = check_output(cfg.out, cfg.overwrite)  # before hours of scoring, not after
    runs = [load_run(Path(r), (given.get("infer") or {}), cfg.infer_max_length) for r in cfg.runs]
    df, report = read_competition_csv(cfg.csv, drop_bad_rows=cfg.drop_bad_rows)
    print(report.summary())
    if cfg.folds:
        df = select_fold(df, cfg.folds, cfg.fold)
    order = read_sample_submission(cfg.sample_submission, df["id"])["id"] if cfg.sample_submission else None
    pred = predict_frame(runs, df)
    if order is not None:
        pred = merge_by_id([pred], order)
    write_predictions(pred, out, cfg.overwrite)
    print(f"wrote {len(pred)} rows to {cfg.out}")
    if "target" in df:
        truth = targets_by_id(df, pred["id"])
        print(f"log loss: {log_loss(truth, pred[list(LABEL_COLS)].to_numpy()):.5f} on {len(pred)} rows")


if __name__ == "__main__":
    run_cli(main)

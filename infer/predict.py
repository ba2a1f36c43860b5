"""Score a competition CSV with one or more run folders: the same code for CV (OOF) and Kaggle.

Usage:
    python -m infer predict runs=runs/gemma2-9b-qlora/fold0-seed42 csv=test.csv \\
        sample_submission=sample_submission.csv out=submission.csv [workers=2] [tta=true]
    python -m infer predict runs=RUN csv=train.csv folds=folds.csv fold=0 out=oof0.csv

Rows are formatted by the run's own saved formatter settings and tokenizer, sorted by length,
cut into token-budget batches, spread over N workers (one per GPU, or N CPU processes) by token
count, and scored. On Ampere or newer GPUs batches are packed (rows end to end, no padding,
attention kept inside each row: infer/packing.py) and LoRA is merged into bf16/fp16 weights;
on CPU and T4 rows are right-padded (layout=packed|padded overrides). Swap TTA scores each
row a second time with A and B exchanged. Everything is merged by id (never by position): swapped probabilities are permuted back, TTA passes and runs
are averaged, rows are renormalised to sum to 1. With winner columns present the log loss is
printed; with `sample_submission` the output follows its id order and must cover the same ids.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from data.config import ConfigError, UserError, cli_config, from_dict, opt, run_cli
from data.formatter import FORMATTER_VERSION, FormatConfig, Formatter
from data.io import LABEL_COLS, SWAP_PERM, DataError, read_competition_csv, read_sample_submission, targets_by_id
from infer.fp8 import check_fp8_settings
from infer.model import AdapterError, ModelConfig, check_base, pick_device
from infer.packing import resolve_layout
from infer.scoring import InferSettings, plan_batches, run_shares, split_batches, unbatch


@dataclasses.dataclass
class PredictConfig:
    runs: list[str] = opt([], "run folders (each holds adapter/, tokenizer/, config.yaml, manifest.json)")
    csv: str = opt("", "competition-format CSV to score (test.csv, or train.csv with folds/fold)")
    out: str = opt("submission.csv", "where to write id + 3 probabilities")
    sample_submission: str = opt("", "if set, output follows its id order and must cover exactly its ids")
    folds: str = opt("", "folds file (id,fold): with `fold`, score only that fold's rows")
    fold: int = opt(-1, "fold to score (needs `folds`); -1 scores every row")
    tta: bool | None = opt(None, "swap TTA on/off; unset: as the run's config says")
    workers: int | None = opt(None, "worker count; unset: as the run's config says")
    token_budget: int | None = opt(None, "batch token budget; unset: as the run's config says")
    max_rows: int | None = opt(None, "max rows per batch (padded layout); unset: as the run's config says")
    layout: str = opt("", "auto | packed | padded; empty: as the run's config says")
    merge_lora: bool | None = opt(None, "merge LoRA into unquantised weights; unset: as the run's config says")
    fp8: bool | None = opt(None, "fp8 e4m3 decoder projections (H100/L4 class GPUs); unset: as the run's config says")
    compile: bool | None = opt(None, "torch.compile the decoder layers; unset: as the run's config says")
    device: str = opt("", "auto | cpu | cuda; empty: as the run's config says")
    infer_max_length: int | None = opt(None, "max tokens per row at inference; unset: as the run's format config says")
    base_path: str = opt("", "base model folder to use instead of the one recorded in the run (e.g. on Kaggle)")
    quantization: str = opt("", "4bit | 8bit | none for inference; empty: as trained")
    compute_dtype: str = opt("", "float32 | bfloat16 | float16 for inference; empty: as trained")
    drop_bad_rows: bool = opt(False, "drop rows that fail validation (counted) instead of stopping")


class ScoringError(UserError, RuntimeError):
    """A model produced unusable scores (e.g. NaN from fp16 overflow)."""


@dataclasses.dataclass
class Run:
    path: Path
    model: ModelConfig
    format: FormatConfig
    infer: InferSettings
    manifest: dict


def load_run(path: Path, overrides: PredictConfig | None = None, need_base: bool = True) -> Run:
    """Read a run folder's resolved config and manifest, applying inference-time overrides.

    need_base=False is for tools that only use the saved settings and tokenizer (infer plan).
    """
    path = Path(path)
    for need in ("config.yaml", "manifest.json", "tokenizer", *(("adapter",) if need_base else ())):
        if not (path / need).exists():
            raise FileNotFoundError(f"{path}: not a complete run folder ({need} missing)")
    raw = yaml.safe_load((path / "config.yaml").read_text())
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest["formatter"]["version"] != FORMATTER_VERSION:
        raise AdapterError(
            f"{path}: trained with formatter version {manifest['formatter']['version']}, this code has "
            f"{FORMATTER_VERSION}; token ids would differ from training"
        )
    run = Run(
        path,
        from_dict(ModelConfig, raw["model"], f"{path}/config.yaml:model"),
        from_dict(FormatConfig, raw["format"], f"{path}/config.yaml:format"),
        from_dict(InferSettings, raw["infer"], f"{path}/config.yaml:infer"),
        manifest,
    )
    if overrides is not None:
        model_changes = {k: getattr(overrides, k) for k in ("quantization", "compute_dtype") if getattr(overrides, k)}
        if overrides.base_path:
            model_changes["path"] = overrides.base_path
        infer_keys = ("tta", "workers", "token_budget", "max_rows", "merge_lora", "fp8", "compile")
        infer_changes = {k: getattr(overrides, k) for k in infer_keys if getattr(overrides, k) is not None}
        for key in ("device", "layout"):
            if getattr(overrides, key):
                infer_changes[key] = getattr(overrides, key)
        try:
            if overrides.infer_max_length is not None:
                run.format = dataclasses.replace(run.format, infer_max_length=overrides.infer_max_length)
            run.model = dataclasses.replace(run.model, **model_changes)
            run.infer = dataclasses.replace(run.infer, **infer_changes)
        except ValueError as err:
            raise ConfigError(f"{path}: {err}") from None
    if run.infer.fp8:
        try:
            check_fp8_settings(run.model.quantization, run.model.compute_dtype)
        except ValueError as err:
            raise ConfigError(f"{path}: {err}") from None
    if need_base:
        check_base(run.model)
    return run


def run_formatter(run: Run) -> Formatter:
    """The formatter exactly as the run was trained with: its saved tokenizer and format settings."""
    from transformers import AutoTokenizer

    return Formatter(AutoTokenizer.from_pretrained(run.path / "tokenizer", local_files_only=True), run.format)


def score_run(run: Run, df: pd.DataFrame) -> pd.DataFrame:
    """Per-(id, swap) probabilities of one run, already mapped back to the unswapped order."""
    formatter = run_formatter(run)
    passes = [False, True] if run.infer.tta else [False]
    seqs, ids, swaps = [], [], []
    for swap in passes:
        seqs += formatter.encode_batch(df["prompt"], df["response_a"], df["response_b"], swap=swap, inference=True)
        ids += df["id"].tolist()
        swaps += [swap] * len(df)
    lengths = list(map(len, seqs))
    device = pick_device(run.infer.device)
    layout = resolve_layout(run.infer.layout, device)
    batches, costs = plan_batches(lengths, run.infer, layout)
    n_workers = run.infer.workers or (torch.cuda.device_count() if device.type == "cuda" else 1)
    if device.type == "cuda" and n_workers > torch.cuda.device_count():
        raise ConfigError(f"workers={n_workers} but only {torch.cuda.device_count()} GPU(s) are visible")
    shares = [s for s in split_batches(batches, costs, n_workers) if s]
    results = run_shares(run.path, run.model, run.infer, [[[seqs[i] for i in b] for b in share] for share in shares],
                         formatter.pad_id, layout, device.type)
    logits = unbatch([b for share in shares for b in share], [p for parts, _ in results for p in parts], len(seqs))
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        raise ScoringError(
            f"{run.path}: non-finite logits for {bad.sum()} row(s), ids {sorted(set(np.asarray(ids)[bad]))[:10]}; "
            f"with compute_dtype={run.model.compute_dtype} this is usually fp16 overflow: try bfloat16 or float32"
        )
    probs = softmax(logits.astype(np.float64))
    swapped = np.asarray(swaps)
    probs[swapped] = probs[swapped][:, SWAP_PERM]
    return pd.DataFrame({"id": ids, "swap": swaps, **{c: probs[:, k] for k, c in enumerate(LABEL_COLS)}})


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


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


def log_loss(targets: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class log loss with soft or one-hot targets, probabilities clipped like Kaggle's metric."""
    probs = np.clip(probs, 1e-15, 1 - 1e-15)
    probs = probs / probs.sum(axis=1, keepdims=True)
    return float(-(targets * np.log(probs)).sum(axis=1).mean())


def fold_metrics(fold: int, truth: np.ndarray, probs: np.ndarray, train_targets: np.ndarray) -> dict:
    """A held-out fold's log loss next to the class prior of its training rows."""
    prior = train_targets.mean(axis=0)
    return {
        "fold": fold,
        "rows": len(truth),
        "log_loss": log_loss(truth, probs),
        "prior_log_loss": log_loss(truth, np.tile(prior, (len(truth), 1))),
        "prior": prior.tolist(),
    }


def cv_table(results: list[dict], overall: float, rows: int) -> tuple[str, float]:
    """(the CV table every trainer prints, overall prior log loss) from fold_metrics results."""
    lines = [f"{'fold':>5} {'rows':>6} {'log_loss':>9} {'prior':>9}"]
    for m in results:
        lines.append(f"{m['fold']:>5} {m['rows']:>6} {m['log_loss']:>9.4f} {m['prior_log_loss']:>9.4f}")
    # Each fold's prior comes from its own training folds, so the overall prior is row-weighted.
    prior = sum(m["prior_log_loss"] * m["rows"] for m in results) / rows
    lines.append(f"{'all':>5} {rows:>6} {overall:>9.4f} {prior:>9.4f}")
    return "\n".join(lines), prior


def select_fold(df: pd.DataFrame, folds_path: str, fold: int) -> pd.DataFrame:
    from data.folds import attach_folds, read_folds

    df = attach_folds(df, read_folds(folds_path), folds_path)
    if fold not in set(df["fold"]):
        raise DataError(f"fold {fold} not in {folds_path} (folds: {sorted(set(df['fold']))})")
    return df[df["fold"] == fold].reset_index(drop=True)


def write_predictions(pred: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pred.to_csv(path, index=False, float_format="%.9g")


def main(argv: list[str] | None = None) -> None:
    cfg = cli_config(PredictConfig, __doc__, argv)
    if not cfg.csv or not cfg.runs:
        raise ConfigError("csv= and runs= are required (see python -m infer predict --help)")
    if (cfg.folds != "") != (cfg.fold >= 0):
        raise ConfigError("folds= and fold= go together")
    if cfg.drop_bad_rows and cfg.sample_submission:
        raise ConfigError("drop_bad_rows cannot be combined with sample_submission: every id needs a prediction")
    runs = [load_run(Path(r), cfg) for r in cfg.runs]
    df, report = read_competition_csv(cfg.csv, drop_bad_rows=cfg.drop_bad_rows)
    print(report.summary())
    if cfg.folds:
        df = select_fold(df, cfg.folds, cfg.fold)
    pred = predict_frame(runs, df)
    if cfg.sample_submission:
        order = read_sample_submission(cfg.sample_submission)["id"]
        pred = merge_by_id([pred], order)
    write_predictions(pred, Path(cfg.out))
    print(f"wrote {len(pred)} rows to {cfg.out}")
    if "target" in df:
        truth = targets_by_id(df, pred["id"])
        print(f"log loss: {log_loss(truth, pred[list(LABEL_COLS)].to_numpy()):.5f} on {len(pred)} rows")


if __name__ == "__main__":
    run_cli(main)

"""Markdown + PNG report for out-of-fold (OOF) prediction files.

Usage:
    python -m infer report oof=runs/gemma2-9b-qlora/oof-seed42.csv labels=input/train.csv \\
        folds=input/folds.csv out=docs/report passes='runs/gemma2-9b-qlora/fold*-seed42/oof_passes.csv'
    python -m infer report oof=A.csv,B.csv labels=... folds=...    one section per file, summary first

Writes OUT/report.md and small PNGs next to it. Per OOF file: log loss per fold next to the class
prior of the training folds (for fold k the mean target of the labelled rows in the other folds,
as `python -m train` reports it), reliability diagrams per class, the confusion matrix, and log
loss by quantile of total response length and of prompt length. OOF rows are joined to labels
and folds by id; ids without a label or a fold are errors that name them.

passes= takes the per-pass files that training saves (oof_passes.csv: one row per id and TTA
pass, the swapped pass already mapped back to the original A/B order). For ids scored both ways
it compares mean P(A wins) of the two passes: an unbiased model gives equal numbers, a model that
favours the first slot gives a higher P(A) in the plain pass. File arguments are expanded as glob
patterns here, since the shell leaves a word like `passes=runs/x/fold*/oof_passes.csv` alone.
"""
from __future__ import annotations

import dataclasses
import glob
from pathlib import Path

import numpy as np
import pandas as pd

from cli.config import ConfigError, cli_config, opt
from cli.output import check_output, output_folder
from data.features import length_features
from data.folds import read_folds
from data.io import LABEL_COLS, DataError, check_columns, read_checked_csv, read_competition_csv
from infer.metrics import NO_TIES_NOTE, check_probs, has_ties, log_loss, two_class_metrics
from infer.plots import CLASSES, plot_bias, plot_confusion, plot_lengths, plot_reliability
from infer.tracking import start as start_tracking


@dataclasses.dataclass
class ReportConfig:
    oof: list[str] = opt([], "OOF files (id + 3 probabilities), comma-separated; glob patterns allowed")
    labels: str = opt("", "competition-format CSV with the winner columns (train.csv)")
    folds: str = opt("", "the id,fold file the runs were trained with (python -m data.folds)")
    out: str = opt("docs/report", "output folder for report.md and its PNGs")
    overwrite: bool = opt(False, "replace `out` if it holds files")
    passes: list[str] = opt([], "per-pass files (oof_passes.csv) for the position-bias section; glob patterns allowed")
    title: str = opt("OOF report", "top heading of report.md")
    bins: int = opt(10, "equal-width probability bins of the reliability diagrams")
    length_buckets: int = opt(5, "quantile buckets of the log-loss-by-length tables")
    report_to: str = opt("none", "wandb: also log the report's PNGs (wandb.Image) in a run of job type `report`, "
                         "offline unless WANDB_MODE says otherwise | none")
    group: str = opt("", "wandb group; empty: the folder of the first OOF file (runs/NAME/oof-seed42.csv -> NAME), "
                     "the group `python -m train` gives that config's runs")


@dataclasses.dataclass
class Scored:
    """One OOF file joined to labels and folds by id."""

    name: str
    ids: np.ndarray
    fold: np.ndarray
    probs: np.ndarray
    targets: np.ndarray
    prior: np.ndarray  # per row: class mean of the labelled rows outside the row's fold


def expand(patterns: list[str], what: str) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"{what}={pattern}: no file matches")
        paths += [Path(m) for m in matches]
    return paths


def model_name(path: Path) -> str:
    return "/".join(path.with_suffix("").parts[-3:])  # runs/NAME/oof-seed42, NAME/fold0-seed42/oof


def join_oof(path: Path, labels_df: pd.DataFrame, folds_df: pd.DataFrame) -> Scored:
    oof = check_probs(read_checked_csv(path, ("id", *LABEL_COLS)), str(path))
    probs = oof[list(LABEL_COLS)].to_numpy(dtype=float)
    for other, source in ((labels_df, "the labels file"), (folds_df, "the folds file")):
        missing = oof["id"][~oof["id"].isin(other["id"])]
        if len(missing):
            raise DataError(f"{path}: {len(missing)} id(s) not in {source}, e.g. {missing.tolist()[:20]}")
    labelled = labels_df[["id", "target"]].merge(folds_df, on="id", how="inner")
    all_targets = np.stack(labelled["target"].to_numpy())
    rows = oof[["id"]].merge(labelled, on="id", how="left", validate="one_to_one")
    fold = rows["fold"].to_numpy()
    prior = np.zeros_like(probs)
    for k in np.unique(fold):
        prior[fold == k] = all_targets[labelled["fold"].to_numpy() != k].mean(axis=0)
    return Scored(model_name(path), oof["id"].to_numpy(), fold, probs, np.stack(rows["target"].to_numpy()), prior)


def fold_table(s: Scored) -> pd.DataFrame:
    """fold, rows, model log loss, prior log loss; last row `all` (the prior row-weighted, as in train).
    Tie-free truth adds accuracy and log_loss_2class (infer.metrics.two_class_metrics), as the CV table does."""
    tie_free = not has_ties(s.targets)
    rows = []
    for k in np.unique(s.fold):
        m = s.fold == k
        rows.append({"fold": str(k), "rows": int(m.sum()), "log_loss": log_loss(s.targets[m], s.probs[m]),
                     "prior": log_loss(s.targets[m], s.prior[m]),
                     **(two_class_metrics(s.targets[m], s.probs[m]) if tie_free else {})})
    # Each fold has its own prior, so the overall prior is the row-weighted mean of the folds'.
    prior = sum(r["prior"] * r["rows"] for r in rows) / len(s.ids)
    rows.append({"fold": "all", "rows": len(s.ids), "log_loss": log_loss(s.targets, s.probs), "prior": prior,
                 **(two_class_metrics(s.targets, s.probs) if tie_free else {})})
    return pd.DataFrame(rows)


def absent_classes(targets: np.ndarray) -> list[int]:
    """Classes (indices into CLASSES) that no row of the truth puts weight on, e.g. tie in reward-model data."""
    return [c for c in range(len(CLASSES)) if not (targets[:, c] > 0).any()]


def reliability(probs: np.ndarray, targets: np.ndarray, bins: int) -> pd.DataFrame:
    """Per class and non-empty bin: count, mean predicted probability, observed frequency. Classes the
    truth never holds are left out: their observed frequency is 0 in every bin, which says nothing."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    absent = absent_classes(targets)
    for c, name in enumerate(CLASSES):
        if c in absent:
            continue
        which = np.clip(np.digitize(probs[:, c], edges[1:-1]), 0, bins - 1)
        for b in np.unique(which):
            m = which == b
            rows.append({"class": name, "bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}", "count": int(m.sum()),
                         "mean_pred": probs[m, c].mean(), "observed": targets[m, c].mean()})
    return pd.DataFrame(rows)


def calibration_error(table: pd.DataFrame) -> dict[str, float]:
    """Expected calibration error per class in the table: count-weighted |mean predicted - observed|."""
    gap = (table["mean_pred"] - table["observed"]).abs() * table["count"]
    return {c: float(gap[table["class"] == c].sum() / table.loc[table["class"] == c, "count"].sum())
            for c in CLASSES if (table["class"] == c).any()}


def confusion(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Counts, rows = true class (argmax of the target), columns = argmax of the prediction."""
    cm = np.zeros((3, 3), dtype=int)
    np.add.at(cm, (targets.argmax(axis=1), probs.argmax(axis=1)), 1)
    return cm


def length_table(s: Scored, lengths: pd.Series, buckets: int) -> pd.DataFrame:
    """Log loss per quantile bucket of `lengths` (characters, indexed by id)."""
    values = lengths.loc[list(s.ids)].to_numpy()
    cut = pd.qcut(values, buckets, duplicates="drop")
    rows = []
    for interval in cut.categories:
        m = np.asarray(cut == interval)
        rows.append({"chars": f"{values[m].min():.0f}-{values[m].max():.0f}", "rows": int(m.sum()),
                     "log_loss": log_loss(s.targets[m], s.probs[m]), "prior": log_loss(s.targets[m], s.prior[m])})
    return pd.DataFrame(rows)


def read_passes(paths: list[Path]) -> pd.DataFrame:
    frames = []
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        df = pd.read_csv(path)
        check_columns(df, ("id", "swap", *LABEL_COLS), path)
        swap = df["swap"].astype(str).str.lower().map({"true": True, "false": False})
        if swap.isna().any():
            raise DataError(f"{path}: field swap must be True/False; bad row id(s) {df['id'][swap.isna()].tolist()[:20]}")
        frames.append(df.assign(swap=swap.astype(bool)))
    passes = pd.concat(frames, ignore_index=True)
    dup = passes.duplicated(["id", "swap"], keep=False)
    if dup.any():
        raise DataError(f"passes: (id, swap) repeated for id(s) {sorted(set(passes['id'][dup]))[:20]}; "
                        "give the passes of one model (its folds) at a time")
    return passes


def position_bias(passes: pd.DataFrame) -> dict:
    """P(A wins) of the plain pass vs the swapped pass (mapped back) for ids scored both ways."""
    plain = passes[~passes["swap"]].set_index("id")
    swapped = passes[passes["swap"]].set_index("id")
    both = plain.index.intersection(swapped.index)
    a_plain, a_swapped = (part.loc[both, "winner_model_a"].to_numpy() for part in (plain, swapped))
    diff = a_plain - a_swapped

    def mean(x: np.ndarray) -> float:
        return float(x.mean()) if len(x) else float("nan")

    return {"rows": len(both), "one_pass_only": len(plain.index.union(swapped.index)) - len(both),
            "p_a_plain": mean(a_plain), "p_a_swapped": mean(a_swapped), "mean_diff": mean(diff),
            "mean_abs_diff": mean(np.abs(diff)), "ids": both.to_numpy(), "diff": diff}


def md_table(df: pd.DataFrame, digits: int = 4) -> str:
    cells = [[f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def model_section(s: Scored, index: int, lengths: dict[str, pd.Series], out_dir: Path, bins: int, buckets: int) -> list[str]:
    rel = reliability(s.probs, s.targets, bins)
    ece = calibration_error(rel)
    absent = absent_classes(s.targets)
    present = [c for c in range(len(CLASSES)) if c not in absent]
    cm = confusion(s.probs, s.targets)
    shares = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    counts = pd.DataFrame([[CLASSES[i]] + [f"{n} ({f:.0%})" for n, f in zip(cm[i], shares[i])] for i in present],
                          columns=["true", *(f"pred {c}" for c in CLASSES)])
    # What the model still spends on a class the truth never holds (a tie-free set's P(tie)).
    absent_lines = []
    for c in absent:
        absent_lines += [f"No rows of class {CLASSES[c]} in the truth: its reliability diagram, calibration error and "
                         f"confusion row are left out (mean predicted P({CLASSES[c]}) {s.probs[:, c].mean():.4f}).", ""]
    tie_note = [f"Note: {NO_TIES_NOTE}.", ""] if not has_ties(s.targets) else []
    by_length = {what: length_table(s, values, buckets) for what, values in lengths.items()}
    stem = f"m{index}"
    out = [f"## {s.name}", "", "### Log loss by fold", "",
           "Prior: the class mean of the labelled rows in the other folds (what training saw).", "", *tie_note,
           md_table(fold_table(s)), "", "### Calibration", "",
           f"![reliability]({plot_reliability(rel, out_dir / f'{stem}-calibration.png')})", "",
           "Points: bins of width 1/{} with their row counts. Expected calibration error: ".format(bins)
           + ", ".join(f"{c} {v:.4f}" for c, v in ece.items()) + ".", "", *absent_lines,
           "### Confusion matrix", "", md_table(counts), "",
           f"![confusion]({plot_confusion(cm, out_dir / f'{stem}-confusion.png', present)})", "",
           "### Log loss by length", ""]
    for what, table in by_length.items():
        out += [f"By {what} (characters, quantile buckets):", "", md_table(table), ""]
    out += [f"![lengths]({plot_lengths(by_length, out_dir / f'{stem}-lengths.png')})", ""]
    return out


def bias_section(passes_files: list[Path], labels_df: pd.DataFrame, out_dir: Path) -> list[str]:
    out = ["## Position bias (swap TTA passes)", ""]
    if not passes_files:
        return out + ["No per-pass files given (passes=runs/NAME/fold*-seed*/oof_passes.csv); section omitted.", ""]
    passes = read_passes(passes_files)
    bias = position_bias(passes)
    out += [f"Files: {', '.join(f'`{p}`' for p in passes_files)}.", ""]
    if not bias["rows"]:
        return out + [f"No id was scored in both passes ({bias['one_pass_only']} ids with one pass: TTA off?).", ""]
    summary = pd.DataFrame([{"rows": bias["rows"], "P(A) plain": bias["p_a_plain"], "P(A) swapped": bias["p_a_swapped"],
                             "mean diff": bias["mean_diff"], "mean abs diff": bias["mean_abs_diff"]}])
    out += [md_table(summary), "",
            "Swapped-pass probabilities are mapped back to the original order, so an unbiased model gives "
            "equal means; plain > swapped means the model favours whichever response sits in slot A.", ""]
    if bias["one_pass_only"]:
        out += [f"{bias['one_pass_only']} id(s) had one pass only and are left out.", ""]
    labelled = labels_df.set_index("id")
    if set(bias["ids"]) <= set(labelled.index):
        passes = passes.set_index("id")
        targets = np.stack(labelled.loc[bias["ids"], "target"].to_numpy())
        plain = passes[~passes["swap"]].loc[bias["ids"], list(LABEL_COLS)].to_numpy()
        swapped = passes[passes["swap"]].loc[bias["ids"], list(LABEL_COLS)].to_numpy()
        losses = pd.DataFrame([{"plain pass": log_loss(targets, plain), "swapped pass": log_loss(targets, swapped),
                                "mean of both": log_loss(targets, (plain + swapped) / 2)}])
        out += ["Log loss of each pass alone and of their mean (what TTA submits):", "", md_table(losses), ""]
    return out + [f"![bias]({plot_bias(bias['diff'], out_dir / 'position-bias.png')})", ""]


def write_report(oof_files, labels_df: pd.DataFrame, folds_df: pd.DataFrame, out_dir, passes_files=(),
                 title: str = "OOF report", bins: int = 10, buckets: int = 5) -> Path:
    """Write out_dir/report.md (+ PNGs); labels_df as read by read_competition_csv(labels=True)."""
    if not oof_files:
        raise ConfigError("no OOF files given (oof=FILE[,FILE...])")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scored = [join_oof(Path(p), labels_df, folds_df) for p in oof_files]
    feats = length_features(labels_df)
    lengths = {"total response length": np.rint(np.expm1(feats["log_len_a"]) + np.expm1(feats["log_len_b"])),
               "prompt length": np.rint(np.expm1(feats["log_len_prompt"]))}
    summary = pd.DataFrame([{"model": s.name, "file": f"`{p}`", **fold_table(s).iloc[-1].drop("fold").to_dict()}
                            for s, p in zip(scored, oof_files)])
    if summary.isna().any().any():  # tie-free and tied files side by side: only the tie-free have 2-class columns
        summary = summary.astype(object).where(summary.notna(), "-")
    lines = [f"# {title}", "", "Overall OOF log loss (lower is better) next to the class prior of the training folds.",
             "", md_table(summary), ""]
    for i, s in enumerate(scored):
        lines += model_section(s, i, lengths, out_dir, bins, buckets)
    lines += bias_section([Path(p) for p in passes_files], labels_df, out_dir)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    cfg = cli_config(ReportConfig, __doc__, argv)
    if not (cfg.oof and cfg.labels and cfg.folds):
        raise ConfigError("oof=, labels= and folds= are required (see python -m infer report --help)")
    if cfg.bins < 2 or cfg.length_buckets < 1:
        raise ConfigError(f"bins must be >= 2 and length_buckets >= 1, got {cfg.bins}, {cfg.length_buckets}")
    if cfg.report_to not in ("none", "wandb"):
        raise ConfigError(f"report_to must be wandb or none, got {cfg.report_to!r}")
    check_output(cfg.out, cfg.overwrite, folder=True)  # before the work, not after it
    oof_files, passes_files = expand(cfg.oof, "oof"), expand(cfg.passes, "passes")
    folds_df = read_folds(cfg.folds)  # cheap checks first: the labels file is the slow read
    labels_df, parse_report = read_competition_csv(cfg.labels, labels=True)
    print(parse_report.summary())
    with output_folder(cfg.out, cfg.overwrite) as out:  # the report appears whole, or not at all
        write_report(oof_files, labels_df, folds_df, out, passes_files, cfg.title, cfg.bins, cfg.length_buckets)
    print(f"wrote {Path(cfg.out) / 'report.md'}")
    track_report(cfg, oof_files)


def track_report(cfg: ReportConfig, oof_files: list[Path]) -> None:
    """report_to=wandb: the written report's PNGs as wandb.Image (`report/<file stem>`), its settings as config."""
    group = cfg.group or Path(oof_files[0]).resolve().parent.name
    with start_tracking(cfg.report_to, group=group, job_type="report", name=f"{group}-report",
                        config=dataclasses.asdict(cfg)) as track:
        track.images(sorted(Path(cfg.out).glob("*.png")), "report")

"""Combine ensemble members' out-of-fold predictions into one recipe, and apply it to test predictions.

Usage:
    python -m infer ensemble members=runs/gemma2-9b-qlora,runs/llama3-8b-qlora,runs/length \\
        labels=input/train.csv folds=input/folds.csv method=logprob_avg temperature=true out=runs/ensemble \\
        [seed=42] [test=sub_gemma.csv,sub_llama.csv,sub_length.csv test_csv=input/test.csv]

A member is a directory: `runs/<name>/` from `python -m train <cfg> fold=all` (its
oof-seed<seed>.csv and fold<k>-seed<seed>/ run folders) or the output of `python -m train.length`
(oof.csv + length_model.json). `runs/<name>@<seed>` picks another seed of a run directory than
`seed=`, so seeds of one config can be ensembled (member name `<name>-seed<seed>`). Every file is
joined by id, never by position, and refused (naming the ids) when ids are duplicated or differ
from the labelled rows with a fold, or probabilities are NaN, negative or do not sum to 1.

Methods: prob_avg / logprob_avg average probabilities / log-probabilities with weights fitted on
the simplex to minimise OOF log loss; temperature=true then fits p ~ exp(log p / T). stack fits a
multinomial logistic regression on the members' log-probabilities plus length features. Each is
also cross-validated over the folds file (fitted on the other folds, applied to fold k), so the
report shows the honest `nested` log loss next to the in-sample one; out/oof.csv holds the nested
OOF. Tie-free labels (no winner_tie row): stack fits the present classes and gives the absent one
infer.length.ABSENT_CLASS_PROB; the weighted methods keep whatever P(tie) the members give.
Writes out/recipe.json (what the Kaggle entry applies), out/report.md, out/oof.csv and, with
test=, out/submission.csv (test files in members order, rows from test_csv).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize, minimize_scalar

from cli.config import ConfigError, cli_config, opt, run_cli
from cli.output import check_output, output_folder
from data.features import FEATURES, length_features
from data.folds import attach_folds, read_folds
from data.io import LABEL_COLS, DataError, check_columns, read_checked_csv, read_competition_csv
from infer.length import ABSENT_CLASS_PROB, MODEL_FILE, absent_class_note, absent_classes, fit_logistic, fitted_classes, logistic_proba
from infer.metrics import PRED_COLS, check_probs, log_loss, read_probs, softmax, some_ids
from infer.predict import write_predictions
from model.run import verify_run

METHODS = ("prob_avg", "logprob_avg", "stack")
RESERVED = ("prior", "ensemble", "ensemble_nested")  # keys of oof_log_loss next to member names
EPS = 1e-15  # the clip of Kaggle's metric, so no log is ever -inf
RECIPE_VERSION = 1


@dataclasses.dataclass
class EnsembleConfig:
    members: list[str] = opt([], "member directories: runs/<name> (fold=all output; runs/<name>@<seed> for another seed) or a train.length output")
    labels: str = opt("", "competition CSV with winner columns (train.csv): the truth for the OOF rows")
    folds: str = opt("", "folds file (id,fold) the members were trained with; rows with fold >= 0 are the OOF rows")
    method: str = opt("logprob_avg", "prob_avg | logprob_avg (weights on the simplex) | stack (logistic stacker)")
    temperature: bool = opt(True, "weighted methods: fit a scalar temperature on the ensemble's OOF log-probs")
    C: float = opt(1.0, "stack: inverse L2 regularisation strength of the stacker (larger = weaker)")
    seed: int = opt(42, "run-based members: use oof-seed<seed>.csv and the fold<k>-seed<seed> run folders")
    out: str = opt("runs/ensemble", "output folder: recipe.json, report.md, oof.csv (nested OOF), submission.csv")
    overwrite: bool = opt(False, "replace `out` if it holds files")
    test: list[str] = opt([], "test prediction CSVs (id + 3 probs), one per member in members order")
    test_csv: str = opt("", "the competition test.csv the test predictions were made for (required with test=)")
    drop_bad_rows: bool = opt(False, "drop unparseable label rows (as the members' training did) instead of stopping")


def aligned_probs(member_preds: dict[str, pd.DataFrame], names: list[str], ids: pd.Series, what: str) -> np.ndarray:
    """(members, rows, 3) probabilities in the order of `ids`, after checking every member covers exactly `ids`."""
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        raise DataError(f"{what}: the rows repeat ids {some_ids(dup)}")
    missing, extra = [n for n in names if n not in member_preds], sorted(set(member_preds) - set(names))
    if missing or extra:
        raise DataError(f"{what}: predictions missing for member(s) {missing}, given for unknown member(s) {extra}")
    out = []
    for name in names:
        frame = check_probs(member_preds[name], f"{what} of member {name!r}")
        absent, surplus = set(ids) - set(frame["id"]), set(frame["id"]) - set(ids)
        if absent or surplus:
            raise DataError(f"{what} of member {name!r}: id set differs from the rows: {len(absent)} missing "
                            f"{some_ids(absent)}, {len(surplus)} not among them {some_ids(surplus)}")
        out.append(frame.set_index("id").loc[list(ids), list(LABEL_COLS)].to_numpy(float))
    return np.stack(out)


def combined_logp(method: str, weights, probs: np.ndarray) -> np.ndarray:
    """Normalised log-probabilities of a weighted combination of (members, rows, 3) probabilities."""
    w = np.asarray(weights, float)
    if method == "prob_avg":
        return np.log(np.clip(np.tensordot(w, probs, 1), EPS, None))
    z = np.tensordot(w, np.log(np.clip(probs, EPS, None)), 1)
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def fit_weights(method: str, probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Simplex weights minimising OOF log loss (SLSQP from equal weights, analytic gradient: deterministic)."""
    m = len(probs)
    if m == 1:
        return np.ones(1)
    logs = np.log(np.clip(probs, EPS, None))

    def loss_grad(w):
        logp = combined_logp(method, w, probs)
        if method == "prob_avg":
            grad = -np.einsum("ic,mic->m", targets / np.exp(logp), probs) / len(targets)
        else:
            grad = -np.einsum("ic,mic->m", targets - np.exp(logp), logs) / len(targets)
        return -(targets * logp).sum(1).mean(), grad

    res = minimize(loss_grad, np.full(m, 1 / m), jac=True, method="SLSQP", bounds=[(0, 1)] * m,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(m)}],
                   options={"ftol": 1e-12, "maxiter": 500})
    w = np.clip(res.x, 0, None)  # SLSQP may end a hair outside its bounds
    return w / w.sum()


def fit_temperature(logp: np.ndarray, targets: np.ndarray) -> float:
    res = minimize_scalar(lambda t: -(targets * np.log(np.clip(softmax(logp / t), EPS, None))).sum(1).mean(),
                          bounds=(0.05, 20), method="bounded", options={"xatol": 1e-6})
    return float(res.x)


def stack_features(names: list[str], probs: np.ndarray, rows: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Members' clipped log-probabilities plus length features, in rows' order."""
    logs = np.log(np.clip(probs, EPS, None))
    cols = [logs[m, :, c] for m in range(len(names)) for c in range(len(LABEL_COLS))]
    feats = [f"{n}:log_{c}" for n in names for c in LABEL_COLS]
    X = np.column_stack(cols + [length_features(rows)[list(FEATURES)].to_numpy()])  # indexed like rows
    return X, feats + list(FEATURES)


def fit_params(method: str, probs: np.ndarray, targets: np.ndarray, X: np.ndarray | None, feats, temperature: bool, C: float) -> dict:
    if method == "stack":
        return {"weights": None, "temperature": 1.0, "stacker": fit_logistic(X, targets.argmax(1), feats, C)}
    w = fit_weights(method, probs, targets)
    t = fit_temperature(combined_logp(method, w, probs), targets) if temperature else 1.0
    return {"weights": w.tolist(), "temperature": t, "stacker": None}


def transform(recipe: dict, probs: np.ndarray, X: np.ndarray | None) -> np.ndarray:
    """The one place a recipe turns member probabilities into ensemble probabilities (OOF and test)."""
    if recipe["method"] == "stack":
        return logistic_proba(recipe["stacker"], X)
    return softmax(combined_logp(recipe["method"], recipe["weights"], probs) / recipe["temperature"])


def fit_ensemble(member_oofs: dict[str, pd.DataFrame], rows: pd.DataFrame, method: str = "logprob_avg",
                 temperature: bool = True, C: float = 1.0) -> tuple[dict, pd.DataFrame]:
    """Recipe fitted on the OOF of rows with fold >= 0 (rows: read_competition_csv + `fold`), and the
    nested OOF: for each fold k, the same fit on the other folds applied to fold k."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r}; choose one of {list(METHODS)}")
    check_columns(rows, ("id", "fold", "target"), "fit_ensemble rows")
    rows = rows[rows["fold"] >= 0].reset_index(drop=True)
    names = list(member_oofs)
    probs = aligned_probs(member_oofs, names, rows["id"], "OOF")
    targets = np.stack(rows["target"].to_numpy()).astype(float)
    X, feats = stack_features(names, probs, rows) if method == "stack" else (None, None)
    nested, prior = np.zeros_like(targets), np.zeros_like(targets)
    folds = rows["fold"].to_numpy()
    for k in sorted(set(folds.tolist())):
        fit, held = folds != k, folds == k
        if not fit.any():
            raise DataError("nested CV needs at least two folds with fold >= 0")
        part = fit_params(method, probs[:, fit], targets[fit], None if X is None else X[fit], feats, temperature, C)
        nested[held] = transform({"method": method, **part}, probs[:, held], None if X is None else X[held])
        prior[held] = targets[fit].mean(0)
    recipe = {"version": RECIPE_VERSION, "method": method, "members": [{"name": n} for n in names],
              **fit_params(method, probs, targets, X, feats, temperature, C)}
    in_sample = transform(recipe, probs, X)
    recipe["oof_log_loss"] = {**{n: log_loss(targets, probs[m]) for m, n in enumerate(names)},
                              "prior": log_loss(targets, prior), "ensemble": log_loss(targets, in_sample),
                              "ensemble_nested": log_loss(targets, nested)}
    return recipe, pd.DataFrame({"id": rows["id"], **{c: nested[:, j] for j, c in enumerate(LABEL_COLS)}})


def apply_recipe(recipe: dict, member_preds: dict[str, pd.DataFrame], rows: pd.DataFrame) -> pd.DataFrame:
    """id + 3 probabilities in rows' id order; member_preds: member name -> id + 3 probabilities."""
    if recipe.get("version") != RECIPE_VERSION or recipe.get("method") not in METHODS:
        raise DataError(f"recipe: expected version {RECIPE_VERSION} and a method in {list(METHODS)}, "
                        f"got version {recipe.get('version')!r}, method {recipe.get('method')!r}")
    names = [m["name"] for m in recipe["members"]]
    probs = aligned_probs(member_preds, names, rows["id"], "predictions")
    X, feats = stack_features(names, probs, rows) if recipe["method"] == "stack" else (None, None)
    if X is not None and feats != recipe["stacker"]["features"]:
        raise DataError(f"recipe: the stacker was fitted on features {recipe['stacker']['features']}, "
                        f"this code computes {feats}")
    out = transform(recipe, probs, X)
    return pd.DataFrame({"id": rows["id"].to_numpy(), **{c: out[:, j] for j, c in enumerate(LABEL_COLS)}})


def load_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: recipe not found (write it with `python -m infer ensemble`)")
    recipe = json.loads(path.read_text())
    if recipe.get("method") != "stack" and len(recipe.get("weights") or []) != len(recipe.get("members", [])):
        raise DataError(f"{path}: method {recipe.get('method')!r} needs one weight per member")
    return recipe


def parse_member(spec: str, seed: int) -> tuple[Path, int, str]:
    """`dir` or `dir@seed` -> (directory, seed, member name)."""
    head, sep, tail = spec.rpartition("@")
    if sep and tail.isdigit():
        return Path(head), int(tail), f"{Path(head).name}-seed{tail}"
    return Path(spec), seed, Path(spec).name


def read_member(spec: str, seed: int, folds: list[int]) -> tuple[dict, pd.DataFrame]:
    """(recipe member entry with paths relative to the member directory, OOF frame)."""
    path, seed, name = parse_member(spec, seed)
    if (path / MODEL_FILE).is_file():
        if name != path.name:
            raise ConfigError(f"member {spec}: a length model has no seeds; name it without @<seed>")
        entry, oof_file = {"name": path.name, "kind": "length", "model": MODEL_FILE}, path / "oof.csv"
    elif (path / f"oof-seed{seed}.csv").is_file():
        runs = [f"fold{k}-seed{seed}" for k in folds]
        absent = [r for r in runs if not (path / r).is_dir()]
        if absent:
            raise DataError(f"{path}: run folder(s) {absent} missing; the recipe needs one run per fold for test")
        entry = {"name": name, "dir": path.name, "kind": "runs", "runs": runs}
        return entry, verified_member_oof(path, runs, path / f"oof-seed{seed}.csv")
    else:
        raise DataError(f"{path}: not a member directory (neither {MODEL_FILE} nor oof-seed{seed}.csv; "
                        "run `python -m train <cfg> fold=all` or `python -m train.length` first)")
    return entry, read_probs(oof_file)


def verified_member_oof(path: Path, runs: list[str], summary: Path) -> pd.DataFrame:
    """A run member's OOF file `summary` (oof-seed<s>.csv, written by fold=all), once every fold run was
    verified file by file (model.run.verify_run) and the file holds exactly the rows of their oof.csv
    files: a stale or edited summary is refused, never fitted on."""
    parts = []
    for run in runs:
        verify_run(path / run, stage="complete")
        parts.append(read_checked_csv(path / run / "oof.csv", PRED_COLS))
    folds = pd.concat(parts, ignore_index=True).set_index("id").sort_index()
    written = read_probs(summary)
    same = written.set_index("id").sort_index()
    if not (same.index.equals(folds.index) and np.allclose(same.to_numpy(float), folds.to_numpy(float), rtol=0, atol=1e-9)):
        raise DataError(f"{summary}: not the rows of its verified fold runs' oof.csv ({', '.join(runs)}): stale or edited; "
                        "rerun `python -m train <cfg> fold=all` (finished folds are reused) to write it again")
    return written


def format_report(recipe: dict, cfg: EnsembleConfig, rows: int) -> str:
    losses, kinds = recipe["oof_log_loss"], {m["name"]: m.get("kind", "") for m in recipe["members"]}
    lines = [f"# Ensemble: method={recipe['method']}, {rows} OOF rows ({cfg.labels}, folds {cfg.folds})", "",
             "| member | kind | OOF log loss | weight |", "|---|---|---|---|"]
    for j, name in enumerate(kinds):
        weight = f"{recipe['weights'][j]:.4f}" if recipe["weights"] else "-"
        lines.append(f"| {name} | {kinds[name]} | {losses[name]:.5f} | {weight} |")
    lines.append(f"| class prior (of the other folds) | | {losses['prior']:.5f} | |")
    if recipe["stacker"]:
        st = recipe["stacker"]
        fitted = [LABEL_COLS[c] for c in fitted_classes(st)]
        lines += ["", f"Stacker: multinomial logistic regression, C={cfg.C}, {len(st['features'])} standardised "
                  "features; coefficients per class:", "", "| feature | " + " | ".join(fitted) + " |",
                  "|---" * (len(fitted) + 1) + "|"]
        lines += [f"| {f} | " + " | ".join(f"{row[i]:+.3f}" for row in st["coef"]) + " |" for i, f in enumerate(st["features"])]
        if absent_classes(st):
            lines += ["", f"Stacker: {absent_class_note(absent_classes(st), st.get('absent_class_prob', ABSENT_CLASS_PROB))}."]
    else:
        lines += ["", f"Temperature: {recipe['temperature']:.4f}" + ("" if cfg.temperature else " (not fitted)")]
    fitted = "stacker" if recipe["stacker"] else "weights" + (" + temperature" if cfg.temperature else "")
    lines += ["", f"Ensemble OOF log loss, in-sample ({fitted} fitted on all OOF rows): {losses['ensemble']:.5f}",
              f"Ensemble OOF log loss, nested CV ({fitted} fitted on the other folds; out/oof.csv): "
              f"{losses['ensemble_nested']:.5f}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    cfg = cli_config(EnsembleConfig, __doc__, argv)
    if not cfg.members or not cfg.labels or not cfg.folds:
        raise ConfigError("members=, labels= and folds= are required (see python -m infer ensemble --help)")
    if cfg.test and (len(cfg.test) != len(cfg.members) or not cfg.test_csv):
        raise ConfigError(f"test= needs one file per member ({len(cfg.members)}, in members order) and test_csv=")
    if cfg.method not in METHODS or cfg.C <= 0:
        raise ConfigError(f"method must be one of {list(METHODS)} (got {cfg.method!r}) and C > 0 (got {cfg.C})")
    check_output(cfg.out, cfg.overwrite, folder=True)  # before the work, not after it
    rows, report = read_competition_csv(cfg.labels, labels=True, drop_bad_rows=cfg.drop_bad_rows)
    print(report.summary())
    rows = attach_folds(rows, read_folds(cfg.folds), cfg.folds)
    folds = sorted(int(k) for k in set(rows["fold"]) if k >= 0)
    entries, oofs = zip(*(read_member(m, cfg.seed, folds) for m in cfg.members))
    names = [e["name"] for e in entries]
    clash = sorted({n for n in names if names.count(n) > 1 or n in RESERVED})
    if clash:
        raise ConfigError(f"member names (directory basenames) must be unique, not in {list(RESERVED)}: {clash}")
    recipe, nested = fit_ensemble(dict(zip(names, oofs)), rows, cfg.method, cfg.temperature, cfg.C)
    recipe["members"] = list(entries)
    text = format_report(recipe, cfg, len(nested))
    print("\n" + text)
    sub = None
    if cfg.test:
        test_rows, test_report = read_competition_csv(cfg.test_csv, labels=False)
        print(test_report.summary())
        preds = {n: read_checked_csv(p, PRED_COLS) for n, p in zip(names, cfg.test)}
        sub = apply_recipe(recipe, preds, test_rows)
    with output_folder(cfg.out, cfg.overwrite) as out:  # the folder appears whole, or not at all
        (out / "report.md").write_text(text)
        (out / "recipe.json").write_text(json.dumps(recipe, indent=2))
        write_predictions(nested, out / "oof.csv")
        if sub is not None:
            write_predictions(sub, out / "submission.csv")
    print(f"wrote {cfg.out}: recipe.json, report.md, oof.csv" + (f", submission.csv ({len(sub)} rows)" if sub is not None else ""))


if __name__ == "__main__":
    run_cli(main)

"""Export run folders (or an ensemble recipe's members) as a verified Kaggle dataset folder.

Usage:
    python -m train.export runs=runs/gemma2-9b-qlora/fold0-seed42,runs/llama3-8b-qlora \\
        dataset_id=user/arena-pref-models out=export/ [title="Arena pref models"]
    python -m train.export recipe=runs/ensemble/recipe.json dataset_id=user/arena-pref-ens out=export/
    ... --merge-folds   also average each member's fold adapters into members/<name>/merged/
    ... --upload        then create the Kaggle dataset, or a new version of it (needs credentials)
    python -m train.export --help

runs= are run folders (fold0-seed42/) or member directories (all complete run folders inside),
each verified file by file against its manifest (model.run.verify_run). With recipe=, its members
are looked up in runs_root (default: the recipe folder's parent) or among the member directories
in runs=. The folder written:
    members/<name>/<run>/       the run folder as trained (every file its manifest lists)
    members/<name>/<model>      length members' length_model.json
    recipe.json                 with recipe=
    <dist>-<ver>-py3-none-any.whl   this repo's code, installed offline with --no-index --no-deps
    wheels/                     extra_wheels= (e.g. transformers/peft/bitsandbytes for the Kaggle image)
    kaggle_infer.py, kaggle_infer.ipynb   the Kaggle entry (python -m infer.kaggle)
    manifest.json               sha256 + size of every file, head checksums, CV scores, versions
    dataset-metadata.json       for the Kaggle API
Before finishing (and before any upload) the folder is verified: every adapter holds its head, whose
checksum equals the run's manifest and the dataset manifest; every file matches its sha256; the
wheel matches its RECORD; every exported run holds exactly its source run's files; and where the
base model is available locally (the run's model.path or base_path=), the first run of each member
scores `verify_rows` rows from the exported folder (one base load per member). The folder is built
as <out>.partial and renamed to <out> only once verified.

--merge-folds writes one adapter per member, members/<name>/merged/, holding exactly the mean of its
folds' LoRA updates (their A's stacked and B's side by side over K: rank K·r; checked on random
probes) and the mean of their heads; the Kaggle entry then scores the member with merged/ alone,
one pass instead of K. That model is not the ensemble of the folds' predictions: how far the two
are apart on verify_rows rows is printed and stored in the manifest.
"""
from __future__ import annotations

import dataclasses
import json
import importlib.util
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from cli.config import ConfigError, UserError, cli_config, opt, run_cli
from cli.output import check_output
from data.formatter import FORMATTER_VERSION
from infer.kaggle import DATASET_FORMAT, installed_version, parse_bases
from model.factory import resolve_path
from model.files import AdapterError
from model.run import MANIFEST, file_table, read_manifest, verify_files, verify_run
from train.kaggle_files import LAUNCHER, notebook
from train.merge import merge_folds
from train.kaggle_upload import upload, upload_problems
from train.wheel import build_wheel, check_wheel

ID_RE = re.compile(r"[A-Za-z0-9_-]+/[a-z0-9-]{6,50}")


@dataclasses.dataclass
class ExportConfig:
    runs: list[str] = opt([], "run folders or member directories (comma-separated)")
    dataset_id: str = opt("", "Kaggle dataset id owner/slug (slug: 6-50 lowercase letters, digits, hyphens)")
    out: str = opt("", "folder to write; must not exist or be empty (or a previous export, with overwrite)")
    title: str = opt("", "dataset title, 6-50 characters; empty: made from the slug")
    recipe: str = opt("", "ensemble recipe.json: every member it names is exported, and the recipe")
    runs_root: str = opt("", "folder of the recipe's member directories; empty: the recipe folder's parent")
    merge_folds: bool = opt(False, "also average each member's fold adapters into members/<name>/merged/")
    base_path: list[str] = opt([], "base model for the prediction checks: PATH, or NAME=PATH per member; default: each run's model.path if it exists")
    verify_rows: int = opt(8, "rows of verify_csv scored by each member's first exported run, and by merged vs folds; 0: skip")
    verify_csv: str = opt("", "competition-format CSV for those checks; empty: the packaged data/sample/test.csv")
    kaggle_base: list[str] = opt([], "base= items written into the notebook, e.g. NAME=<the attached base model folder on Kaggle>")
    extra_wheels: list[str] = opt([], ".whl files copied to wheels/ and installed first by kaggle_infer.py")
    overwrite: bool = opt(False, "replace `out` when it holds a previous export")
    upload: bool = opt(False, "upload: new dataset if it does not exist, else a new version")
    public: bool = opt(False, "with --upload of a new dataset: make it public")
    notes: str = opt("", "version notes for --upload; empty: a summary of the export")


class ExportError(UserError, RuntimeError):
    """An export that cannot be written, verified or uploaded; the message names the file or run."""


def is_run(path: Path) -> bool:
    """A run folder under its final name (an unfinished `.partial` one is not a member's run)."""
    return path.suffix not in (".partial", ".old") and (path / MANIFEST).is_file() and (path / "adapter").is_dir()


def check_source_run(run: Path) -> dict:
    """The run's manifest, once every file of the run matches it (a changed or corrupted run is refused)."""
    try:
        return verify_run(run, stage="complete")
    except AdapterError as err:
        raise ExportError(f"refusing to export {run}: {err}") from None


def collect_members(cfg: ExportConfig) -> tuple[dict, dict | None]:
    """member name -> {kind, dir, runs | model}; plus the loaded recipe (or None)."""
    given: dict[str, dict] = {}
    for item in map(Path, cfg.runs):
        if is_run(item):
            name, runs, folder = item.resolve().parent.name, [item.name], item.resolve().parent
        elif item.is_dir():
            runs, folder, name = sorted(p.name for p in item.iterdir() if is_run(p) and p.name != "merged"), item, item.resolve().name
            if not runs:
                raise ExportError(f"{item}: neither a run folder nor a member directory holding run folders")
        else:
            raise ExportError(f"{item}: no such run folder or member directory")
        member = given.setdefault(name, {"kind": "runs", "dir": folder, "runs": []})
        if member["dir"].resolve() != folder.resolve():
            raise ExportError(f"member name {name!r} given twice: {member['dir']} and {folder}")
        member["runs"] += [r for r in runs if r not in member["runs"]]
    if not cfg.recipe:
        if not given:
            raise ConfigError("give runs= (run folders / member directories) or recipe= (see --help)")
        return given, None
    from infer.ensemble import load_recipe

    recipe = load_recipe(Path(cfg.recipe))
    root = Path(cfg.runs_root) if cfg.runs_root else Path(cfg.recipe).resolve().parent.parent
    names = [m["name"] for m in recipe["members"]]
    if set(given) - set(names):
        raise ExportError(f"{sorted(set(given) - set(names))} are not members of {cfg.recipe} (members: {names})")
    members = {}
    for m in recipe["members"]:
        folder = given[m["name"]]["dir"] if m["name"] in given else root / m.get("dir", m["name"])
        entry = {"kind": m["kind"], "dir": folder}
        entry.update({"runs": list(m["runs"])} if m["kind"] == "runs" else {"model": m["model"]})
        if m["kind"] == "length" and not (folder / m["model"]).is_file():
            raise ExportError(f"{folder / m['model']}: length model of recipe member {m['name']} not found")
        members[m["name"]] = entry
    return members, recipe


def copy_run(src: Path, dst: Path, manifest: dict) -> None:
    """Every file the run's manifest lists, and the manifest: the copy verifies like its source."""
    for rel in [*manifest["files"], MANIFEST]:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)


def check_rows(cfg: ExportConfig):
    from data.io import read_competition_csv

    path = Path(cfg.verify_csv) if cfg.verify_csv else Path(importlib.util.find_spec("data").origin).parent / "sample" / "test.csv"
    return read_competition_csv(path, labels=False)[0].head(cfg.verify_rows)


def predictions(run_dirs: list[Path], base: str, rows):
    from infer.predict import load_run, predict_frame

    return predict_frame([load_run(d, {"base_path": base, "tta": False, "workers": 1}) for d in run_dirs], rows)


def base_for(run: Path, bases: dict, member: str) -> str:
    """base_path= for the member, else the run's recorded model.path if it is here; "" if neither."""
    if member in bases:
        return bases[member]
    recorded = yaml.safe_load((run / "config.yaml").read_text())["model"]["path"]
    try:
        resolve_path(recorded)
    except ConfigError:  # recorded on another machine: no local base to check predictions with
        return ""
    return recorded


def prediction_checks(cfg: ExportConfig, out: Path, members: dict, manifest: dict) -> None:
    """Each exported run holds exactly its source run's files (sha256, manifest included), so it scores as
    the source did without scoring both; the first run of each member is then scored through the Kaggle
    code path on its base (one base load per member): id + finite probabilities summing to 1. A merged
    adapter is compared with the mean of its folds' predictions (that check loads the base per fold)."""
    from data.io import LABEL_COLS
    from infer.metrics import check_probs

    for rel, info in manifest["runs"].items():
        if not info.get("merged_from"):
            run, source = out / rel, members[info["member"]]["dir"] / Path(rel).name
            if file_table(run) != file_table(source) or read_manifest(run) != read_manifest(source):
                raise ExportError(f"{run}: files differ from the source run {source} (changed while exporting?)")
    if cfg.verify_rows <= 0:
        print("prediction checks skipped (verify_rows=0)")
        return
    rows, cols = check_rows(cfg), list(LABEL_COLS)
    bases = parse_bases(cfg.base_path, [n for n, m in members.items() if m["kind"] == "runs"])
    scored: set[str] = set()
    for rel, info in manifest["runs"].items():
        member, run = info["member"], out / rel
        base = base_for(run, bases, member)
        if not base:
            print(f"{rel}: prediction check skipped: base model not found locally (pass base_path={member}=DIR)")
        elif info.get("merged_from"):
            # Not a parity check: one model with the mean update and the mean head is not the ensemble of the
            # folds' predictions. How far apart the two are is what merging trades for a K-fold faster submission.
            folds = predictions([run.parent / r for r in info["merged_from"]], base, rows)[cols].to_numpy()
            diff = np.abs(check_probs(predictions([run], base, rows), f"{rel}")[cols].to_numpy() - folds)
            gap = {"rows": len(rows), "mean_abs_prob_diff": float(diff.mean()), "max_abs_prob_diff": float(diff.max())}
            manifest["merge"][member]["vs_fold_ensemble"] = gap
            print(f"{rel}: the merged model vs the ensemble of its {len(info['merged_from'])} folds (two different models): {gap}")
        elif member not in scored:
            scored.add(member)
            check_probs(predictions([run], base, rows), f"{rel} on {len(rows)} rows of the verify CSV")
            print(f"{rel}: scores {len(rows)} rows from the exported folder (the member's other runs are byte-identical "
                  "to their sources, checked above)")


def verify_export(out: Path, manifest: dict) -> None:
    listed, present = set(manifest["files"]), set(file_table(out))
    if listed != present:
        raise ExportError(f"{out}: files not matching the manifest listing: {sorted(listed ^ present)[:10]}")
    verify_files(out, manifest["files"], ExportError)
    for rel, info in manifest["runs"].items():
        run_sha = verify_run(out / rel)["head"]["sha256"]
        if run_sha != info["head_sha256"]:
            raise AdapterError(f"{out / rel}: head checksum differs between the run's manifest and {MANIFEST}")
    check_wheel(out / manifest["wheel"])
    check_metadata(json.loads((out / "dataset-metadata.json").read_text()))


def check_metadata(meta: dict) -> None:
    if not ID_RE.fullmatch(meta.get("id", "")):
        raise ConfigError(f"dataset id {meta.get('id')!r}: must be owner/slug, slug 6-50 lowercase letters, digits, hyphens")
    if not 6 <= len(meta.get("title", "")) <= 50:
        raise ConfigError(f"dataset title {meta.get('title')!r}: must be 6-50 characters (Kaggle's limit)")
    if meta.get("licenses") != [{"name": "CC0-1.0"}]:
        raise ConfigError(f"dataset licenses {meta.get('licenses')!r}: expected [{{'name': 'CC0-1.0'}}]")


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (overwrite and (out / MANIFEST).is_file() and (out / "dataset-metadata.json").is_file()):
        raise ExportError(f"{out} is not empty (overwrite=true replaces a previous export, nothing else)")


def write_export(cfg: ExportConfig, members: dict, recipe: dict | None, sources: dict, out: Path) -> dict:
    """Copy members, merge folds, write wheel, entry files and metadata; returns the manifest without files."""
    runs, cv, merge = {}, {}, {}
    for name, m in members.items():
        folder = out / "members" / name
        if m["kind"] == "length":
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy2(m["dir"] / m["model"], folder / m["model"])
            continue
        cv[name] = {"runs": {}, "oof": {p.name: json.loads(p.read_text()).get("oof_log_loss") for p in sorted(m["dir"].glob("cv-seed*.json"))}}
        for r in m["runs"]:
            source = sources[name, r]
            copy_run(m["dir"] / r, folder / r, source)
            metrics = source.get("metrics") or {}
            cv[name]["runs"][r] = metrics.get("log_loss")
            runs[f"members/{name}/{r}"] = {"member": name, "head_key": source["head"]["key"], "head_sha256": source["head"]["sha256"],
                                           "base_model": source["base_model"], "metrics": metrics, "trained_with": source["packages"]}
        m["predict"] = list(m["runs"])
        if cfg.merge_folds and len(m["runs"]) == 1:
            print(f"merge-folds: member {name} has a single run, nothing to merge")
        elif cfg.merge_folds:
            exact = merge_folds(folder, m["runs"])
            m["predict"] = ["merged"]
            head = json.loads((folder / "merged/manifest.json").read_text())["head"]
            runs[f"members/{name}/merged"] = {"member": name, "head_key": head["key"], "head_sha256": head["sha256"], "merged_from": m["runs"]}
            merge[name] = {"from": m["runs"], **exact, "vs_fold_ensemble": None}
    for path in map(Path, cfg.extra_wheels):
        (out / "wheels").mkdir(exist_ok=True)
        shutil.copy2(path, out / "wheels" / path.name)
    if cfg.recipe:
        shutil.copy2(cfg.recipe, out / "recipe.json")
    wheel = build_wheel(out).name
    slug = cfg.dataset_id.split("/")[1]
    summary = f"Dataset `{cfg.dataset_id}`: members {sorted(members)}" + (", combined by recipe.json" if recipe else ", averaged")
    (out / "kaggle_infer.py").write_text(LAUNCHER)
    (out / "kaggle_infer.ipynb").write_text(json.dumps(notebook(slug, wheel, cfg.kaggle_base, summary), indent=1))
    meta = {"title": cfg.title or slug.replace("-", " "), "id": cfg.dataset_id, "licenses": [{"name": "CC0-1.0"}]}
    (out / "dataset-metadata.json").write_text(json.dumps(meta, indent=2))
    return {
        "format": DATASET_FORMAT, "dataset_id": cfg.dataset_id, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "formatter_version": FORMATTER_VERSION, "wheel": wheel, "recipe": "recipe.json" if cfg.recipe else None,
        "packages": {p: installed_version(p) for p in ("torch", "transformers", "peft", "bitsandbytes")},
        "members": {n: {k: v for k, v in m.items() if k != "dir"} for n, m in members.items()},
        "runs": runs, "cv": cv, "recipe_oof_log_loss": (recipe or {}).get("oof_log_loss"), "merge": merge,
    }


def main(argv: list[str] | None = None) -> None:
    cfg = cli_config(ExportConfig, __doc__, argv)
    if not cfg.out or not cfg.dataset_id:
        raise ConfigError("out= and dataset_id= are required (see --help)")
    check_metadata({"id": cfg.dataset_id, "title": cfg.title or cfg.dataset_id.partition("/")[2], "licenses": [{"name": "CC0-1.0"}]})
    if cfg.upload and upload_problems():  # fail before minutes of export work
        raise ExportError("cannot upload:\n  " + "\n  ".join(upload_problems()))
    members, recipe = collect_members(cfg)
    sources = {(n, r): check_source_run(m["dir"] / r) for n, m in members.items() if m["kind"] == "runs" for r in m["runs"]}
    out = Path(cfg.out).resolve()
    check_out(out, cfg.overwrite)
    check_output(out, overwrite=True, folder=True)  # writable; check_out above decides what may be replaced
    # Built next to `out` and moved there only once verified, so a failed export never looks finished.
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    manifest = write_export(cfg, members, recipe, sources, partial)
    prediction_checks(cfg, partial, members, manifest)
    manifest["files"] = file_table(partial)
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
    verify_export(partial, manifest)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    print(f"{out}: {len(manifest['files'])} files verified ({len(manifest['runs'])} runs, heads and sha256 checked)")
    if cfg.upload:
        upload(out, cfg.dataset_id, cfg.notes or f"arena-pref export {manifest['created']}: {sorted(members)}", cfg.public)


if __name__ == "__main__":
    run_cli(main)

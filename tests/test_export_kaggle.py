"""train.export -> Kaggle dataset folder -> infer.kaggle on a fake /kaggle/input tree (CPU, tiny 4-bit Llama)."""
from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ENV, SAMPLE
from cli.config import run_cli
from data.io import LABEL_COLS, read_competition_csv
from model.run import MANIFEST, file_table, verify_files, write_manifest
from model.files import head_checksum
from infer.predict import load_run, predict_frame
from train.export import ExportError
from train.export import main as export_main

DATASET_ID = "tester/arena-pref-tiny"
ADAPTER = "adapter/adapter_model.safetensors"


@pytest.fixture(scope="module")
def member(llama_run, tmp_path_factory) -> Path:
    """A member directory holding a copy of the session's run (whose folder stays untouched)."""
    folder = tmp_path_factory.mktemp("members") / "tiny-llama"
    shutil.copytree(llama_run, folder / llama_run.name)
    return folder


@pytest.fixture(scope="module")
def exported(member, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "arena-pref-tiny"
    export_main([f"runs={member}", f"dataset_id={DATASET_ID}", f"out={out}", "verify_rows=4"])
    return out


@pytest.fixture(scope="module")
def installed(exported, tmp_path_factory) -> Path:
    """The exported wheel installed with `pip install --no-index --no-deps --target`."""
    target = tmp_path_factory.mktemp("site")
    wheel = next(exported.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
                   check=True, env=pip_env(), capture_output=True)
    return target


def pip_env() -> dict:
    """This interpreter's pip, or else the pip wheel bundled with ensurepip run from the zip (uv venvs lack pip)."""
    if importlib.util.find_spec("pip"):
        return dict(os.environ)
    bundled = sorted((Path(importlib.util.find_spec("ensurepip").origin).parent / "_bundled").glob("pip-*.whl"))
    return {**os.environ, "PYTHONPATH": str(bundled[-1])}


def test_an_exported_run_that_differs_from_its_source_is_refused(member, tmp_path, monkeypatch):
    import train.export

    original = train.export.copy_run

    def copy_then_change(src, dst, manifest):
        original(src, dst, manifest)
        (dst / "oof.csv").write_text((dst / "oof.csv").read_text() + "\n")

    monkeypatch.setattr(train.export, "copy_run", copy_then_change)
    with pytest.raises(train.export.ExportError, match="files differ from the source run"):
        export_main([f"runs={member}", f"dataset_id={DATASET_ID}", f"out={tmp_path / 'out'}", "verify_rows=0"])
    assert not (tmp_path / "out").exists()


def test_export_round_trips(exported, member):
    run = exported / "members" / "tiny-llama" / "fold0-seed42"
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "config.yaml", "manifest.json", "metrics.json", "oof.csv",
                                                     "oof_passes.csv", "tokenizer"]
    manifest = json.loads((exported / MANIFEST).read_text())
    assert manifest["files"] == file_table(exported) and verify_files(exported, manifest["files"]) == len(manifest["files"])
    source_head = json.loads((member / "fold0-seed42" / "manifest.json").read_text())["head"]["sha256"]
    assert manifest["runs"]["members/tiny-llama/fold0-seed42"]["head_sha256"] == source_head
    assert manifest["members"]["tiny-llama"] == {"kind": "runs", "runs": ["fold0-seed42"], "predict": ["fold0-seed42"]}
    assert set(manifest["packages"]) == {"torch", "transformers", "peft", "bitsandbytes"} and manifest["formatter_version"] == "1"
    assert manifest["cv"]["tiny-llama"]["runs"]["fold0-seed42"] == json.loads((run / "metrics.json").read_text())["log_loss"]
    meta = json.loads((exported / "dataset-metadata.json").read_text())
    assert meta == {"title": "arena pref tiny", "id": DATASET_ID, "licenses": [{"name": "CC0-1.0"}]}
    nb = json.loads((exported / "kaggle_infer.ipynb").read_text())
    code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert nb["nbformat"] == 4 and "'--no-index', '--no-deps'" in code and "kaggle_infer.py" in code

    rows = read_competition_csv(SAMPLE / "test.csv", labels=False)[0].iloc[:12]
    pd.testing.assert_frame_equal(predict_frame([load_run(run)], rows), predict_frame([load_run(member / run.name)], rows),
                                  check_exact=True)


def test_wheel_record_and_pip_install(exported, installed):
    wheel = next(exported.glob("*.whl"))
    assert wheel.name == "arena_pref-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        record = list(csv.reader(io.StringIO(zf.read("arena_pref-0.1.0.dist-info/RECORD").decode())))
        assert {row[0] for row in record} == set(zf.namelist())
        for name, digest, size in record:
            if name.endswith("RECORD"):
                continue
            data = zf.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, int(size)) == (f"sha256={expected}", len(data)), name
    for name in ("infer/kaggle.py", "infer/predict.py", "train/export.py", "data/io.py", "arena_pref-0.1.0.dist-info/METADATA"):
        assert (installed / name).is_file(), name


@pytest.mark.parametrize("damage", ["removed", "changed"])
def test_export_refuses_missing_or_changed_head(llama_run, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "tiny-llama" / "fold0-seed42"
    shutil.copytree(llama_run, run)
    tensors = load_file(run / ADAPTER)
    key = next(k for k in tensors if k.endswith("score.weight"))
    if damage == "removed":
        del tensors[key]
    else:
        tensors[key] = tensors[key] + 1e-3
    save_file(tensors, run / ADAPTER)
    with pytest.raises(ExportError, match=re.escape(f"refusing to export {run}: {run / ADAPTER}: ")):
        export_main([f"runs={run}", f"dataset_id={DATASET_ID}", f"out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()  # refused before writing


def test_upload_without_credentials_says_what_is_missing(member, tmp_path, monkeypatch, capsys):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    argv = [f"runs={member}", f"dataset_id={DATASET_ID}", f"out={tmp_path / 'out'}", "--upload"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: export_main(argv))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "KAGGLE_USERNAME and KAGGLE_KEY not set" in err and str(tmp_path / "kaggle-config" / "kaggle.json") in err
    assert "KAGGLE_API_TOKEN" in err and "access_token" in err  # all three ways are named
    if importlib.util.find_spec("kaggle") is None:
        assert "pip install kaggle" in err
    assert not (tmp_path / "out").exists()  # checked before any export work


def test_kaggle_entry_end_to_end(exported, installed, tiny_llama, tmp_path):
    """kaggle_infer.py against a fake /kaggle/input tree, importing the installed wheel, not the repo."""
    kaggle_input = tmp_path / "kaggle" / "input"
    competition, dataset, base = kaggle_input / "lmsys-chatbot-arena", kaggle_input / "arena-pref-tiny", kaggle_input / "tiny-base"
    competition.mkdir(parents=True)
    shutil.copy2(SAMPLE / "test.csv", competition / "test.csv")
    sample = pd.read_csv(SAMPLE / "sample_submission.csv").sample(frac=1.0, random_state=3)
    sample.to_csv(competition / "sample_submission.csv", index=False)
    shutil.copytree(exported, dataset)
    shutil.copytree(tiny_llama, base)
    out = tmp_path / "kaggle" / "working" / "submission.csv"
    env = {**ENV, "PYTHONPATH": str(installed)}
    where = subprocess.run([sys.executable, "-c", "import infer.kaggle; print(infer.kaggle.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(installed)
    cmd = [sys.executable, str(dataset / "kaggle_infer.py"), "--no-install", f"competition={competition}",
           f"dataset={dataset}", f"base={base}", f"out={out}", "infer.workers=1",
           "infer.quantization=4bit", "infer.compute_dtype=float32"]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "files match manifest.json" in result.stdout

    sub = pd.read_csv(out)
    assert list(sub.columns) == ["id", *LABEL_COLS] and sub["id"].tolist() == sample["id"].tolist()
    np.testing.assert_allclose(sub[list(LABEL_COLS)].sum(axis=1), 1.0, atol=1e-6)
    from infer.predict import main as predict_main

    reference = tmp_path / "reference.csv"
    predict_main([f"runs={dataset / 'members/tiny-llama/fold0-seed42'}", f"csv={competition / 'test.csv'}",
                  f"sample_submission={competition / 'sample_submission.csv'}", f"out={reference}", f"infer.base_path={base}",
                  "infer.quantization=4bit", "infer.compute_dtype=float32", "infer.workers=1", "infer.tta=true"])
    ref = pd.read_csv(reference)
    assert ref["id"].tolist() == sub["id"].tolist()
    np.testing.assert_allclose(sub[list(LABEL_COLS)].to_numpy(), ref[list(LABEL_COLS)].to_numpy(), atol=1e-6, rtol=0)


def test_merged_lora_holds_the_mean_of_the_fold_updates_exactly():
    import torch
    from train.merge import merge_lora_exactly, update_gap

    gen = torch.Generator().manual_seed(0)
    key_a, key_b, head = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight", "base_model.model.score.weight"
    folds = [{key_a: torch.randn(4, 16, generator=gen), key_b: torch.randn(8, 4, generator=gen),
              head: torch.randn(3, 8, generator=gen)} for _ in range(5)]
    lora = {"r": 4, "lora_alpha": 8, "use_rslora": False}
    merged, cfg = merge_lora_exactly(folds, lora)
    assert cfg["r"] == 20 and cfg["lora_alpha"] / cfg["r"] == lora["lora_alpha"] / lora["r"]  # same scale s
    mean_update = sum(f[key_b] @ f[key_a] for f in folds) / 5
    torch.testing.assert_close(merged[key_b] @ merged[key_a], mean_update, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged[head], sum(f[head] for f in folds) / 5)
    assert update_gap(folds, merged) < 1e-5
    # what element-wise averaging writes is another update altogether
    naive = (sum(f[key_b] for f in folds) / 5) @ (sum(f[key_a] for f in folds) / 5)
    assert (naive - mean_update).abs().max() > 0.5
    _, rs = merge_lora_exactly(folds, {**lora, "use_rslora": True})
    assert rs["lora_alpha"] / rs["r"] ** 0.5 == pytest.approx(lora["lora_alpha"] / lora["r"] ** 0.5)


def test_merge_folds_exports_one_adapter_of_rank_k_r(member, tmp_path):
    """Two folds (the second a perturbed copy) merged: rank 2r, the update gap ~0, the gap to the fold ensemble stored."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "tiny-llama"
    shutil.copytree(member, folder)
    fold1 = folder / "fold1-seed42"
    shutil.copytree(folder / "fold0-seed42", fold1)
    tensors = {k: v * 0.8 + 0.01 for k, v in load_file(fold1 / ADAPTER).items()}
    save_file(tensors, fold1 / ADAPTER, metadata={"format": "pt"})
    lora_file = fold1 / "adapter/adapter_config.json"  # peft writes target_modules (a set) in its process's hash order
    lora = json.loads(lora_file.read_text())
    lora_file.write_text(json.dumps({**lora, "target_modules": lora["target_modules"][::-1]}))
    manifest = json.loads((fold1 / "manifest.json").read_text())
    manifest["head"]["sha256"] = head_checksum(next(v for k, v in tensors.items() if k.endswith("score.weight")))
    write_manifest(fold1, manifest)  # resealed: a second fold as training would have written it

    out = tmp_path / "export"
    export_main([f"runs={folder}", f"dataset_id={DATASET_ID}", f"out={out}", "--merge-folds", "verify_rows=4"])
    dataset_manifest = json.loads((out / MANIFEST).read_text())
    assert dataset_manifest["members"]["tiny-llama"]["predict"] == ["merged"]
    merge = dataset_manifest["merge"]["tiny-llama"]
    r = json.loads((folder / "fold0-seed42/adapter/adapter_config.json").read_text())["r"]
    assert merge["rank"] == 2 * r and merge["max_abs_update_gap"] < 1e-5
    gap = merge["vs_fold_ensemble"]
    assert gap["rows"] == 4 and 0 <= gap["mean_abs_prob_diff"] <= gap["max_abs_prob_diff"] < 1
    merged = load_file(out / "members/tiny-llama/merged" / ADAPTER)
    first = load_file(folder / "fold0-seed42" / ADAPTER)
    head = next(k for k in merged if k.endswith("score.weight"))
    assert np.allclose(merged[head].numpy(), (first[head].numpy() + tensors[head].numpy()) / 2, atol=1e-7)
    assert dataset_manifest["runs"]["members/tiny-llama/merged"]["head_sha256"] == head_checksum(merged[head])


def test_merging_identical_folds_gives_the_fold_itself(member, tmp_path):
    """K copies of one fold: the mean update is that fold's, so the merged model scores as the fold does."""
    folder = tmp_path / "tiny-llama"
    shutil.copytree(member, folder)
    shutil.copytree(folder / "fold0-seed42", folder / "fold1-seed42")
    out = tmp_path / "export"
    export_main([f"runs={folder}", f"dataset_id={DATASET_ID}", f"out={out}", "--merge-folds", "verify_rows=6"])
    assert json.loads((out / MANIFEST).read_text())["merge"]["tiny-llama"]["vs_fold_ensemble"]["max_abs_prob_diff"] < 1e-5


def test_recipe_export_and_entry(member, exported, tiny_llama, tmp_path):
    """A recipe with the run member and a length member: exported, then scored by infer.kaggle in-process."""
    pytest.importorskip("infer.ensemble")
    from infer.kaggle import main as kaggle_main
    from train.length import main as length_main

    folds = tmp_path / "folds.csv"
    from data.folds import make_folds

    make_folds(read_competition_csv(SAMPLE / "train.csv")[0], n_folds=5, seed=42).to_csv(folds, index=False)
    runs_root = tmp_path / "runs"
    shutil.copytree(member, runs_root / "tiny-llama")
    length_main([f"csv={SAMPLE / 'train.csv'}", f"folds={folds}", f"out={runs_root / 'length'}"])
    recipe = {"version": 1, "method": "prob_avg", "weights": [0.7, 0.3], "temperature": 1.0, "stacker": None, "oof_log_loss": {},
              "members": [{"name": "tiny-llama", "kind": "runs", "runs": ["fold0-seed42"]},
                          {"name": "length", "kind": "length", "model": "length_model.json"}]}
    (runs_root / "ensemble").mkdir()
    (runs_root / "ensemble" / "recipe.json").write_text(json.dumps(recipe))
    out = tmp_path / "export"
    export_main([f"recipe={runs_root / 'ensemble' / 'recipe.json'}", f"dataset_id={DATASET_ID}", f"out={out}",
                 "verify_rows=0"])
    assert (out / "recipe.json").is_file() and (out / "members/length/length_model.json").is_file()
    sub_path = tmp_path / "submission.csv"
    kaggle_main([f"dataset={out}", f"competition={SAMPLE}", f"base={tiny_llama}", f"out={sub_path}",
                 "infer.workers=1", "infer.quantization=4bit", "infer.compute_dtype=float32", "infer.tta=false"])
    sub = pd.read_csv(sub_path)
    assert sub["id"].tolist() == pd.read_csv(SAMPLE / "sample_submission.csv")["id"].tolist()
    np.testing.assert_allclose(sub[list(LABEL_COLS)].sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("name, damage", [("test.csv", "empty"), ("test.csv", "header only"),
                                          ("sample_submission.csv", "empty"), ("sample_submission.csv", "other ids")])
def test_kaggle_entry_refuses_bad_competition_files(exported, tmp_path, monkeypatch, capsys, name, damage):
    """The Kaggle entry reads its CSVs through the one reader: one line naming the file, before any scoring."""
    import infer.predict
    from infer.kaggle import main as kaggle_main

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored")

    monkeypatch.setattr(infer.predict, "predict_frame", no_scoring)
    competition = tmp_path / "competition"
    competition.mkdir()
    for file in ("test.csv", "sample_submission.csv"):
        shutil.copy2(SAMPLE / file, competition / file)
    bad = competition / name
    lines = bad.read_text().splitlines(keepends=True)
    if damage == "empty":
        bad.write_text("")
    elif damage == "header only":
        bad.write_text(lines[0])
    else:
        bad.write_text(lines[0] + "999999999" + lines[1][lines[1].index(","):] + "".join(lines[2:]))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: kaggle_main([f"dataset={exported}", f"competition={competition}", f"out={tmp_path / 'sub.csv'}"]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith(f"error: {bad}") and "Traceback" not in err
    assert not (tmp_path / "sub.csv").exists()


@pytest.mark.parametrize("way", ["api token", "token file", "username and key", "kaggle.json"])
def test_kaggle_credentials_each_way(tmp_path, monkeypatch, way):
    """Each way the current kaggle releases authenticate is accepted; nothing is imported or sent."""
    from train.kaggle_upload import credentials_problem

    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    assert credentials_problem() is not None
    if way == "api token":
        monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_0123456789abcdef")
    elif way == "token file":
        (tmp_path / "home/.kaggle").mkdir(parents=True)
        (tmp_path / "home/.kaggle/access_token").write_text("KGAT_0123456789abcdef\n")
    elif way == "username and key":
        monkeypatch.setenv("KAGGLE_USERNAME", "someone")
        monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef")
    else:
        (tmp_path / "kaggle-config").mkdir()
        (tmp_path / "kaggle-config/kaggle.json").write_text(json.dumps({"username": "someone", "key": "0123"}))
    assert credentials_problem() is None

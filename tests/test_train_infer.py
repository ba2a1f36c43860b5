"""Train -> save -> reload -> predict on tiny random models (real 4-bit NF4 path on CPU)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ENV, REPO, SAMPLE, train_args
from cli.config import ConfigError, build_config
from data.formatter import Formatter
from data.io import LABEL_COLS, DataError
from model.factory import build_for_training, pick_device
from model.files import AdapterError
from model.run import load_model, write_manifest
from infer.predict import load_run, predict_frame, score_run
from model.packing import pad_batch
from train.__main__ import main as train_main
from train.config import TrainConfig
from train.fold import encode_examples, save_run


def test_tiny_training_beats_class_prior(llama_run):
    metrics = json.loads((llama_run / "metrics.json").read_text())
    assert metrics["rows"] > 40
    assert metrics["log_loss"] < metrics["prior_log_loss"] - 0.15, metrics


def test_run_folder_holds_what_inference_needs(llama_run):
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "tokenizer", "config.yaml", "oof.csv"):
        assert (llama_run / name).exists(), name
    manifest = json.loads((llama_run / "manifest.json").read_text())
    assert manifest["formatter"]["version"] == "1" and manifest["formatter"]["template"] == "tags"
    assert manifest["head"]["key"].endswith("score.weight") and len(manifest["head"]["sha256"]) == 64
    assert manifest["metrics"]["log_loss"] == json.loads((llama_run / "metrics.json").read_text())["log_loss"]
    assert load_run(llama_run).model.quantization == "4bit"


def test_oof_rows_equal_infer_predict_cli(llama_run, sample_folds, tmp_path):
    """CV and submission are one function: the CLI on fold 0's rows reproduces oof.csv exactly."""
    out = tmp_path / "pred.csv"
    cmd = [sys.executable, "-m", "infer", "predict", f"runs={llama_run}", f"csv={SAMPLE / 'train.csv'}",
           f"folds={sample_folds}", "fold=0", f"out={out}"]
    subprocess.run(cmd, check=True, cwd=REPO, env=ENV, capture_output=True)
    assert out.read_bytes() == (llama_run / "oof.csv").read_bytes()


def test_one_and_two_workers_identical(llama_run, sample_rows):
    rows = sample_rows.iloc[:40]
    one = predict_frame([load_run(llama_run)], rows)
    run = load_run(llama_run)
    run.infer.workers = 2
    two = predict_frame([run], rows)
    pd.testing.assert_frame_equal(one, two, check_exact=True)


def test_swap_tta_is_invariant_to_ab_order(llama_run, sample_rows):
    rows = sample_rows.iloc[:30]
    swapped = rows.assign(response_a=rows["response_b"], response_b=rows["response_a"])
    run = load_run(llama_run)
    p = predict_frame([run], rows)[list(LABEL_COLS)].to_numpy()
    q = predict_frame([run], swapped)[list(LABEL_COLS)].to_numpy()
    np.testing.assert_allclose(p, q[:, [1, 0, 2]], atol=1e-6)
    per_pass = score_run(run, rows)
    assert per_pass.groupby("id").size().eq(2).all()  # both passes present, merged by id


def test_submission_follows_sample_order_and_sums_to_one(llama_run, tmp_path):
    sample = pd.read_csv(SAMPLE / "sample_submission.csv").sample(frac=1.0, random_state=1)
    sample.to_csv(tmp_path / "sample.csv", index=False)
    out = tmp_path / "submission.csv"
    cmd = [sys.executable, "-m", "infer", "predict", f"runs={llama_run}", f"csv={SAMPLE / 'test.csv'}",
           f"sample_submission={tmp_path / 'sample.csv'}", f"out={out}", "infer.tta=false"]
    subprocess.run(cmd, check=True, cwd=REPO, env=ENV, capture_output=True)
    sub = pd.read_csv(out)
    assert list(sub.columns) == ["id", *LABEL_COLS]
    assert sub["id"].tolist() == sample["id"].tolist()
    np.testing.assert_allclose(sub[list(LABEL_COLS)].sum(axis=1), 1.0, atol=1e-6)
    assert (sub[list(LABEL_COLS)] > 0).all().all()

    sample.iloc[1:].to_csv(tmp_path / "short.csv", index=False)
    cmd[-3] = f"sample_submission={tmp_path / 'short.csv'}"
    cmd[-2] = f"out={tmp_path / 'short-submission.csv'}"
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert result.returncode != 0 and str(sample["id"].iloc[0]) in result.stderr


def _copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_missing_head_is_refused(llama_run, tmp_path, sample_rows):
    from safetensors.torch import load_file, save_file

    run = _copy_run(llama_run, tmp_path)
    file = run / "adapter" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(file).items() if "score" not in k}, file)
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: (sha256 differs|\d+ bytes)"):
        load_run(run)
    write_manifest(run, json.loads((run / "manifest.json").read_text()))  # as if it had been saved without its head
    with pytest.raises(AdapterError, match="no classification head"):
        predict_frame([load_run(run)], sample_rows.iloc[:4])
    cmd = [sys.executable, "-m", "infer", "predict", f"runs={run}", f"csv={SAMPLE / 'test.csv'}", f"out={tmp_path / 'x.csv'}"]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert result.returncode != 0 and "no classification head" in result.stderr


def test_changed_head_fails_checksum(llama_run, tmp_path, sample_rows):
    from safetensors.torch import load_file, save_file

    run = _copy_run(llama_run, tmp_path)
    file = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("score.weight"))
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, file)
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: (sha256 differs|\d+ bytes)"):
        predict_frame([load_run(run)], sample_rows.iloc[:4])


@pytest.mark.parametrize("quantization", ["4bit", "none"])
def test_save_reload_gives_identical_logits(tiny_llama, tiny_tokenizer, tmp_path, quantization, sample_rows):
    cfg = build_config(TrainConfig, REPO / "configs" / "tiny-llama.yaml",
                       [f"model.path={tiny_llama}", f"model.quantization={quantization}", "name=rt"])
    formatter = Formatter(tiny_tokenizer, cfg.format)
    torch.manual_seed(0)
    model = build_for_training(cfg.model, formatter.pad_id, pick_device("cpu"))
    with torch.no_grad():  # stand-in for training: LoRA B starts at zero, so make every update visible
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    model.eval()
    seqs = [e["input_ids"] for e in encode_examples(formatter, sample_rows.iloc[:6], swap_aug=True)]
    ids, mask = pad_batch(seqs, formatter.pad_id)
    with torch.inference_mode():
        before = model(ids, mask)
    save_run(tmp_path, cfg, model, tiny_tokenizer, formatter, 0, {}, None)
    reloaded = load_model(tmp_path, cfg.model, pick_device("cpu"), formatter.pad_id)
    with torch.inference_mode():
        after = reloaded(ids, mask)
    assert torch.equal(before, after)


def test_padding_does_not_change_a_rows_logits(llama_run, sample_rows):
    run = load_run(llama_run)
    formatter = run.formatter()
    model = load_model(llama_run, run.model, pick_device("cpu"), formatter.pad_id)
    seqs = formatter.encode_batch(sample_rows["prompt"][:5], sample_rows["response_a"][:5], sample_rows["response_b"][:5])
    with torch.inference_mode():
        batched = model(*pad_batch(seqs, formatter.pad_id))
        alone = torch.cat([model(*pad_batch([s], formatter.pad_id)) for s in seqs])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_swap_augmentation_permutes_labels(tiny_tokenizer, sample_rows):
    formatter = Formatter(tiny_tokenizer, build_config(TrainConfig).format)
    rows = sample_rows.iloc[:20]
    examples = encode_examples(formatter, rows, swap_aug=True)
    assert len(examples) == 40
    for k in range(20):
        plain, swapped = examples[k], examples[20 + k]
        np.testing.assert_array_equal(swapped["target"], plain["target"][[1, 0, 2]])
        row = rows.iloc[k]
        assert swapped["input_ids"] == formatter.encode(row.prompt, row.response_b, row.response_a)


def test_gemma2_trains_and_predicts(tmp_path, tiny_gemma2, sample_folds):
    train_main(train_args("tiny-gemma2.yaml", tiny_gemma2, sample_folds, tmp_path, "fold=1"))
    run = tmp_path / "tiny-gemma2" / "fold1-seed42"
    oof = pd.read_csv(run / "oof.csv")
    folds = pd.read_csv(sample_folds)
    assert sorted(oof["id"]) == sorted(folds.loc[folds["fold"] == 1, "id"])
    assert load_run(run).model.attn_implementation == "auto"


def test_fold_all_prints_cv_table(tmp_path, tiny_llama, sample_folds, capsys):
    train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path, "fold=all", "train.epochs=1",
                          "model.quantization=none", "train.swap_aug=false", "infer.tta=false"))
    printed = capsys.readouterr().out
    table = printed[printed.index("CV (OOF"):]
    assert [line.split()[0] for line in table.splitlines()[2:]] == ["0", "1", "2", "3", "4", "all"]
    summary = json.loads((tmp_path / "tiny-llama" / "cv-seed42.json").read_text())
    oof = pd.read_csv(tmp_path / "tiny-llama" / "oof-seed42.csv")
    assert summary["rows"] == len(oof) == 300 and oof["id"].is_unique


def test_extra_rows_only_in_training(tmp_path, tiny_llama, sample_folds):
    extra = pd.read_csv(SAMPLE / "test.csv").assign(winner_model_a=1, winner_model_b=0, winner_tie=0)
    extra.to_csv(tmp_path / "extra.csv", index=False)
    train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path, "fold=2", "train.max_steps=2",
                          f"data.extra_csv={tmp_path / 'extra.csv'}"))
    run = tmp_path / "tiny-llama" / "fold2-seed42"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["rows"]["extra"] == len(extra)
    assert not set(pd.read_csv(run / "oof.csv")["id"]) & set(extra["id"])


def test_finished_run_is_reused_not_retrained(llama_run, tiny_llama, sample_folds, capsys):
    adapter = llama_run / "adapter" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, llama_run.parents[1], "fold=0"))
    assert "is finished with these settings" in capsys.readouterr().out
    assert adapter.stat().st_mtime_ns == before
    assert not (llama_run.parent / "cv-seed42.json").exists()  # only fold=all writes the CV summary


def test_runs_weigh_equally_with_or_without_tta(llama_run, tmp_path, sample_rows):
    rows = sample_rows.iloc[:10]
    with_tta, without = load_run(llama_run), load_run(llama_run)
    without.infer.tta = False
    p_tta = predict_frame([with_tta], rows)[list(LABEL_COLS)].to_numpy()
    p_plain = predict_frame([without], rows)[list(LABEL_COLS)].to_numpy()
    both = predict_frame([with_tta, without], rows)[list(LABEL_COLS)].to_numpy()
    np.testing.assert_allclose(both, (p_tta + p_plain) / 2, atol=1e-9)


def test_non_finite_logits_are_refused(llama_run, sample_rows, monkeypatch):
    import infer.predict as predict
    import infer.scoring as scoring

    def nan_scores(run_path, model_cfg, infer_cfg, device, batches, *rest):
        return [np.full((len(b), 3), np.nan, dtype=np.float32) for b in batches], {}

    monkeypatch.setattr(scoring, "_score_share", nan_scores)
    with pytest.raises(predict.ScoringError, match="non-finite logits"):
        predict_frame([load_run(llama_run)], sample_rows.iloc[:3])


def test_bad_rows_stop_training_naming_the_row(tmp_path, tiny_llama, sample_folds):
    df = pd.read_csv(SAMPLE / "train.csv")
    df.loc[3, "winner_tie"] = 1
    df.to_csv(tmp_path / "bad.csv", index=False)
    args = train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path, "fold=0")
    args[3] = f"data.train_csv={tmp_path / 'bad.csv'}"
    with pytest.raises(DataError, match=f"id={df.loc[3, 'id']}"):
        train_main(args)


def test_8bit_base_trains_and_scores(tmp_path, tiny_llama, sample_folds):
    train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path, "fold=3", "model.quantization=8bit",
                          "train.max_steps=3", "infer.tta=false"))
    run = tmp_path / "tiny-llama" / "fold3-seed42"
    assert load_run(run).model.quantization == "8bit"
    assert len(pd.read_csv(run / "oof.csv")) == json.loads((run / "metrics.json").read_text())["rows"]


def test_init_from_starts_from_another_runs_adapter(llama_run, tiny_llama, sample_folds, tmp_path):
    from safetensors.torch import load_file

    # lr 0 for LoRA and head: the new run must end exactly where the pre-stage run ended.
    train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path, "fold=1", "train.max_steps=2",
                          "train.lr=0", f"train.init_from={llama_run}"))
    run = tmp_path / "tiny-llama" / "fold1-seed42"
    before = load_file(llama_run / "adapter" / "adapter_model.safetensors")
    after = load_file(run / "adapter" / "adapter_model.safetensors")
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    pre = json.loads((llama_run / "manifest.json").read_text())
    assert json.loads((run / "manifest.json").read_text())["init_from"] == {"run": str(llama_run), "head_sha256": pre["head"]["sha256"]}


def test_init_from_refuses_another_lora_shape(llama_run, tiny_llama, sample_folds, tmp_path):
    with pytest.raises(ConfigError, match="does not fit this model's LoRA"):
        train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path, "fold=1", "train.max_steps=1",
                              "model.lora_r=4", f"train.init_from={llama_run}"))


def test_excluded_prompts_are_never_trained_on(tiny_llama, sample_folds, sample_rows, tmp_path):
    from data.io import prompt_key

    pd.read_csv(SAMPLE / "train.csv").iloc[:40].to_csv(tmp_path / "held.csv", index=False)
    train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path, "fold=3", "train.max_steps=1",
                          f"data.exclude_prompts_of=[{tmp_path / 'held.csv'}]"))
    run = tmp_path / "tiny-llama" / "fold3-seed42"
    folds = pd.read_csv(sample_folds).set_index("id")["fold"]
    held = set(sample_rows["prompt"].iloc[:40].map(prompt_key))
    training = sample_rows[(sample_rows["id"].map(folds) != 3) & ~sample_rows["prompt"].map(prompt_key).isin(held)]
    assert json.loads((run / "manifest.json").read_text())["rows"]["train"] == len(training) < (folds != 3).sum()
    assert set(pd.read_csv(run / "oof.csv")["id"]) == set(folds.index[folds == 3])  # held-out rows are all scored


def test_inference_load_prints_no_false_head_report(llama_run, capfd, caplog):
    """transformers' load report ("score.weight MISSING ... newly initialized") is false at inference, where the
    head is restored from the adapter right after: it is dropped there only, and so is bitsandbytes' kernels note
    and the deprecation warning peft triggers."""
    run = load_run(llama_run)
    capfd.readouterr()  # whatever setting up the run printed
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(llama_run, run.model, pick_device("cpu"), run.formatter().pad_id)
    out = "".join(capfd.readouterr()) + caplog.text
    assert "adapter and head loaded and verified" in out
    assert "LOAD REPORT" not in out and "newly initialized" not in out and "pip install kernels" not in out
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]

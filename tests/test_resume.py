"""resume=auto: a fold killed after a checkpoint continues with the same command and ends with
the adapter an uninterrupted run of the same seed ends with (CPU, tiny 4-bit Llama)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_args
from cli.config import ConfigError
from train.__main__ import main as train_main
from train.trainers import PairTrainer

STEPS = ("fold=1", "train.max_steps=6", "train.save_steps=2", "train.batch_size=8", "train.grad_accum=2",
         "model.lora_dropout=0.1", "infer.tta=false")


def adapter(out):
    return load_file(out / "tiny-llama" / "fold1-seed42" / "adapter" / "adapter_model.safetensors")


def test_killed_fold_resumes_to_the_same_adapter(tmp_path, tiny_llama, sample_folds, monkeypatch, capsys):
    train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path / "whole", *STEPS))

    calls = {"n": 0}
    original = PairTrainer.training_step

    def killed_after_step_3(self, *args, **kwargs):  # 2 micro-batches per step: dies inside step 4
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PairTrainer, "training_step", killed_after_step_3)
    args = train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path / "killed", *STEPS)
    with pytest.raises(KeyboardInterrupt):
        train_main(args)
    run_dir = tmp_path / "killed" / "tiny-llama" / "fold1-seed42"
    work = run_dir.with_name("fold1-seed42.partial")  # an unfinished run never holds the final name
    assert (work / "trainer" / "checkpoint-2").is_dir() and not run_dir.exists()
    checkpoint_files = {p.name for p in (work / "trainer" / "checkpoint-2").iterdir()}
    assert "adapter_model.safetensors" in checkpoint_files and "model.safetensors" not in checkpoint_files

    monkeypatch.setattr(PairTrainer, "training_step", original)
    capsys.readouterr()
    train_main(args)
    assert "resuming from" in capsys.readouterr().out
    whole, resumed = adapter(tmp_path / "whole"), adapter(tmp_path / "killed")
    assert set(whole) == set(resumed)
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0, msg=name)
    assert json.loads((run_dir / "metrics.json").read_text())["rows"] > 0
    assert not (run_dir / "trainer").exists() and not work.exists()  # checkpoints go once the fold is finished


def test_resume_refuses_checkpoints_of_another_config(tmp_path, tiny_llama, sample_folds, monkeypatch):
    def killed(self, *args, **kwargs):
        if self.state.global_step >= 2:
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    original = PairTrainer.training_step
    monkeypatch.setattr(PairTrainer, "training_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path, *STEPS))
    monkeypatch.setattr(PairTrainer, "training_step", original)
    with pytest.raises(ConfigError, match=r"different config\)[\s\S]*train.lr: 0.003 -> 0.001[\s\S]*overwrite=true"):
        train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path, *STEPS, "train.lr=1e-3"))
    train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path, *STEPS, "train.lr=1e-3", "overwrite=true"))

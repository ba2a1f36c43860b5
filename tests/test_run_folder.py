"""The run-folder contract (model/run.py) under misuse and kills, on CPU with the tiny 4-bit Llama.

A finished run is reused only for the same settings; a damaged run folder is refused by
`python -m infer predict` in one `error:` line naming the file, before any base model loads; an
interrupted `overwrite=true` retraining leaves the old run intact; a kill after the adapter was
saved resumes at OOF scoring and ends with the OOF file an uninterrupted run writes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import train.fold
from conftest import REPO, SAMPLE, forbid_model_loading, train_args
from cli.config import ConfigError, run_cli
from infer.predict import main as predict_main
import model.run
from model.run import ADAPTER_FILE, MANIFEST, file_table, partial_dir, verify_run
from train.__main__ import main as train_main
from train.trainers import PairTrainer

RUN = Path("tiny-llama") / "fold0-seed42"  # where llama_run's fold lives under any output_dir
# A fresh run as small as the tests can make it: few steps, one scoring pass.
QUICK = ("fold=2", "train.max_steps=3", "infer.tta=false")


def must_not_train(self, *args, **kwargs):
    raise AssertionError("retrained")


@pytest.fixture
def finished(tmp_path, llama_run) -> Path:
    """A copy of the session's finished fold-0 run where `train` with output_dir=tmp_path finds it."""
    run = tmp_path / RUN
    shutil.copytree(llama_run, run)
    return run


@pytest.fixture
def no_base(monkeypatch):
    """Loading a base model fails the test: damage must be found from the files alone."""
    forbid_model_loading(monkeypatch)


def predict_cli(run: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    """`python -m infer predict` on `run`, in-process: (exit code, stdout + stderr)."""
    out = tmp_path / "pred.csv"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: predict_main([f"runs={run}", f"csv={SAMPLE / 'test.csv'}", f"out={out}"]))
    assert not out.exists()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out + captured.err


def lora_byte_offset(file: Path) -> tuple[str, int]:
    """(key, absolute offset of a byte in the middle) of a LoRA tensor, from the safetensors header:
    8 bytes little-endian header length, the JSON header, then data offsets relative to its end."""
    raw = file.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    key = next(k for k in sorted(header) if "lora_A" in k or "lora_B" in k)
    start, end = header[key]["data_offsets"]
    return key, 8 + header_len + (start + end) // 2


# Hole 1: a finished run is never silently reused, or replaced, for other settings.

@pytest.mark.parametrize("override, key", [("train.lr=1e-3", "train.lr"), ("format.max_length=64", "format.max_length")])
def test_finished_run_with_other_settings_is_refused(finished, tmp_path, tiny_llama, sample_folds, monkeypatch,
                                                     override, key):
    monkeypatch.setattr(PairTrainer, "train", must_not_train)
    manifest, files = (finished / MANIFEST).read_bytes(), file_table(finished)
    with pytest.raises(ConfigError) as refused:
        train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path, "fold=0", override))
    message = str(refused.value)
    assert f"{key}:" in message and "overwrite=true" in message and "name=" in message, message
    assert (finished / MANIFEST).read_bytes() == manifest and file_table(finished) == files
    assert not partial_dir(finished).exists()


def test_finished_run_with_the_same_settings_is_reused(finished, tmp_path, tiny_llama, sample_folds, monkeypatch,
                                                       capsys):
    monkeypatch.setattr(PairTrainer, "train", must_not_train)
    manifest = (finished / MANIFEST).read_bytes()
    train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path, "fold=0"))
    assert "is finished with these settings" in capsys.readouterr().out
    assert (finished / MANIFEST).read_bytes() == manifest


# Holes 2 and 3: a damaged run folder is refused by name before any base model loads.

def test_flipped_byte_in_a_lora_tensor_is_refused_before_the_base_loads(finished, tmp_path, no_base, capsys):
    file = finished / ADAPTER_FILE
    key, offset = lora_byte_offset(file)
    assert "score" not in key  # the head has its own checksum; this is about every other tensor
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))
    assert file.stat().st_size == len(data)

    code, output = predict_cli(finished, tmp_path, capsys)
    assert code == 1
    assert ADAPTER_FILE in output and "Traceback" not in output, output


def truncate_adapter(run: Path) -> str:
    file = run / ADAPTER_FILE
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return ADAPTER_FILE


def remove_adapter_config(run: Path) -> str:
    (run / "adapter" / "adapter_config.json").unlink()
    return "adapter/adapter_config.json"


def break_manifest(run: Path) -> str:
    (run / MANIFEST).write_text((run / MANIFEST).read_text()[:-10])
    return MANIFEST


@pytest.mark.parametrize("damage", [truncate_adapter, remove_adapter_config, break_manifest])
def test_damaged_run_folder_is_refused_before_the_base_loads(finished, tmp_path, no_base, capsys, damage):
    named = damage(finished)
    code, output = predict_cli(finished, tmp_path, capsys)
    assert code == 1
    assert named in output and "Traceback" not in output, output


# Hole 4: overwrite=true replaces the old run only once the new one is complete.

def test_killed_overwrite_leaves_the_old_run_intact(finished, tmp_path, tiny_llama, sample_folds, monkeypatch):
    manifest, oof = (finished / MANIFEST).read_bytes(), (finished / "oof.csv").read_bytes()

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(PairTrainer, "training_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path, "fold=0", "train.lr=1e-3",
                              "overwrite=true"))
    verify_run(finished, stage="complete")
    assert (finished / MANIFEST).read_bytes() == manifest
    assert (finished / "oof.csv").read_bytes() == oof


# Hole 5: a kill between saving the adapter and scoring resumes at scoring, without retraining.

def test_kill_after_adapter_save_resumes_at_scoring(tmp_path, tiny_llama, sample_folds, monkeypatch, capsys):
    whole = tmp_path / "a"
    train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, whole, *QUICK))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    original = train.fold.score_stage
    monkeypatch.setattr(train.fold, "score_stage", killed)
    args = train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path / "b", *QUICK)
    with pytest.raises(KeyboardInterrupt):
        train_main(args)
    run_dir = tmp_path / "b" / "tiny-llama" / "fold2-seed42"
    work = partial_dir(run_dir)
    assert json.loads((work / MANIFEST).read_text())["stage"] == "trained"
    assert not run_dir.exists()

    monkeypatch.setattr(train.fold, "score_stage", original)
    monkeypatch.setattr(PairTrainer, "train", must_not_train)
    capsys.readouterr()
    train_main(args)
    assert "resuming at OOF scoring" in capsys.readouterr().out
    verify_run(run_dir, stage="complete")
    assert not work.exists()
    # CPU training with one seed is deterministic, so the resumed run scores what an uninterrupted one does.
    assert (run_dir / "oof.csv").read_bytes() == (whole / "tiny-llama" / "fold2-seed42" / "oof.csv").read_bytes()


def test_a_file_loading_would_read_but_the_manifest_does_not_list_is_refused(finished, tmp_path, capsys, no_base):
    """A stray tokenizer file (left by copying one run over another) would change token ids unchecked."""
    (finished / "tokenizer" / "added_tokens.json").write_text('{"hello world": 49152}')
    code, out = predict_cli(finished, tmp_path, capsys)
    assert code == 1 and "tokenizer/added_tokens.json: not in" in out and "Traceback" not in out


def test_files_left_by_a_killed_write_are_not_sealed(finished):
    """A temporary file a kill left behind is neither listed nor shipped, so the resealed run still verifies."""
    (finished / "manifest.json.tmp").write_text("{")
    (finished / ".oof.csv.abc123.tmp").write_text("half")
    manifest = model.run.write_manifest(finished, json.loads((finished / MANIFEST).read_text()))
    assert not [rel for rel in manifest["files"] if rel.endswith(".tmp")]
    verify_run(finished, stage="complete")


def test_fold_lock_keeps_a_second_trainer_out(tmp_path):
    """Two processes never build one fold's folder at once (a rerun started while the first still ran did, once):
    the second is stopped with the holder named; the lock goes with its holder, on an error too, and a lock file
    left by a process that ended holds nothing (the kernel dropped its lock)."""
    import os
    import subprocess
    import sys

    from model.run import RunBusy, fold_lock

    run = tmp_path / "plain" / "fold0-seed42"
    lock = run.with_name("fold0-seed42.lock")
    with fold_lock(run):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(RunBusy, match=rf"being trained by process {os.getpid()} on .*wait for it"):
            with fold_lock(run):
                pass
    assert not lock.exists()
    with pytest.raises(ZeroDivisionError):
        with fold_lock(run):
            1 / 0
    assert not lock.exists()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from model.run import "
                               "fold_lock\nwith fold_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)",
                               str(run)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusy, match=f"being trained by process {holder.pid} on "):
            with fold_lock(run):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists()  # killed: its file stays, its lock does not
    with fold_lock(run):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_training_a_locked_fold_stops_before_any_model_loads(tmp_path, tiny_llama, sample_folds, monkeypatch, capsys):
    import os

    from model.run import fold_lock

    out = tmp_path / "runs"
    forbid_model_loading(monkeypatch)
    with fold_lock(out / "tiny-llama" / "fold0-seed42"):  # held by this process: the run's own lock is refused
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, out, "fold=0")))
    assert exit_info.value.code != 0
    assert f"being trained by process {os.getpid()}" in capsys.readouterr().err
    assert not (out / "tiny-llama" / "fold0-seed42.partial").exists()

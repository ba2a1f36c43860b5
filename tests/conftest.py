"""Shared fixtures: a BPE tokenizer trained in-process and tiny random Llama / Gemma-2 bases.

Nothing is downloaded: models are built from configs with random weights and saved the way a
real base model folder looks (safetensors + tokenizer files), so the real loading code runs.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
SHARED_DATA = REPO.parent / "shared" / "data"
# For `python -m ...` subprocesses: the repo first, whatever PYTHONPATH already holds after it.
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}


def train_args(config: str, model_dir: Path, folds: Path, out: Path, *extra: str) -> list[str]:
    """argv for `python -m train` on the committed sample with a tiny model."""
    return [str(REPO / "configs" / config), f"model.path={model_dir}", f"data.folds_csv={folds}",
            f"data.train_csv={SAMPLE / 'train.csv'}", f"output_dir={out}", *extra]


def train_tokenizer(texts: list[str], vocab_size: int = 1000, with_pad: bool = False):
    """Byte-level BPE with Llama-3 style specials: BOS added in front, EOS, and (by default) no pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>"] + (["<pad>"] if with_pad else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>" if with_pad else None
    )


def sample_texts() -> list[str]:
    import pandas as pd

    df = pd.read_csv(SAMPLE / "train.csv")
    tags = ["<prompt>: ", "<response_a>: ", "<response_b>: ", "\n", "\n\n"]
    return tags * 20 + df["prompt"].tolist() + df["response_a"].tolist() + df["response_b"].tolist()


def build_tiny_model(path: Path, arch: str, tokenizer) -> Path:
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16, sliding_window=64))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(sample_texts())


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_gemma2(tmp_path_factory, tiny_tokenizer) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gemma2"), "gemma2", tiny_tokenizer)


@pytest.fixture(scope="session")
def sample_folds(tmp_path_factory) -> Path:
    from data.folds import make_folds
    from data.io import read_competition_csv

    df, _ = read_competition_csv(SAMPLE / "train.csv")
    path = tmp_path_factory.mktemp("folds") / "folds.csv"
    make_folds(df, n_folds=5, seed=42).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def sample_rows():
    """The committed sample's train.csv as read_competition_csv returns it."""
    from data.io import read_competition_csv

    return read_competition_csv(SAMPLE / "train.csv")[0]


@pytest.fixture(scope="session")
def llama_run(tmp_path_factory, tiny_llama, sample_folds) -> Path:
    """A finished tiny 4-bit Llama run of fold 0 (trained once per test session); treat as read-only."""
    from train.__main__ import main as train_main

    out = tmp_path_factory.mktemp("runs")
    train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, out, "fold=0"))
    return out / "tiny-llama" / "fold0-seed42"


def forbid_model_loading(monkeypatch) -> None:
    """From here on, loading a base, building a trainable model or scoring a row fails the test: bad input
    must be found before any of that. (Call it after fixtures that train, such as llama_run.)"""
    import infer.predict
    import model.factory
    import model.run
    import train.fold

    def fail(what):
        def refuse(*args, **kwargs):
            raise AssertionError(what)
        return refuse

    monkeypatch.setattr(model.factory, "load_base", fail("base loaded"))
    monkeypatch.setattr(model.run, "load_base", fail("base loaded"))  # imported by name there
    monkeypatch.setattr(model.factory, "build_for_training", fail("model built"))
    monkeypatch.setattr(train.fold, "build_for_training", fail("model built"))  # imported by name there
    monkeypatch.setattr(infer.predict, "predict_frame", fail("scored"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def sealed_run(folder: Path, oof) -> None:
    """A complete run folder as model.run.verify_run accepts it (adapter with a head, manifest listing every
    file), whose oof.csv holds `oof`: a member's fold run without training one."""
    import torch
    from safetensors.torch import save_file

    from data.formatter import FORMATTER_VERSION
    from model.files import head_checksum
    from model.run import write_manifest

    head, key = torch.zeros(3, 8), "base_model.model.score.weight"
    (folder / "adapter").mkdir(parents=True)
    save_file({key: head}, folder / "adapter/adapter_model.safetensors")
    (folder / "adapter/adapter_config.json").write_text("{}")
    (folder / "config.yaml").write_text("{}\n")
    oof.to_csv(folder / "oof.csv", index=False)
    write_manifest(folder, {"formatter": {"version": FORMATTER_VERSION}, "stage": "complete",
                            "head": {"key": key, "shape": [3, 8], "sha256": head_checksum(head)}})

"""Two-stage training: a pre-stage on extra data that never sees the evaluation prompts, then
fold runs that start from its adapter (`data.exclude_prompts_of`, `train.init_from`)."""
from __future__ import annotations

from pathlib import Path

from cli.config import ConfigError
from data.io import prompt_key, read_competition_csv
from model.files import load_adapter_weights
from model.run import run_folder, verify_run
from train.config import TrainConfig


def excluded_prompts(cfg: TrainConfig) -> set[str]:
    keys: set[str] = set()
    for path in cfg.data.exclude_prompts_of:
        other, _ = read_competition_csv(path, labels=False)
        keys |= set(other["prompt"].map(prompt_key))
    return keys


def init_from(model, cfg: TrainConfig) -> dict:
    """Start LoRA + head from another run (a pre-stage); returns its provenance for the manifest."""
    src = Path(cfg.train.init_from)
    run = run_folder(src)
    manifest = verify_run(run)  # every file of the pre-stage checked before its adapter is used
    base = {"path": cfg.model.path, "gguf_file": cfg.model.gguf_file}
    if manifest["base_model"] != base:
        raise ConfigError(f"train.init_from={src}: trained on base {manifest['base_model']}, this run uses {base}")
    try:
        load_adapter_weights(model.model, run / "adapter")
    except RuntimeError as err:  # tensor shapes differ: another LoRA rank or model size
        raise ConfigError(f"train.init_from={src}: adapter does not fit this model's LoRA ({err})") from None
    return {"run": str(src), "head_sha256": manifest["head"]["sha256"]}

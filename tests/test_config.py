"""Config plumbing: defaults < YAML < key=value, unknown keys and bad types are errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from cli.config import ConfigError, build_config, load_config
from train.config import TrainConfig

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_documents_its_launch(path):
    cfg = build_config(TrainConfig, path)
    assert cfg.model.quantization in ("4bit", "8bit", "none")
    header = path.read_text().split("\n\n")[0]
    assert "python -m train " + f"configs/{path.name}" in header


def test_overrides_beat_yaml_and_parse_types(tmp_path):
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("model:\n  lora_r: 8\ntrain:\n  lr: 1.0e-4\n")
    cfg = load_config(TrainConfig, [str(yaml_path), "model.lora_r=32", "train.swap_aug=false",
                                    "model.lora_targets=q_proj,v_proj", "--overwrite", "seed=7"])
    assert cfg.model.lora_r == 32 and cfg.train.lr == 1e-4 and cfg.train.swap_aug is False
    assert cfg.model.lora_targets == ["q_proj", "v_proj"] and cfg.overwrite is True and cfg.seed == 7
    assert cfg.model.lora_alpha == 32  # dataclass default kept


def test_yaml_style_values_in_overrides():
    cfg = load_config(TrainConfig, ["train.lr=5e-4", "model.lora_layers=[1, 2]", "model.lora_targets=[q_proj,v_proj]",
                                    "data.extra_csv=[a.csv,b.csv]"])
    assert cfg.train.lr == 5e-4 and cfg.model.lora_layers == [1, 2]
    assert cfg.model.lora_targets == ["q_proj", "v_proj"] and cfg.data.extra_csv == ["a.csv", "b.csv"]
    with pytest.raises(ConfigError, match="seed in command-line overrides: cannot parse"):
        load_config(TrainConfig, ["seed=@x"])


def test_empty_yaml_section_means_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n#  lora_r: 8\ntrain:\n  epochs: 2\n")
    cfg = build_config(TrainConfig, path, ["model.lora_alpha=8"])
    assert cfg.model.lora_r == 16 and cfg.model.lora_alpha == 8 and cfg.train.epochs == 2.0


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        build_config(TrainConfig, path)


def test_flag_spelling_maps_to_key():
    cfg = load_config(TrainConfig, ["--data.drop-bad-rows", "--seed=3"])
    assert cfg.data.drop_bad_rows is True and cfg.seed == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.lora_rank=8", "unknown key.*model.lora_rank"),
        ("epochs=2", "unknown key.*epochs"),
        ("model.lora_r=eight", "model.lora_r .* must be int"),
        ("train.swap_aug=maybe", "train.swap_aug .* must be bool"),
        ("format.template=chatml", "format.template must be one of"),
        ("model.quantization=3bit", "model.quantization must be"),
        ("model.gguf_file=x.gguf", "cannot re-quantise"),
        ("infer.fp8=true", "infer.fp8=true needs an unquantised base.*infer.quantization=none infer.compute_dtype=bfloat16 infer.fp8=true"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, [override])


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"train.learning_rate.*bad.yaml"):
        build_config(TrainConfig, path)


def test_cli_help_and_errors_exit_cleanly():
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    help_run = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=REPO, env=env, capture_output=True, text=True)
    assert help_run.returncode == 0 and "model.lora_r" in help_run.stdout and "LoRA rank" in help_run.stdout
    bad = subprocess.run([sys.executable, "-m", "train", "configs/tiny-llama.yaml", "model.nope=1"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "model.nope" in bad.stderr and "Traceback" not in bad.stderr


def test_distill_config_is_the_recipe_plus_its_teacher():
    """configs/smollm2-mtbench-distill.yaml copies the recipe (one YAML per run: no includes); only the
    train.distill_* keys may differ, so the README's comparison stays recipe against recipe + teacher."""
    recipe = yaml.safe_load((REPO / "configs" / "smollm2-mtbench.yaml").read_text())
    distill = yaml.safe_load((REPO / "configs" / "smollm2-mtbench-distill.yaml").read_text())
    added = {k: distill["train"].pop(k) for k in [k for k in distill["train"] if k.startswith("distill_")]}
    assert distill == recipe
    assert added == {"distill_from": "runs/stack-seed42", "distill_weight": 0.5, "distill_temperature": 1.0}


def test_pdistill_config_is_the_distill_config_started_from_the_prestage():
    """configs/smollm2-mtbench-pdistill.yaml (the best recipe) is the distillation config plus train.init_from, the
    pre-stage run folder that configs/smollm2-alpaca.yaml writes (fold 0, seed 42)."""
    distill = yaml.safe_load((REPO / "configs" / "smollm2-mtbench-distill.yaml").read_text())
    pdistill = yaml.safe_load((REPO / "configs" / "smollm2-mtbench-pdistill.yaml").read_text())
    assert pdistill["train"].pop("init_from") == "runs/smollm2-alpaca/fold0-seed42"
    assert pdistill == distill

"""`infer report` (sections, PNGs, numbers equal to log_loss, position bias) and `infer plan`
(token counts from the run's own formatter, minutes = tokens / throughput, budget knobs)."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ENV, REPO, SAMPLE
from cli.config import ConfigError
from data.folds import read_folds
from data.formatter import FormatConfig, Formatter
from data.io import LABEL_COLS, DataError, read_competition_csv
from infer.plan import DEFAULT_TABLE, ThroughputTable, format_table, plan, read_run
from infer.metrics import log_loss
from infer.scoring import make_batches
from infer.report import fold_table, join_oof, position_bias, write_report
from infer.report import main as report_main

HEADINGS = ("### Log loss by fold", "### Calibration", "### Confusion matrix", "### Log loss by length",
            "## Position bias (swap TTA passes)")


@pytest.fixture(scope="module")
def labels() -> pd.DataFrame:
    return read_competition_csv(SAMPLE / "train.csv")[0]


@pytest.fixture(scope="module")
def folds(sample_folds) -> pd.DataFrame:
    return read_folds(sample_folds)


@pytest.fixture(scope="module")
def test_rows() -> pd.DataFrame:
    return read_competition_csv(SAMPLE / "test.csv")[0]


def synthetic_oof(labels: pd.DataFrame, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    logits = 2.0 * np.stack(labels["target"]) + rng.normal(size=(len(labels), 3))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return pd.DataFrame({"id": labels["id"], **{c: probs[:, k] for k, c in enumerate(LABEL_COLS)}})


def images(md_path) -> list:
    names = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_path.read_text())
    assert names
    for name in names:
        from PIL import Image

        png = md_path.parent / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 0 < png.stat().st_size < 60_000, name
        with Image.open(png) as img:
            img.verify()
    return names


def direct_truth(labels: pd.DataFrame, ids) -> np.ndarray:
    return np.stack(labels.set_index("id").loc[list(ids), "target"].to_numpy())


def test_report_on_trained_run(llama_run, labels, folds, tmp_path):
    md = write_report([llama_run / "oof.csv"], labels, folds, tmp_path / "rep", [llama_run / "oof_passes.csv"])
    text = md.read_text()
    assert text.startswith("# OOF report") and "## tiny-llama/fold0-seed42/oof" in text
    assert all(h in text for h in HEADINGS) and "section omitted" not in text
    assert set(images(md)) == {"m0-calibration.png", "m0-confusion.png", "m0-lengths.png", "position-bias.png"}

    oof = pd.read_csv(llama_run / "oof.csv")
    table = fold_table(join_oof(llama_run / "oof.csv", labels, folds))
    direct = log_loss(direct_truth(labels, oof["id"]), oof[list(LABEL_COLS)].to_numpy())
    metrics = json.loads((llama_run / "metrics.json").read_text())
    assert list(table["fold"]) == ["0", "all"] and list(table["rows"]) == [len(oof)] * 2
    assert table["log_loss"].tolist() == pytest.approx([direct, direct], abs=1e-12)
    # The same numbers training wrote for this fold, prior of the training folds included.
    assert table["log_loss"][0] == pytest.approx(metrics["log_loss"], abs=1e-7)
    assert table["prior"][0] == pytest.approx(metrics["prior_log_loss"], abs=1e-12)
    assert f"{direct:.4f}" in text and f"{metrics['prior_log_loss']:.4f}" in text


def test_fold_table_all_folds_and_two_models(labels, folds, tmp_path):
    oof = synthetic_oof(labels, seed=1)
    oof.to_csv(tmp_path / "a.csv", index=False)
    oof.sample(frac=1.0, random_state=0).to_csv(tmp_path / "b.csv", index=False)  # row order must not matter
    table = fold_table(join_oof(tmp_path / "b.csv", labels, folds))
    fold_of = folds.set_index("id")["fold"]
    all_targets = direct_truth(labels, labels["id"])
    for k in range(5):
        ids = oof["id"][oof["id"].map(fold_of) == k]
        truth = direct_truth(labels, ids)
        prior = all_targets[labels["id"].map(fold_of).to_numpy() != k].mean(axis=0)
        row = table[table["fold"] == str(k)].iloc[0]
        assert row["rows"] == len(ids)
        assert row["log_loss"] == pytest.approx(log_loss(truth, oof.set_index("id").loc[ids].to_numpy()), abs=1e-12)
        assert row["prior"] == pytest.approx(log_loss(truth, np.tile(prior, (len(ids), 1))), abs=1e-12)
    overall = table.iloc[-1]
    assert overall["fold"] == "all" and overall["rows"] == 300
    assert overall["log_loss"] == pytest.approx(log_loss(all_targets, oof[list(LABEL_COLS)].to_numpy()), abs=1e-12)

    md = write_report([tmp_path / "a.csv", tmp_path / "b.csv"], labels, folds, tmp_path / "rep")
    text = md.read_text()
    assert text.count("### Log loss by fold") == 2 and "section omitted" in text
    assert {"m0-lengths.png", "m1-calibration.png"} <= set(images(md))


def test_report_missing_ids_are_named(labels, folds, tmp_path):
    oof = synthetic_oof(labels, seed=2)
    extra = oof.iloc[:2].assign(id=[987654321, 987654322])
    pd.concat([oof, extra]).to_csv(tmp_path / "oof.csv", index=False)
    with pytest.raises(DataError, match=r"2 id\(s\) not in the labels file.*987654321, 987654322"):
        join_oof(tmp_path / "oof.csv", labels, folds)
    oof.to_csv(tmp_path / "oof.csv", index=False)
    dropped = int(folds["id"].iloc[7])
    with pytest.raises(DataError, match=rf"not in the folds file.*{dropped}"):
        join_oof(tmp_path / "oof.csv", labels, folds[folds["id"] != dropped])


def test_position_bias_is_recovered(labels, folds, tmp_path):
    rng = np.random.default_rng(3)
    ids = labels["id"].to_numpy()
    p_a, tie = rng.uniform(0.2, 0.6, len(ids)), rng.uniform(0.05, 0.2, len(ids))
    shift = rng.uniform(0.0, 0.1, len(ids))  # the plain pass favours slot A by `shift`, the swapped one disfavours it

    def pass_frame(a, swap):
        return pd.DataFrame({"id": ids, "swap": swap, "winner_model_a": a, "winner_model_b": 1 - a - tie, "winner_tie": tie})

    passes = pd.concat([pass_frame(p_a + shift, False), pass_frame(p_a - shift, True).iloc[5:]], ignore_index=True)
    bias = position_bias(passes)
    assert bias["rows"] == len(ids) - 5 and bias["one_pass_only"] == 5
    assert bias["p_a_plain"] - bias["p_a_swapped"] == pytest.approx(2 * shift[5:].mean(), abs=1e-12)
    assert bias["mean_abs_diff"] == pytest.approx(2 * shift[5:].mean(), abs=1e-12)

    half = len(passes) // 2  # as two folds' files, found by a glob pattern the shell would not expand
    for k, part in enumerate((passes.iloc[:half], passes.iloc[half:])):
        (tmp_path / f"fold{k}").mkdir()
        part.to_csv(tmp_path / f"fold{k}" / "oof_passes.csv", index=False)
    synthetic_oof(labels, seed=4).to_csv(tmp_path / "oof.csv", index=False)
    folds.to_csv(tmp_path / "folds.csv", index=False)
    report_main([f"oof={tmp_path / 'oof.csv'}", f"labels={SAMPLE / 'train.csv'}", f"folds={tmp_path / 'folds.csv'}",
                 f"out={tmp_path / 'rep'}", f"passes={tmp_path / 'fold*' / 'oof_passes.csv'}", "title=Bias check"])
    text = (tmp_path / "rep" / "report.md").read_text()
    assert text.startswith("# Bias check") and "5 id(s) had one pass only" in text
    assert f"{2 * shift[5:].mean():.4f}" in text and "position-bias.png" in images(tmp_path / "rep" / "report.md")
    dup = tmp_path / "fold0" / "oof_passes.csv"
    with pytest.raises(DataError, match="repeated"):
        report_main([f"oof={tmp_path / 'oof.csv'}", f"labels={SAMPLE / 'train.csv'}", f"folds={tmp_path / 'folds.csv'}",
                     f"out={tmp_path / 'rep2'}", f"passes={dup},{dup}"])


def formatted_lengths(run_dir, df: pd.DataFrame, swap: bool, **format_changes) -> list[int]:
    """Token counts by the run's own tokenizer and saved format settings, as inference formats them."""
    from transformers import AutoTokenizer

    raw = yaml.safe_load((run_dir / "config.yaml").read_text())["format"]
    formatter = Formatter(AutoTokenizer.from_pretrained(run_dir / "tokenizer"), FormatConfig(**{**raw, **format_changes}))
    seqs = formatter.encode_batch(df["prompt"], df["response_a"], df["response_b"], swap=swap, inference=True)
    return [len(s) for s in seqs]


def test_plan_minutes_are_tokens_over_throughput(llama_run, test_rows):
    run = read_run(llama_run)
    plain, swapped = (formatted_lengths(llama_run, test_rows, s) for s in (False, True))
    table, warnings = plan([run], test_rows, lambda r: 1234.5, budget_hours=9)
    assert warnings == [] and list(table["pass"]) == ["plain", "swap"] and list(table["rows"]) == [60, 60]
    assert list(table["tokens"]) == [sum(plain), sum(swapped)]
    for r in table.itertuples():
        assert abs(r.minutes - r.tokens / 1234.5 / 60) < 1e-9
    lengths = plain + swapped  # both passes are batched together, as score_run does
    batches = make_batches(lengths, run.infer.token_budget, run.infer.max_rows)
    assert table["padded_tokens"].sum() == sum(len(b) * lengths[b[0]] for b in batches) >= table["tokens"].sum()
    padded, _ = plan([run], test_rows, lambda r: 1234.5, budget_hours=9, count="padded")
    assert np.allclose(padded["minutes"], padded["padded_tokens"] / 1234.5 / 60, rtol=0, atol=1e-9)

    single, _ = plan([read_run(llama_run, {"tta": False})], test_rows, lambda r: 1234.5, budget_hours=9)
    assert list(single["pass"]) == ["plain"] and table["tokens"].sum() == 2 * single["tokens"].sum()
    assert "total" in format_table(table)


def test_plan_budget_warning_names_knobs(llama_run, test_rows):
    runs = [read_run(llama_run), read_run(llama_run)]
    table, warnings = plan(runs, test_rows, lambda r: 1 / 60, budget_hours=1e-3)  # 1 minute per token
    total = table["minutes"].sum()
    assert total == table["tokens"].sum() and warnings[0].startswith(f"WARN: estimated {total:.1f} min")
    text = "\n".join(warnings)
    swap_minutes = table.loc[table["pass"] == "swap", "minutes"].sum()
    assert f"infer.tta=false: saves {swap_minutes:.1f} min -> {total - swap_minutes:.1f} min total (still over)" in text
    cap = int(re.search(r"infer_max_length .*?128 -> (\d+)", text).group(1))
    capped = sum(sum(formatted_lengths(llama_run, test_rows, s, infer_max_length=cap)) for s in (False, True))
    assert f"saves {total - 2 * capped:.1f} min" in text.split("infer_max_length")[1].splitlines()[0]
    assert f"drop the slowest member tiny-llama/fold0-seed42 ({total / 2:.1f} min)" in text


def test_plan_throughput_table(llama_run, test_rows, tmp_path):
    shipped = yaml.safe_load(DEFAULT_TABLE.read_text())
    assert shipped["t4x2"]["gemma2"] > 0
    path = tmp_path / "throughput.yaml"
    path.write_text(yaml.safe_dump({"t4x2": {"gemma2": 1170, "llama": None}, "a100": {"llama": 3000}}))
    run = read_run(llama_run)
    with pytest.raises(ConfigError, match=r"hardware=t4x2, family=llama \(from config; not measured yet.*throughput=TOKENS_PER_S"):
        plan([run], test_rows, ThroughputTable(path, "t4x2"), budget_hours=9)
    with pytest.raises(ConfigError, match=r"hardware=h100, family=llama \(.*no such key"):
        ThroughputTable(path, "h100")(run)
    table = ThroughputTable(path, "a100", family="gemma2")  # config.json (llama) wins over the fallback
    assert table(run) == 3000.0 and "llama (config)" in table.used["tiny-llama/fold0-seed42"]
    moved = dataclasses.replace(run, model=dataclasses.replace(run.model, path=str(tmp_path / "elsewhere")))
    with pytest.raises(ConfigError, match="cannot tell the model family.*family=NAME"):
        ThroughputTable(path, "t4x2")(moved)
    assert ThroughputTable(path, "t4x2", family="gemma2")(moved) == 1170.0


def test_plan_cli(llama_run):
    cmd = [sys.executable, "-m", "infer", "plan", f"runs={llama_run}", f"csv={SAMPLE / 'test.csv'}"]
    ok = subprocess.run([*cmd, "throughput=100", "budget_hours=0.0001"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"^total +120 ", ok.stdout, re.M) and "WARN: estimated" in ok.stdout and "tta=false" in ok.stdout
    bad = subprocess.run([*cmd, "hardware=nowhere"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error:") and "hardware=nowhere, family=llama" in bad.stderr


@pytest.mark.parametrize("config, hardware", [("gemma2-9b-qlora.yaml", "t4x2"), ("llama3-8b-qlora.yaml", "t4x2"),
                                              ("gemma2-9b-qlora.yaml", "t4x2-int8"), ("llama3-8b-qlora.yaml", "t4x2-int8"),
                                              ("gemma2-9b-qlora.yaml", "t4x2-fp16-split"),
                                              ("llama3-8b-qlora.yaml", "t4x2-fp16-split"),
                                              ("smollm2-demo.yaml", "cpu-2core"), ("smollm2-mtbench.yaml", "cpu-2core")])
def test_shipped_configs_have_a_throughput_figure(config, hardware, tmp_path):
    """`infer plan` as the README writes it finds a rate for every shipped config's base model, found by family
    and size: the 9B/8B architectures from their real configs, SmolLM2 from the GGUF the package ships."""
    from cli.config import build_config
    from model.run import Run
    from train.config import TrainConfig

    cfg = build_config(TrainConfig, REPO / "configs" / config)
    if not cfg.model.path.startswith("pypkg:"):  # a real 9B base is not here: its architecture's config is enough
        from bench.common import arch_config

        arch_config("gemma2" if "gemma2" in config else "llama").save_pretrained(tmp_path)
        cfg.model.path = str(tmp_path)
    run = Run(tmp_path / "run", cfg.model, cfg.format, cfg.infer, {})
    assert ThroughputTable(DEFAULT_TABLE, hardware)(run) > 0


def test_planned_layout_is_the_one_predict_resolves(llama_run, tmp_path):
    """infer plan asks model.hardware.resolve_components, as infer predict does: a T4 pads even a packed run, and
    batches a soft-capped Gemma-2's eager attention within the T4 score budget."""
    from bench.common import arch_config
    from cli.config import build_config
    from infer.plan import target_settings
    from model.hardware import T4_EAGER_SCORE_BUDGET
    from model.run import Run, load_run
    from train.config import TrainConfig

    layout = lambda run, hardware: target_settings(run, hardware)[0]  # noqa: E731
    packed = load_run(llama_run, {"layout": "packed"}, need_base=False)
    assert layout(packed, "t4x2") == "padded"  # the T4 profile: no flex attention below sm80
    assert layout(packed, "h100") == "packed"
    auto = load_run(llama_run, need_base=False)
    assert (layout(auto, "cpu-2core"), layout(auto, "t4x2"), layout(auto, "h100")) == ("padded", "padded", "packed")
    assert target_settings(auto, "t4x2")[1].score_budget == -1  # Llama: SDPA, no score matrices
    cfg = build_config(TrainConfig, REPO / "configs" / "gemma2-9b-qlora.yaml")
    arch_config("gemma2").save_pretrained(tmp_path)
    gemma = Run(tmp_path / "run", dataclasses.replace(cfg.model, path=str(tmp_path)), cfg.format, cfg.infer, {})
    assert target_settings(gemma, "t4x2")[1].score_budget == T4_EAGER_SCORE_BUDGET

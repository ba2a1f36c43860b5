"""Pseudo-labels (python -m train.pseudo, per-row weights) and distillation (train.distill_from): the tool's
join by id, the loss against hand computations, and tiny training runs that use both."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import SAMPLE, forbid_model_loading, sealed_run, train_args
from cli.config import ConfigError, build_config
from cli.output import OutputError
from data.io import LABEL_COLS, DataError, read_competition_csv
from train.config import TrainConfig
from train.distill import teacher_file
from train.fold import encode_examples
from train.state import differences, fold_settings
from train.pseudo import main as pseudo_main
from train.trainers import Collator, pair_loss

POOL = SAMPLE / "test.csv"  # 60 unlabelled rows whose prompts the sample's train.csv does not have
FAST = ("model.quantization=none", "train.max_steps=2", "train.swap_aug=true", "infer.tta=false",
        "data.max_train_rows=48", "train.batch_size=16")


def random_probs(ids, seed: int = 0) -> pd.DataFrame:
    p = np.random.default_rng(seed).dirichlet([1.0, 1.0, 0.5], size=len(ids))
    return pd.DataFrame({"id": list(ids), **{c: p[:, j] for j, c in enumerate(LABEL_COLS)}})


@pytest.fixture()
def pool_preds(tmp_path) -> pd.DataFrame:
    pred = random_probs(pd.read_csv(POOL)["id"])
    pred.to_csv(tmp_path / "pred.csv", index=False, float_format="%.9g")
    return pred


def run_pseudo(tmp_path, preds: str = "pred.csv", out: str = "pseudo.csv", *extra: str):
    pseudo_main([f"preds={tmp_path / preds}", f"csv={POOL}", f"out={tmp_path / out}", *extra])
    return tmp_path / out


# --- the pseudo-label tool ------------------------------------------------------------------------------


def test_pseudo_joins_by_id_and_writes_soft_labels_with_weight(tmp_path, pool_preds):
    out = run_pseudo(tmp_path, "pred.csv", "pseudo.csv", "weight=0.5")
    written, _ = read_competition_csv(out, labels=True, soft_labels=True)
    raw_pool, raw_out = pd.read_csv(POOL), pd.read_csv(out)
    assert raw_out["id"].tolist() == raw_pool["id"].tolist()  # the pool's order
    for col in ("prompt", "response_a", "response_b"):  # text cells exactly as the pool has them
        assert raw_out[col].tolist() == raw_pool[col].tolist()
    want = pool_preds.set_index("id").loc[written["id"], list(LABEL_COLS)].to_numpy()
    np.testing.assert_allclose(np.stack(written["target"].to_numpy()), want, atol=1e-8)
    assert (written["weight"] == 0.5).all()

    shuffled = pool_preds.sample(frac=1.0, random_state=3)
    shuffled.to_csv(tmp_path / "shuffled.csv", index=False, float_format="%.9g")
    again = run_pseudo(tmp_path, "shuffled.csv", "again.csv", "weight=0.5")
    assert again.read_bytes() == out.read_bytes()  # joined by id: the prediction order does not matter


def test_pseudo_min_confidence_and_pool_labels(tmp_path, pool_preds):
    out = run_pseudo(tmp_path, "pred.csv", "pseudo.csv", "min_confidence=0.6")
    kept = pd.read_csv(out)
    assert len(kept) == int((pool_preds[list(LABEL_COLS)].max(axis=1) >= 0.6).sum()) < len(pool_preds)
    assert (kept[list(LABEL_COLS)].max(axis=1) >= 0.6).all() and (kept["weight"] == 1.0).all()
    with pytest.raises(OutputError, match="overwrite=true"):
        run_pseudo(tmp_path, "pred.csv", "pseudo.csv")


@pytest.mark.parametrize("change, match", [
    (lambda p: p.iloc[3:], r"3 pool id\(s\) have no probabilities"),
    (lambda p: pd.concat([p, p.iloc[:1].assign(id=1)]), r"1 id\(s\) there are not pool ids: \[1\]"),
    (lambda p: pd.concat([p, p.iloc[:1]]), "duplicate ids"),
    (lambda p: p.assign(winner_tie=p["winner_tie"] + 0.1), "not summing to 1"),
    (lambda p: p.assign(winner_model_a=-p["winner_model_a"]), "negative"),
    (lambda p: p.assign(winner_model_a=np.nan), "NaN"),
])
def test_pseudo_refuses_bad_predictions(tmp_path, pool_preds, change, match):
    change(pool_preds).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=match):
        run_pseudo(tmp_path, "bad.csv")
    if "have no probabilities" in match:  # the missing ids are named
        with pytest.raises(DataError, match=str(pool_preds["id"].iloc[:3].min())):
            run_pseudo(tmp_path, "bad.csv")
    assert not (tmp_path / "pseudo.csv").exists()


def test_pseudo_refuses_bad_settings(tmp_path, pool_preds):
    for bad in ("weight=0", "weight=-1", "min_confidence=1.5"):
        with pytest.raises(ConfigError):
            run_pseudo(tmp_path, "pred.csv", "pseudo.csv", bad)


def test_weight_column_is_validated(tmp_path):
    df = pd.read_csv(SAMPLE / "train.csv").head(5).assign(weight=[1, 0.5, "x", -1, 2])
    df.to_csv(tmp_path / "w.csv", index=False)
    with pytest.raises(DataError, match=r"(?s)2 bad row\(s\).*field weight") as err:
        read_competition_csv(tmp_path / "w.csv")
    assert str(df["id"][2]) in str(err.value) and str(df["id"][3]) in str(err.value)


# --- the loss ---------------------------------------------------------------------------------------------


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


BATCH = dict(
    logits=np.array([[1.0, -0.5, 0.2], [0.3, 0.9, -1.2], [-0.4, 0.1, 0.6], [2.0, 0.0, -1.0]]),
    target=np.array([[1.0, 0.0, 0.0], [0.2, 0.7, 0.1], [0.0, 0.0, 1.0], [0.5, 0.25, 0.25]]),
    weight=np.array([1.0, 0.5, 2.0, 0.0]),
    teacher=np.array([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.9, 0.1, 0.0]]),
)


def as_torch(*names):
    return [torch.tensor(BATCH[n], dtype=torch.float32) for n in names]


def hand_loss(alpha: float, temperature: float, smoothing: float = 0.0, weighted: bool = True) -> float:
    z, t, w, p = BATCH["logits"], BATCH["target"], BATCH["weight"], BATCH["teacher"]
    t = (1 - smoothing) * t + smoothing / 3
    ce = -(t * np_log_softmax(z)).sum(axis=1)
    with np.errstate(divide="ignore"):
        p_t = p ** (1 / temperature)
    p_t = p_t / p_t.sum(axis=1, keepdims=True)
    log_p = np.log(np.where(p_t > 0, p_t, 1.0))  # 0 log 0 = 0
    kl = (p_t * (log_p - np_log_softmax(z / temperature))).sum(axis=1)
    per_row = (1 - alpha) * ce + alpha * temperature ** 2 * kl
    return float(((w if weighted else 1.0) * per_row).mean())


def test_weighted_soft_label_loss_equals_hand_computation():
    logits, target, weight = as_torch("logits", "target", "weight")
    for smoothing in (0.0, 0.1):
        got = pair_loss(logits, target, weight, label_smoothing=smoothing).item()
        assert got == pytest.approx(hand_loss(0.0, 1.0, smoothing), rel=1e-6)
    # all weights 1 is plain (mean) soft-target cross-entropy
    ones = torch.ones(4)
    assert pair_loss(logits, target, ones).item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)
    assert pair_loss(logits, target).item() == F.cross_entropy(logits, target).item()  # the old path, untouched


@pytest.mark.parametrize("alpha, temperature", [(0.0, 1.0), (0.3, 1.0), (0.3, 2.0), (1.0, 1.0), (1.0, 0.5)])
def test_distillation_loss_equals_hand_computation(alpha, temperature):
    logits, target, weight, teacher = as_torch("logits", "target", "weight", "teacher")
    got = pair_loss(logits, target, weight, teacher, distill_weight=alpha, temperature=temperature).item()
    assert got == pytest.approx(hand_loss(alpha, temperature), rel=1e-5)
    unweighted = pair_loss(logits, target, None, teacher, distill_weight=alpha, temperature=temperature).item()
    assert unweighted == pytest.approx(hand_loss(alpha, temperature, weighted=False), rel=1e-5)


def test_distillation_extremes():
    logits, target, teacher = as_torch("logits", "target", "teacher")
    plain = pair_loss(logits, target, None, teacher, distill_weight=0.0).item()
    assert plain == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)  # α = 0: plain CE
    pure = pair_loss(logits, target, None, teacher, distill_weight=1.0).item()
    kl = F.kl_div(F.log_softmax(logits, -1), teacher, reduction="batchmean").item()
    assert pure == pytest.approx(kl, rel=1e-6)  # α = 1: pure KL(teacher ‖ student)
    # the KL term pulls the student toward the teacher: its gradient is softmax(z) - p
    z = logits.clone().requires_grad_(True)
    pair_loss(z, target, None, teacher, distill_weight=1.0).backward()
    np.testing.assert_allclose(z.grad.numpy(), (torch.softmax(logits, -1) - teacher).numpy() / 4, atol=1e-6)


def test_collator_and_examples_carry_weights_and_teacher(tiny_tokenizer, sample_rows):
    from data.formatter import FormatConfig, Formatter

    formatter = Formatter(tiny_tokenizer, FormatConfig(max_length=64))
    rows = sample_rows.head(4).copy()
    plain = encode_examples(formatter, rows, swap_aug=True)
    assert set(plain[0]) == {"input_ids", "target"}  # no weight, no teacher: the batches of before
    rows["weight"] = [0.5, np.nan, 1.0, 2.0]  # NaN: a competition row beside weighted extra rows weighs 1
    rows["teacher"] = list(BATCH["teacher"])
    examples = encode_examples(formatter, rows, swap_aug=True)
    assert [float(e["weight"]) for e in examples] == [0.5, 1.0, 1.0, 2.0] * 2
    np.testing.assert_allclose(examples[0]["teacher"], BATCH["teacher"][0])
    np.testing.assert_allclose(examples[4]["teacher"], BATCH["teacher"][0][[1, 0, 2]])  # swapped copy: permuted
    np.testing.assert_allclose(examples[4]["target"], examples[0]["target"][[1, 0, 2]])
    for packed in (False, True):
        batch = Collator(formatter.pad_id, packed)(examples[:3])
        assert batch["weight"].tolist() == [0.5, 1.0, 1.0] and batch["teacher"].shape == (3, 3)


# --- config, teacher files, settings ---------------------------------------------------------------------


def test_config_refuses_distillation_settings_that_cannot_apply():
    with pytest.raises(ConfigError, match="bradley_terry cannot distil"):
        build_config(TrainConfig, None, ["train.objective=bradley_terry", "train.distill_from=t.csv"])
    with pytest.raises(ConfigError, match="only apply with train.distill_from"):
        build_config(TrainConfig, None, ["train.distill_weight=0.3"])
    for bad in ("train.distill_weight=0", "train.distill_weight=1.5", "train.distill_temperature=0"):
        with pytest.raises(ConfigError):
            build_config(TrainConfig, None, ["train.distill_from=t.csv", bad])


def test_a_run_member_teacher_is_taken_only_from_verified_fold_runs(tmp_path):
    from train.distill import attach_teacher

    member = tmp_path / "teacher"
    probs = random_probs(range(1, 11))
    sealed_run(member / "fold0-seed42", probs.iloc[:5])
    sealed_run(member / "fold1-seed42", probs.iloc[5:])
    probs.to_csv(member / "oof-seed42.csv", index=False)
    frames = [pd.DataFrame({"id": range(1, 11)})]
    (teacher,) = attach_teacher(frames, str(member), frames[0]["id"])
    np.testing.assert_allclose(np.stack(teacher["teacher"].to_numpy()), probs[list(LABEL_COLS)].to_numpy())
    random_probs(range(1, 11), seed=3).to_csv(member / "oof-seed42.csv", index=False)  # stale: not the runs' rows
    with pytest.raises(DataError, match="not the rows of its verified fold runs"):
        attach_teacher(frames, str(member), frames[0]["id"])


def test_teacher_file_of_a_member_directory(tmp_path):
    member = tmp_path / "teacher"
    member.mkdir()
    with pytest.raises(ConfigError, match="oof-seed<seed>.csv"):
        teacher_file(str(member))
    (member / "fold0-seed42").mkdir()
    (member / "fold0-seed42" / "oof.csv").write_text("id\n")
    (member / "oof-seed42.csv").write_text("id\n")
    assert teacher_file(str(member)) == member / "oof-seed42.csv"  # the all-fold OOF, not a fold's
    (member / "oof-seed7.csv").write_text("id\n")
    with pytest.raises(ConfigError, match="@<seed>"):
        teacher_file(str(member))
    assert teacher_file(f"{member}@7") == member / "oof-seed7.csv"
    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / "oof.csv").write_text("id\n")  # infer ensemble / train.length folder
    assert teacher_file(str(tmp_path / "ens")) == tmp_path / "ens" / "oof.csv"


def test_settings_record_the_teacher_by_content(tmp_path, sample_folds):
    teacher = tmp_path / "teacher.csv"
    random_probs([1, 2]).to_csv(teacher, index=False)
    base = [f"data.train_csv={SAMPLE / 'train.csv'}", f"data.folds_csv={sample_folds}"]
    plain = fold_settings(build_config(TrainConfig, None, base), 0)
    # A run made before distillation existed (no distill_* keys) still matches settings at their defaults
    before = {**plain, "train": {k: v for k, v in plain["train"].items() if not k.startswith("distill")}}
    assert differences(before, plain) == []
    cfg = build_config(TrainConfig, None, [*base, f"train.distill_from={teacher}", "train.distill_weight=0.7"])
    first = fold_settings(cfg, 0)
    assert first["train"]["distill_from"].startswith("sha256:") and first["train"]["distill_weight"] == 0.7
    assert differences(before, first) == [f"train.distill_from: '<absent>' -> {first['train']['distill_from']!r}",
                                          "train.distill_weight: '<absent>' -> 0.7"]
    random_probs([1, 2], seed=1).to_csv(teacher, index=False)
    assert fold_settings(cfg, 0)["train"]["distill_from"] != first["train"]["distill_from"]


# --- tiny training runs -----------------------------------------------------------------------------------


@pytest.fixture()
def loss_spy(monkeypatch):
    """Every (weight, teacher) the trainer hands pair_loss, recorded."""
    import train.trainers

    calls = []

    def spy(logits, target, weight=None, teacher=None, *args, **kwargs):
        calls.append((weight, teacher, kwargs, args))
        return pair_loss(logits, target, weight, teacher, *args, **kwargs)

    monkeypatch.setattr(train.trainers, "pair_loss", spy)
    return calls


def test_training_with_pseudo_labelled_extra_csv(tmp_path, tiny_llama, sample_folds, pool_preds, loss_spy):
    from train.__main__ import main as train_main

    pseudo = run_pseudo(tmp_path, "pred.csv", "pseudo.csv", "weight=0.25")
    train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path / "runs", "fold=0", *FAST,
                          "data.max_train_rows=300", "train.batch_size=32", f"data.extra_csv=[{pseudo}]", "train.soft_labels=true"))
    run = tmp_path / "runs" / "tiny-llama" / "fold0-seed42"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["rows"]["extra"] == 60 and np.isfinite(manifest["metrics"]["log_loss"])
    weights = torch.cat([w for w, *_ in loss_spy])
    assert set(weights.tolist()) <= {1.0, 0.25} and 0.25 in weights.tolist() and 1.0 in weights.tolist()
    assert all(t is None for _, t, *_ in loss_spy)


def test_per_fold_extra_csv_reads_the_folds_own_file(tmp_path, tiny_llama, sample_folds, pool_preds, loss_spy,
                                                     monkeypatch):
    """`{fold}` in data.extra_csv: fold k trains on its own file (pseudo-labels from fold k's run alone), and
    its settings digest that file; a fold without its file stops fold=all before any model loads."""
    from model.files import sha256_file
    from train.__main__ import main as train_main

    run_pseudo(tmp_path, "pred.csv", "pseudo0.csv", "weight=0.25")
    run_pseudo(tmp_path, "pred.csv", "pseudo1.csv", "weight=0.5")
    per_fold = f"data.extra_csv={tmp_path / 'pseudo{fold}.csv'}"  # in YAML: ["pseudo{fold}.csv"], quoted
    args = train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path / "runs", "fold=0", *FAST,
                      "data.max_train_rows=300", "train.batch_size=32", per_fold, "train.soft_labels=true")
    cfg = build_config(TrainConfig, Path(args[0]), args[1:])
    assert fold_settings(cfg, 1)["data"]["extra_csv"] == [f"sha256:{sha256_file(tmp_path / 'pseudo1.csv')}"]
    train_main(args)
    manifest = json.loads((tmp_path / "runs" / "tiny-llama" / "fold0-seed42" / "manifest.json").read_text())
    assert manifest["settings"]["data"]["extra_csv"] == [f"sha256:{sha256_file(tmp_path / 'pseudo0.csv')}"]
    assert set(torch.cat([w for w, *_ in loss_spy]).tolist()) == {1.0, 0.25}  # pseudo0's weight, not pseudo1's

    forbid_model_loading(monkeypatch)
    with pytest.raises(DataError, match="pseudo2.csv"):
        train_main([a if a != "fold=0" else "fold=all" for a in args])


def test_training_with_distill_from(tmp_path, tiny_llama, sample_folds, loss_spy):
    from train.__main__ import main as train_main

    teacher = tmp_path / "teacher.csv"
    random_probs(pd.read_csv(SAMPLE / "train.csv")["id"]).to_csv(teacher, index=False)
    train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path / "runs", "fold=0", *FAST,
                          f"train.distill_from={teacher}", "train.distill_weight=0.7", "train.distill_temperature=2"))
    run = tmp_path / "runs" / "tiny-llama" / "fold0-seed42"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["settings"]["train"]["distill_from"].startswith("sha256:") and (run / "oof.csv").is_file()
    assert loss_spy and all(t is not None and t.shape[1] == 3 for _, t, *_ in loss_spy)
    assert all(args[1:] == (0.7, 2.0) for *_, args in loss_spy)  # label_smoothing, α, T as configured


def test_missing_teacher_ids_stop_the_run_named(tmp_path, tiny_llama, sample_folds, monkeypatch):
    from train.__main__ import main as train_main

    forbid_model_loading(monkeypatch)  # found before any model is built
    folds = pd.read_csv(sample_folds)
    trained = folds.loc[folds["fold"] != 0, "id"]
    teacher = tmp_path / "teacher.csv"
    random_probs(folds["id"][~folds["id"].isin(trained.iloc[:2])]).to_csv(teacher, index=False)
    with pytest.raises(DataError, match=r"2 training row id\(s\) have no probabilities") as err:
        train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path / "runs", "fold=0", *FAST,
                              f"train.distill_from={teacher}"))
    assert all(str(i) in str(err.value) for i in trained.iloc[:2])
    # fold 0's own rows are not trained on in fold=0: a teacher without them is enough
    random_probs(trained).to_csv(teacher, index=False)
    with pytest.raises(AssertionError, match="model built"):
        train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path / "runs", "fold=0", *FAST,
                              f"train.distill_from={teacher}"))


def test_bradley_terry_refuses_row_weights(tmp_path, tiny_llama, sample_folds, monkeypatch):
    from train.__main__ import main as train_main

    forbid_model_loading(monkeypatch)
    pool = pd.read_csv(POOL).assign(winner_model_a=1, winner_model_b=0, winner_tie=0, weight=0.5)
    pool.to_csv(tmp_path / "weighted.csv", index=False)
    with pytest.raises(ConfigError, match="bradley_terry cannot honour"):
        train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path / "runs", "fold=0", *FAST,
                              f"data.extra_csv=[{tmp_path / 'weighted.csv'}]", "train.objective=bradley_terry"))

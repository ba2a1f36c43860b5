"""Train one fold and score its held-out rows through `infer` (the submission's code path).

A run folder `output_dir/name/fold{k}-seed{s}/` (model.run: built as `.partial`, renamed when
complete) ends up holding everything inference needs: adapter/ (LoRA + head), tokenizer/,
config.yaml (resolved), manifest.json (formatter, head, settings with input hashes, package
versions, metrics, sha256 of every file), oof.csv and metrics.json. train.state decides whether a
finished run is reused (same settings only), and whether a killed one resumes from its last
checkpoint or, once its adapter was saved, at OOF scoring.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import TrainingArguments, set_seed

from cli.config import ConfigError, to_dict
from data.folds import EXTRA_FOLD, add_extra_training_rows, attach_folds, read_folds
from data.formatter import Formatter
from data.io import LABEL_COLS, SWAP_PERM, WEIGHT_COL, DataError, prompt_key, read_competition_csv, targets_by_id
from infer.metrics import fold_metrics
from infer.predict import load_run, predict_frame, write_predictions
from model.factory import HEAD_SIZES, build_for_training, check_base, load_tokenizer, pick_device
from model.run import fold_lock, partial_dir, publish, read_manifest, write_complete, write_trained
from model.tokens import encode_rows
from train.config import TrainConfig, extra_csv_path
from train.state import fold_settings, fold_state, run_dir_for
from train.tracking import finish_fold, fold_run, log_reused_fold
from train.distributed import barrier, dist_rank
from train.distill import attach_teacher
from train.prestage import excluded_prompts, init_from
from train.trainers import BradleyTerryTrainer, Collator, PairTrainer, RewardModel, preference_dataset


def load_rows(cfg: TrainConfig) -> tuple[pd.DataFrame, set[str]]:
    """Competition rows with their fold and whether their prompt is excluded from training; the excluded prompt keys."""
    check_base(cfg.model)  # a wrong model path should fail before minutes of data work
    df, report = _read_labelled(cfg, cfg.data.train_csv)
    print(report.summary())
    if not cfg.data.folds_csv:
        raise ConfigError(f"data.folds_csv is empty: write folds once with `python -m data.folds csv={cfg.data.train_csv} out=...`")
    df = attach_folds(df, read_folds(cfg.data.folds_csv), cfg.data.folds_csv)
    excluded = excluded_prompts(cfg)
    df["excluded"] = df["prompt"].map(prompt_key).isin(excluded) if excluded else False
    if excluded:
        print(f"data.exclude_prompts_of: {int(df['excluded'].sum())} row(s) share a prompt with those files; "
              "they are never trained on (held out rows are still scored)")
    return df, excluded


def _read_labelled(cfg: TrainConfig, path: str):
    return read_competition_csv(path, labels=True, soft_labels=cfg.train.soft_labels,
                                drop_bad_rows=cfg.data.drop_bad_rows, drop_hint="data.drop_bad_rows=true")


def fold_rows(cfg: TrainConfig, df: pd.DataFrame, excluded: set[str],
              folds: list[int]) -> dict[int, tuple[pd.DataFrame, pd.DataFrame]]:
    """Per fold to train: (competition rows, extra rows for its training folds, fold -1), every file read and
    every teacher probability joined before any model loads. An extra file named with `{fold}`
    (extra_csv_path) is fold k's own file, e.g. pseudo-labels made by fold k's run alone; files named
    without it are read once and shared."""
    frames: dict[str, pd.DataFrame] = {}
    extras: dict[tuple[str, ...], pd.DataFrame] = {}
    paths_of = {}
    for fold in folds:
        paths_of[fold] = paths = tuple(extra_csv_path(p, fold) for p in cfg.data.extra_csv)
        for path in paths:
            if path not in frames:
                frames[path], extra_report = _read_labelled(cfg, path)
                print(extra_report.summary())
        if paths not in extras:
            extras[paths] = _extra_rows(df, [frames[p] for p in paths], excluded)
    check_weights(cfg, df, list(extras.values()))
    if cfg.train.distill_from:  # the teacher read and checked once, for every row some fold trains on
        needed = pd.concat([ids for fold in folds for ids in (
            df.loc[~df["excluded"] & (df["fold"] != fold), "id"], extras[paths_of[fold]]["id"])]).drop_duplicates()
        df, *attached = attach_teacher([df, *extras.values()], cfg.train.distill_from, needed)
        extras = dict(zip(extras, attached))
    return {fold: (df, extras[paths_of[fold]]) for fold in folds}


def _extra_rows(df: pd.DataFrame, frames: list[pd.DataFrame], excluded: set[str]) -> pd.DataFrame:
    if not frames:
        return df.iloc[:0]
    extra = pd.concat(frames, ignore_index=True)
    repeated = extra["id"][extra["id"].duplicated()]
    if len(repeated):
        raise DataError(f"data.extra_csv: ids {sorted(set(repeated))[:20]} occur in more than one extra file")
    kept, stats = add_extra_training_rows(df, extra)
    kept["excluded"] = kept["prompt"].map(prompt_key).isin(excluded) if excluded else False
    stats["dropped_excluded_prompt"] = int(kept["excluded"].sum())
    print(f"extra training rows: {stats}")
    return kept[~kept["excluded"]].reset_index(drop=True)


def check_weights(cfg: TrainConfig, df: pd.DataFrame, extras: list[pd.DataFrame]) -> None:
    """Per-row weights checked against the objective before any model loads."""
    weighted = [p for p, f in ((cfg.data.train_csv, df), *(("data.extra_csv", e) for e in extras))
                if WEIGHT_COL in f and (f[WEIGHT_COL] != 1).any()]
    if weighted and cfg.train.objective == "bradley_terry":
        raise ConfigError(f"{', '.join(dict.fromkeys(weighted))}: a {WEIGHT_COL} column other than 1, which "
                          "train.objective=bradley_terry cannot honour (trl's reward loss has no row weights); "
                          "use train.objective=classify")


def encode_examples(formatter: Formatter, df: pd.DataFrame, swap_aug: bool) -> list[dict]:
    """Token ids and targets per row (and per swapped copy, labels permuted), with the row's `weight` when
    some row weighs other than 1 (a missing weight is 1) and its `teacher` probabilities when df has them."""
    rows = {"target": np.stack(df["target"].to_numpy()).astype(np.float32)}
    if WEIGHT_COL in df:
        weight = df[WEIGHT_COL].astype(float).fillna(1.0).to_numpy(np.float32)  # competition rows: no weight column
        if (weight != 1).any():
            rows["weight"] = weight
    if "teacher" in df:
        if df["teacher"].isna().any():
            raise DataError(f"training rows without teacher probabilities: ids {sorted(df.loc[df['teacher'].isna(), 'id'])[:20]}")
        rows["teacher"] = np.stack(df["teacher"].to_numpy()).astype(np.float32)
    examples = []
    for swap in [False] + ([True] if swap_aug else []):
        ids = encode_rows(formatter, df, swap=swap, desc="training rows")
        values = {k: v[:, SWAP_PERM] if swap and v.ndim == 2 else v for k, v in rows.items()}  # weights stay
        examples += [{"input_ids": x, **{k: v[i] for k, v in values.items()}} for i, x in enumerate(ids)]
    return examples


def training_args(cfg: TrainConfig, run_dir: Path, device: torch.device) -> TrainingArguments:
    t = cfg.train
    on_gpu = device.type == "cuda"
    if "wandb" in t.report_to:
        os.environ.setdefault("WANDB_MODE", "offline")  # no network on the training boxes by default
    kwargs = dict(
        output_dir=str(partial_dir(run_dir) / "trainer"),  # checkpoints live in the unfinished run
        run_name=run_dir.parent.name + "-" + run_dir.name,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup,
        lr_scheduler_type=t.scheduler,
        optim=t.optim,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=2,  # the newest may be cut short by a kill; the one before stays usable
        report_to=[] if t.report_to == "none" else [t.report_to],
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=on_gpu and cfg.model.compute_dtype == "bfloat16",
        fp16=on_gpu and cfg.model.compute_dtype == "float16",
        use_cpu=not on_gpu,
        remove_unused_columns=False,
        label_names=["target"],
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every trainable tensor (LoRA, head) gets a gradient each step
        ddp_timeout=4 * 3600,  # the other ranks wait while rank 0 scores the held-out fold
    )
    args_class = TrainingArguments
    if t.objective == "bradley_terry":
        from trl import RewardConfig

        args_class = RewardConfig
        del kwargs["label_names"]  # RewardTrainer's batches carry no labels; it sets what it needs
        # RewardConfig's own defaults would silently change the recipe: rows over its max_length dropped
        # (the formatter already cut them), LoRA dropout zeroed, checkpointing outside the factory.
        # (transformers 5.2x renamed gradient_checkpointing; trl's default True must be overridden under either name)
        names = {f.name for f in dataclasses.fields(RewardConfig)}
        checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
        kwargs.update({"max_length": None, "disable_dropout": False, checkpointing: False})
    try:
        args = args_class(**kwargs)
    except ValueError as err:  # unknown optim / scheduler names and the like
        raise ConfigError(f"train settings: {err}") from None
    _ = args.device  # sets up devices now, so the next line is not undone later
    # One process drives one GPU: several GPUs means DDP (torchrun / accelerate launch), never the
    # nn.DataParallel that Trainer would pick on its own and that changes the effective batch size.
    args._n_gpu = min(args._n_gpu, 1)
    return args


def save_run(run_dir: Path, cfg: TrainConfig, model, tokenizer, formatter: Formatter, fold: int, counts: dict,
             origin: dict | None, settings: dict | None = None, training: dict | None = None,
             objective: dict | None = None) -> dict:
    """Stage "trained" of a run folder (model.run.write_trained): adapter, tokenizer, resolved config, manifest."""
    manifest = {
        "name": cfg.name,
        "fold": fold,
        "seed": cfg.seed,
        "formatter": formatter.describe(),
        "objective": objective or {"name": "classify"},
        "base_model": {"path": cfg.model.path, "gguf_file": cfg.model.gguf_file},
        "init_from": origin,
        "rows": counts,
        "settings": settings if settings is not None else fold_settings(cfg, fold),
        "training": training or {},
        "packages": {p: version(p) for p in ("torch", "transformers", "peft", "bitsandbytes")},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_trained(run_dir, model.model, tokenizer, to_dict(dataclasses.replace(cfg, fold=str(fold))), manifest)


def train_fold(cfg: TrainConfig, fold: int, df: pd.DataFrame, extra: pd.DataFrame) -> dict:
    """Train on every fold but `fold` (+ extra rows), save the run, score `fold` via infer; the fold's folder locked
    for the whole of it (rank 0 holds the lock for all ranks)."""
    with fold_lock(run_dir_for(cfg, fold)) if dist_rank()[0] == 0 else contextlib.nullcontext():
        return _train_fold(cfg, fold, df, extra)


def _train_fold(cfg: TrainConfig, fold: int, df: pd.DataFrame, extra: pd.DataFrame) -> dict:
    run_dir = run_dir_for(cfg, fold)
    work = partial_dir(run_dir)
    settings = fold_settings(cfg, fold)
    action, manifest, checkpoint = fold_state(cfg, fold, settings)
    if action == "reuse":
        print(f"fold {fold}: {run_dir} is finished with these settings (every file verified), reusing it")
        log_reused_fold(cfg, fold, manifest)  # wandb: its verified metrics, tagged reused; nothing re-trained
        return manifest["metrics"]
    rank, world = dist_rank()
    device = pick_device(cfg.train.device)
    if world > 1 and device.type == "cuda":  # DDP: one GPU per process, each with its own (4-bit) base
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    args = training_args(cfg, run_dir, device)  # under torchrun this joins the process group
    track = fold_run(cfg, fold, action, rank)  # wandb (rank 0): the Trainer logs its loss into this fold's run
    barrier()  # every rank has read the folder's state before rank 0 changes it
    if action == "train":
        train_stage(cfg, fold, df, extra, work, settings, checkpoint, args, device)
    if rank != 0:  # rank 0 alone scores the held-out fold, writes the OOF file and publishes the run, once
        barrier()
        return read_manifest(run_dir)["metrics"]
    if action == "score":
        print(f"fold {fold}: {work} holds the adapter saved before an interruption (verified); resuming at OOF scoring")
    if action != "publish":
        score_stage(df, fold, work)
    publish(work, run_dir)
    barrier()
    return finish_fold(track, run_dir, read_manifest(run_dir)["metrics"], action)


def train_stage(cfg: TrainConfig, fold: int, df: pd.DataFrame, extra: pd.DataFrame, work: Path, settings: dict,
                checkpoint: Path | None, args: TrainingArguments, device: torch.device) -> None:
    """Train the fold into `work` (a .partial folder) up to stage "trained"."""
    rank, world = dist_rank()
    if checkpoint is None and rank == 0:
        shutil.rmtree(work, ignore_errors=True)
        (work / "trainer").mkdir(parents=True)
        (work / "trainer" / "settings.json").write_text(json.dumps(settings, indent=1))
    barrier()
    set_seed(cfg.seed)
    train_df = pd.concat([df[(df["fold"] != fold) & ~df["excluded"]], extra], ignore_index=True)
    if cfg.data.max_train_rows:
        train_df = train_df.sample(frac=1.0, random_state=cfg.seed).head(cfg.data.max_train_rows)
    valid_rows = int((df["fold"] == fold).sum())

    tokenizer = load_tokenizer(cfg.model)
    formatter = Formatter(tokenizer, cfg.format)
    objective = {"name": cfg.train.objective}
    packed = cfg.train.layout == "packed"
    model = build_for_training(cfg.model, formatter.pad_id, device, packed=packed, compile=cfg.train.compile,
                               num_labels=HEAD_SIZES[cfg.train.objective])
    origin = init_from(model, cfg) if cfg.train.init_from else None
    if cfg.train.objective == "bradley_terry":
        pairs, ties = preference_dataset(formatter, train_df)
        tie_rate = float(np.stack(train_df["target"].to_numpy())[:, 2].mean())
        objective.update(tie_rate=tie_rate, ties_dropped=ties)
        print(f"fold {fold}: bradley_terry trains on decisive rows: {ties} tie row(s) of {len(train_df)} left out; "
              f"P(tie) = their share {tie_rate:.4f} at inference")
        model = RewardModel(model.model)
        n_sequences = 2 * len(pairs)
        trainer = BradleyTerryTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                                      head_lr=cfg.train.head_lr)
    else:
        examples = encode_examples(formatter, train_df, cfg.train.swap_aug)
        n_sequences = len(examples)
        trainer = PairTrainer(model=model, args=args, train_dataset=examples, data_collator=Collator(formatter.pad_id, packed),
                              head_lr=cfg.train.head_lr, label_smoothing=cfg.train.label_smoothing,
                              distill_weight=cfg.train.distill_weight, distill_temperature=cfg.train.distill_temperature)
    start = time.time()
    if rank == 0:
        print(f"fold {fold}: training on {len(train_df)} rows ({n_sequences} sequences) -> {run_dir_for(cfg, fold)}"
              + (f", data-parallel over {world} processes" if world > 1 else ""))
        if checkpoint is not None:
            print(f"fold {fold}: resuming from {checkpoint} (resume=auto; overwrite=true starts afresh)")
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    # (step, loss) as the Trainer logged it: loss curves of runs can be compared without wandb
    curve = [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h]
    if world > 1:
        print(f"fold {fold}: rank {rank}/{world} done, {trainer.state.global_step} optimizer steps")
    if rank == 0:
        n_extra = int((train_df["fold"] == EXTRA_FOLD).sum())
        counts = {"train": len(train_df), "extra": n_extra, "valid": valid_rows, "sequences": n_sequences}
        training = {"seconds": round(time.time() - start, 1), "loss_curve": curve}
        save_run(work, cfg, model, tokenizer, formatter, fold, counts, origin, settings, training, objective)
        shutil.rmtree(work / "trainer", ignore_errors=True)  # only once the sealed adapter can replace them
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # scoring may use every GPU, this rank's included


def score_stage(df: pd.DataFrame, fold: int, work: Path) -> dict:
    """Score the held-out fold from the saved run folder (as the submission would), then seal it complete."""
    valid_df = df[df["fold"] == fold].reset_index(drop=True)
    passes: list[pd.DataFrame] = []
    run = load_run(work)  # verified file by file, as any reader of a run folder
    oof = predict_frame([run], valid_df, passes)
    write_predictions(oof, work / "oof.csv")
    write_predictions(passes[0], work / "oof_passes.csv")  # per TTA pass: position-bias analysis
    truth = targets_by_id(valid_df, oof["id"])
    comp_train_targets = np.stack(df.loc[df["fold"] != fold, "target"].to_numpy())
    metrics = fold_metrics(fold, truth, oof[list(LABEL_COLS)].to_numpy(), comp_train_targets)
    training = run.manifest["training"]
    metrics["train_seconds"] = training.get("seconds")
    metrics["train_loss_curve"] = training.get("loss_curve", [])
    return write_complete(work, metrics)["metrics"]

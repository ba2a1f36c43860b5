"""The training entry point's config (TrainConfig): one dataclass per YAML section, help text on every field."""
from __future__ import annotations

import dataclasses

from cli.config import opt
from data.formatter import FormatConfig
from model.settings import InferSettings, ModelConfig, inference_model


@dataclasses.dataclass
class DataSettings:
    train_csv: str = opt("", "competition-format train CSV")
    folds_csv: str = opt("", "id -> fold file written once by `python -m data.folds`")
    extra_csv: list[str] = opt([], "extra labelled CSVs (same format) added to the training folds only; `{fold}` in a "
                               "name is the fold trained (fold k reads its own file: pseudo-labels from fold k's run)")
    drop_bad_rows: bool = opt(False, "drop rows that fail validation (counted) instead of stopping")
    max_train_rows: int = opt(0, "use only the first N training rows after shuffling (0: all); for quick demos")
    exclude_prompts_of: list[str] = opt(
        [], "CSVs whose prompts must never be trained on (e.g. the evaluation set of a pre-stage): "
        "training rows with one of their normalised prompts are dropped, counted")


FOLD_FIELD = "{fold}"


def extra_csv_path(path: str, fold: int) -> str:
    """The data.extra_csv file fold `fold` trains on: `{fold}` in the name replaced by the fold number."""
    return path.replace(FOLD_FIELD, str(fold))


@dataclasses.dataclass
class TrainSettings:
    epochs: float = opt(1.0, "passes over the training rows (swapped copies included)")
    lr: float = opt(2e-4, "peak learning rate of the LoRA weights")
    head_lr: float = opt(0.0, "learning rate of the classification head; 0 means `lr`")
    batch_size: int = opt(4, "rows per device per micro-batch")
    grad_accum: int = opt(2, "micro-batches per optimizer step")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup: float = opt(0.05, "warm-up: a fraction of all steps if < 1, else a step count")
    scheduler: str = opt("cosine", "transformers lr_scheduler_type (linear, cosine, constant, ...)")
    optim: str = opt("adamw_torch", "transformers optim name (adamw_torch, paged_adamw_8bit, ...)")
    max_grad_norm: float = opt(1.0, "gradient clipping")
    layout: str = opt("padded", "padded: a micro-batch's rows padded to its longest | packed: its rows end to end with "
                      "no padding (flex attention, each row attends only to itself); same rows, same loss")
    compile: bool = opt(False, "torch.compile each decoder layer (the first steps compile for minutes; pays with "
                               "train.layout=packed on a GPU, where Python overhead between small kernels dominates)")
    init_from: str = opt("", "run folder (or its adapter/) whose LoRA + head start this training, e.g. a "
                         "pre-stage on extra data; same base model and LoRA shape required")
    objective: str = opt("classify", "classify: the 3-way head on the pair (A wins, B wins, tie) | bradley_terry: one reward "
                         "per response through trl's RewardTrainer, P(A) = (1-τ)σ(r_A-r_B), trained on decisive rows only, "
                         "P(tie) = τ, the training rows' tie rate")
    swap_aug: bool = opt(True, "add an A<->B swapped copy of every training row, labels permuted [1,0,2]")
    soft_labels: bool = opt(False, "read winner columns as probabilities summing to 1 (pseudo-labels)")
    label_smoothing: float = opt(0.0, "cross-entropy label smoothing")
    distill_from: str = opt("", "teacher probabilities for distillation, joined by id; every training row needs one: a CSV of "
                            "id + 3 probabilities (an OOF file, infer ensemble's out/oof.csv), or a member directory: "
                            "runs/<name>[@seed] (its oof-seed<seed>.csv, out of fold) or a train.length / infer ensemble "
                            "folder (its oof.csv)")
    distill_weight: float = opt(0.5, "α in (1-α)·CE(labels) + α·T²·KL(teacher ‖ student), per row; with train.distill_from")
    distill_temperature: float = opt(1.0, "T: teacher probabilities softened as p^(1/T) (renormalised), the student's as "
                                     "softmax(logits/T); with train.distill_from")
    max_steps: int = opt(-1, "stop after this many optimizer steps (-1: run all epochs)")
    logging_steps: int = opt(10, "log the training loss every N steps")
    save_steps: int = opt(0, "checkpoint (adapter + optimizer + scheduler + RNG) every N optimizer steps for resume=auto; 0: none")
    report_to: str = opt("wandb", "wandb: per fold the config, training loss and OOF / prior log loss, fold=all the CV "
                         "table (offline unless WANDB_MODE says otherwise) | none (wandb never imported) | tensorboard")
    device: str = opt("auto", "auto (cuda:0 when there is a GPU; cuda:LOCAL_RANK under torchrun) | cpu | cuda; several GPUs: launch with torchrun")


@dataclasses.dataclass
class TrainConfig:
    name: str = opt("", "run name; empty means the config file's stem. Runs go to output_dir/name/fold{k}-seed{s}")
    fold: str = opt("0", "fold to hold out and score (an integer), or `all` for every fold and the CV table")
    seed: int = opt(42, "seed for the head init, LoRA init, data order and dropout")
    output_dir: str = opt("runs", "parent folder of run folders")
    overwrite: bool = opt(False, "replace a run folder of other settings (the old one stays until the new run is "
                                 "complete); a run of the same settings is reused or resumed either way")
    resume: str = opt("auto", "auto: an unfinished fold continues from its last checkpoint (train.save_steps) | never")
    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    format: FormatConfig = dataclasses.field(default_factory=FormatConfig)
    train: TrainSettings = dataclasses.field(default_factory=TrainSettings)
    infer: InferSettings = dataclasses.field(default_factory=InferSettings)

    def __post_init__(self) -> None:
        if self.train.layout not in ("padded", "packed"):
            raise ValueError(f"train.layout must be padded or packed, got {self.train.layout!r}")
        if self.train.objective not in ("classify", "bradley_terry"):
            raise ValueError(f"train.objective must be classify or bradley_terry, got {self.train.objective!r}")
        if self.train.objective == "bradley_terry" and (self.train.soft_labels or self.train.layout != "padded"):
            raise ValueError("train.objective=bradley_terry needs hard labels (train.soft_labels=false) and train.layout=padded")
        t = self.train
        if t.distill_from:
            if t.objective == "bradley_terry":
                raise ValueError("train.objective=bradley_terry cannot distil (train.distill_from): its reward loss has no "
                                 "3-class teacher probabilities; use train.objective=classify")
            if not 0 < t.distill_weight <= 1:
                raise ValueError(f"train.distill_weight must be in (0, 1], got {t.distill_weight} (leave train.distill_from "
                                 "empty for no distillation)")
            if not t.distill_temperature > 0:
                raise ValueError(f"train.distill_temperature must be > 0, got {t.distill_temperature}")
        elif (t.distill_weight, t.distill_temperature) != (0.5, 1.0):
            raise ValueError("train.distill_weight / train.distill_temperature only apply with train.distill_from (a teacher's "
                             "probabilities); set it, or leave them at their defaults")
        if self.resume not in ("auto", "never"):
            raise ValueError(f"resume must be auto or never, got {self.resume!r}")
        try:  # the fold's OOF is scored with these settings: refuse what cannot run before training
            inference_model(self.model, self.infer)
        except ValueError as err:
            raise ValueError(f"{err}; to score a 4/8-bit run in fp8 afterwards: python -m infer predict ... "
                             "infer.quantization=none infer.compute_dtype=bfloat16 infer.fp8=true") from None

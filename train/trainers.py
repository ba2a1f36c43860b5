"""The two training objectives as transformers/trl trainers, sharing the factory's model and the adapter-only checkpoints.

classify       PairTrainer (transformers Trainer): the pair (prompt, A, B) in one sequence, soft-target
               cross-entropy on the pooled 3-way head (pair_loss), per-row weights (a `weight` column,
               e.g. pseudo-labels) and optional distillation to teacher probabilities.
bradley_terry  BradleyTerryTrainer (trl RewardTrainer): each response with its prompt alone, one reward
               each, loss -log σ(r_chosen - r_rejected) on decisive rows. Ties have no place in that
               loss; they are dropped (counted) and P(tie) at inference is the training rows' tie rate.
"""
from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.modeling_outputs import SequenceClassifierOutput
from trl import RewardTrainer

from data.formatter import Formatter
from model.factory import HEAD, PooledClassifier
from model.files import load_adapter_weights
from model.packing import pack_batch, pad_batch
from model.tokens import encode_rows, in_memory
from train.distributed import RankBalancedSampler

# Packed widths are rounded up to this: a handful of distinct shapes for compiled attention
# instead of one per micro-batch, for at most PACK_MULTIPLE - 1 padding tokens per step.
PACK_MULTIPLE = 256


# Per-row values an example may carry besides its tokens, passed to the loss: 3-class targets, the
# row's weight (only when some row weighs other than 1) and its teacher's probabilities (distillation).
ROW_KEYS = ("target", "weight", "teacher")


class Collator:
    """A micro-batch as padded rows, or packed end to end (width rounded up to PACK_MULTIPLE), with the
    per-row values (ROW_KEYS) its examples carry."""

    def __init__(self, pad_id: int, packed: bool = False):
        self.pad_id, self.packed = pad_id, packed

    def __call__(self, examples: list[dict]) -> dict:
        seqs = [e["input_ids"] for e in examples]
        rows = {k: torch.tensor(np.stack([e[k] for e in examples])) for k in ROW_KEYS if k in examples[0]}
        if self.packed:
            width = -(-sum(map(len, seqs)) // PACK_MULTIPLE) * PACK_MULTIPLE
            return {**pack_batch(seqs, self.pad_id, width), **rows}
        ids, mask = pad_batch(seqs, self.pad_id)
        return {"input_ids": ids, "attention_mask": mask, **rows}


def distill_kl(logits: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per row KL(p_T ‖ q_T): p_T the teacher's probabilities softened as p^(1/T) (renormalised), q_T =
    softmax(logits / T). A teacher probability of 0 contributes 0 (0·log 0 = 0)."""
    if temperature != 1.0:
        teacher = torch.softmax(torch.log(teacher.clamp_min(1e-30)) / temperature, dim=-1)
    log_q = torch.log_softmax(logits / temperature, dim=-1)
    return (torch.special.xlogy(teacher, teacher) - teacher * log_q).sum(-1)


def pair_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
              teacher: torch.Tensor | None = None, label_smoothing: float = 0.0, distill_weight: float = 0.0,
              temperature: float = 1.0) -> torch.Tensor:
    """The classify objective on a micro-batch: mean over rows of w_i · l_i, where
    l_i = (1-α)·CE(target_i, logits_i) + α·T²·KL(teacher_i ‖ student_i) with a teacher, else CE alone
    (w_i = 1 without weights). T² keeps the KL gradient's scale as T changes (Hinton et al.). Without
    weights and teacher it is exactly F.cross_entropy, as before either existed."""
    if weight is None and teacher is None:
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    loss = F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction="none")
    if teacher is not None:
        kl = distill_kl(logits, teacher.to(logits.dtype), temperature)
        loss = (1 - distill_weight) * loss + distill_weight * temperature ** 2 * kl
    if weight is not None:
        loss = loss * weight.to(loss.dtype)
    return loss.mean()


class AdapterTrainerMixin:
    """What both trainers change in transformers' Trainer: adapter-only checkpoints, a head learning rate."""

    head_lr: float

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Checkpoints hold the adapter (LoRA + head) only: the frozen base is already on disk, and
        # Trainer's default for a non-PreTrainedModel would write all of it (GBs) every save_steps.
        self.model.model.save_pretrained(output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter_weights(self.model.model, Path(resume_from_checkpoint))

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            head = [p for n, p in params if f".{HEAD}." in n]
            groups = [{"params": [p for n, p in params if f".{HEAD}." not in n]}]
            groups.append({"params": head, "lr": self.head_lr or self.args.learning_rate})
            optim_cls, optim_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            optim_kwargs["weight_decay"] = self.args.weight_decay
            self.optimizer = optim_cls(groups, **optim_kwargs)
        return self.optimizer


class PairTrainer(AdapterTrainerMixin, Trainer):
    """Trainer with soft-target cross-entropy on pooled logits (pair_loss: per-row weights, distillation)
    and a separate head learning rate."""

    def __init__(self, *args, head_lr: float, label_smoothing: float, distill_weight: float = 0.0,
                 distill_temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_lr = head_lr
        self.label_smoothing = label_smoothing
        self.distill_weight, self.distill_temperature = distill_weight, distill_temperature

    def _get_train_sampler(self, *args, **kwargs):
        if self.args.world_size > 1:
            lengths = [len(e["input_ids"]) for e in self.train_dataset]
            return RankBalancedSampler(lengths, self.args.per_device_train_batch_size, self.args.world_size, self.args.seed)
        return super()._get_train_sampler(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        target, weight, teacher = inputs.pop("target"), inputs.pop("weight", None), inputs.pop("teacher", None)
        logits = model(**inputs)
        loss = pair_loss(logits, target, weight, teacher, self.label_smoothing, self.distill_weight, self.distill_temperature)
        return (loss, logits) if return_outputs else loss


class RewardModel(PooledClassifier):
    """The factory's model with a 1-output head as trl's RewardTrainer reads it: `.config` and `.logits`.

    It must not expose `is_loaded_in_4bit`: RewardTrainer would cast every trainable tensor to bf16,
    the fp32 head included, and training would no longer compute what inference computes.
    """

    @property
    def config(self):
        return self.base.config

    def add_model_tags(self, tags) -> None:
        self.base.add_model_tags(tags)

    def forward(self, input_ids, attention_mask=None, position_ids=None, seq_lens=None, **_ignored):
        # _ignored: use_cache (the backbone is always called without a cache) and margin (none here)
        return SequenceClassifierOutput(logits=super().forward(input_ids, attention_mask, position_ids, seq_lens))


class BradleyTerryTrainer(AdapterTrainerMixin, RewardTrainer):
    """trl's RewardTrainer (its loss, preference collator and reward/accuracy logging) with our checkpoints."""

    def __init__(self, *args, head_lr: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_lr = head_lr


def preference_dataset(formatter: Formatter, df: pd.DataFrame) -> tuple[datasets.Dataset, int]:
    """Decisive rows as trl's processed preference format (chosen_ids / rejected_ids: trl re-tokenises
    nothing), and the number of tie rows left out."""
    targets = np.stack(df["target"].to_numpy())
    decisive = targets[:, 2] < 0.5
    rows = df[decisive]
    a_won = targets[decisive, 0] > targets[decisive, 1]
    side_a = encode_rows(formatter, rows, side="a", desc="training rows")
    side_b = encode_rows(formatter, rows, side="b", desc="training rows")
    return in_memory({
        "chosen_ids": [a if w else b for a, b, w in zip(side_a, side_b, a_won)],
        "rejected_ids": [b if w else a for a, b, w in zip(side_a, side_b, a_won)],
    }), int((~decisive).sum())

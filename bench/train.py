"""Training benchmark: the seed notebook's QLoRA recipe against `python -m train`'s own code path.

Usage:
    python -m bench.train out=bench-out                                 # gemma2 + llama, max_length 1024 and 2048
    python -m bench.train out=bench-out models=gemma2 max_lengths=1024 steps=40 variants=seed,repo
    torchrun --nproc_per_node=2 -m bench.train out=bench-2gpu workdir=/tmp/tb variants=repo   # DDP scaling

Models: Gemma-2-9B / Llama-3-8B built from their real configs with random weights, saved once to
`workdir` and reloaded the way a real base is (4-bit NF4 through bitsandbytes, or bf16). Rows:
random token ids with arena-like lengths (log-normal, median 500, mean 675, cut at max_length);
every variant trains on the same rows in the same order for `steps` optimizer steps.
A `workdir` given on the command line keeps the saved bases, so later runs (other variants, or
torchrun) load them instead of building them again.
Variants:
  seed         NF4 base (double quant), LoRA r16 a32 on q/k/v, transformers Trainer with the
               model's own loss, batch 4 x accumulation 2, padding to the longest, gradient
               checkpointing, eager attention (the seed notebook);
  repo-qkv     train.fold's model factory, PairTrainer and collator (what `python -m train`
               runs), same LoRA targets and rank as the seed;
  repo         the same with the repo's default targets (q/k/v/o/gate);
  repo-packed, repo-qkv-packed: with train.layout=packed (rows end to end, no padding, flex attention);
  repo-bf16, repo-bf16-packed: the last two on an unquantised bf16 base (more memory).
Tokens/s counts real tokens (padding excluded) of the steps after the first `warmup` ones, summed
over all processes under torchrun (each process trains `steps` steps on its own share of rows).
Prints a table last and writes bench-train.json under out.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import SEED_TARGETS, arch_config, non_embedding_params, random_rows, result_table
from cli.config import ConfigError, cli_config, opt, run_cli
from model.factory import NUM_LABELS, build_for_training, pick_device
from model.packing import pad_batch
from model.settings import ModelConfig
from train.distributed import barrier, dist_rank

FOLD_ROWS = 46_000
VARIANTS = ("seed", "repo-qkv", "repo-qkv-packed", "repo", "repo-packed", "repo-bf16", "repo-bf16-packed")


@dataclasses.dataclass
class TrainBenchConfig:
    out: str = opt("", "output folder for bench-train.json (required)")
    models: list[str] = opt(["gemma2", "llama"], "gemma2 (9B) | llama (Llama-3 8B) | tiny (a 2-layer Llama, for tests)")
    max_lengths: list[int] = opt([1024, 2048], "row length cut")
    variants: list[str] = opt(list(VARIANTS), "which rows of the table to run: " + " | ".join(VARIANTS))
    steps: int = opt(40, "optimizer steps per variant")
    warmup: int = opt(5, "first steps left out of the timing (allocation, autotuning)")
    batch_size: int = opt(4, "rows per micro-batch (the seed's 4)")
    grad_accum: int = opt(2, "micro-batches per optimizer step (the seed's 2)")
    repo_batch_size: int = opt(0, "rows per micro-batch of the repo variants, accumulation scaled so that a step keeps "
                                  "batch_size x grad_accum rows (0: batch_size)")
    compile: bool = opt(False, "repo variants: torch.compile each decoder layer (train.compile=true)")
    workdir: str = opt("", "folder for the saved random bases (18 GB each), kept and reused; empty: a temp folder, "
                           "removed at the end (required under torchrun)")
    device: str = opt("cuda", "cuda | cpu (cpu: the tests, on models=tiny)")


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, num_labels=NUM_LABELS, pad_token_id=0, max_position_embeddings=4096)


class Counted:
    """Wraps a collator and records the real (unpadded) tokens of every micro-batch it builds, in order."""

    def __init__(self, collate):
        self.collate, self.tokens = collate, []

    def __call__(self, examples):
        self.tokens.append(sum(len(e["input_ids"]) for e in examples))
        return self.collate(examples)


def seed_collate(examples):
    ids, mask = pad_batch([e["input_ids"] for e in examples], 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["label"] for e in examples])}


def step_clock(device: torch.device):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.start, self.times = 0.0, []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter())

    return Clock()


def seed_model(base_dir: Path, device: torch.device):
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=NUM_LABELS, quantization_config=nf4, attn_implementation="eager",
        device_map={"": device.index or 0} if device.type == "cuda" else {"": "cpu"})
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": True})  # the seed's default
    return get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=16, lora_alpha=32, lora_dropout=0.05,
                                            target_modules=SEED_TARGETS))


def run_variant(variant: str, base_dir: Path, rows: list[list[int]], cfg: TrainBenchConfig, device: torch.device) -> dict:
    from transformers import Trainer

    from train.config import TrainConfig, TrainSettings
    from train.fold import training_args
    from train.trainers import Collator, PairTrainer

    on_gpu = device.type == "cuda"
    dtype = "bfloat16" if on_gpu else "float32"
    batch, accum = cfg.batch_size, cfg.grad_accum
    if variant != "seed" and cfg.repo_batch_size:
        batch, accum = cfg.repo_batch_size, cfg.batch_size * cfg.grad_accum // cfg.repo_batch_size
    settings = TrainSettings(batch_size=batch, grad_accum=accum, max_steps=cfg.steps, warmup=0,
                             logging_steps=10**6, report_to="none", device=str(device))
    labels = np.random.default_rng(1).integers(0, NUM_LABELS, len(rows))
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # Trainer arguments read only the compute dtype from the model section: one set for every variant.
    args = training_args(TrainConfig(model=ModelConfig(path=str(base_dir), compute_dtype=dtype), train=settings),
                         base_dir.parent / "run", device)
    if variant == "seed":
        model = seed_model(base_dir, device)
        data, collate = [{"input_ids": r, "label": int(y)} for r, y in zip(rows, labels)], Counted(seed_collate)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    else:
        targets = SEED_TARGETS if variant.startswith("repo-qkv") else ModelConfig().lora_targets
        quant = "none" if variant.startswith("repo-bf16") else "4bit"
        packed = variant.endswith("packed")
        mcfg = ModelConfig(path=str(base_dir), quantization=quant, compute_dtype=dtype, lora_targets=list(targets))
        model = build_for_training(mcfg, 0, device, packed=packed, compile=cfg.compile)
        targets_1hot = np.eye(NUM_LABELS, dtype=np.float32)[labels]
        data, collate = [{"input_ids": r, "target": t} for r, t in zip(rows, targets_1hot)], Counted(Collator(0, packed))
        trainer = PairTrainer(model=model, args=args, train_dataset=data, data_collator=collate, head_lr=0.0, label_smoothing=0.0)
    clock = step_clock(device)
    trainer.add_callback(clock)
    trainer.train()
    steps = len(clock.times)
    micro = [sum(collate.tokens[k * accum:(k + 1) * accum]) for k in range(steps)]
    counts = torch.tensor([sum(micro[cfg.warmup + 1:]), sum(micro)], dtype=torch.float64, device=device)
    rank, world = dist_rank()
    if world > 1:
        torch.distributed.all_reduce(counts)
    tokens, tokens_trained = counts.tolist()
    seconds = clock.times[-1] - clock.times[cfg.warmup]
    rows_per_s = (steps - cfg.warmup - 1) * cfg.batch_size * cfg.grad_accum * world / seconds
    result = {"variant": variant, "micro_batch": f"{batch}x{accum}", "compiled": variant != "seed" and cfg.compile,
              "gpus": world, "steps": steps, "tokens_trained": int(tokens_trained), "tokens_per_s": tokens / seconds,
              "warmup_s": clock.times[cfg.warmup] - clock.start, "s_per_1000_rows": 1000 / rows_per_s,
              "fold_hours": FOLD_ROWS / rows_per_s / 3600,
              "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else float("nan")}
    del trainer, model
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    if rank == 0:
        print(f"  {variant} ({batch}x{accum} rows, {world} processes): {result['tokens_per_s']:,.0f} tokens/s, "
              f"{result['s_per_1000_rows']:.1f} s/1000 rows, peak {result['peak_gb']:.1f} GB, "
              f"first {cfg.warmup + 1} steps {result['warmup_s']:.0f} s", flush=True)
    return result


def bench_model(arch: str, cfg: TrainBenchConfig, workdir: Path, device: torch.device) -> list[dict]:
    from transformers import AutoModelForSequenceClassification

    config = tiny_config() if arch == "tiny" else arch_config(arch)
    base_dir = workdir / arch / "base"
    rank, world = dist_rank()
    with torch.device("meta"):
        params = non_embedding_params(AutoModelForSequenceClassification.from_config(config))
    if rank == 0 and not (base_dir / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device(device):
            base = AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        base.save_pretrained(base_dir)
        del base
        gc.collect()
    barrier()
    results = []
    n_rows = cfg.steps * cfg.batch_size * cfg.grad_accum * world
    for max_length in cfg.max_lengths:
        rows = random_rows(n_rows, max_length, config.vocab_size)
        if rank == 0:
            print(f"{arch} max_length {max_length}: {params / 1e9:.2f} B non-embedding parameters, {n_rows} rows, "
                  f"{world} processes", flush=True)
        for variant in cfg.variants:
            try:
                result = run_variant(variant, base_dir, rows, cfg, device)
            except Exception as err:  # one failing variant must not lose the others' numbers
                print(f"  {variant}: FAILED {type(err).__name__}: {err}")
                result = {"variant": variant, "error": f"{type(err).__name__}: {str(err)[:500]}"}
            results.append({"model": arch, "max_length": max_length, **result})
            if rank == 0:
                (Path(cfg.out) / "bench-train.partial.json").write_text(json.dumps(results, indent=1))
    barrier()
    if rank == 0 and not cfg.workdir:
        shutil.rmtree(workdir / arch, ignore_errors=True)
    for r in results:
        base_rate = next((b.get("tokens_per_s") for b in results if b["variant"] == "seed" and b["max_length"] == r["max_length"]), None)
        if "tokens_per_s" in r and base_rate:
            r["vs_seed"] = r["tokens_per_s"] / base_rate
    return results


def table(results: list[dict], device: str) -> str:
    columns = [("micro", "micro_batch", 5, "s"), ("compiled", "compiled", 8, ""), ("GPUs", "gpus", 4, "d"), ("tok/s", "tokens_per_s", 8, ",.0f"), ("s/1k rows", "s_per_1000_rows", 10, ".1f"), ("peak GB", "peak_gb", 8, ".1f"),
               ("h/46k fold", "fold_hours", 11, ".2f"), ("x seed", "vs_seed", 7, ".2f")]
    return device + "\n" + result_table(results, columns, 16)


def main(argv: list[str] | None = None) -> None:
    cfg = cli_config(TrainBenchConfig, __doc__, argv)
    if not cfg.out:
        raise ConfigError("out= is required: the folder for the JSON results")
    unknown = set(cfg.variants) - set(VARIANTS)
    if unknown or cfg.steps <= cfg.warmup + 1:
        raise ConfigError(f"variants must be among {list(VARIANTS)} (unknown: {sorted(unknown)}), steps > warmup + 1")
    rows_per_step = cfg.batch_size * cfg.grad_accum
    if cfg.repo_batch_size and rows_per_step % cfg.repo_batch_size:
        raise ConfigError(f"repo_batch_size={cfg.repo_batch_size} must divide batch_size x grad_accum = {rows_per_step}")
    rank, world = dist_rank()
    if world > 1:
        if cfg.device != "cuda" or not cfg.workdir:
            raise ConfigError("under torchrun the bench needs device=cuda and a workdir= that every process sees")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=device)
    else:
        device = pick_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{world} x {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"
    name += f", torch {torch.__version__}"
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="arena-train-bench-"))
    results = [r for arch in cfg.models for r in bench_model(arch, cfg, workdir, device)]
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank != 0:
        return
    (out / "bench-train.json").write_text(json.dumps({"device": name, "config": dataclasses.asdict(cfg), "results": results}, indent=1))
    print("\n" + table(results, name))


if __name__ == "__main__":
    run_cli(main)

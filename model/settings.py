"""The settings of a model: how the base is built and trained (ModelConfig) and how a run is scored (InferSettings).

InferSettings is the one inference-settings type: saved in every run's config (the settings its
OOF was scored with) and overridden key by key as `infer.KEY=VALUE` by `infer predict`, the
Kaggle entry and `infer plan`; the benchmarks build it directly.
"""
from __future__ import annotations

import dataclasses
import re

import torch

from cli.config import opt
from model.packing import LAYOUTS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("4bit", "8bit", "none")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa")
PROFILES = ("auto", "t4", "default")


@dataclasses.dataclass
class ModelConfig:
    path: str = opt("", "base model folder, or pypkg:<module> for a model shipped inside a pip package")
    gguf_file: str = opt("", "GGUF file inside `path` (transformers dequantises it on load); empty for safetensors")
    quantization: str = opt("4bit", "4bit (bitsandbytes NF4) | 8bit (LLM.int8) | none")
    compute_dtype: str = opt("bfloat16", "float32 | bfloat16 | float16 (T4 has no bf16: use float16 there)")
    double_quant: bool = opt(True, "4bit: also quantise the quantisation constants (saves ~0.4 bit/param)")
    attn_implementation: str = opt("auto", "auto (eager for Gemma-2 with attn_softcapping, which SDPA ignores; sdpa otherwise) | eager | sdpa")
    attn_softcapping: bool = opt(True, "Gemma-2 attention logit soft-capping (tanh at 50); false sets the base's "
                                       "attn_logit_softcapping=None in training and inference alike, so SDPA kernels "
                                       "apply (T4: memory-efficient SDPA instead of eager); no effect on other models")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input")
    lora_targets: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"], "module names that get LoRA")
    lora_layers: list[int] = opt([], "layer indices that get LoRA; empty means all layers")
    gradient_checkpointing: bool = opt(True, "recompute activations in backward (less memory, ~30% slower)")

    def __post_init__(self) -> None:
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"model.attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"model.quantization must be 4bit, 8bit or none, got {self.quantization!r}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"model.compute_dtype must be one of {list(DTYPES)}, got {self.compute_dtype!r}")
        if self.gguf_file and self.quantization != "none":
            raise ValueError(
                "model.gguf_file: transformers dequantises GGUF weights and cannot re-quantise them with "
                "bitsandbytes; use model.quantization=none, or a safetensors copy of the base for 4bit/8bit"
            )


@dataclasses.dataclass
class InferSettings:
    """How a run is scored; `infer predict` and the Kaggle entry override these as infer.KEY=VALUE."""

    base_path: str = opt("", "base model folder at inference; empty: the run's model.path (on Kaggle: the attached model)")
    quantization: str = opt("", "4bit | 8bit | none for the base at inference; empty: as trained (Kaggle T4: 8bit)")
    compute_dtype: str = opt("", "float32 | bfloat16 | float16 at inference; empty: as trained (a T4 has no bf16: float16)")
    token_budget: int = opt(16384, "tokens per batch: packed, every batch is exactly this wide; padded, rows x longest row <= this")
    max_rows: int = opt(64, "padded layout: max rows per batch, whatever their length")
    score_budget: int = opt(0, "eager attention: rows x longest row^2 per batch at most this (eager's score matrices grow "
                               "with it, not with the tokens); 0 = auto: 8,388,608 (2 rows of 2,048) on the T4 profile, "
                               "no limit elsewhere; -1 = no limit")
    layout: str = opt("auto", "packed (rows end to end, no padding; flex attention) | padded | auto: packed on GPUs of compute capability >= 8.0, padded on CPU and T4")
    merge_lora: bool = opt(True, "fold LoRA into the base weights before scoring when the base is not quantised")
    fp8: bool = opt(False, "fp8 e4m3 decoder projections after the LoRA merge (model/fp8.py): faster on compute "
                           "capability >= 8.9 (H100, L4) with the packed layout + compile; changes probabilities (README: Performance)")
    compile: bool = opt(True, "packed layout: torch.compile each decoder layer (first batch per worker: ~10 s Llama-3, 3-5 min Gemma-2 on a cold cache)")
    int8: bool = opt(False, "int8 W8A8 decoder projections after the LoRA merge (model/int8.py: per-channel int8 weights, "
                            "per-token int8 activations, torch._int_mm): the T4 weight format candidate; changes "
                            "probabilities; needs an unquantised base (infer.quantization=none) and merge_lora")
    profile: str = opt("auto", "kernel set: auto (t4 on GPUs of compute capability 7.x, else default) | t4 (fp16, padded, "
                               "SDPA mem-efficient/math or eager, no flex/compile/bf16/fp8, 15 GiB per GPU; to measure "
                               "the T4 path on a larger GPU) | default (model/hardware.py prints what was chosen and why)")
    pipeline: int = opt(1, "GPUs one model is split over by decoder layers (model/pipeline.py), the stages working on "
                           "consecutive batches at once: 2 puts an fp16 Gemma-2 9B (18.5 GB) on Kaggle's two 15 GB T4s "
                           "(with infer.quantization=none infer.compute_dtype=float16 infer.workers=1); padded layout; "
                           "1 = the whole model on each worker's GPU")
    tta: bool = opt(True, "also score each row with A and B swapped and average (merged by id)")
    workers: int = opt(0, "parallel workers: 0 means one per visible GPU, or 1 on CPU")
    device: str = opt("auto", "auto | cpu | cuda (workers take cuda:0..N-1)")

    def __post_init__(self) -> None:
        if self.quantization not in ("", *QUANTIZATIONS):
            raise ValueError(f"infer.quantization must be empty (as trained) or one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.compute_dtype not in ("", *DTYPES):
            raise ValueError(f"infer.compute_dtype must be empty (as trained) or one of {list(DTYPES)}, got {self.compute_dtype!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"infer.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"infer.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.workers < 0:
            raise ValueError(f"infer.workers must be 0 (one per GPU, or 1 on CPU) or more, got {self.workers}")
        if self.score_budget < -1:
            raise ValueError(f"infer.score_budget must be -1 (no limit), 0 (auto) or positive, got {self.score_budget}")
        if self.token_budget < 1 or self.max_rows < 1:
            raise ValueError(f"infer.token_budget and infer.max_rows must be positive, got {self.token_budget}, {self.max_rows}")
        if self.fp8 and not self.merge_lora:
            raise ValueError("infer.fp8=true converts the merged weights: it needs infer.merge_lora=true")
        if self.int8 and not self.merge_lora:
            raise ValueError("infer.int8=true converts the merged weights: it needs infer.merge_lora=true")
        if self.int8 and self.fp8:
            raise ValueError("infer.int8=true and infer.fp8=true are two weight formats: choose one")
        if self.pipeline < 1:
            raise ValueError(f"infer.pipeline must be 1 (no split) or the number of GPUs per model, got {self.pipeline}")
        if self.pipeline > 1 and (self.int8 or self.fp8 or not self.merge_lora):
            raise ValueError("infer.pipeline > 1 splits the merged fp16 weights: it needs infer.merge_lora=true and "
                             "neither infer.int8 nor infer.fp8")
        if self.pipeline > 1 and self.layout == "packed":
            raise ValueError("infer.pipeline > 1 runs the padded layout (packed batches compile each layer on one "
                             "device): infer.layout=padded or auto")
        if self.profile not in PROFILES:
            raise ValueError(f"infer.profile must be one of {PROFILES}, got {self.profile!r}")


def inference_model(model: ModelConfig, infer: InferSettings) -> ModelConfig:
    """The base as inference builds it: the trained ModelConfig with infer's base_path / quantization /
    compute_dtype applied; settings fp8 cannot run with are refused here, before any model loads."""
    changes = {"path": infer.base_path, "quantization": infer.quantization, "compute_dtype": infer.compute_dtype}
    resolved = dataclasses.replace(model, **{k: v for k, v in changes.items() if v})
    if infer.fp8:
        check_fp8_settings(resolved.quantization, resolved.compute_dtype)
    if infer.int8 and resolved.quantization != "none":
        raise ValueError(f"infer.int8=true quantises the merged fp16 weights itself: it needs an unquantised base, not "
                         f"quantization={resolved.quantization} (set infer.quantization=none)")
    if infer.pipeline > 1 and resolved.quantization != "none":
        raise ValueError(f"infer.pipeline={infer.pipeline} splits the merged fp16 weights over the GPUs: it needs an "
                         f"unquantised base, not quantization={resolved.quantization} (set infer.quantization=none)")
    return resolved


def check_fp8_settings(quantization: str, compute_dtype: str) -> None:
    """Settings under which fp8 cannot run (ValueError)."""
    if quantization != "none":
        raise ValueError(f"infer.fp8=true needs an unquantised base, not quantization={quantization} "
                         "(set infer.quantization=none)")
    if compute_dtype == "float16":
        raise ValueError("infer.fp8=true writes bf16 matmul outputs, not compute_dtype=float16 "
                         "(set infer.compute_dtype=bfloat16)")

"""One model split by decoder layers over several GPUs (`infer.pipeline`), its stages working on consecutive batches.

Gemma-2 9B in fp16 is 18.5 GB of weights and a T4 holds 15 GB, so one fp16 model spans Kaggle's two T4s:
embeddings and the first half of the decoder layers on GPU 0, the second half, the final norm and the
head on GPU 1 (the 2nd-place LMSYS solution's layout). accelerate's hooks (`dispatch_model`, made for this)
move each module's inputs to its GPU (the attention mask and rotary tables once per later-stage layer: tens of
MB per batch over PCIe, about 1 % of a T4 batch). The stages are meant to overlap without threads: CUDA queues
work asynchronously, and `infer.scoring.score_batches` keeps logits on the device and never waits between
batches, so the host can queue batch k+1's first half on GPU 0 while GPU 1 still runs batch k's second half.
T4 mode measured one stage at a time (README: Performance, T4 mode): 1.58x the seed method per GPU; the
overlap itself needs two GPUs and is not measured yet.
"""
from __future__ import annotations

import torch
from torch import nn

from cli.config import ConfigError
from model.factory import HEAD, PooledClassifier, is_quantised


def stage_of(layer: int, n_layers: int, n_stages: int) -> int:
    """Stage of decoder layer `layer`: contiguous runs of (nearly) equal length, the first stage first."""
    return layer * n_stages // n_layers


def stage_map(base: nn.Module, n_stages: int) -> dict[str, int]:
    """Module name -> stage for accelerate: decoder layers split evenly; what runs before them (embeddings, rotary)
    on the first stage, what runs after them (final norm, head, anything else at the top) on the last."""
    prefix = base.base_model_prefix
    backbone = getattr(base, prefix)
    n_layers = len(backbone.layers)
    if not 1 < n_stages <= n_layers:
        raise ConfigError(f"infer.pipeline={n_stages}: a model of {n_layers} decoder layers splits into 2..{n_layers} stages")
    last = n_stages - 1
    mapping = {}
    for name, child in base.named_children():
        if child is not backbone:
            mapping[name] = last
            continue
        for sub, _ in backbone.named_children():
            if sub == "layers":
                mapping.update({f"{prefix}.layers.{i}": stage_of(i, n_layers, n_stages) for i in range(n_layers)})
            else:  # norm runs after the layers; embed_tokens and rotary_emb before them
                mapping[f"{prefix}.{sub}"] = last if sub == "norm" else 0
    return mapping


def split_model(model: PooledClassifier, devices: list[torch.device]) -> str:
    """Place an unquantised model with LoRA merged (loaded on the CPU) over `devices`, one stage each, with the
    hooks that move activations between them; returns what was done, for the log."""
    from accelerate import dispatch_model
    from peft import PeftModel

    if isinstance(model.model, PeftModel) or is_quantised(model.base):
        raise ConfigError("infer.pipeline > 1 places plain fp16 weights: it needs LoRA merged into an unquantised base "
                          "(infer.quantization=none, infer.merge_lora=true)")
    base = model.base
    mapping = stage_map(base, len(devices))
    # force_hooks: the same hooks on one device too (the CPU tests run the two-stage path with both stages on the CPU)
    dispatch_model(base, device_map={name: devices[s] for name, s in mapping.items()}, force_hooks=True)
    layers = [sum(1 for name, s in mapping.items() if ".layers." in name and s == k) for k in range(len(devices))]
    return (f"decoder layers split {' + '.join(map(str, layers))} over {', '.join(map(str, devices))} "
            f"(embeddings on {devices[0]}, norm and head on {devices[mapping[HEAD]]})")

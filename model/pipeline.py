"""One model split by decoder layers over several GPUs (`infer.pipeline`), its stages working on consecutive batches.

Gemma-2 9B in fp16 is 18.5 GB of weights and a T4 holds 15 GB, so one fp16 model spans Kaggle's two T4s:
embeddings and the first half of the decoder layers on GPU 0, the second half, the final norm and the
head on GPU 1 (the 2nd-place LMSYS solution's layout). The stages are meant to overlap without threads:
CUDA queues work asynchronously and `infer.scoring.score_batches` never waits between batches, so the host
can queue batch k+1's first half on GPU 0 while GPU 1 still runs batch k's second half.

What decides whether they overlap is where the GPU-to-GPU copies stand. PyTorch makes every copy between
two GPUs a two-way barrier (the source GPU's queue waits until the destination's has drained up to that
point), so a copy from GPU 0 issued after any of batch k's second-stage work is queued holds GPU 0 until
that work is done. accelerate's `dispatch_model` moves each layer's inputs (attention mask, rotary tables)
again at every layer, which would put such a copy before every second-stage layer; here a hook on a
stage's first layer moves them all once, at the boundary, and the stage's other layers reuse those copies
(Gemma-2 alternates a sliding-window and a full mask, so its second mask crosses at the stage's second layer:
a stall of one layer, not of the stage).
`PooledClassifier` sends the pooling index to the last GPU from the host for the same reason.
T4 mode measured one stage at a time (README: Performance, T4 mode): 1.46-1.58x the seed method on Gemma-2; the
overlap itself needs two GPUs (`python -m bench.infer t4_mode=true` measures it there).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cli.config import ConfigError
from model.factory import HEAD, PooledClassifier, is_quantised


def stage_of(layer: int, n_layers: int, n_stages: int) -> int:
    """Stage of decoder layer `layer`: contiguous runs of (nearly) equal length, the first stage first."""
    return layer * n_stages // n_layers


def stage_map(base: nn.Module, n_stages: int) -> dict[str, int]:
    """Module name -> stage: decoder layers split evenly; what runs before them (embeddings, rotary) on the first
    stage, what runs after them (final norm, head, anything else at the top) on the last."""
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


def stage_hooks(device: torch.device, move: Callable = lambda t, d: t.to(d, non_blocking=True)):
    """(first-layer hook, other-layers hook) for one stage on `device`: the first moves every tensor argument that
    is elsewhere and remembers the copies of its keyword arguments; the others reuse those copies (the same mask
    and rotary tables reach every layer of a forward) and move only what they have not seen. The hidden state, the
    one positional argument, is moved and not kept: its copy is the next layer's input, not the cache's."""
    copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(source) -> (source, copy): `is` guards id reuse

    def moved(value, keep: bool):
        if isinstance(value, torch.Tensor):
            if value.device == device:
                return value
            hit = copies.get(id(value))
            if hit is not None and hit[0] is value:
                return hit[1]
            copy = move(value, device)
            if keep:
                copies[id(value)] = (value, copy)
            return copy
        if isinstance(value, (tuple, list)):
            return type(value)(moved(v, keep) for v in value)
        if isinstance(value, dict):
            return {k: moved(v, keep) for k, v in value.items()}
        return value

    def first(module, args, kwargs):
        copies.clear()  # a new forward: the last one's copies are no use
        return moved(args, False), moved(kwargs, True)

    def rest(module, args, kwargs):
        return moved(args, False), moved(kwargs, True)

    return first, rest


def split_model(model: PooledClassifier, devices: list[torch.device]) -> str:
    """Place an unquantised model with LoRA merged (loaded on the CPU) over `devices`, one stage each, with the
    hooks that hand activations over at each stage's first layer; returns what was done, for the log."""
    from peft import PeftModel

    if isinstance(model.model, PeftModel) or is_quantised(model.base):
        raise ConfigError("infer.pipeline > 1 places plain fp16 weights: it needs LoRA merged into an unquantised base "
                          "(infer.quantization=none, infer.merge_lora=true)")
    base = model.base
    mapping = stage_map(base, len(devices))
    for name, stage in mapping.items():
        base.get_submodule(name).to(devices[stage])
    backbone = getattr(base, base.base_model_prefix)
    stages = [[layer for i, layer in enumerate(backbone.layers) if mapping[f"{base.base_model_prefix}.layers.{i}"] == s]
              for s in range(len(devices))]
    for s, layers in enumerate(stages):
        if s == 0:
            continue  # inputs arrive on the first stage's device
        first, rest = stage_hooks(devices[s])
        layers[0].register_forward_pre_hook(first, with_kwargs=True)
        for layer in layers[1:]:
            layer.register_forward_pre_hook(rest, with_kwargs=True)
    return (f"decoder layers split {' + '.join(str(len(layers)) for layers in stages)} over "
            f"{', '.join(map(str, devices))} (embeddings on {devices[0]}, norm and head on {devices[mapping[HEAD]]})")

"""Roofline estimate of `infer predict` on Kaggle's 2xT4, per path, from the FLOPs and bytes each moves per token.

Usage:
    python -m bench.t4_roofline [max_length=2048] [token_budget=16384] [efficiency=0.5]

No GPU: a derivation, not a measurement. For Gemma-2 9B and Llama-3 8B (bench.common.arch_config, the
real configs) at the shipped configs' inference length, with arena-like rows (bench.common.random_rows:
log-normal, median 500, mean 675, cut at max_length) cut into the padded layout's token-budget batches
exactly as inference cuts them (infer.scoring.plan_batches), per real token:
- FLOPs: 2 x non-embedding parameters (the projections) + attention 4 x heads x head_dim x W per layer
  over the padded batch width W (eager and the memory-efficient kernel both compute the whole W x W
  square of a padded row);
- bytes: the weights once per batch (divided by the batch's tokens), every projection's input and
  output in fp16 (int8 W8A8: + the int8 copy of the input and the int32 result), and eager
  attention's fp32 scores written and read back; all over padded tokens;
- time per token = max(FLOPs / tensor rate, bytes / 320 GB/s) (the roofline), with the tensor rate
  65 TFLOP/s fp16 (attention always) and 130 TOPS int8 (W8A8 projections); then x 1/efficiency.
efficiency (default 0.5) is an ASSUMPTION, not a measurement: the share of the boost-clock tensor
peak a 70 W T4 sustains on these GEMMs plus everything the roofline leaves out (norms, RoPE,
launches). Replace it by the T4-mode benchmark's %peak (python -m bench.infer t4_mode=true) and,
best, by a measurement on a real T4.
Paths (tokens/s of the whole 2xT4 machine, real tokens, as infer/throughput.yaml counts them):
- fp16-padded: one fp16 model per GPU; does not fit (9B: 18.5 GB, 8B: 16.1 GB of weights > 15 GB);
- int8: LoRA merged, int8 W8A8 projections (model/int8.py), one model per GPU: 2 x one GPU's rate;
- fp16-split: fp16 weights, half the layers on each GPU, pipelined (batch k+1 on GPU 0 while batch k
  is on GPU 1): the machine runs at one full-model fp16 GPU's rate x 2, less the pipeline's fill and
  drain (one batch out of thousands: ignored) and the hidden-state hand-over (W x hidden x 2 bytes per
  batch over PCIe: ~0.1 ms, ignored).
`python -m bench.t4_roofline` prints the table; its `estimate` column is what infer/throughput.yaml
holds under t4x2-int8 and t4x2-fp16-split (source: DERIVED, this script).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from bench.common import arch_config, random_rows
from cli.config import cli_config, opt
from infer.scoring import plan_batches
from model.settings import InferSettings

T4 = {"fp16_tflops": 65.0, "int8_tops": 130.0, "gb_per_s": 320.0, "memory_gb": 15.0, "gpus": 2}
PATHS = ("fp16-padded", "int8", "fp16-split")


@dataclasses.dataclass
class RooflineConfig:
    max_length: int = opt(2048, "row length cut (the shipped configs' format.infer_max_length)")
    token_budget: int = opt(16384, "padded batches: rows x longest row <= this (the shipped infer.token_budget)")
    max_rows: int = opt(64, "padded batches: max rows (infer.max_rows)")
    rows: int = opt(20000, "arena-like rows drawn to measure padding and batch widths")
    efficiency: float = opt(0.5, "ASSUMED share of the roofline reached (see the docstring); replace by measurement")


def dims(arch: str) -> dict:
    c = arch_config(arch)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    per_layer = 2 * c.hidden_size * q + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    # elements each projection reads (input) and writes (output) per token, summed over a layer's 7 projections
    io = (3 * c.hidden_size + (q + 2 * kv)) + (q + c.hidden_size) + (2 * c.hidden_size + 2 * c.intermediate_size) \
        + (c.intermediate_size + c.hidden_size)
    return {"layers": c.num_hidden_layers, "params": c.num_hidden_layers * per_layer, "heads": c.num_attention_heads,
            "head_dim": hd, "io": io, "embedding": c.vocab_size * c.hidden_size,
            "eager": bool(getattr(c, "attn_logit_softcapping", None))}


def batches(cfg: RooflineConfig) -> dict:
    """Padding factor and mean padded width of the inference batches of arena-like rows."""
    lengths = [len(r) for r in random_rows(cfg.rows, cfg.max_length, vocab=1000)]
    groups, widths = plan_batches(lengths, InferSettings(token_budget=cfg.token_budget, max_rows=cfg.max_rows), "padded")
    padded = sum(widths)
    width = sum(w * lengths[g[0]] for g, w in zip(groups, widths)) / padded  # width seen by a padded token
    return {"real": sum(lengths), "padded": padded, "pad_factor": padded / sum(lengths), "width": width,
            "tokens_per_batch": padded / len(groups), "mean_len": float(np.mean(lengths))}


def per_gpu(arch: str, path: str, b: dict) -> dict:
    """Seconds per padded token on one T4 (roofline), and whether the weights fit."""
    d = dims(arch)
    layers = d["layers"] // 2 if path == "fp16-split" else d["layers"]
    share = layers / d["layers"]
    attn_flops = 4 * d["heads"] * d["head_dim"] * b["width"] * layers
    lin_flops = 2 * d["params"] * share
    weight_bytes = d["params"] * share * (1 if path == "int8" else 2) + d["embedding"] * 2 * (path != "fp16-split" or 0.5)
    act_bytes = d["io"] * layers * (2 + (1 + 4 + 4) / 2 if path == "int8" else 2)
    scores = 3 * 4 * d["heads"] * b["width"] * layers if d["eager"] else 0  # fp32 scores: write, read, write probs
    byts = weight_bytes / b["tokens_per_batch"] + act_bytes + scores
    rate = T4["int8_tops"] if path == "int8" else T4["fp16_tflops"]
    compute = lin_flops / (rate * 1e12) + attn_flops / (T4["fp16_tflops"] * 1e12)
    memory = byts / (T4["gb_per_s"] * 1e9)
    return {"s_per_token": max(compute, memory), "bound": "compute" if compute >= memory else "memory",
            "flops": lin_flops + attn_flops, "bytes": byts, "weights_gb": weight_bytes / 1e9,
            "fits": weight_bytes / 1e9 < T4["memory_gb"] - 1.5}  # 1.5 GB for activations, CUDA context, allocator


def estimate(arch: str, path: str, cfg: RooflineConfig) -> dict:
    """tokens/s of the 2xT4 machine in real tokens: roofline and roofline x efficiency."""
    b = batches(cfg)
    g = per_gpu(arch, path, b)
    # fp16-split: each GPU runs half the layers of every batch: 2 GPUs together = one full pass per stage time
    machine = 1 / g["s_per_token"] if path == "fp16-split" else T4["gpus"] / g["s_per_token"]
    roofline = machine / b["pad_factor"]
    return {"model": arch, "path": path, **g, "pad_factor": b["pad_factor"], "width": b["width"],
            "mean_len": b["mean_len"], "roofline": roofline, "estimate": roofline * cfg.efficiency if g["fits"] else None}


def wall_hours(rates: dict[str, float], mean_len: float, rows: int = 25_000, passes: int = 2) -> float:
    """Hours to score `rows` x `passes` (swap TTA) with each model one after another at `rates` (real tokens/s)."""
    return sum(rows * passes * mean_len / r for r in rates.values()) / 3600


def main(argv: list[str] | None = None) -> None:
    cfg = cli_config(RooflineConfig, __doc__, argv)
    results = [estimate(arch, path, cfg) for arch in ("gemma2", "llama") for path in PATHS]
    print(f"T4: {T4}; rows cut at {cfg.max_length}, padded batches of <= {cfg.token_budget} tokens; "
          f"efficiency {cfg.efficiency} (assumed)")
    print(f"{'model':<7} {'path':<12} {'GFLOP/tok':>9} {'MB/tok':>7} {'bound':>8} {'weights GB':>10} {'fits':>5} "
          f"{'pad':>5} {'roofline tok/s':>14} {'estimate':>9}")
    for r in results:
        est = f"{r['estimate']:>9,.0f}" if r["estimate"] else f"{'-':>9}"
        print(f"{r['model']:<7} {r['path']:<12} {r['flops'] / 1e9:>9.2f} {r['bytes'] / 1e6:>7.2f} {r['bound']:>8} "
              f"{r['weights_gb']:>10.1f} {str(r['fits']):>5} {r['pad_factor']:>5.3f} {r['roofline']:>14,.0f} {est}")
    mean_len = results[0]["mean_len"]
    for path in ("int8", "fp16-split"):
        rates = {r["model"]: r["estimate"] for r in results if r["path"] == path}
        print(f"2xT4 {path}: 25k rows x (Gemma-2 + Llama-3) x swap TTA ({mean_len:.0f} tokens/row): "
              f"{wall_hours(rates, mean_len):.2f} h (estimate)")


if __name__ == "__main__":
    from cli.config import run_cli

    run_cli(main)

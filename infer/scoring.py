"""Batches and workers: how `infer predict` turns token ids into logits, on one GPU or several.

Rows are cut into batches in one of two layouts (model.packing: `packed`, rows end to end with no
padding; or `padded`, right-padded rows), whole batches are spread over N workers by the tokens
they compute, and each worker loads the run once, applies the inference-only speed-ups (merged
LoRA, fp8 projections if asked, compiled layers) and scores its batches. Nothing here knows about
ids or CSVs: predict.py formats rows, calls run_shares and merges by id.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from model.factory import PooledClassifier, compile_layers, merge_lora
from model.fp8 import to_fp8
from model.hardware import SDPA_T4_BACKENDS, sdpa_backends, t4_memory_cap
from model.int8 import to_int8
from model.packing import make_inputs, pack_rows
from model.pipeline import split_model
from model.run import load_model
from model.settings import InferSettings, ModelConfig


def make_batches(lengths: list[int], token_budget: int, max_rows: int, score_budget: int = 0) -> list[list[int]]:
    """Padded layout: indices grouped longest first so that rows x longest row stays within the token budget
    and, with score_budget > 0 (eager attention), rows x longest row^2 within that; a row over either goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        rows, longest = (len(batches[-1]) + 1, lengths[batches[-1][0]]) if batches else (0, 0)
        if (batches and rows <= max_rows and rows * longest <= token_budget
                and (score_budget <= 0 or rows * longest**2 <= score_budget)):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def plan_batches(lengths: list[int], infer: InferSettings, layout: str) -> tuple[list[list[int]], list[int]]:
    """(batches of row indices, tokens each batch computes including padding) for a resolved layout."""
    if layout == "packed":
        batches = pack_rows(lengths, infer.token_budget)
        return batches, [infer.token_budget] * len(batches)
    batches = make_batches(lengths, infer.token_budget, infer.max_rows, infer.score_budget)
    return batches, [len(b) * lengths[b[0]] for b in batches]


def split_batches(batches: list[list[int]], costs: list[int], n_workers: int) -> list[list[list[int]]]:
    """Give each worker whole batches so their computed-token totals are as equal as possible."""
    shares: list[list[list[int]]] = [[] for _ in range(n_workers)]
    load = [0] * n_workers
    for j in sorted(range(len(batches)), key=lambda j: (-costs[j], j)):
        w = load.index(min(load))
        shares[w].append(batches[j])
        load[w] += costs[j]
    return shares


def prepare(model: PooledClassifier, infer: InferSettings, layout: str) -> list[str]:
    """Inference-only speed-ups on a loaded model (merged LoRA, fp8 or int8 projections, compiled layers);
    returns what was done, for the log."""
    done = [merge_lora(model)] if infer.merge_lora else ["LoRA kept unmerged (infer.merge_lora=false)"]
    if infer.fp8:
        done.append(to_fp8(model))
    if infer.int8:
        done.append(to_int8(model))
    if infer.compile and layout == "packed":
        compile_layers(model)
        done.append("decoder layers compiled")
    elif infer.compile:
        done.append("not compiled: padded batches vary in shape, each new shape would recompile")
    return done


def score_batches(model: PooledClassifier, batches: list[list[list[int]]], pad_id: int, layout: str, width: int,
                  device: torch.device, desc: str = "batches", position: int = 0) -> tuple[list[np.ndarray], dict]:
    """float32 logits per batch, and timing: the first batch (compilation, warm-up) apart from the rest.

    Logits stay on the device until the end so the GPU is never idle waiting for a copy back.
    """
    out, stats = [], {"first_batch_s": 0.0, "steady_s": 0.0, "steady_tokens": 0, "tokens": 0}
    start = time.perf_counter()
    with torch.inference_mode():
        for k, seqs in enumerate(tqdm(batches, desc=desc, position=position, leave=False)):
            inputs = {name: t.to(device, non_blocking=True) for name, t in make_inputs(seqs, pad_id, layout, width).items()}
            out.append(model(**inputs))
            tokens = sum(map(len, seqs))
            stats["tokens"] += tokens
            if k == 0:
                _sync(out[-1].device)  # the last stage's device when the model is split (infer.pipeline)
                stats["first_batch_s"] = time.perf_counter() - start
                start = time.perf_counter()
            else:
                stats["steady_tokens"] += tokens
        if out:
            _sync(out[-1].device)
    stats["steady_s"] = time.perf_counter() - start
    return [o.cpu().numpy() for o in out], stats


def unbatch(batches: list[list[int]], parts: list[np.ndarray], n_rows: int) -> np.ndarray:
    """Per-batch logits back in row order: (n_rows, 3) float32, row i from the batch that holds it."""
    logits = np.zeros((n_rows, parts[0].shape[1] if parts else 3), dtype=np.float32)
    for batch, part in zip(batches, parts):
        logits[batch] = part
    return logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker_devices(n_workers: int, per_worker: int, device_type: str) -> list[list[str]]:
    """The devices of each worker: one GPU each, or `per_worker` consecutive GPUs for a split model (infer.pipeline);
    CPU workers name the CPU once per stage."""
    if device_type != "cuda":
        return [["cpu"] * per_worker for _ in range(n_workers)]
    return [[f"cuda:{w * per_worker + s}" for s in range(per_worker)] for w in range(n_workers)]


def _score_share(run_path: str, model_cfg: dict, infer_cfg: dict, devices: list[str], batches: list[list[list[int]]],
                 pad_id: int, layout: str, rank: int, threads: int):
    """Worker body: load the run once, score its batches, return float32 logits per batch and timing."""
    devs = [torch.device(d) for d in devices]
    dev = devs[0]  # inputs go to the first stage
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(threads)  # CPU workers share the cores instead of each taking all of them
    infer = InferSettings(**infer_cfg)
    t4 = infer.profile == "t4"  # resolved by model.hardware.resolve_components: only sm75 kernels
    capped = [c for c in (t4_memory_cap(d) for d in devs) if c] if t4 else []
    # int8 or a split model on a GPU: the fp16 base (18.5 GB for Gemma-2 9B) need not fit one card; merge (and
    # quantise) on the CPU first, then place it
    load_dev = torch.device("cpu") if (infer.int8 or len(devs) > 1) and dev.type == "cuda" else dev
    model = load_model(Path(run_path), ModelConfig(**model_cfg), load_dev, pad_id, packed=layout == "packed")
    done = prepare(model, infer, layout) + capped
    if len(devs) > 1:
        done.append(split_model(model, devs))
    elif load_dev != dev:
        model.to(dev)
        done.append(f"moved to {dev} after quantising")
    print(f"worker {rank} ({', '.join(devices)}, {layout} layout): {'; '.join(done)}")
    with sdpa_backends(SDPA_T4_BACKENDS if t4 else ()):
        logits, stats = score_batches(model, batches, pad_id, layout, infer.token_budget, dev, f"worker {rank} batches", rank)
    if len(batches) > 1:  # the first batch carries compilation and warm-up: the rate is the rest's
        print(f"worker {rank}: {stats['tokens']} tokens in {len(batches)} batches; first batch {stats['first_batch_s']:.1f} s, "
              f"then {stats['steady_tokens'] / max(stats['steady_s'], 1e-9):,.0f} tokens/s")
    elif batches:
        print(f"worker {rank}: {stats['tokens']} tokens in 1 batch, {stats['first_batch_s']:.1f} s (warm-up included)")
    return logits, stats


def run_shares(run_path: Path, model: ModelConfig, infer: InferSettings, shares: list[list[list[list[int]]]],
               pad_id: int, layout: str, device_type: str) -> list[tuple[list[np.ndarray], dict]]:
    """Score each worker's share of batches (token ids) in its own process, one GPU each (infer.pipeline GPUs for a
    split model); results in order."""
    devices = worker_devices(len(shares), infer.pipeline, device_type)
    threads = max(1, torch.get_num_threads() // len(shares))
    jobs = [(str(run_path), dataclasses.asdict(model), dataclasses.asdict(infer), devices[w], share, pad_id, layout, w, threads)
            for w, share in enumerate(shares)]
    if len(jobs) == 1:
        return [_score_share(*jobs[0])]
    ctx = torch.multiprocessing.get_context("spawn")  # CUDA cannot be forked; CPU workers match it
    with ctx.Pool(len(jobs)) as pool:
        results = pool.starmap(_score_share, jobs)
        pool.close()  # let workers exit cleanly; the context manager alone would terminate them
        pool.join()
    return results

"""Inference benchmark on a GPU: the seed notebook's method against this module's real code path.

Usage:
    python -m bench.infer out=bench-out                                   # speed: gemma2 + llama
    python -m bench.infer out=bench-out tasks=speed models=gemma2 max_lengths=2048,4096
    python -m bench.infer out=bench-out tasks=exact model_path=DIR gguf_file=F csv=mtbench_human.csv
    python -m bench.infer out=bench-out tasks=scaling models=gemma2 gpus=2
    python -m bench.infer out=bench-out tasks=attn models=gemma2

speed: Gemma-2-9B / Llama-3-8B built from their real configs with random weights on the GPU and
random token ids with arena-like lengths (log-normal, median 500, mean 675, cut at max_length).
Baseline = the seed notebook: NF4 base + unmerged LoRA r16 on q/k/v, eager attention, fp16
autocast, rows sorted by length in fixed batches of 4 padded to the longest. The repo rows run
PooledClassifier (model.factory) / prepare / score_batches (infer.scoring), as `infer predict` does, in bf16
and (GPUs with fp8 tensor cores) with infer.fp8. Tokens/s counts real tokens after the first
batch (compilation and warm-up); TFLOP/s = 2 x non-embedding parameters x tokens/s, next to the
bf16 matmul rate measured in the same run.
exact: a real model (SmolLM2 via gguf_file) on real rows; the fast path's probabilities against
a plain transformers forward (one row at a time, no padding, unmerged LoRA), per dtype; in bf16
also the fp8 path against the bf16 fast path.
scaling: the same random Gemma-2/Llama run folder scored by 1 worker and by `gpus` workers through
infer.scoring's worker split; tokens/s and whether the logits are identical.
attn: flex-attention tile options on one packed batch with each model's attention shapes.
t4_mode=true (speed, exact): the Kaggle T4 path measured here (bench/infer_t4.py): fp16 only, each process
capped at 15 GiB, SDPA limited to mem-efficient/math, no flex/Triton/compile/bf16/fp8; the seed baseline
runs in the same mode in the same run; rows: seed, 8-bit (Kaggle now), int8 W8A8 (eager; Gemma-2 also
SDPA without soft-capping), fp16 2-GPU layer split measured one stage on one GPU (stage rate / 2). One command:
    python -m bench.infer out=bench-t4 t4_mode=true tasks=speed,exact max_lengths=2048
The quantised rows need bitsandbytes (a CUDA build). Prints a table last and writes bench-<task>.json under out.
"""
from __future__ import annotations

import gc
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import (REPO_TARGETS, ROWS_25K, SEED_TARGETS, BenchConfig, arch_config, fp8_capable,
                          non_embedding_params, random_lora, random_rows, repo_scorer, result_table, seed_scorer)
from cli.config import ConfigError, cli_config
from infer.scoring import plan_batches, prepare, score_batches
from model import packing
from model.factory import PooledClassifier, head_to_fp32
from model.settings import InferSettings


def matmul_tflops(dtype: torch.dtype = torch.bfloat16) -> float:
    a, b = torch.randn(8192, 8192, device="cuda", dtype=dtype), torch.randn(8192, 8192, device="cuda", dtype=dtype)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / float(np.median(times)) / 1e12


def measure(name: str, score, rows: list[list[int]]) -> dict:
    """Run `score(rows) -> stats` with fresh peak-memory counters; errors are recorded, not raised."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        stats = score(rows)
    except Exception as err:  # one failing variant must not lose the others' numbers
        print(f"  {name}: FAILED {type(err).__name__}: {err}")
        return {"variant": name, "error": f"{type(err).__name__}: {str(err)[:500]}"}
    tokens_per_s = stats["steady_tokens"] / stats["steady_s"]
    result = {"variant": name, "tokens_per_s": tokens_per_s, "rows_per_s": tokens_per_s * len(rows) / sum(map(len, rows)),
              "peak_gb": torch.cuda.max_memory_allocated() / 2**30, **stats}
    print(f"  {name}: {tokens_per_s:,.0f} tokens/s, peak {result['peak_gb']:.1f} GB, first batch {stats['first_batch_s']:.1f} s")
    return result


def quantised_rows(cfg: BenchConfig, arch: str, workdir: Path, first: int, padded_attn: str, add) -> None:
    """The seed baseline, then the repo's low-memory path (NF4 weights, fp16 compute: Kaggle's T4) on the same base."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float16)
    quantised = AutoModelForSequenceClassification.from_pretrained(
        workdir / arch, quantization_config=nf4, dtype=torch.float16, attn_implementation="eager", device_map={"": 0})
    seed_model = random_lora(quantised, SEED_TARGETS)
    for m in cfg.max_lengths:
        add("seed baseline: NF4, LoRA qkv unmerged, eager, fp16 autocast, batch 4", seed_scorer(seed_model), m, baseline=True)
    low = seed_model.unload()
    head_to_fp32(low)
    low.config._attn_implementation = padded_attn
    low_model = PooledClassifier(random_lora(low, REPO_TARGETS))
    add("repo NF4 fp16 padded, LoRA unmerged (Kaggle T4 settings)", repo_scorer(low_model, "padded", cfg.token_budget), first)


def kernel_profile(model: PooledClassifier, rows: list[list[int]], budget: int) -> str:
    """GPU time per kernel over two steady-state batches: where the time goes beyond the matmuls."""
    from torch.profiler import ProfilerActivity, profile

    batches, _ = plan_batches(list(map(len, rows)), InferSettings(token_budget=budget), "packed")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        score_batches(model, [[rows[i] for i in b] for b in batches[1:3]], 0, "packed", budget, torch.device("cuda"))
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70)
    print(table)
    return table


def speed(cfg: BenchConfig, arch: str, workdir: Path, peak: float, profiles: dict) -> list[dict]:
    config = arch_config(arch)
    lengths = {m: random_rows(cfg.rows, m, config.vocab_size) for m in cfg.max_lengths}
    results = []

    def add(name, score, max_length, **extra):
        print(f"{arch} max_length {max_length}:")
        result = measure(name, score, lengths[max_length])
        results.append({"model": arch, "max_length": max_length, **extra, **result})
        (Path(cfg.out) / f"bench-speed-{arch}.partial.json").write_text(json.dumps(results, indent=1))

    add.failed = lambda name, error: results.append({"model": arch, "max_length": cfg.max_lengths[0], "variant": name, "error": error})
    if cfg.t4_mode:
        from bench.infer_t4 import t4_speed

        flops_per_token = t4_speed(cfg, arch, workdir, add, lengths)
    else:
        flops_per_token = bf16_rows(cfg, arch, workdir, config, lengths, add, profiles)
    shutil.rmtree(workdir / arch, ignore_errors=True)
    for r in results:
        base_rate = next((b.get("tokens_per_s") for b in results if b.get("baseline") and b["max_length"] == r["max_length"]), None)
        if "tokens_per_s" in r:
            mean_len = sum(map(len, lengths[r["max_length"]])) / cfg.rows
            r.update(tflops=r["tokens_per_s"] * flops_per_token / 1e12, pct_bf16_peak=100 * r["tokens_per_s"] * flops_per_token / 1e12 / peak,
                     minutes_25k=ROWS_25K * mean_len / r["tokens_per_s"] / 60, minutes_25k_tta=2 * ROWS_25K * mean_len / r["tokens_per_s"] / 60,
                     vs_baseline=r["tokens_per_s"] / base_rate if base_rate else None)
    return results


def bf16_rows(cfg: BenchConfig, arch: str, workdir: Path, config, lengths: dict, add, profiles: dict) -> int:
    """The speed task's rows (bf16/fp8 fast paths, then the seed and NF4 rows); returns FLOPs per token."""
    from transformers import AutoModelForSequenceClassification

    padded_attn = "eager" if arch == "gemma2" else "sdpa"  # the repo's `auto` rule
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16, attn_implementation=padded_attn)
    flops_per_token = 2 * non_embedding_params(base)
    print(f"{arch}: {flops_per_token / 2e9:.2f} B non-embedding parameters; saving a copy for the quantised rows")
    base.save_pretrained(workdir / arch)
    head_to_fp32(base)
    model = PooledClassifier(random_lora(base, REPO_TARGETS))
    first = cfg.max_lengths[0]

    add("repo bf16 padded, LoRA unmerged", repo_scorer(model, "padded", cfg.token_budget), first)
    model.base.config._attn_implementation = packing.register()
    if cfg.uncompiled:
        prepare(model, InferSettings(compile=False), "packed")
        add("repo bf16 packed, merged", repo_scorer(model, "packed", cfg.token_budget), first)
    prepare(model, InferSettings(), "packed")
    for m in cfg.max_lengths:
        add("repo bf16 packed, merged, compiled (default)", repo_scorer(model, "packed", max(cfg.token_budget, m)), m)
    if cfg.profile:
        profiles[arch] = kernel_profile(model, lengths[first], cfg.token_budget)
    if fp8_capable(cfg):
        prepare(model, InferSettings(fp8=True), "packed")
        for m in cfg.max_lengths:
            budget = max(cfg.token_budget, m)
            add("repo fp8 packed, merged, compiled (infer.fp8)", repo_scorer(model, "packed", budget), m)
        if cfg.profile:
            profiles[f"{arch}-fp8"] = kernel_profile(model, lengths[first], cfg.token_budget)
    del model, base
    torch._dynamo.reset()  # compiled layers keep the bf16 weights alive otherwise (inflating later peaks)
    gc.collect()
    torch.cuda.empty_cache()
    try:
        quantised_rows(cfg, arch, workdir, first, padded_attn, add)
    except Exception as err:  # e.g. bitsandbytes missing: keep the bf16 numbers
        print(f"{arch}: quantised rows FAILED {type(err).__name__}: {err}")
        add.failed("quantised rows", f"{type(err).__name__}: {err}")
    return flops_per_token


def speed_table(results: list[dict], device: str, peak: float, dtype: str = "bf16") -> str:
    columns = [("tok/s", "tokens_per_s", 8, ",.0f"), ("rows/s", "rows_per_s", 7, ".1f"), ("TFLOP/s", "tflops", 8, ".0f"),
               ("%peak", "pct_bf16_peak", 6, ".1f"), ("min/25k", "minutes_25k", 8, ".1f"), ("+TTA", "minutes_25k_tta", 7, ".1f"),
               ("peak GB", "peak_gb", 8, ".1f"), ("x base", "vs_baseline", 7, ".2f")]
    return f"{device}; {dtype} matmul {peak:.0f} TFLOP/s (8192^3, median of 20)\n" + result_table(results, columns, 68)


def main(argv: list[str] | None = None) -> None:
    cfg = cli_config(BenchConfig, __doc__, argv)
    if not cfg.out:
        raise ConfigError("out= is required: the folder for the JSON results")
    if not torch.cuda.is_available():
        raise ConfigError("the benchmark needs a CUDA GPU")
    unknown = set(cfg.tasks) - {"speed", "exact", "scaling", "attn"}
    if unknown:
        raise ConfigError(f"tasks: unknown {sorted(unknown)} (speed | exact | scaling | attn)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}"
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="arena-bench-"))
    tables = []
    from bench.infer_checks import attention_options, exact, scaling

    if "attn" in cfg.tasks:
        results = [r for arch in cfg.models for r in attention_options(cfg, arch)]
        (out / "bench-attn.json").write_text(json.dumps({"device": device, "results": results}, indent=1))
        tables.append("\n".join(f"attention {r['model']} {r['options']}: " + (f"{r['ms']:.2f} ms (compile {r['compile_s']:.0f} s, "
                                f"max |diff| {r['max_abs_vs_default']:.1e})" if "ms" in r else r["error"][:120]) for r in results))
    if "exact" in cfg.tasks:
        from bench.infer_t4 import t4_exact

        results = t4_exact(cfg) if cfg.t4_mode else exact(cfg)
        (out / "bench-exact.json").write_text(json.dumps({"device": device, "results": results}, indent=1))
        lines = [f"{'model':<16} {'dtype':<9} {'path':<30} {'against':<19} {'rows':>5} {'max |dp|':>9} {'mean |dp|':>10}"]
        lines += [f"{r.get('model', 'real'):<16} {r['dtype']:<9} {r['path']:<30} {r['against']:<19} {r['rows']:>5} {r['max_abs']:>9.2e} "
                  f"{r['mean_abs']:>10.2e}" for r in results]
        tables.append(f"exactness (model real: {cfg.model_path} on rows of {cfg.csv}), {device}\n" + "\n".join(lines))
    if "scaling" in cfg.tasks:
        results = [r for arch in cfg.models for r in scaling(cfg, arch, workdir)]
        (out / "bench-scaling.json").write_text(json.dumps({"device": device, "results": results}, indent=1))
        tables.append("\n".join(f"scaling {r['model']}: {r['gpus']} GPU(s) {r['tokens_per_s']:,.0f} tokens/s"
                                + (f" = {r['scaling']:.2f}x, identical logits: {r['identical_to_1_gpu']}" if "scaling" in r else "")
                                for r in results))
    if "speed" in cfg.tasks:
        peak = matmul_tflops(torch.float16 if cfg.t4_mode else torch.bfloat16)  # T4 mode: %peak is of the fp16 rate
        results, profiles = [], {}
        for arch in cfg.models:
            results += speed(cfg, arch, workdir, peak, profiles)
            (out / "bench-speed.json").write_text(json.dumps({"device": device, "bf16_tflops": peak, "results": results,
                                                              "kernel_profiles": profiles}, indent=1))
        tables.append(("T4 mode (fp16 only, 15 GiB per process, SDPA mem-efficient/math, no flex/compile/bf16/fp8)\n"
                       if cfg.t4_mode else "") + speed_table(results, device, peak, "fp16" if cfg.t4_mode else "bf16"))
    print("\n\n".join(tables))


if __name__ == "__main__":
    from cli.config import run_cli

    run_cli(main)

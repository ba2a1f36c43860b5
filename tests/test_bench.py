"""The benchmarks' CPU-checkable parts: inference bench inputs and exactness on a tiny model, and
every training-bench variant on a tiny model (every row trained once, real tokens counted)."""
from __future__ import annotations

import json

import numpy as np
import torch

from conftest import SAMPLE
from bench.infer import BenchConfig, random_rows
from bench.infer_checks import exact


def test_random_rows_have_arena_like_lengths():
    lengths = np.array([len(r) for r in random_rows(20000, 10**6, vocab=1000)])
    assert abs(np.median(lengths) - 500) < 15 and abs(lengths.mean() - 675) < 20
    capped = [len(r) for r in random_rows(500, 2048, vocab=1000)]
    assert max(capped) <= 2048 and min(min(r) for r in random_rows(50, 2048, vocab=1000)) >= 1  # 0 is the pad id


def test_exactness_report_on_a_tiny_model(tiny_llama):
    cfg = BenchConfig(out="unused", model_path=str(tiny_llama), gguf_file="", csv=str(SAMPLE / "train.csv"),
                      exact_rows=16, dtypes=["float32"], token_budget=2048, device="cpu")
    results = exact(cfg)
    paths = {(r["path"], r["against"]) for r in results}
    assert ("packed, merged", "packed, unmerged") in paths and ("packed, merged, compiled", "plain") in paths
    for r in results:  # fp32: every fast path computes the plain forward's function
        assert r["rows"] == 16 and r["max_abs"] < 1e-5, r


def test_exactness_report_has_the_fp8_path_in_bf16(tiny_llama):
    cfg = BenchConfig(out="unused", model_path=str(tiny_llama), gguf_file="", csv=str(SAMPLE / "train.csv"),
                      exact_rows=8, dtypes=["bfloat16"], token_budget=2048, device="cpu")
    fp8 = [r for r in exact(cfg) if r["path"] == "packed, merged, fp8, compiled"]
    assert sorted(r["against"] for r in fp8) == ["packed, merged, compiled", "packed, unmerged", "plain"]
    assert all(0 < r["max_abs"] < 0.1 for r in fp8), fp8


def test_training_bench_runs_every_variant_on_a_tiny_model(tmp_path):
    from bench.infer import random_rows
    from bench.train import main as train_bench_main

    train_bench_main([f"out={tmp_path}", "models=tiny", "max_lengths=64", "steps=4", "warmup=1", "device=cpu",
                      "batch_size=2", "grad_accum=2"])
    results = json.loads((tmp_path / "bench-train.json").read_text())["results"]
    assert [r["variant"] for r in results] == ["seed", "repo-qkv", "repo-qkv-packed", "repo", "repo-packed", "repo-bf16", "repo-bf16-packed"]
    every_row = sum(map(len, random_rows(16, 64, 1000)))  # 4 steps x 2 x 2 rows, each trained once
    for r in results:
        assert "error" not in r, r
        assert r["steps"] == 4 and r["tokens_trained"] == every_row and r["tokens_per_s"] > 0
    assert results[0]["vs_seed"] == 1.0


def test_t4_mode_resolves_only_sm75_components():
    """bench.infer t4_mode=true: the rows' components are resolve_components' at capability 7.5 (no GPU run here)."""
    from bench.infer_t4 import t4_components
    from cli.config import cli_config

    assert cli_config(BenchConfig, "", ["out=x", "t4_mode=true", "tasks=speed,exact"]).t4_mode
    for arch, softcapping, attention in [("gemma2", True, "eager"), ("gemma2", False, "sdpa"), ("llama", True, "sdpa")]:
        c = t4_components(arch, softcapping=softcapping)
        assert c.profile == "t4" and c.attention == attention and c.layout == "padded"
        assert c.model.compute_dtype == "float16" and c.infer.int8 and not c.infer.fp8 and not c.infer.compile
        assert attention == "eager" or c.sdpa_backends == ("EFFICIENT_ATTENTION", "MATH")
    eight = t4_components("llama", quantization="8bit", int8=False)
    assert eight.weights == "LLM.int8 8-bit, LoRA unmerged" and eight.model.compute_dtype == "float16"


def test_t4_exactness_report_on_a_tiny_model(tiny_llama):
    from bench.infer_t4 import t4_exact

    cfg = BenchConfig(out="unused", model_path=str(tiny_llama), gguf_file="", csv=str(SAMPLE / "train.csv"),
                      exact_rows=8, token_budget=2048, device="cpu", t4_mode=True, models=[])
    results = {r["path"]: r for r in t4_exact(cfg)}
    assert set(results) == {"t4 fp16 padded, unmerged", "t4 fp16 padded, merged, int8"}
    for r in results.values():
        assert r["against"] == "fp32 plain one-row" and r["rows"] == 8 and 0 < r["max_abs"] < 0.05, r


def test_t4_exactness_on_random_weights_of_an_architecture(monkeypatch):
    """The random-architecture rows of t4_exact, with a tiny Llama config standing in for Llama-3's widths."""
    import bench.infer_t4
    from transformers import LlamaConfig

    tiny = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                       num_key_value_heads=2, num_labels=3, pad_token_id=0)
    monkeypatch.setattr(bench.infer_t4, "arch_config", lambda arch: tiny)
    cfg = BenchConfig(out="unused", token_budget=1024, device="cpu", t4_mode=True)
    results = bench.infer_t4.t4_exact_random(cfg, "llama", layers=2, rows=6, max_length=64)
    assert [r["path"] for r in results] == ["t4 fp16 padded, unmerged", "t4 fp16 padded, merged, int8"]
    for r in results:
        assert r["model"] == "llama 2 layers" and r["rows"] == 6 and 0 < r["max_abs"] < 0.05, r


def test_t4_speed_rows_run_on_a_tiny_gemma2(monkeypatch, tmp_path):
    """t4_speed's own steps (build, LoRA merge + int8, soft-capping on/off, the half-depth stage) on the CPU with a
    tiny Gemma-2 standing in for the 9B; the bitsandbytes rows need CUDA and are left out (t4_bnb=false)."""
    import bench.infer_t4
    from transformers import Gemma2Config

    tiny = lambda arch: Gemma2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,  # noqa: E731
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_labels=3,
                                     pad_token_id=0, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)

    real, budgets = bench.infer_t4.repo_scorer, []

    def recording_scorer(model, layout, budget, infer, device):  # the settings each row batches with
        budgets.append(infer.score_budget)
        return real(model, layout, budget, infer, device)

    monkeypatch.setattr(bench.infer_t4, "arch_config", tiny)
    monkeypatch.setattr(bench.infer_t4, "repo_scorer", recording_scorer)
    monkeypatch.setattr(bench.infer_t4, "pipeline_devices", lambda: [torch.device("cpu")] * 2)  # both stages on the CPU
    cfg = BenchConfig(out=str(tmp_path), device="cpu", t4_mode=True, t4_bnb=False, max_lengths=[64], token_budget=512)
    rows = {64: random_rows(8, 64, 300)}
    seen = []

    def add(name, score, max_length, **extra):
        seen.append((name, score(rows[max_length])["steady_tokens"] >= 0, extra))

    assert bench.infer_t4.t4_speed(cfg, "gemma2", tmp_path, add, rows) > 0
    assert [name for name, *_ in seen] == [
        "t4 repo int8 W8A8 merged, padded, eager, soft-capping", "t4 repo int8 W8A8 merged, padded, sdpa, no soft-capping",
        "t4 repo fp16 2-GPU layer split, eager, soft-capping (stage/2)",
        "t4 repo fp16 2-GPU layer split, sdpa, no soft-capping (stage/2)",
        "t4 repo fp16 2-GPU layer split, pipelined, eager, soft-capping (/2)",
        "t4 repo fp16 2-GPU layer split, pipelined, sdpa, no soft-capping (/2)"]
    assert seen[-1][2] == {"gpus": 2}
    # eager rows batch within the T4 score budget, SDPA rows by tokens
    assert budgets == [2 * 2048**2, -1, 2 * 2048**2, -1, 2 * 2048**2, -1]

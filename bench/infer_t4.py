"""T4 mode of the inference benchmark (`python -m bench.infer t4_mode=true ...`): the Kaggle 2xT4 path measured on a larger GPU.

Every row of the run is confined to what a T4 (sm75) has: fp16 compute only (no bf16, no fp8),
each process capped at 15 GiB (torch.cuda.set_per_process_memory_fraction), SDPA restricted to its
memory-efficient and math kernels (no FlashAttention-2, no cuDNN attention), padded batches with
no flex/Triton attention and no torch.compile. The components of the repo rows come from
model.hardware.resolve_components at capability 7.5, the function `infer predict` uses on a T4.

speed rows (random weights with the real architecture, as the speed task), in this order:
- repo int8 W8A8 (LoRA merged into the fp16 base, model/int8.py), padded and batched as infer predict batches
  (eager within infer.score_budget), eager (Gemma-2 trained with soft-capping) and, for Gemma-2, SDPA
  mem-efficient (trained with model.attn_softcapping=false);
- repo fp16 layer split over 2 GPUs, measured stage by stage on one GPU: one stage holds half the
  decoder layers (fp16, LoRA merged); pipelined, two T4s give one stage's rate, so its per-GPU
  figure (what `x base` compares with the seed's one-GPU rate) is the stage rate / 2;
- with two GPUs, that split as infer.pipeline=2 runs it (model/pipeline.py), both stages at work, per GPU;
- seed baseline (same mode, same run): NF4 + unmerged LoRA q/k/v, eager, fp16 autocast, batches of 4;
- repo 8-bit (today's Kaggle settings: bitsandbytes LLM.int8 base, fp16, LoRA unmerged, padded).
The ratios (`x base`) are computed once every row is in, against the seed row of the same run.
exact rows (tasks=exact): the T4 path's probabilities (fp16; unmerged LoRA, and merged + int8) against the fp32
plain one-row forward on the same weights: the real small model on real rows, then each of `models` at its
real widths with its first 4 decoder layers (random weights, random rows up to 1,024 tokens).
"""
from __future__ import annotations

import gc
import time

import numpy as np
import torch

from bench.common import (REPO_TARGETS, SEED_TARGETS, BenchConfig, arch_config, exact_model, one_row_pooled, random_lora,
                          random_rows, repo_scorer, seed_scorer)
from infer.scoring import plan_batches, prepare, score_batches, unbatch
from model.factory import HEAD, PooledClassifier, head_to_fp32
from model.hardware import (SDPA_T4_BACKENDS, T4_CAPABILITY, Components, attention_name, resolve_components,
                            sdpa_backends, t4_memory_cap)
from model.pipeline import split_model
from model.settings import InferSettings, ModelConfig

MODEL_TYPES = {"gemma2": "gemma2", "llama": "llama", "tiny": "llama"}


def t4_components(arch: str, softcapping: bool = True, int8: bool = True, quantization: str = "none",
                  token_budget: int = 16384, pipeline: int = 1) -> Components:
    """What `infer predict` runs on a T4 for this bench model (resolve_components at capability 7.5)."""
    model = ModelConfig(path="bench", quantization=quantization, compute_dtype="float16", attn_softcapping=softcapping)
    infer = InferSettings(profile="auto", int8=int8, token_budget=token_budget, merge_lora=True, pipeline=pipeline)
    return resolve_components(T4_CAPABILITY, MODEL_TYPES[arch], model, infer)


def set_attention(model: PooledClassifier, components: Components) -> None:
    """Point a built model at the components' attention; soft-capping off where the run would be trained without it."""
    base = model.base
    if not components.model.attn_softcapping and getattr(base.config, "attn_logit_softcapping", None) is not None:
        base.config.attn_logit_softcapping = None
        for layer in getattr(base, base.base_model_prefix).layers:
            layer.self_attn.attn_logit_softcapping = None
    base.config._attn_implementation = attention_name(components.attention, base.config.model_type)


def random_model(config, device: torch.device, dtype: torch.dtype = torch.float16) -> PooledClassifier:
    """Seed-0 random weights of `config` built on `device`, the head in fp32, a random LoRA on the repo's targets."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    head_to_fp32(base)
    return PooledClassifier(random_lora(base, REPO_TARGETS))


def t4_speed(cfg: BenchConfig, arch: str, workdir, add, lengths: dict) -> int:
    """The T4-mode speed rows of one architecture through `add(name, score, max_length, **extra)`; returns FLOPs per token.

    Setting up is bench work, not the path measured, so it runs on the GPU before the 15 GiB cap (a 9B fp16
    model built, saved and converted on the CPU took most of a 10-minute command): the fp16 model is built
    there, saved for the bitsandbytes rows, merged and put in int8; then the cap, and every row runs under it.
    Rows go fastest first and the bitsandbytes ones last, so a cut run keeps the rest.
    """
    from transformers import AutoModelForSequenceClassification

    from bench.common import non_embedding_params

    dev, first, clock = torch.device(cfg.device), cfg.max_lengths[0], time.perf_counter()

    def stage(what: str) -> None:
        print(f"[{time.perf_counter() - clock:6.0f} s] {arch}: {what}", flush=True)

    config = arch_config(arch)
    torch.manual_seed(0)
    with torch.device(dev):
        base = AutoModelForSequenceClassification.from_config(config, dtype=torch.float16)
    flops_per_token = 2 * non_embedding_params(base)
    stage(f"built on the GPU ({flops_per_token / 2e9:.2f} B non-embedding parameters)")
    if cfg.t4_bnb:
        base.save_pretrained(workdir / arch)
        stage(f"saved to {workdir / arch} for the bitsandbytes rows")
    head_to_fp32(base)
    model = PooledClassifier(random_lora(base, REPO_TARGETS))
    c = t4_components(arch, token_budget=cfg.token_budget)
    done = prepare(model, c.infer, c.layout)  # LoRA merged, int8 W8A8: the fp16 projections are freed
    del base
    _free()
    stage(f"{'; '.join(done)}; {c.describe()}")
    print(t4_memory_cap(dev) or "GPU has <= 15 GiB: no cap needed")
    cappings = [True, False] if arch == "gemma2" else [True]  # Gemma-2 trained with and without soft-capping
    for softcapping in cappings:
        c = t4_components(arch, softcapping=softcapping, token_budget=cfg.token_budget)
        set_attention(model, c)
        for m in cfg.max_lengths:
            add(f"t4 repo int8 W8A8 merged, padded, {c.attention}{_cap(arch, softcapping)}",
                repo_scorer(model, "padded", max(cfg.token_budget, m), c.infer, dev), m)
        stage("int8 rows done")
    del model
    _free()
    half = arch_config(arch)
    half.num_hidden_layers = config.num_hidden_layers // 2
    for softcapping in cappings:
        c = t4_components(arch, softcapping=softcapping, int8=False, token_budget=cfg.token_budget)
        stage_model = random_model(half, dev)
        prepare(stage_model, c.infer, c.layout)
        set_attention(stage_model, c)
        add(f"t4 repo fp16 2-GPU layer split, {c.attention}{_cap(arch, softcapping)} (stage/2)",
            halved(repo_scorer(stage_model, "padded", cfg.token_budget, c.infer, dev)), first, gpus=2)
        del stage_model
        _free()
        stage("layer-split stage row done")
    pipeline_rows(cfg, arch, add, stage, cappings)
    if cfg.t4_bnb:
        try:
            bnb_rows(cfg, arch, workdir, add, stage)
        except Exception as err:  # bitsandbytes missing: keep the rows above
            print(f"{arch}: bitsandbytes rows FAILED {type(err).__name__}: {err}")
            add.failed("t4 bitsandbytes rows", f"{type(err).__name__}: {err}")
    return flops_per_token


def pipeline_devices() -> list[torch.device]:
    """The two GPUs the pipelined rows split the model over; none with fewer than two."""
    return [torch.device("cuda", i) for i in range(2)] if torch.cuda.device_count() >= 2 else []


def pipeline_rows(cfg: BenchConfig, arch: str, add, stage, cappings: list[bool]) -> None:
    """infer.pipeline=2 as `infer predict` runs it: the fp16 model, LoRA merged, its decoder layers split over two
    GPUs (model/pipeline.py), each capped at 15 GiB, the stages overlapping on consecutive batches; reported per GPU
    (the machine's rate / 2), beside the stage rows above that assume the overlap. Only with two GPUs."""
    devices = pipeline_devices()
    if len(devices) < 2:
        print(f"{arch}: pipelined 2-GPU rows skipped ({torch.cuda.device_count()} GPU visible); the stage rows stand in")
        return
    for d in devices:  # the full fp16 model is built on the first GPU before the cap, as in t4_speed
        if d.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, d.index)
    model = random_model(arch_config(arch), devices[0])
    for softcapping in cappings:
        c = t4_components(arch, softcapping=softcapping, int8=False, token_budget=cfg.token_budget, pipeline=2)
        if softcapping == cappings[0]:
            done = prepare(model, c.infer, c.layout) + [split_model(model, devices)]
            done += [capped for capped in map(t4_memory_cap, devices) if capped]
            stage("; ".join(done))
        set_attention(model, c)
        add(f"t4 repo fp16 2-GPU layer split, pipelined, {c.attention}{_cap(arch, softcapping)} (/2)",
            halved(repo_scorer(model, "padded", cfg.token_budget, c.infer, devices[0])), cfg.max_lengths[0], gpus=2)
    del model
    _free()
    stage("pipelined rows done")


def bnb_rows(cfg: BenchConfig, arch: str, workdir, add, stage) -> None:
    """The seed baseline (NF4) and today's Kaggle 8-bit rows, loaded from the saved fp16 model under the cap."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float16)
    with sdpa_backends(SDPA_T4_BACKENDS):
        quantised = AutoModelForSequenceClassification.from_pretrained(
            workdir / arch, quantization_config=nf4, dtype=torch.float16, attn_implementation="eager", device_map={"": 0})
        stage("NF4 base loaded")
        seed_model = random_lora(quantised, SEED_TARGETS)
        for m in cfg.max_lengths:
            add("t4 seed baseline: NF4, LoRA qkv unmerged, eager, fp16, batch 4", seed_scorer(seed_model), m, baseline=True)
        del seed_model, quantised
        _free()
        stage("seed baseline done")
        c = t4_components(arch, quantization="8bit", int8=False, token_budget=cfg.token_budget)
        eight = AutoModelForSequenceClassification.from_pretrained(
            workdir / arch, quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.float16,
            attn_implementation="eager", device_map={"": 0})
        stage("LLM.int8 base loaded")
        head_to_fp32(eight)
        eight_model = PooledClassifier(random_lora(eight, REPO_TARGETS))
        set_attention(eight_model, c)
        add(f"t4 repo 8-bit bnb, LoRA unmerged, {c.attention} (Kaggle now)", repo_scorer(eight_model, "padded", cfg.token_budget, c.infer),
            cfg.max_lengths[0])
        del eight_model, eight
        _free()
        stage("8-bit row done")


def _cap(arch: str, softcapping: bool) -> str:
    return "" if arch != "gemma2" else (", soft-capping" if softcapping else ", no soft-capping")


def halved(score):
    """A pipeline stage's rate, reported per GPU: two stages on two GPUs give one stage's rate."""
    def per_gpu(rows):
        stats = score(rows)
        return {**stats, "steady_s": stats["steady_s"] * 2, "stage_steady_s": stats["steady_s"]}
    return per_gpu


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def t4_exact(cfg: BenchConfig) -> list[dict]:
    """The T4 path's probabilities (fp16) against the fp32 plain one-row forward on the same random LoRA and head."""
    from data.io import read_competition_csv

    dev = torch.device(cfg.device)
    if dev.type == "cuda":
        print(t4_memory_cap(dev))
    df = read_competition_csv(cfg.csv)[0].iloc[: cfg.exact_rows]
    scale, probs, results = None, {}, []
    for dtype in ("float32", "float16"):
        mcfg, formatter, seqs, model = exact_model(cfg, dtype, dev, df)
        if dtype == "float32":
            probs["fp32 plain one-row"], scale = reference_probs(model, seqs, dev)
            continue
        with torch.no_grad():
            getattr(model.base, HEAD).modules_to_save["default"].weight.mul_(scale)
        mtype = model.base.config.model_type
        c = resolve_components(T4_CAPABILITY, mtype, mcfg, InferSettings(int8=True, token_budget=cfg.token_budget))
        probs.update(t4_paths(model, c, seqs, formatter.pad_id, cfg.token_budget, dev))
    results += compared(probs, len(df), "real")
    del model
    _free()
    for arch in cfg.models:
        results += t4_exact_random(cfg, arch)
        _free()
    return results


def t4_paths(model: PooledClassifier, c: Components, seqs: list[list[int]], pad_id: int, budget: int,
             dev: torch.device) -> dict[str, np.ndarray]:
    """Probabilities of the T4 path on an fp16 model: LoRA unmerged, then merged + int8 (the model is converted)."""
    from infer.metrics import softmax

    set_attention(model, c)
    batches, _ = plan_batches(list(map(len, seqs)), c.infer, "padded")
    probs = {}
    with sdpa_backends(c.sdpa_backends):
        for name, settings in (("t4 fp16 padded, unmerged", None), ("t4 fp16 padded, merged, int8", c.infer)):
            if settings is not None:
                prepare(model, settings, "padded")
            logits, _ = score_batches(model, [[seqs[i] for i in b] for b in batches], pad_id, "padded", budget, dev)
            probs[name] = softmax(unbatch(batches, logits, len(seqs)).astype(np.float64))
    return probs


def reference_probs(model: PooledClassifier, seqs: list[list[int]], dev: torch.device) -> tuple[np.ndarray, torch.Tensor]:
    """The fp32 reference: each row alone through the backbone, the head scaled in place to unit-std logits (as
    the exact task); returns its probabilities and the scale, for a second copy of the same weights."""
    from infer.metrics import softmax

    head = getattr(model.base, HEAD).modules_to_save["default"].weight
    with torch.inference_mode():
        pooled = one_row_pooled(model, seqs, dev)
        scale = 1 / (pooled @ head.T).std()
        head.mul_(scale)
        return softmax(getattr(model.base, HEAD)(pooled).cpu().numpy().astype(np.float64)), scale


def compared(probs: dict, rows: int, model: str) -> list[dict]:
    ref = probs.pop("fp32 plain one-row")
    return [{"dtype": "float16", "model": model, "path": name, "against": "fp32 plain one-row", "rows": rows,
             "max_abs": float(np.abs(p - ref).max()), "mean_abs": float(np.abs(p - ref).mean())} for name, p in probs.items()]


def t4_exact_random(cfg: BenchConfig, arch: str, layers: int = 4, rows: int = 64, max_length: int = 1024) -> list[dict]:
    """t4_exact on random weights of a real architecture's widths (int8 error grows with the width summed over),
    cut to its first `layers` decoder layers so the fp32 reference fits the 15 GiB cap."""
    dev = torch.device(cfg.device)
    config = arch_config(arch)
    config.num_hidden_layers = layers
    seqs = random_rows(rows, max_length, config.vocab_size, seed=1)
    model = random_model(config, dev, torch.float32)
    probs = {"fp32 plain one-row": reference_probs(model, seqs, dev)[0]}
    model.base.to(torch.float16)
    head_to_fp32(model.base)
    probs.update(t4_paths(model, t4_components(arch, token_budget=cfg.token_budget), seqs, 0, cfg.token_budget, dev))
    return compared(probs, rows, f"{arch} {layers} layers")

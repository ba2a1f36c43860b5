"""The fast inference path on CPU: packing, unpacking, last-token pooling, merged LoRA, worker split.

Packed batches run the same flex-attention masks as on a GPU, unfused (the compiled kernels are
covered by tests/test_gpu.py); every check compares against the padded eager/SDPA path.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO
from cli.config import ConfigError, build_config
from data.formatter import Formatter
from data.io import LABEL_COLS
from model.factory import ModelConfig, PooledClassifier, load_base, merge_lora
from model.hardware import resolve_layout
from model.packing import ATTN, block_masks, last_token_index, pack_batch, pack_rows
from infer.predict import load_run, predict_frame
from infer.scoring import plan_batches, split_batches
from model.packing import make_inputs, pad_batch
from model.settings import InferSettings
from train.config import TrainConfig

CPU = torch.device("cpu")


def lognormal_lengths(n: int, cap: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(500), 0.77, n), 8, cap).astype(int).tolist()


def test_pack_rows_places_every_row_once_within_width():
    lengths = lognormal_lengths(2000, 2048)
    bins = pack_rows(lengths, 16384)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 16384 for b in bins)
    # Longest-first with the shortest filling the gaps wastes well under one row per bin.
    waste = len(bins) * 16384 - sum(lengths)
    assert waste / (len(bins) * 16384) < 0.02, waste
    assert pack_rows(lengths, 16384) == bins


def test_pack_rows_refuses_a_row_wider_than_the_batch():
    with pytest.raises(ConfigError, match="token_budget"):
        pack_rows([10, 600, 20], 512)


def test_pack_batch_restarts_positions_and_marks_last_tokens():
    batch = pack_batch([[5, 6, 7], [8, 9], [10]], pad_id=0, width=8)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert batch["seq_lens"].tolist() == [3, 2, 1]
    assert last_token_index(batch["seq_lens"]).tolist() == [2, 4, 5]
    with pytest.raises(ValueError, match="do not fit"):
        pack_batch([[1] * 5, [2] * 4], pad_id=0, width=8)


def test_block_mask_keeps_attention_inside_each_row_and_window():
    from model.packing import _create_block_mask

    masks = block_masks(torch.tensor([3, 4]), width=9, windows={2, 64})  # CPU: dense masks
    doc = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
    flex_rule = _create_block_mask(doc, 2).mask_mod  # CUDA's BlockMask: 128-token blocks, the token rule in mask_mod
    flex = torch.tensor([[bool(flex_rule(0, 0, torch.tensor(q), torch.tensor(k))) for k in range(9)] for q in range(9)])
    expected = torch.zeros(9, 9, dtype=torch.bool)
    for start, n in ((0, 3), (3, 4), (7, 2)):  # two rows and the padded tail
        for q in range(start, start + n):
            for k in range(start, q + 1):
                expected[q, k] = q - k < 2
    assert torch.equal(masks[2], expected) and torch.equal(flex, expected)
    assert masks[64] is masks[0]  # a window wider than the batch cannot cut anything


def test_resolve_layout():
    assert resolve_layout("auto", None) == "padded"  # CPU
    assert resolve_layout("auto", (7, 5)) == "padded" and resolve_layout("auto", (8, 0)) == "packed"
    assert resolve_layout("packed", None) == "packed"
    with pytest.raises(ValueError, match="layout"):
        InferSettings(layout="ragged")


def _model_pair(path, quantization="none"):
    """The same random base + head twice: padded attention, and packed attention."""
    cfg = ModelConfig(path=str(path), quantization=quantization, compute_dtype="float32")
    models = []
    for packed in (False, True):
        torch.manual_seed(0)  # the head is initialised at random on load: same seed, same head
        models.append(PooledClassifier(load_base(cfg, 0, CPU, packed=packed)).eval())
    return models


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gemma2"])
def test_packed_logits_equal_padded_logits(arch, request, tiny_tokenizer, sample_rows):
    """Llama (SDPA) and Gemma-2 (eager: soft-capping, sliding window 64 shorter than the rows)."""
    padded_model, packed_model = _model_pair(request.getfixturevalue(arch))
    assert packed_model.base.config._attn_implementation == ATTN
    formatter = Formatter(tiny_tokenizer, build_config(TrainConfig).format)
    rows = sample_rows.iloc[:12]
    seqs = formatter.encode_batch(rows["prompt"], rows["response_a"], rows["response_b"], inference=True)
    assert max(map(len, seqs)) > 64
    width = 4 * max(map(len, seqs))
    with torch.inference_mode():
        alone = torch.cat([padded_model(*pad_batch([s], formatter.pad_id)) for s in seqs])
        packed = []
        for b in pack_rows(list(map(len, seqs)), width):
            out = packed_model(**make_inputs([seqs[i] for i in b], formatter.pad_id, "packed", width))
            packed.append(pd.DataFrame(out.numpy(), index=b))
    packed = torch.tensor(pd.concat(packed).sort_index().to_numpy())
    assert len(pack_rows(list(map(len, seqs)), width)) < len(seqs)  # several rows really share a batch
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=1e-5)


def test_layout_mismatch_is_an_error(tiny_llama):
    padded_model, packed_model = _model_pair(tiny_llama)
    batch = pack_batch([[5, 6, 7]], 0, 8)
    with pytest.raises(ValueError, match="does not match"):
        padded_model(**batch)
    with pytest.raises(ValueError, match="does not match"):
        packed_model(*pad_batch([[5, 6, 7]], 0))


def test_merged_lora_matches_unmerged(llama_run, sample_rows):
    run = load_run(llama_run, {"quantization": "none"})
    formatter = run.formatter()
    from model.run import load_model

    model = load_model(llama_run, run.model, CPU, formatter.pad_id)
    seqs = formatter.encode_batch(sample_rows["prompt"][:6], sample_rows["response_a"][:6], sample_rows["response_b"][:6])
    with torch.inference_mode():
        before = model(*pad_batch(seqs, formatter.pad_id))
        assert merge_lora(model) == "LoRA merged into the base weights"
        after = model(*pad_batch(seqs, formatter.pad_id))
    assert merge_lora(model) == "LoRA already merged"
    assert not hasattr(model.model, "get_base_model")
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_quantised_base_keeps_lora_unmerged(llama_run):
    run = load_run(llama_run)
    from model.run import load_model

    model = load_model(llama_run, run.model, CPU, run.formatter().pad_id)
    assert merge_lora(model) == "LoRA kept unmerged (quantised base)"


def test_packed_prediction_matches_padded_and_is_worker_independent(llama_run, sample_rows):
    rows = sample_rows.iloc[:24]
    fp32 = {"quantization": "none", "compute_dtype": "float32", "token_budget": 1024, "compile": False}
    padded = predict_frame([load_run(llama_run, {**fp32, "layout": "padded"})], rows)
    one = predict_frame([load_run(llama_run, {**fp32, "layout": "packed", "workers": 1})], rows)
    two = predict_frame([load_run(llama_run, {**fp32, "layout": "packed", "workers": 2})], rows)
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    assert one["id"].tolist() == rows["id"].tolist()
    np.testing.assert_allclose(one[list(LABEL_COLS)], padded[list(LABEL_COLS)], atol=1e-5)


def test_split_balances_computed_tokens():
    lengths = lognormal_lengths(600, 2048, seed=1)
    settings = InferSettings(token_budget=8192)
    for layout in ("packed", "padded"):
        batches, costs = plan_batches(lengths, settings, layout)
        shares = split_batches(batches, costs, 2)
        cost_of = {tuple(b): c for b, c in zip(batches, costs)}
        loads = [sum(cost_of[tuple(b)] for b in share) for share in shares]
        assert abs(loads[0] - loads[1]) <= max(costs), (layout, loads)
        assert sorted(i for share in shares for b in share for i in b) == list(range(len(lengths)))


def test_padded_layout_is_never_compiled(llama_run):
    from infer.scoring import prepare

    run = load_run(llama_run)
    done = prepare(PooledClassifier(torch.nn.Identity()), dataclasses.replace(run.infer, compile=True, merge_lora=False), "padded")
    assert "not compiled" in done[-1]


def test_bad_layout_in_config_is_an_error():
    with pytest.raises(ConfigError, match="layout"):
        build_config(TrainConfig, REPO / "configs" / "tiny-llama.yaml", ["infer.layout=ragged"])


def test_plan_counts_packed_batches_on_packed_hardware(llama_run, sample_rows):
    from infer.plan import plan, read_run

    run = read_run(llama_run, {"tta": False})
    rows = sample_rows.iloc[:50]
    lengths = list(map(len, run.formatter().encode_batch(rows["prompt"], rows["response_a"], rows["response_b"],
                                                               inference=True)))
    packed, _ = plan([run], rows, lambda r: 1000.0, budget_hours=9, count="padded", hardware="h100")
    assert packed["padded_tokens"].sum() == len(pack_rows(lengths, run.infer.token_budget)) * run.infer.token_budget
    padded, _ = plan([run], rows, lambda r: 1000.0, budget_hours=9, count="padded", hardware="t4x2")
    batches, costs = plan_batches(lengths, run.infer, "padded")
    assert padded["padded_tokens"].sum() == sum(costs) and packed["tokens"].sum() == sum(lengths)


def packed_vs_padded_training(path, tokenizer, sample_rows, device: torch.device, compile: bool = False) -> None:
    """train.layout=packed: same per-row losses and LoRA/head gradients as padding, in fp32. On
    CPU the tolerance is float32 summation order (the packed attention sums over the same keys);
    Triton runs fp32 dots in TF32 (~1e-3 relative), so CUDA is held to that. Two micro-batches of
    different widths: training compiles for one width, then for any (automatic dynamic shapes)."""
    from model.factory import build_for_training
    from train.fold import encode_examples
    from train.trainers import Collator

    cfg = ModelConfig(path=str(path), quantization="none", compute_dtype="float32", lora_dropout=0.0,
                      gradient_checkpointing=True)
    formatter = Formatter(tokenizer, build_config(TrainConfig).format)
    examples = encode_examples(formatter, sample_rows.iloc[:8], swap_aug=True)
    losses, grads = {}, {}
    for packed in (False, True):
        torch.manual_seed(0)
        model = build_for_training(cfg, formatter.pad_id, device, packed=packed, compile=packed and compile).train()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # LoRA B starts at zero; make LoRA part of the function
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        losses[packed] = []
        for rows in (examples, examples[:5]):
            batch = {k: v.to(device) for k, v in Collator(formatter.pad_id, packed)(rows).items()}
            target = batch.pop("target")
            per_row = torch.nn.functional.cross_entropy(model(**batch), target, reduction="none")
            per_row.mean().backward()
            losses[packed].append(per_row.detach())
        grads[packed] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert [len(x) for x in losses[True]] == [16, 5]
    tol = dict(atol=1e-5, rtol=1e-5) if device.type == "cpu" else dict(atol=2e-3, rtol=2e-3)
    for packed_loss, padded_loss in zip(losses[True], losses[False]):
        torch.testing.assert_close(packed_loss, padded_loss, **tol)
    assert set(grads[True]) == set(grads[False]) and any(g.abs().sum() > 0 for g in grads[False].values())
    for name, grad in grads[False].items():
        if device.type == "cpu":
            torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-4, msg=name)
        else:
            assert (grads[True][name] - grad).norm() <= 1e-2 * grad.norm() + 1e-6, name


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gemma2"])
def test_packed_training_batch_gives_the_padded_losses_and_gradients(arch, request, tiny_tokenizer, sample_rows):
    packed_vs_padded_training(request.getfixturevalue(arch), tiny_tokenizer, sample_rows, CPU)


def test_fold_trains_on_packed_batches(tmp_path, tiny_llama, sample_folds):
    from conftest import train_args
    from train.__main__ import main as train_main

    train_main(train_args("tiny-llama.yaml", tiny_llama, sample_folds, tmp_path, "fold=4", "train.max_steps=2",
                          "train.layout=packed"))
    run = tmp_path / "tiny-llama" / "fold4-seed42"
    assert (run / "oof.csv").is_file() and build_config(TrainConfig, run / "config.yaml").train.layout == "packed"

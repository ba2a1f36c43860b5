"""infer.fp8: e4m3 projections with per-channel weight and per-token activation scales.

On CPU torch computes _scaled_mm exactly as the dequantised product, so the arithmetic, the module
swap, the refusals and the predict plumbing are all checked here; the speed is the benchmark's.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from cli.config import ConfigError
from data.io import LABEL_COLS
from model.fp8 import E4M3_MAX, Fp8Linear, check_fp8_device, quantize_rows, to_fp8
from model.factory import ModelConfig, PooledClassifier, head_to_fp32, load_base
from infer.predict import load_run, predict_frame
from infer.scoring import prepare
from model.packing import pad_batch
from model.settings import InferSettings

CPU = torch.device("cpu")


def test_quantize_rows_maps_each_rows_max_to_448_and_keeps_zero_rows():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [1e-3, 3e-3, -1e-3]])
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 1) and scale.dtype == torch.float32
    assert q.float().abs().amax(dim=1).tolist() == [E4M3_MAX, 0.0, E4M3_MAX]
    back = q.float() * scale
    assert torch.isfinite(back).all() and torch.equal(back[1], torch.zeros(3))
    torch.testing.assert_close(back, x, rtol=2**-4, atol=0)  # e4m3 keeps 3 mantissa bits


def test_fp8_linear_is_the_product_of_its_quantised_operands():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(2, 5, 64)
    fp8 = Fp8Linear(linear)
    out = fp8(x)
    assert out.shape == (2, 5, 48) and fp8.weight.dtype == torch.float8_e4m3fn
    xq, xs = quantize_rows(x.reshape(-1, 64))
    expected = (xq.float() * xs) @ (fp8.weight.float() * fp8.weight_scale.T).T + linear.bias
    torch.testing.assert_close(out.reshape(-1, 48), expected, atol=1e-5, rtol=1e-5)
    exact = linear(x)
    assert ((out - exact).norm() / exact.norm()).item() < 0.05


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gemma2"])
def test_to_fp8_swaps_every_decoder_projection_and_nothing_else(arch, request):
    path = request.getfixturevalue(arch)
    torch.manual_seed(0)
    model = PooledClassifier(load_base(ModelConfig(path=str(path), quantization="none", compute_dtype="float32"), 0, CPU))
    head_to_fp32(model.base)
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    with torch.inference_mode():
        before = model(*pad_batch(seqs, 0))
    embedding = model.base.get_input_embeddings().weight.clone()
    cpu = " (emulated on CPU: slower, not faster)"
    assert to_fp8(model) == "14 decoder projections in fp8 e4m3" + cpu  # 2 layers x q/k/v/o/gate/up/down
    assert to_fp8(model) == "decoder projections already in fp8" + cpu
    backbone = getattr(model.base, model.base.base_model_prefix)
    assert not any(type(m) is torch.nn.Linear for m in backbone.layers.modules())
    assert type(model.base.score) is torch.nn.Linear and torch.equal(model.base.get_input_embeddings().weight, embedding)
    with torch.inference_mode():
        after = model(*pad_batch(seqs, 0))
    probs = lambda logits: logits.softmax(-1)  # noqa: E731
    assert (probs(after) - probs(before)).abs().max().item() < 0.02, (after, before)


def test_fp8_refuses_unmerged_lora_quantised_bases_and_old_gpus(llama_run, monkeypatch):
    run = load_run(llama_run)  # a 4-bit run: LoRA stays unmerged
    from model.run import load_model

    model = load_model(llama_run, run.model, CPU, 0)
    with pytest.raises(ConfigError, match="merged"):
        prepare(model, InferSettings(fp8=True, compile=False), "padded")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ConfigError, match=r"Tesla T4 \(7.5\)"):
        check_fp8_device(torch.device("cuda:0"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(ConfigError, match="bfloat16"):
        check_fp8_device(torch.device("cuda:0"), torch.float16)


def test_settings_fp8_cannot_run_with_are_refused_before_any_model_loads(llama_run):
    from cli.config import load_config
    from train.config import TrainConfig

    fp8 = ["model.quantization=none", "infer.fp8=true"]
    assert load_config(TrainConfig, fp8).infer.fp8
    with pytest.raises(ConfigError, match="needs infer.merge_lora=true"):
        load_config(TrainConfig, [*fp8, "infer.merge_lora=false"])
    with pytest.raises(ConfigError, match="not compute_dtype=float16"):
        load_config(TrainConfig, [*fp8, "model.compute_dtype=float16"])
    with pytest.raises(ConfigError, match=r"fold0-seed42: infer.fp8=true needs an unquantised base.*quantization=none"):
        load_run(llama_run, {"fp8": True})  # a 4-bit run, scored as trained


def test_predict_with_fp8_keeps_ids_and_stays_close(llama_run, sample_rows):
    rows = sample_rows.iloc[:16]
    fp32 = {"quantization": "none", "compute_dtype": "float32", "token_budget": 1024, "compile": False, "layout": "packed"}
    plain = predict_frame([load_run(llama_run, fp32)], rows)
    fp8 = predict_frame([load_run(llama_run, {**fp32, "fp8": True})], rows)
    assert fp8["id"].tolist() == rows["id"].tolist()
    np.testing.assert_allclose(fp8[list(LABEL_COLS)].sum(axis=1), 1.0, atol=1e-6)
    diff = np.abs(fp8[list(LABEL_COLS)].to_numpy() - plain[list(LABEL_COLS)].to_numpy())
    assert 0 < diff.max() < 0.02


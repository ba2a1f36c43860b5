"""The T4 path (issue 18), CPU-checkable: which components a GPU of each compute capability gets
(model/hardware.py), Gemma-2 soft-capping off (model.attn_softcapping), and int8 W8A8 projections
(model/int8.py) against the fp32 reference on tiny random Llama and Gemma-2. Speed is the benchmark's
(`python -m bench.infer t4_mode=true`), on a GPU."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cli.config import ConfigError
from data.io import LABEL_COLS
from infer.predict import load_run, predict_frame
from model.factory import PooledClassifier, head_to_fp32, load_base
from model.hardware import SDPA_ALIAS, SDPA_T4_BACKENDS, resolve_components
from model.int8 import Int8Linear, quantize_int8_rows, to_int8
from model.packing import pad_batch
from model.settings import InferSettings, ModelConfig, inference_model

CPU = torch.device("cpu")
TRAINED = ModelConfig(path="unused", quantization="4bit", compute_dtype="bfloat16")  # the shipped configs' model section
SHIPPED = InferSettings()  # merge_lora, compile, layout auto, fp8 off


def assert_sm75_safe(c) -> None:
    assert c.profile == "t4" and c.model.compute_dtype == "float16"
    assert c.layout == "padded" and c.attention in ("eager", "sdpa") and c.attention != "flex"
    assert not c.infer.compile and not c.infer.fp8
    assert c.attention == "eager" or set(c.sdpa_backends) == {"EFFICIENT_ATTENTION", "MATH"}


@pytest.mark.parametrize("model_type, softcapping, attention", [("gemma2", True, "eager"), ("gemma2", False, "sdpa"),
                                                                ("llama", True, "sdpa")])
@pytest.mark.parametrize("infer", [SHIPPED, InferSettings(layout="packed", fp8=True), InferSettings(int8=True),
                                   InferSettings(profile="t4")])
def test_capability_7_5_selects_only_sm75_components(model_type, softcapping, attention, infer):
    model = dataclasses.replace(TRAINED, attn_softcapping=softcapping,
                                quantization="none" if infer.fp8 or infer.int8 else "4bit")
    c = resolve_components((7, 5), model_type, model, infer)
    assert_sm75_safe(c)
    assert c.attention == attention and c.model.attn_implementation == attention
    assert c.infer.int8 == infer.int8 and c.model.quantization == model.quantization
    text = "\n".join(c.notes)
    assert "compute_dtype bfloat16 -> float16 (T4 (sm75) has no bf16)" in text
    if infer.fp8:
        assert "infer.fp8=true ignored" in text and "infer.layout=packed -> padded" in text
    if attention == "eager":
        assert "soft-capping: eager" in text


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
@pytest.mark.parametrize("model_type", ["gemma2", "llama"])
def test_ampere_and_hopper_keep_todays_choices(capability, model_type):
    for infer in (SHIPPED, InferSettings(fp8=True), InferSettings(layout="padded", merge_lora=False)):
        c = resolve_components(capability, model_type, TRAINED, infer)
        assert c.profile == "default" and c.sdpa_backends == ()
        assert c.model == dataclasses.replace(TRAINED, attn_implementation=c.model.attn_implementation)
        # score_budget resolved like the layout: no limit (-1), as every padded batch always had
        assert c.infer == dataclasses.replace(infer, layout=c.layout, profile="default", score_budget=-1)
        if infer.layout == "auto":
            assert c.layout == "packed" and c.attention == "flex" and c.model.attn_implementation == "auto"
        else:  # padded: the auto rule load_base always had
            assert c.attention == ("eager" if model_type == "gemma2" else "sdpa")
    # CPU: padded, default profile; infer.profile=t4 forces the T4 set on a big GPU (to measure it there)
    assert resolve_components(None, "llama", TRAINED, SHIPPED).layout == "padded"
    assert_sm75_safe(resolve_components((9, 0), "gemma2", TRAINED, InferSettings(profile="t4")))
    assert resolve_components((7, 5), "llama", TRAINED, InferSettings(profile="default")).layout == "padded"


def test_eager_batches_are_bounded_by_their_score_matrices():
    """Eager attention holds rows x width^2 scores per head: on the T4 profile, 2 rows of 2,048 by default (8 rows at
    the 16,384-token budget ran out of 15 GiB in T4 mode); SDPA keeps none, so only the token budget applies."""
    from infer.scoring import plan_batches
    from model.hardware import T4_EAGER_SCORE_BUDGET

    lengths = [2048] * 5 + [1024] * 9 + [300] * 40
    eager = resolve_components((7, 5), "gemma2", TRAINED, SHIPPED)
    sdpa = resolve_components((7, 5), "llama", TRAINED, SHIPPED)
    assert eager.infer.score_budget == T4_EAGER_SCORE_BUDGET == 2 * 2048**2 and sdpa.infer.score_budget == -1
    assert "rows x longest row^2 <= 8,388,608 per batch (auto on the T4 profile" in "\n".join(eager.notes)
    batches, costs = plan_batches(lengths, eager.infer, "padded")
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * lengths[b[0]] ** 2 <= T4_EAGER_SCORE_BUDGET for b in batches)
    widths = [(len(b), lengths[b[0]]) for b in batches]
    assert widths == [(2, 2048), (2, 2048), (2, 2048), (8, 1024), (40, 300)]  # 8 x 1024^2 = the budget
    sdpa_batches = plan_batches(lengths, sdpa.infer, "padded")[0]
    assert [(len(b), lengths[b[0]]) for b in sdpa_batches] == [(8, 2048), (16, 1024), (30, 300)]  # tokens only
    # set by hand: applies to eager at any profile; ignored (and said) where attention keeps no scores
    hand = InferSettings(score_budget=4 * 1024**2, layout="padded")
    assert resolve_components((9, 0), "gemma2", TRAINED, hand).infer.score_budget == 4 * 1024**2
    llama = resolve_components((9, 0), "llama", TRAINED, hand)
    assert llama.infer.score_budget == -1 and "infer.score_budget=4194304 ignored" in "\n".join(llama.notes)
    assert resolve_components((7, 5), "gemma2", TRAINED, InferSettings(score_budget=-1)).infer.score_budget == -1
    with pytest.raises(ValueError, match="score_budget must be"):
        InferSettings(score_budget=-2)


def test_contradictory_settings_are_refused():
    with pytest.raises(ConfigError, match="SDPA ignores soft-capping"):
        resolve_components((7, 5), "gemma2", dataclasses.replace(TRAINED, attn_implementation="sdpa"), SHIPPED)
    sdpa_no_cap = dataclasses.replace(TRAINED, attn_implementation="sdpa", attn_softcapping=False)
    assert resolve_components((7, 5), "gemma2", sdpa_no_cap, SHIPPED).attention == "sdpa"
    with pytest.raises(ValueError, match="choose one"):
        InferSettings(int8=True, fp8=True)
    with pytest.raises(ValueError, match="needs infer.merge_lora=true"):
        InferSettings(int8=True, merge_lora=False)
    with pytest.raises(ValueError, match="infer.profile must be one of"):
        InferSettings(profile="turing")
    with pytest.raises(ValueError, match="int8=true .* quantization=4bit"):
        inference_model(TRAINED, InferSettings(int8=True))
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        ModelConfig(attn_implementation="flash_attention_2")


def test_softcapping_off_reaches_the_built_gemma2_and_picks_sdpa(tiny_gemma2):
    on = load_base(ModelConfig(path=str(tiny_gemma2), quantization="none", compute_dtype="float32"), 0, CPU)
    off = load_base(ModelConfig(path=str(tiny_gemma2), quantization="none", compute_dtype="float32",
                                attn_softcapping=False), 0, CPU)
    assert on.config._attn_implementation == "eager" and on.model.layers[0].self_attn.attn_logit_softcapping == 50.0
    assert off.config._attn_implementation == SDPA_ALIAS and off.config.attn_logit_softcapping is None
    assert all(layer.self_attn.attn_logit_softcapping is None for layer in off.model.layers)
    with pytest.raises(ConfigError, match="SDPA ignores soft-capping"):
        load_base(ModelConfig(path=str(tiny_gemma2), quantization="none", attn_implementation="sdpa"), 0, CPU)
    # the SDPA alias computes eager's function (soft-capping off in both), with the T4 kernels only
    eager = load_base(ModelConfig(path=str(tiny_gemma2), quantization="none", compute_dtype="float32",
                                  attn_softcapping=False, attn_implementation="eager"), 0, CPU)
    from model.hardware import sdpa_backends

    ids, mask = pad_batch([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], 0)
    with torch.inference_mode(), sdpa_backends(SDPA_T4_BACKENDS):
        a = off.model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = eager.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1, :3], b[1, :3], atol=1e-5, rtol=1e-5)


def test_int8_linear_is_the_product_of_its_quantised_operands():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(2, 5, 64)
    q = Int8Linear(linear)
    out = q(x)
    assert out.shape == (2, 5, 48) and q.weight.dtype == torch.int8
    xq, xs = quantize_int8_rows(x.reshape(-1, 64))
    assert xq.abs().amax(dim=1).eq(127).all()
    expected = (xq.float() * xs) @ (q.weight.float() * q.weight_scale.T).T + linear.bias
    torch.testing.assert_close(out.reshape(-1, 48), expected, atol=1e-5, rtol=1e-5)
    exact = linear(x)
    assert ((out - exact).norm() / exact.norm()).item() < 0.02
    zero_rows, scale = quantize_int8_rows(torch.zeros(3, 8))
    assert torch.equal(zero_rows, torch.zeros(3, 8, dtype=torch.int8)) and torch.isfinite(scale).all()


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gemma2"])
def test_int8_against_the_fp32_reference(arch, request):
    """Tiny random models, fp32 reference: int8 W8A8 probabilities (fp32 and fp16 compute), max / mean |dp| printed."""
    path = request.getfixturevalue(arch)
    seqs = [list(range(5, 5 + n)) for n in (40, 23, 9, 31)]
    ids, mask = pad_batch(seqs, 0)
    report = {}
    for dtype in ("float32", "float16"):
        torch.manual_seed(0)
        model = PooledClassifier(load_base(ModelConfig(path=str(path), quantization="none", compute_dtype=dtype), 0, CPU))
        head_to_fp32(model.base)
        with torch.no_grad():  # a trained head gives logits of order 1: scale the random one to unit-std logits
            head = model.base.score.weight
            head.mul_(1 / model(ids, mask).std())
        with torch.inference_mode():
            before = model(ids, mask).softmax(-1)
        if dtype == "float32":
            reference = before
        assert to_int8(model) == "14 decoder projections in int8 W8A8"  # 2 layers x q/k/v/o/gate/up/down
        backbone = getattr(model.base, model.base.base_model_prefix)
        assert not any(type(m) is torch.nn.Linear for m in backbone.layers.modules())
        with torch.inference_mode():
            after = model(ids, mask).softmax(-1)
        for name, probs in ((f"{dtype} int8", after), (f"{dtype} plain", before)):
            diff = (probs.float() - reference).abs()
            report[name] = (diff.max().item(), diff.mean().item())
    print(f"\n{arch} |p - p(fp32)| max / mean: " + "; ".join(f"{k} {a:.1e} / {b:.1e}" for k, (a, b) in report.items()))
    assert report["float32 int8"][0] < 0.02 and report["float16 int8"][0] < 0.02, report
    assert report["float32 int8"][0] > 0  # it does change the function


def test_int8_refuses_unmerged_lora(llama_run):
    from infer.scoring import prepare
    from model.run import load_model

    run = load_run(llama_run)  # a 4-bit run: LoRA stays unmerged
    assert run.model.attn_softcapping is True  # recorded in the run's config (a no-op on Llama)
    model = load_model(llama_run, run.model, CPU, 0)
    with pytest.raises(ConfigError, match="merged"):
        prepare(model, InferSettings(int8=True, compile=False), "padded")


def test_predict_on_the_t4_profile_keeps_ids_and_stays_close(llama_run, sample_rows, capsys):
    rows = sample_rows.iloc[:12]
    fp32 = {"quantization": "none", "compute_dtype": "float32", "token_budget": 1024, "compile": False}
    plain = predict_frame([load_run(llama_run, fp32)], rows)
    t4 = predict_frame([load_run(llama_run, {**fp32, "profile": "t4", "int8": True})], rows)
    out = capsys.readouterr().out
    assert "profile t4" in out and "compute_dtype float32 -> float16" in out and "int8 W8A8" in out
    assert t4["id"].tolist() == rows["id"].tolist()
    diff = np.abs(t4[list(LABEL_COLS)].to_numpy() - plain[list(LABEL_COLS)].to_numpy())
    print(f"\npredict t4 (fp16, int8) vs fp32: max {diff.max():.1e} mean {diff.mean():.1e}")
    assert 0 < diff.max() < 0.02


@pytest.mark.parametrize("device", [torch.device("cuda"), torch.device("cuda", 1)])
def test_t4_memory_cap_on_a_larger_gpu(monkeypatch, device):
    """The cap is a fraction of the named GPU (the current one for a bare `cuda`), never set on a 15 GiB card."""
    from types import SimpleNamespace

    from model.hardware import t4_memory_cap

    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=(i + 1) * 140 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, i: calls.append((f, i)))
    index = device.index or 0
    assert t4_memory_cap(device) == f"GPU memory capped at 15 GiB of {(index + 1) * 140} GiB (T4 profile)"
    assert calls == [(15 / ((index + 1) * 140), index)]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=15 * 2**30))
    assert t4_memory_cap(device) == "" and len(calls) == 1
    assert t4_memory_cap(torch.device("cpu")) == ""

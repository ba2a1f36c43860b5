"""A model split by decoder layers over several devices (infer.pipeline, model/pipeline.py), checked on the CPU:
the stage map, the split model computing exactly what the whole one does (both stages on the CPU, the same
accelerate hooks a GPU split runs), `infer predict` with pipeline=2 against pipeline=1, and the settings it refuses.
Whether the two stages overlap on two GPUs is the benchmark's to measure."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from data.io import LABEL_COLS
from infer.predict import load_run, predict_frame
from infer.scoring import worker_devices
from model.factory import PooledClassifier, head_to_fp32, load_base
from model.hardware import resolve_components
from model.packing import pad_batch
from model.pipeline import split_model, stage_map
from model.settings import InferSettings, ModelConfig, inference_model

CPU = torch.device("cpu")
TRAINED = ModelConfig(path="unused", quantization="4bit", compute_dtype="bfloat16")


def test_stage_map_splits_the_layers_evenly():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=2,
                         num_key_value_heads=1, num_labels=3, pad_token_id=0)
    base = LlamaForSequenceClassification(config)
    assert stage_map(base, 2) == {"model.embed_tokens": 0, **{f"model.layers.{i}": i // 3 for i in range(6)},
                                  "model.norm": 1, "model.rotary_emb": 0, "score": 1}
    assert [stage_map(base, 3)[f"model.layers.{i}"] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(Exception, match="splits into 2..6 stages"):
        stage_map(base, 7)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gemma2"])
def test_split_model_computes_what_the_whole_model_does(arch, request):
    path = request.getfixturevalue(arch)
    ids, mask = pad_batch([list(range(5, 45)), list(range(7, 20)), list(range(9, 40))], 0)
    torch.manual_seed(0)
    model = PooledClassifier(load_base(ModelConfig(path=str(path), quantization="none", compute_dtype="float32"), 0, CPU))
    head_to_fp32(model.base)
    with torch.inference_mode():
        whole = model(ids, mask)
    done = split_model(model, [CPU, CPU])
    assert done == "decoder layers split 1 + 1 over cpu, cpu (embeddings on cpu, norm and head on cpu)"
    backbone = getattr(model.base, model.base.base_model_prefix)
    assert [len(layer._forward_pre_hooks) for layer in backbone.layers] == [0, 1]  # the hand-over, on stage 1's first
    with torch.inference_mode():
        split = model(ids, mask)
    assert torch.equal(whole, split)


def test_a_stage_moves_each_tensor_once_per_forward():
    """Every GPU-to-GPU copy makes the source GPU wait for the destination's queue: a stage's first layer moves the
    mask and rotary tables, its other layers reuse them, so nothing crosses after the stage's work is queued."""
    from model.pipeline import stage_hooks

    moves = []

    def move(t, device):
        moves.append(t)
        return t.clone()

    first, rest = stage_hooks(torch.device("meta"), move)  # "meta": every CPU tensor counts as elsewhere
    hidden, mask, cos, sin = (torch.randn(2, 3) for _ in range(4))
    args, kwargs = first(None, (hidden,), {"attention_mask": mask, "position_embeddings": (cos, sin), "use_cache": False})
    assert [id(t) for t in moves] == [id(hidden), id(mask), id(cos), id(sin)] and kwargs["use_cache"] is False
    assert torch.equal(kwargs["position_embeddings"][1], sin) and kwargs["position_embeddings"][1] is not sin
    moves.clear()
    again = rest(None, (args[0],), {"attention_mask": mask, "position_embeddings": (cos, sin)})[1]
    assert [id(t) for t in moves] == [id(args[0])]  # (on a GPU the hidden state is already there: no move at all)
    assert again["attention_mask"] is kwargs["attention_mask"] and again["position_embeddings"][0] is kwargs["position_embeddings"][0]
    moves.clear()
    first(None, (hidden,), {"attention_mask": mask})  # the next forward starts afresh
    assert len(moves) == 2


def test_predict_with_a_split_model_matches_the_whole_one(llama_run, sample_rows, capsys):
    rows = sample_rows.iloc[:10]
    fp32 = {"quantization": "none", "compute_dtype": "float32", "token_budget": 1024, "compile": False}
    whole = predict_frame([load_run(llama_run, fp32)], rows)
    split = predict_frame([load_run(llama_run, {**fp32, "pipeline": 2})], rows)
    out = capsys.readouterr().out
    assert "infer.pipeline=2" in out and "decoder layers split 1 + 1 over cpu, cpu" in out
    assert split["id"].tolist() == rows["id"].tolist()
    np.testing.assert_array_equal(split[list(LABEL_COLS)].to_numpy(), whole[list(LABEL_COLS)].to_numpy())


def test_split_settings_resolve_and_refuse():
    two = InferSettings(pipeline=2)
    t4 = resolve_components((7, 5), "gemma2", dataclasses.replace(TRAINED, quantization="none"), two)
    assert t4.layout == "padded" and t4.model.compute_dtype == "float16" and not t4.infer.compile
    assert "layers split over 2 GPUs" in t4.describe() and any("infer.pipeline=2" in n for n in t4.notes)
    ampere = resolve_components((8, 0), "llama", dataclasses.replace(TRAINED, quantization="none"), two)
    assert ampere.layout == "padded" and "padded layout (infer.pipeline > 1)" in ampere.notes
    assert worker_devices(2, 2, "cuda") == [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]
    assert worker_devices(1, 2, "cpu") == [["cpu", "cpu"]] and worker_devices(2, 1, "cuda") == [["cuda:0"], ["cuda:1"]]
    with pytest.raises(ValueError, match="unquantised base, not quantization=4bit"):
        inference_model(TRAINED, two)
    assert inference_model(TRAINED, InferSettings(pipeline=2, quantization="none")).quantization == "none"
    for bad, message in (({"int8": True}, "neither infer.int8"), ({"merge_lora": False}, "merge_lora=true"),
                         ({"layout": "packed"}, "padded layout"), ({"pipeline": 0}, "must be 1")):
        with pytest.raises(ValueError, match=message):
            InferSettings(**{"pipeline": 2, **bad})

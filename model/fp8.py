"""fp8 matmuls for inference (`infer.fp8=true`): the decoder's projections in float8 e4m3.

The bf16 path already runs its matmuls at ~93 % of the bf16 tensor-core rate, so what is left
beyond it is a cheaper number format. Each merged projection weight is stored in e4m3 with one
scale per output channel; each activation row (token) is scaled by its own absolute maximum on the
fly, and `torch._scaled_mm` multiplies the two e4m3 operands at twice the bf16 rate (compute
capability >= 8.9: H100, H200, L4, RTX 40xx), accumulating in fp32 and writing bf16. Per-token
activation scales keep one long or loud row from costing the others their precision.

Only the decoder layers' linear projections change; embeddings, norms, attention and the fp32 head
stay as they were. It needs LoRA merged into an unquantised base (a 4/8-bit base or an unmerged
adapter would be quantised twice, or not at all). It changes the function: the README's exactness
table gives how much on a real model.
"""
from __future__ import annotations

import torch
from torch import nn

from cli.config import ConfigError
from model.factory import replace_projections

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
MIN_CAPABILITY = (8, 9)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 tensor, fp32 scale per row) with x ~= e4m3 * scale; a row's absolute max maps to 448."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Fp8Linear(nn.Module):
    """A frozen nn.Linear with e4m3 weights (per-output-channel scales) and per-token e4m3 inputs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)  # (out, in): its transpose is the column-major operand _scaled_mm wants
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, scale = quantize_rows(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(rows, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3"


def check_fp8_device(device: torch.device, dtype: torch.dtype) -> str:
    """'' when this GPU runs row-wise scaled fp8 matmuls, a note on CPU; else a ConfigError saying why not."""
    if device.type != "cuda":
        return " (emulated on CPU: slower, not faster)"  # torch computes _scaled_mm there too: the tests use it
    name, capability = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ConfigError(f"infer.fp8=true needs fp8 tensor cores (compute capability >= 8.9: H100, H200, L4, "
                          f"RTX 40xx); {device} is {name} ({capability[0]}.{capability[1]}). Set infer.fp8=false.")
    if dtype != torch.bfloat16:
        raise ConfigError(f"infer.fp8=true writes bf16 matmul outputs on CUDA; the model computes in {dtype}: "
                          "set model.compute_dtype (infer predict: infer.compute_dtype) to bfloat16")
    try:  # row-wise scaling reached Ada (8.9) GPUs in a later torch than Hopper: ask the kernel, not a table
        probe = Fp8Linear(nn.Linear(16, 16, bias=False, device=device, dtype=dtype))
        probe(torch.ones(16, 16, device=device, dtype=dtype))
    except RuntimeError as err:
        raise ConfigError(f"infer.fp8=true: torch {torch.__version__} cannot run row-wise scaled fp8 matmuls on "
                          f"{name}: {err}. Upgrade torch or set infer.fp8=false.") from None
    return ""


def to_fp8(model) -> str:
    """Put a PooledClassifier's decoder projections in fp8 (after merge_lora); returns what was done."""
    backbone = getattr(model.base, model.base.base_model_prefix)
    embedding = backbone.get_input_embeddings().weight
    note = check_fp8_device(embedding.device, embedding.dtype)
    count = replace_projections(model, Fp8Linear, "infer.fp8")
    if count == 0 and not any(isinstance(m, Fp8Linear) for m in backbone.modules()):
        raise ConfigError("infer.fp8=true: the decoder layers hold no nn.Linear projections to convert")
    done = f"{count} decoder projections in fp8 e4m3" if count else "decoder projections already in fp8"
    return done + note

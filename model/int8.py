"""int8 W8A8 matmuls for inference (`infer.int8=true`): the T4 weight-format candidate.

A T4 has int8 tensor cores at twice its fp16 rate (130 TOPS against 65 TFLOP/s) and 15 GB per
card, where a 9B model's fp16 weights (18.5 GB) do not fit. After LoRA is merged into the fp16
base, each decoder projection weight is stored in int8 with one scale per output channel (absmax
/ 127); each activation row (token) is quantised to int8 by its own absolute maximum on the fly,
and `torch._int_mm` multiplies the two int8 operands with int32 accumulation (exact: |sum| <=
127^2 x 14336 < 2^31); the int32 result times both scales gives the output in the compute dtype.

torch._int_mm shape rules: on CPU (torch 2.13) any shape runs. On CUDA it needs more than 16 rows
and the inner and output dimensions each a multiple of 8: rows are zero-padded up to 17 here (a
zero row quantises to zero and is dropped afterwards), and a projection whose dimensions are not
multiples of 8 (none in Gemma-2 9B or Llama-3 8B) keeps its dequantised weight in a plain matmul.
Whether cuBLASLt runs its int8 kernel on sm75 fast enough is what the T4-mode benchmark measures.

Like model/fp8.py, only the decoder layers' nn.Linear projections change; embeddings, norms,
attention and the fp32 head stay. It needs LoRA merged into an unquantised base. It changes the
function (tests/test_t4.py and the benchmark's exact task give by how much).
"""
from __future__ import annotations

import torch
from torch import nn

from cli.config import ConfigError
from model.factory import replace_projections

INT8_MAX = 127
CUDA_MIN_ROWS = 17  # torch._int_mm on CUDA: m > 16
CUDA_MULTIPLE = 8   # ... and k, n multiples of 8


def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 tensor, fp32 scale per row) with x ~= int8 * scale; a row's absolute max maps to 127, zero rows to 0."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / INT8_MAX
    return torch.round(xf / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def int_mm_fits(rows: int, inner: int, out: int, device: torch.device) -> bool:
    """Would torch._int_mm take these shapes on `device` (rows after padding to CUDA_MIN_ROWS)?"""
    if device.type != "cuda":
        return True
    return inner % CUDA_MULTIPLE == 0 and out % CUDA_MULTIPLE == 0


class Int8Linear(nn.Module):
    """A frozen nn.Linear with int8 weights (per-output-channel scales) and per-token int8 inputs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_int8_rows(linear.weight.detach())
        self.register_buffer("weight", weight)  # (out, in); its transpose is the column-major operand cuBLASLt wants
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows, scale = quantize_int8_rows(flat)
        n = rows.shape[0]
        if int_mm_fits(n, self.in_features, self.out_features, x.device):
            if x.is_cuda and n < CUDA_MIN_ROWS:
                rows = torch.cat([rows, rows.new_zeros(CUDA_MIN_ROWS - n, self.in_features)])
            acc = torch._int_mm(rows, self.weight.t())[:n]
            out = acc.float() * scale * self.weight_scale
        else:  # the same product, dequantised (shapes torch._int_mm refuses on CUDA)
            out = (rows.float() * scale) @ (self.weight.float() * self.weight_scale.T).T
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 W8A8"


def to_int8(model) -> str:
    """Put a PooledClassifier's decoder projections in int8 W8A8 (after merge_lora); returns what was done."""
    backbone = getattr(model.base, model.base.base_model_prefix)
    count = replace_projections(model, Int8Linear, "infer.int8")
    if count == 0 and not any(isinstance(m, Int8Linear) for m in backbone.modules()):
        raise ConfigError("infer.int8=true: the decoder layers hold no nn.Linear projections to convert")
    return f"{count} decoder projections in int8 W8A8" if count else "decoder projections already in int8"

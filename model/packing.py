"""Batch layouts for training and inference: padded rows, or padding-free packed rows with their attention.

A padded batch is right-padded input_ids + attention_mask (`pad_batch`). A packed batch is `input_ids` and `position_ids` of shape (1, width) plus `seq_lens`, the length
of every row in it. Positions restart at 0 for each row, so rotary embeddings see a row exactly
as if it were alone; a flex-attention block mask lets a token attend only to earlier tokens of
its own row (on Gemma-2's sliding layers also only within the window), and Gemma-2's attention
soft-capping is applied as a score_mod. The function computed is therefore the eager one, and the
FLOPs are spent on real tokens only: block-sparse attention skips the blocks between rows.

The backbone runs with the attention implementation registered here as ATTN. Inference pads
every batch to the same width, so the compiled attention kernel is built once per process;
training (train.layout=packed) rounds each micro-batch's width up to a multiple of 256. Off CUDA
the same function runs eagerly on dense masks (flex attention has no CPU backward).
"""
from __future__ import annotations

import functools

import torch

from cli.config import ConfigError

ATTN = "arena_packed"
LAYOUTS = ("auto", "packed", "padded")


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Row indices grouped into bins of at most `width` tokens.

    Longest rows open the bins and the shortest fill what is left, so the waste per bin is small
    and bins finish in a deterministic order (ties broken by index).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if order and lengths[order[0]] > width:
        raise ConfigError(
            f"a row has {lengths[order[0]]} tokens but the packed width (infer.token_budget) is {width}: "
            "raise token_budget to at least the longest row (format.infer_max_length)"
        )
    bins: list[list[int]] = []
    lo, hi = 0, len(order) - 1
    while lo <= hi:
        current, used = [], 0
        while lo <= hi and used + lengths[order[lo]] <= width:
            current.append(order[lo])
            used += lengths[order[lo]]
            lo += 1
        while lo <= hi and used + lengths[order[hi]] <= width:
            current.append(order[hi])
            used += lengths[order[hi]]
            hi -= 1
        bins.append(current)
    return bins


def pack_batch(seqs: list[list[int]], pad_id: int, width: int) -> dict[str, torch.Tensor]:
    """input_ids / position_ids (1, width) and seq_lens (rows,); the tail after the last row is padding."""
    total = sum(map(len, seqs))
    if total > width:
        raise ValueError(f"{total} tokens do not fit a packed batch of width {width}")
    ids = torch.full((1, width), pad_id, dtype=torch.long)
    pos = torch.zeros((1, width), dtype=torch.long)
    start = 0
    for seq in seqs:
        ids[0, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        pos[0, start : start + len(seq)] = torch.arange(len(seq))
        start += len(seq)
    pos[0, start:] = torch.arange(width - start)
    return {"input_ids": ids, "position_ids": pos, "seq_lens": torch.tensor([len(s) for s in seqs], dtype=torch.long)}


def last_token_index(seq_lens: torch.Tensor) -> torch.Tensor:
    """Position of each row's last token in the packed sequence (the token the head reads)."""
    return torch.cumsum(seq_lens, 0) - 1


def _dynamic() -> bool | None:
    # Inference pads every batch to one width: one static graph. Training widths change with every
    # micro-batch: automatic dynamic shapes (None) make the second width's graph serve all later
    # ones, where static graphs recompile per width. Measured fast inside compiled layers
    # (train.compile); flex compiled on its own was still slow on torch 2.11 (README, Training).
    return None if torch.is_grad_enabled() else False


@functools.cache
def _compiled_create_block_mask(dynamic: bool | None):
    return torch.compile(_create_block_mask, dynamic=dynamic)


@functools.cache
def _compiled_flex_attention(dynamic: bool | None):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=dynamic)


def _row_rule(doc: torch.Tensor, window: int):
    """The attention rule, as a flex mask_mod: same row, causal, and within `window` when set."""
    def same_row_causal(b, h, q, kv):
        mask = (doc[q] == doc[kv]) & (q >= kv)
        return mask & (q - kv < window) if window else mask

    return same_row_causal


def _create_block_mask(doc: torch.Tensor, window: int):
    from torch.nn.attention.flex_attention import create_block_mask

    width = doc.shape[0]
    return create_block_mask(_row_rule(doc, window), None, None, width, width, device=doc.device)


def _dense_mask(doc: torch.Tensor, window: int) -> torch.Tensor:
    positions = torch.arange(doc.shape[0], device=doc.device)
    return _row_rule(doc, window)(0, 0, positions.unsqueeze(1), positions.unsqueeze(0))


def block_masks(seq_lens: torch.Tensor, width: int, windows: set[int]) -> dict[int, object]:
    """{0: row-causal mask, w: row-causal mask limited to a window of w} for each sliding window w.

    A window at least as wide as the batch cannot cut anything, so it maps to the full mask.
    The padded tail is one more "row" that attends only to itself and is never read.
    On CUDA the masks are flex-attention BlockMasks; elsewhere dense (width, width) booleans for
    the eager attention below (flex has no CPU backward, and CPU batches are small).
    """
    doc = torch.repeat_interleave(torch.arange(len(seq_lens), device=seq_lens.device), seq_lens)
    doc = torch.cat([doc, torch.full((width - doc.shape[0],), len(seq_lens), device=doc.device)])
    build = _compiled_create_block_mask(_dynamic()) if doc.is_cuda else _dense_mask
    masks = {0: build(doc, 0)}
    for w in windows:
        masks[w] = build(doc, w) if w < width else masks[0]
    return masks


def sliding_windows(config) -> set[int]:
    """The sliding windows a model's attention layers may ask for (Gemma-2: its window; Llama: none)."""
    window = getattr(config, "sliding_window", None)
    return {int(window)} if window else set()


def kernel_options(query: torch.Tensor) -> dict | None:
    """Flex tile sizes where PyTorch's defaults are slow: head_dim 256 (Gemma-2) on Hopper.

    The default there is 64x32 tiles, 4 warps; 128x64, 8 warps, 2 stages ran 1.57x faster on an
    H100 (2.01 -> 1.28 ms per layer on a 16k-token packed batch, `python -m bench.infer tasks=attn`).
    Its shared-memory footprint (192 KB) does not fit Ampere, so other GPUs keep the defaults.
    Training keeps them too: these are forward tiles, and the backward kernel at head_dim 256 has
    its own shared-memory limits.
    """
    if query.requires_grad:
        return None
    if query.is_cuda and query.shape[-1] == 256 and torch.cuda.get_device_capability(query.device) == (9, 0):
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    return None


def packed_attention(module, query, key, value, attention_mask, scaling=None, softcap=None, sliding_window=None,
                     dropout: float = 0.0, block_masks: dict | None = None, **kwargs):
    """transformers attention interface for packed batches: (batch, heads, len, dim) in, (batch, len, heads, dim) out."""
    if block_masks is None:
        raise RuntimeError(f"attention '{ATTN}' needs packed batches (input_ids, position_ids, seq_lens)")
    if dropout:
        raise ConfigError("packed attention has no attention dropout; set the model's attention_dropout to 0")
    mask = block_masks[sliding_window or 0]
    if isinstance(mask, torch.Tensor):
        return _eager_attention(query, key, value, mask, scaling, softcap), None

    def soft_cap(score, b, h, q, kv):
        return softcap * torch.tanh(score / softcap)

    args = dict(score_mod=soft_cap if softcap else None, block_mask=mask, scale=scaling, enable_gqa=True,
                kernel_options=kernel_options(query))
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # inside compiled decoder layers (compile_layers): fused there
        out = flex_attention(query, key, value, **args)
    else:
        out = _compiled_flex_attention(_dynamic())(query, key, value, **args)
    return out.transpose(1, 2).contiguous(), None


def _eager_attention(query, key, value, mask: torch.Tensor, scaling, softcap):
    """The same function as the flex path, written out (dense scores): CPU training and inference."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype) @ value
    return out.transpose(1, 2).contiguous()


def _no_mask(*args, **kwargs):
    return None


@functools.cache
def register() -> str:
    """Make ATTN known to transformers (attention function, and no mask of its own to build)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN, packed_attention)
    AttentionMaskInterface.register(ATTN, _no_mask)
    return ATTN


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask; pooling reads the mask, so pad id is irrelevant."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[r, : len(seq)] = 1
    return ids, mask


def make_inputs(seqs: list[list[int]], pad_id: int, layout: str, width: int) -> dict[str, torch.Tensor]:
    """Model inputs of one batch in the given layout (PooledClassifier takes either)."""
    if layout == "packed":
        return pack_batch(seqs, pad_id, width)
    ids, mask = pad_batch(seqs, pad_id)
    return {"input_ids": ids, "attention_mask": mask}

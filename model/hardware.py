"""Which inference components a GPU gets: one pure decision (`resolve_components`), and the T4 kernel set.

A T4 (compute capability 7.5, Kaggle's 2xT4) has fp16 tensor cores and int8 tensor cores but no
bf16, no fp8, no FlashAttention-2, no Triton lowering of flex attention and 15 GB per card. On it
(`infer.profile=auto` on any 7.x GPU, or `infer.profile=t4` anywhere, to measure the T4 path on a
larger GPU) inference uses only what exists there:
- fp16 compute (a bf16 or fp32 setting is replaced, with the reason printed); fp8 is replaced by
  nothing (printed); the weight format is the loaded one, or `infer.int8` (model/int8.py);
- the padded layout (token-budget batches, rows x longest row <= infer.token_budget), never
  packed/flex attention and never torch.compile;
- attention: SDPA restricted to its memory-efficient and math kernels where the run was trained
  with Gemma-2 soft-capping off (`model.attn_softcapping=false`) or the model has none (Llama);
  eager where the run was trained with soft-capping (SDPA would silently drop it);
- each worker capped at 15 GiB of GPU memory when the GPU is larger (`t4_memory_cap`).
Elsewhere (`default`: compute capability >= 8.0, or CPU) the choices are the ones inference always
made. Everything is decided by `resolve_components` from (capability, model type, model config,
inference settings), with no device or file access, so a CPU test can ask it about any GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

from cli.config import ConfigError
from model.settings import InferSettings, ModelConfig

T4_CAPABILITY = (7, 5)
T4_MEMORY_GIB = 15
# Eager attention on the T4 profile: rows x longest row^2 per batch. Gemma-2's eager scores (16 heads, fp16 then the
# fp32 softmax, soft-capping temporaries) at 2 rows of 2,048 take ~2 GB; at the 16,384-token budget's 8 rows they ran
# out of the 15 GiB cap next to a whole 9B model in T4 mode (README: Performance, T4 mode).
T4_EAGER_SCORE_BUDGET = 2 * 2048**2
SDPA_T4_BACKENDS = ("EFFICIENT_ATTENTION", "MATH")  # sm75 has no FlashAttention(-2) and no cuDNN attention
SDPA_ALIAS = "arena_scaled_dot_product"  # transformers' sdpa function under a name Gemma-2 accepts (no "sdpa" in it:
# transformers refuses any name containing "sdpa" on a model that declares no SDPA support)


def softcapped(model_type: str, cfg: ModelConfig) -> bool:
    """Does the model as built apply attention soft-capping (Gemma-2 with model.attn_softcapping)?"""
    return model_type == "gemma2" and cfg.attn_softcapping


def padded_attention(model_type: str, cfg: ModelConfig) -> tuple[str, str]:
    """(attn_implementation, why) for the padded layout: the one rule of load_base and of the T4 path.

    auto: eager where soft-capping applies (SDPA ignores it), sdpa otherwise. sdpa with soft-capping
    is a contradiction and refused (ConfigError), not silently run without the cap.
    """
    capped = softcapped(model_type, cfg)
    if cfg.attn_implementation == "sdpa" and capped:
        raise ConfigError("model.attn_implementation=sdpa on Gemma-2 with model.attn_softcapping=true: SDPA ignores "
                          "soft-capping and would compute another function; use attn_implementation=eager (or auto), "
                          "or train with model.attn_softcapping=false")
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation, f"model.attn_implementation={cfg.attn_implementation}"
    if capped:
        return "eager", "Gemma-2 trained with attention soft-capping: eager (SDPA would drop the cap)"
    if model_type == "gemma2":
        return "sdpa", "Gemma-2 trained with soft-capping off (model.attn_softcapping=false): SDPA"
    return "sdpa", f"{model_type or 'model'} has no soft-capping: SDPA"


@dataclasses.dataclass(frozen=True)
class Components:
    """What inference runs with, resolved: `model` and `infer` are the settings workers load and score with."""

    profile: str           # t4 | default
    model: ModelConfig     # base as built: compute_dtype, quantization, attn_implementation (resolved: eager | sdpa)
    infer: InferSettings   # layout packed | padded; fp8 / int8 / compile as they will run; profile resolved
    attention: str         # eager | sdpa | flex (packed)
    sdpa_backends: tuple[str, ...]  # () = torch's own choice; t4: memory-efficient and math only
    notes: tuple[str, ...]  # what was chosen and why, one line each (printed by infer predict)

    @property
    def layout(self) -> str:
        return self.infer.layout

    @property
    def weights(self) -> str:
        base = {"4bit": "NF4 4-bit", "8bit": "LLM.int8 8-bit", "none": self.model.compute_dtype}[self.model.quantization]
        if self.infer.int8:
            return "int8 W8A8 (LoRA merged, then per-channel int8 weights)"
        if self.infer.fp8:
            return "fp8 e4m3 (LoRA merged)"
        merged = self.infer.merge_lora and self.model.quantization == "none"
        split = f", layers split over {self.infer.pipeline} GPUs" if self.infer.pipeline > 1 else ""
        return f"{base}, LoRA {'merged' if merged else 'unmerged'}{split}"

    def describe(self) -> str:
        return (f"profile {self.profile}: {self.model.compute_dtype} compute, {self.weights}, {self.layout} layout, "
                f"{self.attention} attention" + (f" ({'/'.join(self.sdpa_backends)} kernels)" if self.sdpa_backends else "")
                + f", compile {'on' if self.infer.compile and self.layout == 'packed' else 'off'}")


def resolve_profile(profile: str, capability: tuple[int, int] | None) -> str:
    """auto: t4 on CUDA GPUs of compute capability 7.x, default on CPU (None) and on 8.0 or newer."""
    if profile != "auto":
        return profile
    return "t4" if capability is not None and capability < (8, 0) else "default"


def resolve_layout(layout: str, capability: tuple[int, int] | None) -> str:
    """auto: packed on GPUs of compute capability >= 8.0 (Ampere+), whose Triton kernels flex attention
    needs; padded on CPU (None: unfused flex attention would materialise width^2 scores) and on older
    GPUs such as Kaggle's T4."""
    if layout != "auto":
        return layout
    return "packed" if capability is not None and capability >= (8, 0) else "padded"


def resolve_components(capability: tuple[int, int] | None, model_type: str, model: ModelConfig,
                       infer: InferSettings) -> Components:
    """The components inference runs with on a device of `capability` (None: CPU), and why.

    `model` is the run's model config as inference builds it (model.settings.inference_model), so
    model.attn_softcapping is what the run was trained with; `model_type` is the base's
    config.json model_type (gemma2, llama, ...). Pure: no device, no files.
    """
    profile = resolve_profile(infer.profile, capability)
    if profile == "default":
        return _default(capability, model_type, model, infer)
    return _t4(capability, model_type, model, infer)


def _where(capability: tuple[int, int] | None) -> str:
    return "CPU" if capability is None else f"compute capability {capability[0]}.{capability[1]}"


def _default(capability, model_type: str, model: ModelConfig, infer: InferSettings) -> Components:
    layout = "padded" if infer.pipeline > 1 else resolve_layout(infer.layout, capability)
    where = _where(capability)
    notes = [f"profile default ({where}; infer.profile={infer.profile})",
             f"{layout} layout" + (" (infer.pipeline > 1)" if infer.pipeline > 1 and infer.layout == "auto" else
                                   f" (infer.layout=auto on {where})" if infer.layout == "auto" else "")]
    if layout == "packed":
        attention = "flex"
        notes.append("flex attention over packed rows (soft-capping, if any, as a score_mod)")
        resolved_model = model
    else:
        attention, why = padded_attention(model_type, model)
        notes.append(why)
        resolved_model = dataclasses.replace(model, attn_implementation=attention)
    budget = score_budget(infer, attention, "default", notes)
    if infer.pipeline > 1:
        notes.append(pipeline_note(infer.pipeline))
    resolved = dataclasses.replace(infer, layout=layout, profile="default", score_budget=budget)
    return Components("default", resolved_model, resolved, attention, (), tuple(notes))


def _t4(capability, model_type: str, model: ModelConfig, infer: InferSettings) -> Components:
    where = _where(capability)
    notes = [f"profile t4 ({where}; infer.profile={infer.profile}): only sm75 kernels"]
    changes: dict = {}
    if model.compute_dtype != "float16":
        why = "T4 (sm75) has no bf16" if model.compute_dtype == "bfloat16" else "fp32 has no T4 tensor cores"
        notes.append(f"compute_dtype {model.compute_dtype} -> float16 ({why})")
    notes.append("fp16 compute")
    if infer.fp8:
        notes.append("infer.fp8=true ignored: fp8 tensor cores need compute capability >= 8.9 (T4 has none)")
        changes["fp8"] = False
    if infer.layout == "packed":
        notes.append("infer.layout=packed -> padded: packed rows need flex attention, which has no Triton kernel below sm80")
    notes.append("padded layout: token-budget batches (rows x longest row <= infer.token_budget, "
                 f"<= {infer.max_rows} rows)")
    if infer.compile:
        notes.append("torch.compile off (no Triton/compile on the T4 path; padded shapes vary per batch)")
    attention, why = padded_attention(model_type, model)
    notes.append(why)
    backends = SDPA_T4_BACKENDS if attention == "sdpa" else ()
    if backends:
        notes.append("SDPA limited to the memory-efficient and math kernels (no FlashAttention-2 on sm75)")
    if infer.int8:
        notes.append("weights: LoRA merged into the fp16 base, then int8 W8A8 projections (model/int8.py)")
    elif model.quantization != "none":
        notes.append(f"weights: {model.quantization} bitsandbytes base, LoRA unmerged")
    else:
        notes.append("weights: fp16, LoRA merged" if infer.merge_lora else "weights: fp16, LoRA unmerged")
    if infer.pipeline > 1:
        notes.append(pipeline_note(infer.pipeline))
    resolved_model = dataclasses.replace(model, compute_dtype="float16", attn_implementation=attention)
    changes["score_budget"] = score_budget(infer, attention, "t4", notes)
    resolved = dataclasses.replace(infer, layout="padded", compile=False, profile="t4", **changes)
    components = Components("t4", resolved_model, resolved, attention, backends, tuple(notes))
    check_t4_components(components)
    return components


def pipeline_note(gpus: int) -> str:
    return (f"decoder layers split over {gpus} GPUs per worker (infer.pipeline={gpus}), the stages on consecutive "
            "batches at once")


def score_budget(infer: InferSettings, attention: str, profile: str, notes: list[str]) -> int:
    """The resolved infer.score_budget (-1: no limit): only eager attention holds rows x width^2 scores per head."""
    if attention != "eager":
        if infer.score_budget > 0:
            notes.append(f"infer.score_budget={infer.score_budget} ignored: {attention} attention keeps no score matrices")
        return -1
    budget = infer.score_budget or (T4_EAGER_SCORE_BUDGET if profile == "t4" else -1)
    if budget > 0:
        source = "infer.score_budget" if infer.score_budget else "auto on the T4 profile, to fit 15 GiB"
        notes.append(f"eager attention: rows x longest row^2 <= {budget:,} per batch ({source})")
    return budget


@functools.cache
def register_sdpa_alias() -> str:
    """transformers' own SDPA attention and mask under SDPA_ALIAS: Gemma-2 declares no SDPA support (for its
    soft-capping), so with soft-capping off it loads SDPA under this name. transformers' sdpa function
    itself raises if a soft-cap reaches it, so a capped model can never run it silently."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SDPA_ALIAS, sdpa_attention_forward)
    AttentionMaskInterface.register(SDPA_ALIAS, sdpa_mask)
    return SDPA_ALIAS


def attention_name(attention: str, model_type: str) -> str:
    """The attn_implementation transformers is given for `attention`: SDPA on Gemma-2 under SDPA_ALIAS."""
    if attention == "sdpa" and model_type == "gemma2":  # declares no SDPA support, for the cap it no longer has
        return register_sdpa_alias()
    return attention


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device; None on CPU."""
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def sdpa_backends(names: tuple[str, ...]):
    """A context limiting SDPA to the named backends (torch.nn.attention.SDPBackend); none: no limit."""
    if not names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, n) for n in names])


def t4_memory_cap(device: torch.device) -> str:
    """Cap this process at T4_MEMORY_GIB on a larger GPU (the T4 profile measured elsewhere); returns what was done."""
    if device.type != "cuda":
        return ""
    index = torch.cuda.current_device() if device.index is None else device.index  # the fraction needs an index
    total = torch.cuda.get_device_properties(index).total_memory
    cap = T4_MEMORY_GIB * 2**30
    if total <= cap:
        return ""
    torch.cuda.set_per_process_memory_fraction(cap / total, index)
    return f"GPU memory capped at {T4_MEMORY_GIB} GiB of {total / 2**30:.0f} GiB (T4 profile)"


def check_t4_components(components: Components) -> None:
    """Refuse a T4 resolution that would use a kernel sm75 lacks (a guard on resolve_components itself)."""
    c = components
    bad = [what for what, wrong in [
        ("bf16/fp32 compute", c.model.compute_dtype != "float16"), ("fp8", c.infer.fp8),
        ("packed/flex attention", c.layout != "padded" or c.attention == "flex"), ("torch.compile", c.infer.compile),
        ("SDPA beyond mem-efficient/math", c.attention == "sdpa" and set(c.sdpa_backends) - set(SDPA_T4_BACKENDS)),
    ] if wrong]
    if bad:
        raise ConfigError(f"T4 profile resolved to components sm75 lacks: {', '.join(bad)}")

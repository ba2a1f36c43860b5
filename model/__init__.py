"""The model layer shared by training and inference: base loading, LoRA, the pooled head, packing, fp8, run folders."""
import logging


def _not_the_kernels_request(record: logging.LogRecord) -> bool:
    # bitsandbytes' CPU backend asks, when first imported (by peft and transformers too), for the `kernels`
    # package, which fetches kernels from the hub at run time; this repo never does that and bitsandbytes
    # runs correctly without it. This one message of that one logger is dropped; nothing else is.
    return "pip install kernels" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_kernels_request)

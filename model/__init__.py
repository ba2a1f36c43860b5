"""The model layer shared by training and inference: base loading, LoRA, the pooled head, packing, fp8, run folders."""

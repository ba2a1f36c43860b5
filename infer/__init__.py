"""Inference: the one module that scores rows for CV (OOF) and for the Kaggle submission."""

"""Data loading, formatting, folds and the synthetic sample for arena-pref."""

"""Length features of a comparison, shared by the length baseline model and ensemble stacking.

Length is the strongest single signal in preference data (the longer answer wins most non-tie
votes), so every model is measured against these features and stacking may use them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

FEATURES = (
    "log_len_a", "log_len_b", "log_len_diff", "abs_log_len_diff", "log_len_prompt",
    "turns", "empty_a", "empty_b", "same_response",
)


def length_features(df: pd.DataFrame) -> pd.DataFrame:
    """One row per comparison (index = id) from list-valued prompt/response_a/response_b columns."""
    chars = {c: df[c].map(lambda turns: sum(len(t) for t in turns)).to_numpy(float) for c in ("prompt", "response_a", "response_b")}
    log_a, log_b = np.log1p(chars["response_a"]), np.log1p(chars["response_b"])
    out = pd.DataFrame(
        {
            "log_len_a": log_a,
            "log_len_b": log_b,
            "log_len_diff": log_a - log_b,
            "abs_log_len_diff": np.abs(log_a - log_b),
            "log_len_prompt": np.log1p(chars["prompt"]),
            "turns": df["prompt"].map(len).to_numpy(float),
            "empty_a": (chars["response_a"] == 0).astype(float),
            "empty_b": (chars["response_b"] == 0).astype(float),
            "same_response": (df["response_a"].map(tuple) == df["response_b"].map(tuple)).to_numpy(float),
        },
        index=pd.Index(df["id"], name="id"),
    )
    return out[list(FEATURES)]

"""`train.export --merge-folds`: one adapter per member holding exactly the mean of its folds' LoRA updates.

Fold k's update is ΔW_k = s·B_k·A_k (s = lora_alpha / r). Averaging A and B element-wise, as the
1st-place write-up did, gives mean(B)·mean(A): a different update, since every fold starts from its
own random A. Here the A's are stacked and the B's placed side by side over K, one LoRA of rank K·r
whose B·A is (1/K)·Σ B_k·A_k, at the same scale; heads (any other saved module) are averaged.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from cli.config import UserError
from model.files import head_checksum
from model.run import ADAPTER_FILE, adapter_head, read_manifest, write_manifest


class MergeError(UserError, ValueError):
    """Fold adapters that cannot be merged into one; the message names the run."""


def merge_lora_exactly(tensors: list[dict], lora: dict) -> tuple[dict, dict]:
    """(adapter tensors, adapter config) of one LoRA whose update is exactly the mean of the folds' updates.

    Fold k's update is ΔW_k = s·B_k·A_k (s = lora_alpha / r). Its A's stacked (rows) and B's placed side
    by side and divided by K give one adapter of rank K·r with B·A = (1/K)·Σ B_k·A_k; lora_alpha is
    scaled so that s is unchanged. (Averaging A and B element-wise instead, as the 1st-place write-up
    did, gives mean(B)·mean(A): a different update, since every fold starts from its own random A.)
    Any other saved module (the head) is the element-wise mean of the folds'.
    """
    import torch

    if lora.get("rank_pattern") or lora.get("alpha_pattern"):
        raise MergeError("--merge-folds: adapters with per-module rank_pattern/alpha_pattern are not supported")
    k = len(tensors)
    merged = {}
    for key, first in tensors[0].items():
        if ".lora_A." in key:
            merged[key] = torch.cat([t[key] for t in tensors], dim=0)
        elif ".lora_B." in key:
            merged[key] = (torch.cat([t[key].float() for t in tensors], dim=1) / k).to(first.dtype)
        else:
            merged[key] = torch.stack([t[key].float() for t in tensors]).mean(0).to(first.dtype)
    # rsLoRA scales by alpha / sqrt(r): the same scale at rank K·r needs alpha·sqrt(K) instead of alpha·K
    alpha = lora["lora_alpha"] * (k ** 0.5 if lora.get("use_rslora") else k)
    return merged, {**lora, "r": lora["r"] * k, "lora_alpha": alpha}


def update_gap(tensors: list[dict], merged: dict, probes: int = 4) -> float:
    """max |merged B·A·x - mean_k B_k·A_k·x| over the LoRA modules, for random x: the merged adapter checked
    against its definition on the tensors alone (cheap: never forms a full ΔW)."""
    import torch

    gen, worst = torch.Generator().manual_seed(0), 0.0
    for key in (k for k in merged if ".lora_A." in k):
        b_key = key.replace(".lora_A.", ".lora_B.")
        x = torch.randn(merged[key].shape[1], probes, generator=gen, dtype=torch.float64)
        mean = sum(t[b_key].double() @ (t[key].double() @ x) for t in tensors) / len(tensors)
        worst = max(worst, float((merged[b_key].double() @ (merged[key].double() @ x) - mean).abs().max()))
    return worst


def same_lora(config: dict) -> dict:
    """An adapter config as compared between folds: peft saves target_modules (a set) in each process's hash order."""
    return {k: sorted(v) if k in ("target_modules", "modules_to_save") and isinstance(v, list) else v for k, v in config.items()}


def merge_folds(member_out: Path, runs: list[str]) -> dict:
    """The folds' mean LoRA update written exactly as one adapter (merge_lora_exactly) -> member_out/merged."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    first = member_out / runs[0]
    tensors = [load_file(member_out / r / ADAPTER_FILE) for r in runs]
    lora = json.loads((first / "adapter/adapter_config.json").read_text())
    for r, t in zip(runs[1:], tensors[1:]):
        if {k: v.shape for k, v in t.items()} != {k: v.shape for k, v in tensors[0].items()}:
            raise MergeError(f"{member_out / r}: adapter tensors differ in names or shapes from {first}; cannot merge")
        if same_lora(json.loads((member_out / r / "adapter/adapter_config.json").read_text())) != same_lora(lora):
            raise MergeError(f"{member_out / r}: LoRA config differs from {first}; cannot merge")
    merged, merged_lora = merge_lora_exactly(tensors, lora)
    out = member_out / "merged"
    shutil.copytree(first / "tokenizer", out / "tokenizer")
    (out / "adapter").mkdir(parents=True)
    (out / "adapter/adapter_config.json").write_text(json.dumps(merged_lora, indent=2, sort_keys=True))
    with safe_open(first / ADAPTER_FILE, "pt") as fh:
        metadata = fh.metadata()
    save_file(merged, out / ADAPTER_FILE, metadata=metadata)
    config = yaml.safe_load((first / "config.yaml").read_text())
    config["model"] = {**config["model"], "lora_r": merged_lora["r"], "lora_alpha": merged_lora["lora_alpha"]}
    (out / "config.yaml").write_text(yaml.safe_dump({**config, "fold": "merged"}, sort_keys=False))
    manifest = read_manifest(first)
    key, head = adapter_head(out)
    for stale in ("metrics", "settings", "files"):
        manifest.pop(stale, None)
    gap = update_gap(tensors, merged)
    manifest.update(fold="merged", merged_from=runs, head={"key": key, "shape": list(head.shape), "sha256": head_checksum(head)},
                    merge={"method": "mean of the folds' LoRA updates, rank K*r", "rank": merged_lora["r"],
                           "max_abs_update_gap": gap})
    write_manifest(out, manifest)
    print(f"merge-folds: {len(runs)} folds of {member_out.name} -> one LoRA of rank {merged_lora['r']} holding the mean of "
          f"their updates (largest deviation from it on random probes: {gap:.2e}); heads averaged")
    return {"rank": merged_lora["r"], "max_abs_update_gap": gap}

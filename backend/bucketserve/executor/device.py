"""Where an executor runs and in which dtype, from the ``device`` and ``dtype`` parameters."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bfloat16 on a GPU that has it (float16 on older ones); on the CPU the checkpoint's own
    dtype (None), whose greedy tokens match transformers' reference exactly. bfloat16 on a CPU with
    native support measured faster here (README, Deployment) and is one parameter away."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None

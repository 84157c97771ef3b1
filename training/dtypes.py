"""Floating-point dtypes by the names that configs and the command line use: fp32, bf16 and fp16."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Name -> torch dtype; the names of DeepSpeed's precision sections and of ``--dtype``."""

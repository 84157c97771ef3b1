"""Training FLOPs of BERT, peak tensor-core FLOP/s of known GPUs, and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import torch

from training.models.bert_config import BertConfig

# Dense (no sparsity) bf16/fp16 tensor-core peaks from NVIDIA's datasheets, most specific name first:
# the device name of an H100 SXM is e.g. "NVIDIA H100 80GB HBM3", of the PCIe card "NVIDIA H100 PCIe".
_HALF_PRECISION_PEAKS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIE", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
)
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def bert_train_flops_per_sequence(config: BertConfig, seq_len: int, masked_fraction: float = 0.15) -> float:
    """Matmul FLOPs of one forward + backward pass over one sequence (the numerator of MFU).

    Forward: each dense layer costs 2 FLOPs per weight per token, attention 2 * 2 * seq_len * hidden per
    token and layer (scores and weighted values); the MLM head runs on the masked positions only, as the
    model does. Backward costs twice the forward, hence the factor 3 (the "6 * parameters" rule).
    Padding positions count: the encoder computes them. Activation-checkpointing recompute is not
    counted, as MFU (unlike hardware FLOPs utilisation) does not count it. Embedding lookups, softmax,
    LayerNorm and activations are not matmuls and are left out.

    Args:
        config: The model architecture.
        seq_len: Positions per sequence, padding included.
        masked_fraction: Fraction of positions with an MLM label. Defaults to 0.15.
    """
    hidden, intermediate = config.hidden_size, config.intermediate_size
    # q, k, v and output projections (4 * h^2 weights) plus the feed-forward pair (2 * h * i weights).
    dense_per_token = 2 * (4 * hidden * hidden + 2 * hidden * intermediate)
    attention_per_token = 2 * 2 * seq_len * hidden
    encoder = seq_len * config.num_hidden_layers * (dense_per_token + attention_per_token)
    # Transform (h^2) and vocabulary decoder (h * vocab) on the masked positions.
    mlm_head = masked_fraction * seq_len * 2 * (hidden * hidden + hidden * config.vocab_size)
    # Pooler (h^2) and the two-way classifier on the [CLS] position.
    sentence_head = 2 * (hidden * hidden + 2 * hidden) if config.next_sentence_head else 0
    return 3.0 * (encoder + mlm_head + sentence_head)


def peak_flops_for_gpu(device_name: str, dtype: torch.dtype) -> float | None:
    """Dense tensor-core peak FLOP/s of a GPU by its ``torch.cuda.get_device_name``, or None if unknown.

    Only bf16 and fp16 are listed: fp32 peaks depend on whether TF32 is on, so MFU is not reported there.
    """
    if dtype not in _HALF_DTYPES:
        return None
    name = device_name.upper()
    for marker, peak in _HALF_PRECISION_PEAKS:
        if marker in name:
            return peak
    return None


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of ``device`` for matmuls in ``dtype``; None on CPU or for an unlisted GPU or dtype."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_flops_for_gpu(torch.cuda.get_device_name(device), dtype)


def mfu(achieved_flops_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved over peak FLOP/s (a fraction, 0.4 means 40%).

    Raises:
        ValueError: if ``peak`` is not positive.
    """
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return achieved_flops_per_s / peak

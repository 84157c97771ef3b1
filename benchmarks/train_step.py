"""Time a training step (forward, backward, AdamW) of our BERT against transformers' BertForPreTraining.

    python benchmarks/train_step.py                               # CPU: mini, batch 32, seq 128, fp32
    python benchmarks/train_step.py --size small --steps 5        # another size
    python benchmarks/train_step.py --device cuda                 # GPU: comparison in bf16, then the MFU
                                                                  # of base and large, bf16 and fp16

Both models get the same weights (transformers loads our state_dict unchanged), the same padded batch with
15% MLM labels and NSP labels, and the same optimizer; steps alternate between them so that a busy
machine slows both alike. The printed ratio is ours / transformers (below 1 means ours is faster); most of
the gain comes from running the vocabulary projection on the masked positions only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import transformers
from torch import nn

from training.dtypes import DTYPES
from training.flops import bert_train_flops_per_sequence, mfu, peak_flops
from training.models.bert import BertForPreTraining
from training.models.bert_config import BertConfig, bert_config


def make_batch(
    batch_size: int, seq_len: int, vocab_size: int, mask_prob: float, padded: bool, device: torch.device
) -> dict[str, torch.Tensor]:
    """Random ids, lengths between half and all of seq_len when ``padded``, labels on ``mask_prob`` of tokens."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=generator)
    if padded:
        lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=generator)
    else:
        lengths = torch.full((batch_size,), seq_len)
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()  # (batch, seq)
    input_ids[attention_mask == 0] = 0
    chosen = (torch.rand(batch_size, seq_len, generator=generator) < mask_prob) & (attention_mask == 1)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": (torch.arange(seq_len)[None, :] >= lengths[:, None] // 2).long() * attention_mask,
        "labels": labels,
        "next_sentence_label": torch.randint(0, 2, (batch_size,), generator=generator),
    }
    return {name: tensor.to(device) for name, tensor in batch.items()}


class Stepper:
    """One model with its optimizer (and fp16 loss scaler): ``step()`` runs and times one training step."""

    def __init__(self, model: nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.model = model.train()
        self.batch = batch
        self.device = next(model.parameters()).device
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)
        enabled = dtype != torch.float32
        self.autocast: Callable[[], object] = (
            (lambda: torch.autocast(self.device.type, dtype=dtype)) if enabled else nullcontext
        )

    def step(self) -> float:
        """Seconds for forward, backward and optimizer step (device synchronised)."""
        self._sync()
        start = time.perf_counter()
        with self.autocast():
            loss = self.model(**self.batch).loss
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        return time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def transformers_twin(model: BertForPreTraining) -> nn.Module:
    """transformers' BertForPreTraining of the same config and weights (its default attention, SDPA)."""
    twin = transformers.BertForPreTraining(transformers.BertConfig(**model.hf_config()))
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin


def compare(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """Alternate steps of ours and transformers' model; print both medians and their ratio."""
    config = bert_config(args.size, args.vocab_size)
    torch.manual_seed(0)
    ours = BertForPreTraining(config).to(device)
    theirs = transformers_twin(ours).to(device)
    batch = make_batch(args.batch_size, args.seq_len, args.vocab_size, args.mask_prob, True, device)
    steppers = {"ours": Stepper(ours, batch, dtype), "transformers": Stepper(theirs, batch, dtype)}
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for index in range(args.warmup + args.steps):
        for name, stepper in steppers.items():
            seconds = stepper.step()
            if index >= args.warmup:
                times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"{args.size} ({ours.num_parameters() / 1e6:.1f}M params), batch {args.batch_size}, seq {args.seq_len}, "
        f"vocab {args.vocab_size}, {args.mask_prob:.0%} masked, {device.type} {args.dtype}, "
        f"{torch.get_num_threads()} threads, median of {args.steps} after {args.warmup} warm-up"
    )
    print(f"{'model':<14} {'step s':>8} {'samples/s':>10}")
    for name, seconds in medians.items():
        print(f"{name:<14} {seconds:8.3f} {args.batch_size / seconds:10.1f}")
    print(f"ratio ours/transformers: {medians['ours'] / medians['transformers']:.3f}")


def measure_mfu(args: argparse.Namespace, device: torch.device) -> None:
    """MFU of our model for base and large at seq 128 (unpadded batches), under bf16 and fp16 autocast."""
    print(f"\nMFU on {torch.cuda.get_device_name(device)}, seq {args.seq_len}, batch {args.mfu_batch_size}")
    print(f"{'size':<6} {'dtype':<5} {'step s':>8} {'TFLOP/s':>8} {'MFU':>6}")
    for size in ("base", "large"):
        for dtype_name in ("bf16", "fp16"):
            config = bert_config(size, args.vocab_size)
            seconds, masked_fraction = _time_our_model(args, config, device, DTYPES[dtype_name])
            flops = bert_train_flops_per_sequence(config, args.seq_len, masked_fraction) * args.mfu_batch_size
            peak = peak_flops(device, DTYPES[dtype_name])
            utilisation = f"{mfu(flops / seconds, peak):6.1%}" if peak else "   n/a"
            print(f"{size:<6} {dtype_name:<5} {seconds:8.3f} {flops / seconds / 1e12:8.1f} {utilisation}")


def _time_our_model(
    args: argparse.Namespace, config: BertConfig, device: torch.device, dtype: torch.dtype
) -> tuple[float, float]:
    """Median step seconds of our model and the masked fraction of the batch it ran on."""
    torch.manual_seed(0)
    model = BertForPreTraining(config).to(device)
    batch = make_batch(args.mfu_batch_size, args.seq_len, args.vocab_size, args.mask_prob, False, device)
    stepper = Stepper(model, batch, dtype)
    times = [stepper.step() for _ in range(args.warmup + args.steps)][args.warmup :]
    masked_fraction = float((batch["labels"] != -100).float().mean())
    del stepper, model
    torch.cuda.empty_cache()
    return statistics.median(times), masked_fraction


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", default="mini", help="BERT size of the comparison")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="autocast dtype; default fp32 on CPU, bf16 on GPU"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--mask-prob", type=float, default=0.15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--mfu-batch-size", type=int, default=128, help="batch of the GPU MFU runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    compare(args, device, DTYPES[args.dtype])
    if device.type == "cuda":
        measure_mfu(args, device)


if __name__ == "__main__":
    main()

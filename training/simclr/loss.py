"""NT-Xent (normalised temperature-scaled cross entropy) with negatives gathered from every rank.

With ``W`` ranks each holding ``B`` pairs, the ``2B`` local embeddings are the anchors and the
``2WB`` gathered embeddings the candidates, so every anchor sees ``2WB - 2`` negatives, as with one
rank holding all ``WB`` pairs. The gather is differentiable: its backward sums, over ranks, the
gradient that each rank's loss sends to each embedding and hands every rank the part for its own
rows. Each rank's loss is the mean over its own anchors, so once the data-parallel engine averages
gradients over ranks (as DDP and DeepSpeed do), the update equals that of the full-batch loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns each rank the summed gradient of its own rows."""

    @staticmethod
    def forward(ctx: FunctionCtx, rows: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        gathered = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(gathered, rows.contiguous())
        ctx.rank, ctx.count = dist.get_rank(), rows.shape[0]  # type: ignore[attr-defined]
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        rank, count = ctx.rank, ctx.count  # type: ignore[attr-defined]
        if dist.get_backend() == dist.Backend.NCCL:
            own = torch.empty_like(grad[:count])
            dist.reduce_scatter_tensor(own, grad)
            return own
        # gloo has no reduce-scatter: sum everything, keep this rank's slice.
        dist.all_reduce(grad)
        return grad[rank * count : (rank + 1) * count]


def gather_with_grad(rows: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, in rank order, ``(world * n, ...)``; the identity without a process group."""
    return _GatherRows.apply(rows) if _distributed() else rows


@torch.no_grad()
def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows of every rank (equal counts on every rank), in rank order, without gradient."""
    if not _distributed():
        return rows
    gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, rows.contiguous())
    return torch.cat(gathered)


@dataclass
class ContrastiveOutput:
    """The loss of one rank's anchors and how often the positive is their most similar candidate."""

    loss: torch.Tensor
    """Scalar mean NT-Xent over this rank's ``2B`` anchors (differentiable)."""
    accuracy: torch.Tensor
    """Scalar share of anchors whose nearest candidate (self excluded) is their positive (no gradient)."""


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> ContrastiveOutput:
    """NT-Xent of this rank's pairs ``(z1[i], z2[i])`` against the candidates of all ranks.

    Anchor ``k`` of the local ``2B`` (``z1`` then ``z2``) has loss
    ``-log(exp(s_kp / t) / sum_{j != k} exp(s_kj / t))`` where ``s`` is cosine similarity, ``p`` its
    positive and ``j`` runs over all ``2WB`` gathered embeddings.

    Args:
        z1: (B, dim) projections of the first views.
        z2: (B, dim) projections of the second views, row ``i`` paired with ``z1[i]``.
        temperature: Softmax temperature. Defaults to 0.1.
    """
    batch = z1.shape[0]
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    # Similarities in float32 even under bf16 autocast: 1/temperature magnifies rounding errors.
    with torch.autocast(device_type=z1.device.type, enabled=False):
        local = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, dim)
        # (W, 2, B, dim) -> candidates ordered as [all z1 of all ranks, all z2 of all ranks]: (2WB, dim)
        gathered = gather_with_grad(local).view(world, 2, batch, -1).transpose(0, 1).flatten(0, 2)
        logits = local @ gathered.T / temperature  # (2B, 2WB)
    global_rows = rank * batch + torch.arange(batch, device=local.device)
    self_index = torch.cat([global_rows, global_rows + world * batch])  # (2B,)
    positive_index = torch.cat([global_rows + world * batch, global_rows])
    # An anchor is not its own candidate.
    logits = logits.masked_fill(
        F.one_hot(self_index, 2 * world * batch).bool(), torch.finfo(logits.dtype).min
    )
    loss = F.cross_entropy(logits, positive_index)
    accuracy = (logits.detach().argmax(dim=1) == positive_index).float().mean()
    return ContrastiveOutput(loss, accuracy)

"""SimCLR v1 model: a ResNet encoder, a 2-layer projection MLP and the NT-Xent loss (pure PyTorch).

The model is written for one device. For the paper's global BatchNorm across devices convert it
with ``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` before handing it to the engine; the loss
already draws its negatives from every rank (see :mod:`training.simclr.loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from data_pipeline.errors import UserError
from training.models.resnet import ResNet, resnet
from training.simclr.loss import nt_xent


@dataclass
class SimCLROutput:
    """What one forward pass over a batch of view pairs returns."""

    loss: torch.Tensor
    """Scalar NT-Xent of this rank's anchors (differentiable)."""
    accuracy: torch.Tensor
    """Scalar share of anchors whose most similar candidate is their positive (no gradient)."""


class ProjectionHead(nn.Module):
    """SimCLR v1's non-linear head: Linear -> BN -> ReLU -> Linear -> BN (the reference code's layout).

    Args:
        in_dim: Encoder feature width.
        hidden_dim: Hidden width (SimCLR: the feature width).
        out_dim: Projection width. Defaults to 128.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        # Biases are left out: each Linear is followed by a BatchNorm that would cancel them.
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
            nn.BatchNorm1d(out_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class SimCLRModel(nn.Module):
    """Encoder plus projection head; ``forward(view1, view2)`` returns the contrastive loss.

    Args:
        encoder: A ResNet built without ``fc`` (its ``forward`` returns pooled features).
        projection_hidden_dim: Hidden width of the head. Defaults to None (the feature width).
        projection_dim: Output width of the head. Defaults to 128.
        temperature: NT-Xent temperature. Defaults to 0.1.
    """

    def __init__(
        self,
        encoder: ResNet,
        projection_hidden_dim: int | None = None,
        projection_dim: int = 128,
        temperature: float = 0.1,
    ) -> None:
        super().__init__()
        if encoder.fc is not None:
            raise UserError("the SimCLR encoder must be built without a classifier (num_classes=None)")
        if not temperature > 0:
            raise UserError(f"simclr temperature must be > 0, got {temperature!r}")
        self.encoder = encoder
        self.projector = ProjectionHead(
            encoder.feature_dim, projection_hidden_dim or encoder.feature_dim, projection_dim
        )
        self.temperature = temperature

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, feature_dim) encoder features (for kNN and fine-tuning)."""
        return self.encoder(images)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> SimCLROutput:
        """NT-Xent of the pairs ``(view1[i], view2[i])``, both (B, 3, H, W) normalised float images."""
        if view1.shape != view2.shape:
            raise ValueError(f"views differ in shape: {tuple(view1.shape)} vs {tuple(view2.shape)}")
        batch = view1.shape[0]
        # One encoder pass over both views: BatchNorm statistics cover all 2B images, as in SimCLR.
        projections = self.projector(self.encoder(torch.cat([view1, view2])))  # (2B, projection_dim)
        output = nt_xent(projections[:batch], projections[batch:], self.temperature)
        return SimCLROutput(output.loss, output.accuracy)


def build_simclr(
    depth: int = 50,
    cifar_stem: bool = False,
    projection_hidden_dim: int | None = None,
    projection_dim: int = 128,
    temperature: float = 0.1,
    zero_init_residual: bool = False,
) -> SimCLRModel:
    """A :class:`SimCLRModel` over a ResNet of ``depth`` (18, 34, 50 or 101); see its arguments."""
    encoder = resnet(depth, num_classes=None, cifar_stem=cifar_stem, zero_init_residual=zero_init_residual)
    return SimCLRModel(encoder, projection_hidden_dim, projection_dim, temperature)

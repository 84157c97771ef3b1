"""SimCLR pieces: the ``simclr:`` config section and factories for its model, augmentation and optimizer.

Modules: :mod:`.model` (ResNet encoder + projection head + NT-Xent), :mod:`.loss` (NT-Xent with
negatives from every rank), :mod:`.lars` (LARS), :mod:`.augment` (on-device augmentation),
:mod:`.images` (two-view image loader; imported on its own as it pulls in the loaders) and
:mod:`.knn` (kNN monitor).

A training step with these pieces::

    model = build_model(cfg)                        # then SyncBatchNorm when cfg.sync_batchnorm
    optimizer = build_optimizer(model, cfg)         # a client optimizer for deepspeed.initialize
    generator = make_generator(device, seed, step, rank)
    view1 = augment(batch["view1"].to(device), augment_config(cfg), generator)
    view2 = augment(batch["view2"].to(device), augment_config(cfg), generator)
    output = model(view1, view2)                    # output.loss, output.accuracy

LARS needs whole parameters to compute per-layer trust ratios: use it with ZeRO stage 0 and fp32
master weights (``torch_autocast`` for bf16, not ``bf16.enabled``, whose optimizer wrapper hands
the optimizer flattened parameter groups).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from data_pipeline.errors import UserError
from training.simclr.augment import AugmentConfig, augment, make_generator
from training.simclr.lars import LARS, lars_param_groups
from training.simclr.loss import ContrastiveOutput, nt_xent
from training.simclr.model import SimCLRModel, SimCLROutput, build_simclr

__all__ = [
    "LARS",
    "AugmentConfig",
    "ContrastiveOutput",
    "SimCLRConfig",
    "SimCLRModel",
    "SimCLROutput",
    "augment",
    "augment_config",
    "build_model",
    "build_optimizer",
    "build_simclr",
    "lars_param_groups",
    "make_generator",
    "nt_xent",
]


@dataclass
class SimCLRConfig:
    """The ``simclr:`` section of a config: model, augmentation, optimizer and kNN monitor (ImageNet defaults)."""

    depth: int = 50
    """ResNet depth: 18, 34, 50 or 101."""
    cifar_stem: bool = False
    """3x3 stride-1 first convolution and no max-pool (for 32 px images)."""
    zero_init_residual: bool = False
    """Start the last BatchNorm scale of each residual block at zero."""
    projection_hidden_dim: int | None = None
    """Hidden width of the projection head. Defaults to None (the encoder's feature width)."""
    projection_dim: int = 128
    """Output width of the projection head."""
    temperature: float = 0.1
    """NT-Xent temperature (SimCLR: 0.1 for ImageNet, 0.5 for CIFAR-10)."""
    sync_batchnorm: bool = True
    """BatchNorm statistics over all ranks (the paper's global BN)."""
    image_size: int = 224
    """Side of the crops the loader makes."""
    crop_scale_min: float = 0.08
    """Smallest area share of a random resized crop."""
    jitter_strength: float = 1.0
    """Colour jitter strength ``s`` (SimCLR: 1.0 for ImageNet, 0.5 for CIFAR-10)."""
    blur_prob: float = 0.5
    """Gaussian blur probability (SimCLR: 0.5 for ImageNet, 0 for CIFAR-10)."""
    solarize_prob: float = 0.0
    """Solarize probability."""
    lr: float = 4.8
    """Peak learning rate (SimCLR: 0.3 x global batch / 256); the DeepSpeed scheduler scales it."""
    momentum: float = 0.9
    """LARS momentum."""
    weight_decay: float = 1.0e-6
    """Weight decay of weights (biases and norms get none)."""
    lars_trust_coefficient: float = 0.001
    """LARS ``eta``."""
    knn_k: int = 200
    """Neighbours of the kNN monitor."""
    knn_temperature: float = 0.1
    """Vote temperature of the kNN monitor."""
    eval_crop_fraction: float = 0.875
    """Central share of the shorter side kept for kNN features (1.0 for CIFAR)."""

    def validate(self) -> None:
        """Raise ``UserError`` naming the key of a value out of range."""
        for key in ("projection_dim", "image_size", "knn_k"):
            if getattr(self, key) < 1:
                raise UserError(f"simclr.{key}: expected a positive int, got {getattr(self, key)!r}")
        for key in ("temperature", "knn_temperature", "lr"):
            if not getattr(self, key) > 0:
                raise UserError(f"simclr.{key}: expected a value > 0, got {getattr(self, key)!r}")
        if not 0 < self.crop_scale_min <= 1:
            raise UserError(f"simclr.crop_scale_min: expected a value in (0, 1], got {self.crop_scale_min!r}")
        augment_config(self).validate()


def augment_config(config: SimCLRConfig) -> AugmentConfig:
    """The on-device augmentation of a ``simclr:`` section (other options at SimCLR's values)."""
    return AugmentConfig(
        strength=config.jitter_strength, blur_prob=config.blur_prob, solarize_prob=config.solarize_prob
    )


def build_model(config: SimCLRConfig) -> nn.Module:
    """The SimCLR model of a ``simclr:`` section, with SyncBatchNorm when asked for.

    SyncBatchNorm needs several processes on an accelerator: with one process, or with the gloo
    backend (CPU ranks, which PyTorch's SyncBatchNorm refuses), each rank keeps plain BatchNorm.
    """
    import torch.distributed as dist

    model: nn.Module = build_simclr(
        config.depth,
        config.cifar_stem,
        config.projection_hidden_dim,
        config.projection_dim,
        config.temperature,
        config.zero_init_residual,
    )
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if config.sync_batchnorm and distributed and dist.get_backend() != dist.Backend.GLOO:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_optimizer(model: nn.Module, config: SimCLRConfig) -> LARS:
    """LARS over ``model`` with biases and norm parameters excluded from decay and adaptation."""
    return LARS(
        lars_param_groups(model, config.weight_decay),
        lr=config.lr,
        momentum=config.momentum,
        trust_coefficient=config.lars_trust_coefficient,
    )

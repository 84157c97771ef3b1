"""SimCLR on image shards: two augmented views, NT-Xent over all ranks, LARS, kNN monitor."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from data_pipeline.errors import UserError
from training.data.loader import StepLoader
from training.deepspeed_config import zero_stage
from training.methods.base import MethodContext, MicroStep, stack_sums, val_split_problem
from training.simclr import (
    SimCLRConfig,
    augment,
    augment_config,
    build_model,
    build_optimizer,
    make_generator,
)
from training.simclr.augment import AugmentConfig
from training.simclr.images import (
    DEFAULT_IMAGE_WINDOW,
    CropConfig,
    ImageSource,
    image_eval_batches,
    image_loader,
    image_source,
)
from training.simclr.knn import collect_features, knn_accuracy

# The architecture fields of the simclr: section: a checkpoint resumes only with the same values.
ARCHITECTURE_FIELDS = ("depth", "cifar_stem", "projection_hidden_dim", "projection_dim")
SUM_NAMES = ("loss", "pos_acc")
"""What a micro-batch adds up: NT-Xent loss and the share of views whose positive scores highest."""


def check_deepspeed_for_lars(ds_config: dict[str, Any]) -> None:
    """LARS needs whole fp32 parameters: ZeRO stage 0, no DeepSpeed optimizer, no bf16/fp16 wrapper.

    Raises:
        UserError: Naming the ``deepspeed.`` key that conflicts.
    """
    if "optimizer" in ds_config:
        raise UserError(
            "deepspeed.optimizer: a simclr run uses LARS (simclr.lr, momentum, weight_decay, "
            "lars_trust_coefficient) as the client optimizer; remove the deepspeed.optimizer section"
        )
    if zero_stage(ds_config) != 0:
        raise UserError(
            f"deepspeed.zero_optimization.stage={zero_stage(ds_config)}: LARS computes per-layer trust "
            "ratios on whole parameters; use stage 0"
        )
    for key in ("bf16", "fp16"):
        if (ds_config.get(key) or {}).get("enabled"):
            raise UserError(
                f"deepspeed.{key}.enabled: LARS needs fp32 master weights; use "
                "deepspeed.torch_autocast {enabled: true, dtype: bfloat16} instead"
            )


def model_config_of(section: SimCLRConfig, feature_dim: int) -> dict[str, Any]:
    """What checkpoints record of the model (and ``pretrain export`` describes)."""
    recorded = {key: getattr(section, key) for key in ARCHITECTURE_FIELDS}
    return {"architecture": f"resnet{section.depth}", "feature_dim": feature_dim, **recorded}


@dataclass
class SimCLRMethod:
    """SimCLR on image shards; see :class:`training.methods.base.Method`."""

    context: MethodContext
    section: SimCLRConfig
    loader: StepLoader[ImageSource]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    augmentation: AugmentConfig
    knn_monitor: bool = True
    """Whether :meth:`evaluate` runs the kNN monitor (decided at start, see :func:`knn_monitor_for`)."""
    name: str = "simclr"
    data_fingerprint: str | None = None
    progress_keys: tuple[str, ...] = ("loss", "pos_acc", "lr", "images_per_s")
    sum_names: tuple[str, ...] = SUM_NAMES

    @property
    def model_config(self) -> dict[str, Any]:
        return model_config_of(self.section, self.model.encoder.feature_dim)

    def forward(self, engine: Any, batch: dict[str, Any], step: int, micro: int) -> MicroStep:
        env = self.context.env
        # Keyed by (step, micro-batch, rank): a resumed run draws the same augmentations as an unbroken one.
        generator = make_generator(env.device, self.context.config.train.seed, step, micro, env.rank)
        view1 = augment(batch["view1"].to(env.device, non_blocking=True), self.augmentation, generator)
        view2 = augment(batch["view2"].to(env.device, non_blocking=True), self.augmentation, generator)
        output = engine(view1, view2)
        sums = stack_sums(SUM_NAMES, {"loss": output.loss, "pos_acc": output.accuracy})
        return MicroStep(output.loss, sums, 0, int(batch["view1"].shape[0]))

    def step_metrics(self, sums: Mapping[str, float], micro_batches: int) -> dict[str, float]:
        return {name: sums[name] / micro_batches for name in SUM_NAMES}

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float on the device, normalised as the augmentation's output is."""
        device = self.context.env.device
        mean = torch.tensor(self.augmentation.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.augmentation.std, device=device).view(1, 3, 1, 1)
        return (images.to(device).float() / 255.0 - mean) / std

    def evaluate(self, engine: Any) -> dict[str, float]:
        """kNN accuracy of val images against a memory bank of train features (empty without labels/val)."""
        if not self.knn_monitor:
            return {}
        config, env = self.context.config, self.context.env
        common = {
            "micro_batch_size": self.context.ds_config["train_micro_batch_size_per_gpu"],
            "image_size": self.section.image_size,
            "rank": env.rank,
            "world_size": env.world_size,
            "eval_crop_fraction": self.section.eval_crop_fraction,
            "verify": self.context.verify_shards,
        }
        engine.eval()
        encode = engine.module.encode
        bank, bank_labels = collect_features(
            encode, image_eval_batches(self.context.data_dir, split="train", **common), self.normalise
        )
        queries, query_labels = collect_features(
            encode,
            image_eval_batches(
                self.context.data_dir, split="val", max_batches=config.train.val_batches or None, **common
            ),
            self.normalise,
        )
        engine.train()
        labelled = bank_labels >= 0
        scores = knn_accuracy(
            queries,
            query_labels,
            bank[labelled],
            bank_labels[labelled],
            len(self.loader.source.classes),
            self.section.knn_k,
            self.section.knn_temperature,
        )
        return {
            "knn_acc": scores["knn_top1"],
            **({"knn_top5": scores["knn_top5"]} if "knn_top5" in scores else {}),
        }

    def rates(self, samples_per_s: float, tokens_per_s: float) -> dict[str, float]:
        return {"images_per_s": samples_per_s}


def knn_data_problem(manifest: dict[str, Any], world_size: int) -> str | None:
    """Why a kNN monitor cannot run (unlabelled images, no val image for every rank), or None."""
    if not manifest.get("classes"):
        return "the images have no classes"
    return val_split_problem(manifest, world_size, "images")


def has_knn_data(manifest: dict[str, Any], world_size: int) -> bool:
    """Whether a kNN monitor can run: labelled images and a val split with an image for every rank."""
    return knn_data_problem(manifest, world_size) is None


def knn_monitor_for(context: MethodContext, section: SimCLRConfig, manifest: dict[str, Any]) -> bool:
    """Whether the run evaluates a kNN monitor (``train.val_every`` and usable data), decided at start.

    Data without labels or a usable ``val`` split trains without the monitor, with a warning; a
    usable ``val`` split is checked now (manifest entries, shard sizes) rather than at the first
    evaluation.
    """
    val_every = context.config.train.val_every
    if not val_every:
        return False
    problem = knn_data_problem(manifest, context.env.world_size)
    if problem is not None:
        context.warn(f"kNN validation skipped: {problem} (train.val_every={val_every} is ignored)")
        return False
    # Built for its checks only (each evaluation opens the split anew, as it does the train split).
    image_source(
        context.data_dir,
        "val",
        section.image_size,
        0,
        DEFAULT_IMAGE_WINDOW,
        CropConfig(),
        section.eval_crop_fraction,
        context.verify_shards,
    )
    return True


def build_simclr(context: MethodContext) -> SimCLRMethod:
    """The two-view image loader, the SimCLR model (SyncBatchNorm over ranks) and LARS."""
    config, env, ds_config = context.config, context.env, context.ds_config
    section = config.simclr
    if section is None:
        raise UserError("the simclr method needs a simclr: section in the config")
    check_deepspeed_for_lars(ds_config)
    loader = image_loader(
        context.data_dir,
        global_batch_size=ds_config["train_batch_size"],
        micro_batch_size=ds_config["train_micro_batch_size_per_gpu"],
        image_size=section.image_size,
        rank=env.rank,
        world_size=env.world_size,
        seed=config.train.seed,
        crop=CropConfig(scale_min=section.crop_scale_min),
        num_workers=config.data.num_workers,
        verify=context.verify_shards,
    )
    knn_monitor = knn_monitor_for(context, section, loader.source.manifest)
    model = build_model(section).to(env.device)
    optimizer = build_optimizer(model, section)
    return SimCLRMethod(context, section, loader, model, optimizer, augment_config(section), knn_monitor)

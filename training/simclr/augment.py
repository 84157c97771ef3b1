"""SimCLR's augmentations, batched on the training device: flip, colour jitter, grayscale, blur, solarize.

The random crop is done by the loader (it decides how much of the JPEG to decode); everything else
happens here on ``(batch, 3, H, W)`` uint8 tensors, with every random choice drawn per sample as a
tensor from one ``torch.Generator`` (no Python loop over images), in a fixed draw order so that
the same generator state gives the same output whichever options are on.

Colour jitter follows SimCLR (Chen et al., 2020, appendix A): with probability ``jitter_prob`` a
sample gets brightness, contrast and saturation factors from ``U(1 - 0.8s, 1 + 0.8s)`` and a hue
shift from ``U(-0.2s, 0.2s)``, applied in a random order of its own. Brightness, contrast and
saturation are blends ``f * x + (1 - f) * reference`` (black, the mean grey level, the grey image),
so a sample whose op in a slot is another one simply gets ``f = 1``; the hue shift is 0 there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data_pipeline.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as torchvision's rgb_to_grayscale


@dataclass
class AugmentConfig:
    """Probabilities and strengths of the on-device augmentations (SimCLR's ImageNet defaults)."""

    strength: float = 1.0
    """Colour jitter strength ``s`` (brightness, contrast, saturation 0.8s; hue 0.2s)."""
    flip_prob: float = 0.5
    """Probability of a horizontal flip."""
    jitter_prob: float = 0.8
    """Probability that a sample is colour jittered."""
    grayscale_prob: float = 0.2
    """Probability of converting a sample to grey."""
    blur_prob: float = 0.5
    """Probability of a Gaussian blur (SimCLR uses it for ImageNet, 0 for CIFAR)."""
    blur_sigma_min: float = 0.1
    """Smallest blur sigma, in pixels."""
    blur_sigma_max: float = 2.0
    """Largest blur sigma, in pixels."""
    blur_kernel_fraction: float = 0.1
    """Blur kernel size as a share of the image height (made odd, at least 3)."""
    solarize_prob: float = 0.0
    """Probability of solarizing (inverting values >= 0.5); 0 in SimCLR, 0.2 on one view in BYOL."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted from the [0, 1] output."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation the output is divided by."""

    def validate(self) -> None:
        """Raise ``UserError`` naming a field whose value is out of range."""
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"augmentation {name} must be in [0, 1], got {value!r}")
        if self.strength < 0:
            raise UserError(f"augmentation strength must be >= 0, got {self.strength!r}")
        if not 0.0 < self.blur_kernel_fraction <= 1.0:
            raise UserError(
                f"augmentation blur_kernel_fraction must be in (0, 1], got {self.blur_kernel_fraction!r}"
            )
        if not 0 < self.blur_sigma_min <= self.blur_sigma_max:
            raise UserError(
                f"augmentation blur sigma range ({self.blur_sigma_min!r}, {self.blur_sigma_max!r}) "
                "must satisfy 0 < min <= max"
            )


@dataclass
class AugmentParams:
    """Per-sample random choices of one batch, all tensors of length ``batch`` on the device."""

    flip: torch.Tensor
    """(B,) bool."""
    factors: torch.Tensor
    """(B, 4) float: brightness, contrast, saturation factors and hue shift (1, 1, 1, 0 = no jitter)."""
    order: torch.Tensor
    """(B, 4) long: the jitter ops of each sample in the order they are applied."""
    grayscale: torch.Tensor
    """(B,) bool."""
    blur_sigma: torch.Tensor
    """(B,) float; 0 means no blur."""
    solarize: torch.Tensor
    """(B,) bool."""


def sample_params(batch: int, config: AugmentConfig, generator: torch.Generator) -> AugmentParams:
    """Draw every random choice of a batch on the generator's device (fixed draw order)."""
    device = generator.device

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=device)

    flip = uniform(batch) < config.flip_prob
    jitter = uniform(batch) < config.jitter_prob
    spread = torch.tensor([0.8, 0.8, 0.8, 0.2], device=device) * config.strength
    factors = 1.0 + (2.0 * uniform(batch, 4) - 1.0) * spread  # (B, 4) in [1 - spread, 1 + spread]
    factors[:, _HUE] -= 1.0  # the hue shift is centred on 0, not 1
    factors[:, :_HUE] = factors[:, :_HUE].clamp(min=0.0)
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device)
    factors = torch.where(jitter[:, None], factors, identity)
    order = uniform(batch, 4).argsort(dim=1)  # a random permutation per sample
    grayscale = uniform(batch) < config.grayscale_prob
    blur = uniform(batch) < config.blur_prob
    sigma = config.blur_sigma_min + uniform(batch) * (config.blur_sigma_max - config.blur_sigma_min)
    solarize = uniform(batch) < config.solarize_prob
    return AugmentParams(flip, factors, order, grayscale, torch.where(blur, sigma, 0.0), solarize)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    weights = torch.tensor(_LUMA, device=images.device, dtype=images.dtype)
    return torch.einsum("bchw,c->bhw", images, weights).unsqueeze(1)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV with every channel in [0, 1] (torchvision's conventions)."""
    red, green, blue = images.unbind(dim=1)
    high, low = images.amax(dim=1), images.amin(dim=1)
    chroma = high - low
    # Grey pixels (chroma 0) get hue 0 and saturation 0, as in torchvision.
    safe_chroma = torch.where(chroma > 0, chroma, 1.0)
    saturation = chroma / torch.where(high > 0, high, 1.0)
    hue = torch.where(
        high == red,
        (green - blue) / safe_chroma,
        torch.where(high == green, 2.0 + (blue - red) / safe_chroma, 4.0 + (red - green) / safe_chroma),
    )
    hue = torch.remainder(hue / 6.0, 1.0)
    return torch.stack([hue, saturation, high], dim=1)


def hsv_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`.

    Uses the closed form ``c_n = v - v * s * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6h) mod 6`` and ``n = 5, 3, 1`` for red, green, blue, which needs no per-sector select.
    """
    hue, saturation, value = images.unbind(dim=1)
    offsets = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = torch.remainder(offsets + 6.0 * hue.unsqueeze(1), 6.0)  # (B, 3, H, W)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    chroma = (value * saturation).unsqueeze(1)
    return value.unsqueeze(1) - chroma * ramp


def shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each sample by ``shift`` (B,) turns."""
    hsv = rgb_to_hsv(images)
    hue = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))


def colour_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Apply each sample's four jitter ops in its own order (see the module docstring)."""
    for slot in range(4):
        op = order[:, slot]  # (B,)
        chosen = torch.gather(factors, 1, op[:, None]).squeeze(1)
        factor = torch.where(op == _HUE, 1.0, chosen).view(-1, 1, 1, 1)
        grey = grayscale(images)  # (B, 1, H, W)
        reference = torch.where(
            (op == _SATURATION).view(-1, 1, 1, 1),
            grey,
            grey.mean(dim=(1, 2, 3), keepdim=True) * (op == _CONTRAST).view(-1, 1, 1, 1),
        )
        images = (factor * images + (1.0 - factor) * reference).clamp(0.0, 1.0)
        images = _shift_hue_of(images, chosen, (op == _HUE) & (chosen != 0))
    return images


def _shift_hue_of(images: torch.Tensor, shift: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Shift the hue of the selected samples only.

    The HSV round trip is the costliest op; in each of the four slots about a fifth of the samples
    need it, so it runs on that subset (one small host sync for the subset's size) rather than on
    the whole batch with zero shifts.
    """
    index = selected.nonzero().squeeze(1)
    if index.numel() == 0:
        return images
    return images.index_copy(0, index, shift_hue(images[index], shift[index]))


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a sigma per sample (0: unchanged), reflect padding."""
    batch, channels, height, width = images.shape
    taps = torch.arange(kernel_size, device=images.device, dtype=images.dtype) - kernel_size // 2
    safe_sigma = torch.where(sigma > 0, sigma, 1.0).view(-1, 1)
    kernel = torch.exp(-(taps**2) / (2.0 * safe_sigma**2))  # (B, k)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    delta = (taps == 0).to(images.dtype).expand_as(kernel)
    kernel = torch.where((sigma > 0).view(-1, 1), kernel, delta)
    # One depthwise group per (sample, channel): (B*C, 1, k) kernels over a (1, B*C, H, W) input.
    kernel = kernel.repeat_interleave(channels, dim=0).view(batch * channels, 1, kernel_size)
    pad = kernel_size // 2
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.conv2d(
        F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernel.unsqueeze(-1), groups=batch * channels
    )
    flat = F.conv2d(
        F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernel.unsqueeze(-2), groups=batch * channels
    )
    return flat.view(batch, channels, height, width)


def blur_kernel_size(height: int, fraction: float) -> int:
    """``fraction`` of the height, made odd (rounding down), at least 3."""
    size = max(3, int(fraction * height))
    return size if size % 2 else size - 1


def apply_params(images: torch.Tensor, params: AugmentParams, config: AugmentConfig) -> torch.Tensor:
    """Augment (B, 3, H, W) uint8 images with given choices; returns normalised float32."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (batch, 3, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
    x = images.float() / 255.0
    x = torch.where(params.flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if config.jitter_prob > 0 and config.strength > 0:
        x = colour_jitter(x, params.factors, params.order)
    if config.grayscale_prob > 0:
        x = torch.where(params.grayscale.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
    if config.blur_prob > 0 and x.shape[-2] > 3 and x.shape[-1] > 3:
        x = gaussian_blur(x, params.blur_sigma, blur_kernel_size(x.shape[-2], config.blur_kernel_fraction))
    if config.solarize_prob > 0:
        x = torch.where(params.solarize.view(-1, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)
    mean = torch.tensor(config.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """One random augmentation of each image.

    Args:
        images: (B, 3, H, W) uint8 on the generator's device.
        config: Probabilities and strengths.
        generator: Source of all randomness; the same state gives the same output.

    Returns:
        (B, 3, H, W) float32, normalised with ``config.mean`` and ``config.std``.
    """
    return apply_params(images, sample_params(images.shape[0], config, generator), config)


def make_generator(device: torch.device | str, seed: int, *keys: int) -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, *keys)``, e.g. ``(seed, step, rank)``."""
    generator = torch.Generator(device=device)
    mixed = seed
    for key in keys:
        # splitmix-style mixing keeps nearby (step, rank) pairs far apart in seed space.
        mixed = (mixed * 0x9E3779B97F4A7C15 + key + 1) % (1 << 63)
    generator.manual_seed(mixed)
    return generator

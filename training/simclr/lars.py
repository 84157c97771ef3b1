"""LARS (You et al., 2017): momentum SGD whose step per layer is scaled by a trust ratio.

For a parameter ``w`` with gradient ``g``, in a group with weight decay ``wd``, trust coefficient
``eta``, momentum ``m`` and learning rate ``lr``:

    u = g + wd * w
    trust = eta * ||w|| / ||u||      (1 when either norm is 0, or when the group is not adapted)
    v = m * v + lr * trust * u
    w = w - v

(Algorithm 1 of the paper; the learning rate sits inside the momentum buffer as in SimCLR's
implementation.) Biases and normalisation parameters are usually excluded from both the decay and
the adaptation: :func:`lars_param_groups` builds the two groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from data_pipeline.errors import UserError


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling over momentum SGD (see the module docstring).

    Args:
        params: Parameters or param groups; a group may set ``weight_decay`` and ``lars_adapt``.
        lr: Learning rate. Defaults to 0.1.
        momentum: Momentum. Defaults to 0.9.
        weight_decay: Weight decay added to the gradient. Defaults to 0.0.
        trust_coefficient: ``eta`` of the trust ratio. Defaults to 0.001.
        lars_adapt: Whether the trust ratio applies (per group). Defaults to True.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        lars_adapt: bool = True,
    ) -> None:
        for name, value in (
            ("lr", lr),
            ("momentum", momentum),
            ("weight_decay", weight_decay),
            ("trust_coefficient", trust_coefficient),
        ):
            if value < 0:
                raise UserError(f"LARS {name} must be >= 0, got {value!r}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "lars_adapt": lars_adapt,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        update = param.grad.add(param, alpha=group["weight_decay"]) if group["weight_decay"] else param.grad
        scale = torch.tensor(group["lr"], dtype=torch.float32, device=param.device)
        if group["lars_adapt"]:
            weight_norm, update_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
            # Tensor ops, not Python branches: no device-to-host sync per parameter.
            trust = torch.where(
                (weight_norm > 0) & (update_norm > 0),
                group["trust_coefficient"] * weight_norm / update_norm,
                torch.ones_like(weight_norm),
            )
            scale = scale * trust
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        buffer = state["momentum_buffer"]
        buffer.mul_(group["momentum"]).add_(update * scale.to(update.dtype))
        param.sub_(buffer)


def is_excluded_from_lars(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    """Biases and normalisation parameters (every 1-D parameter, or one owned by a norm layer)."""
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return param.ndim <= 1 or isinstance(module, norms) or name.endswith("bias")


def lars_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two LARS param groups: weights (decayed and adapted), biases and norms (neither).

    Args:
        model: The model whose trainable parameters are grouped.
        weight_decay: Decay of the first group.
    """
    adapted: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    seen: set[int] = set()  # a parameter shared by two modules goes into one group only
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                full_name = f"{module_name}.{name}" if module_name else name
                (excluded if is_excluded_from_lars(full_name, param, module) else adapted).append(param)
    return [
        {"params": adapted, "weight_decay": weight_decay, "lars_adapt": True},
        {"params": excluded, "weight_decay": 0.0, "lars_adapt": False},
    ]

"""Optimizers with weight decay only where it regularises (Goyal et al.; timm's `param_groups_weight_decay`).

Decay on BatchNorm/LayerNorm scales and on biases does not regularise a ReLU network and slightly
hurts accuracy; 1-d parameters are exactly those.
"""
from __future__ import annotations

from torch import nn
from torch.optim import SGD, AdamW, Optimizer


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
          nesterov: bool = False, betas: tuple[float, float] = (0.9, 0.999)) -> Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return AdamW(groups, lr=lr, betas=betas)
    raise ValueError(f"optim.name must be sgd or adamw, got {name!r}")

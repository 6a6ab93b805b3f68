"""Optimizers with weight decay only where it regularises (Goyal et al.; timm's `param_groups_weight_decay`).

Decay on BatchNorm/LayerNorm scales and on biases does not regularise a ReLU network and slightly
hurts accuracy; 1-d parameters are exactly those. Fine-tuning a pretrained backbone often wants a
lower lr for it than for the fresh classifier (`optim.backbone_lr_scale`): then each of the two
groups is split again into classifier and backbone, and the backbone's carry their own lr (the lr
schedule scales every group's lr by the same factor). Frozen parameters are in no group.
"""
from __future__ import annotations

from torch import nn
from torch.optim import SGD, AdamW, Optimizer

from trainer import model as models


def param_groups(model: nn.Module, weight_decay: float, backbone_lr: float | None = None) -> list[dict]:
    """[decay, no decay] groups; with `backbone_lr`, the classifier's two, then the backbone's two at
    that lr (empty ones left out: a frozen backbone has none)."""
    head = None if backbone_lr is None else models.is_classifier_param(model)
    groups: list[dict] = []
    for in_head in (None,) if head is None else (True, False):
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad and (head is None or head(name) == in_head):
                (no_decay if param.ndim <= 1 else decay).append(param)
        lr = {} if in_head is not False else {"lr": backbone_lr}
        groups += [{"params": decay, "weight_decay": weight_decay, **lr},
                   {"params": no_decay, "weight_decay": 0.0, **lr}]
    return groups if head is None else [g for g in groups if g["params"]]


def build(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
          nesterov: bool = False, betas: tuple[float, float] = (0.9, 0.999),
          backbone_lr_scale: float = 1.0) -> Optimizer:
    groups = param_groups(model, weight_decay, None if backbone_lr_scale == 1 else lr * backbone_lr_scale)
    if name == "sgd":
        return SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return AdamW(groups, lr=lr, betas=betas)
    raise ValueError(f"optim.name must be sgd or adamw, got {name!r}")

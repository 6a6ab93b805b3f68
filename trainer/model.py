"""Classifiers by name (torchvision, or timm as `timm/<name>`), local pretrained weights, frozen backbones.

Nothing is ever downloaded: compute nodes have no internet, and a silent download on a login node
would make the run depend on a cache nobody recorded. `model.pretrained` is a local file, and timm
models are created with `pretrained=False`. The classifier is the module timm's `get_classifier()`
names, or the last Linear layer of a torchvision model; everything else is the backbone.
"""
from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
import torchvision
from torch import nn

from trainer.runtime.exits import UsageError

log = logging.getLogger(__name__)

# where torchvision and timm checkpoints nest their weights, and the prefixes DDP/compile add
_NESTED_KEYS = ("model", "state_dict", "model_state", "module")
_PREFIXES = ("module.", "_orig_mod.")


class ModelError(UsageError, ValueError):
    """The model name or weights file cannot be used; the message names it."""


TIMM_PREFIX = "timm/"
FREEZE = ("none", "backbone")


def build(name: str, num_classes: int, pretrained: str | None = None,
          zero_init_residual: bool = True) -> nn.Module:
    """A classification model with `num_classes` outputs, weights from a local file.

    `name` is a torchvision classification model, or `timm/<name>` for any of timm's models.
    """
    if name.startswith(TIMM_PREFIX):
        model = _timm_model(name.removeprefix(TIMM_PREFIX), num_classes)
    else:
        model = _torchvision_model(name, num_classes, zero_init_residual)
    if pretrained:
        load_pretrained(model, Path(pretrained).expanduser())
    return model


def _torchvision_model(name: str, num_classes: int, zero_init_residual: bool) -> nn.Module:
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        raise ModelError(f"model.name={name!r} is not a torchvision classification model"
                         + (f"; did you mean {close}?" if close else "")
                         + f" (timm models: model.name={TIMM_PREFIX}<name>)")
    builder = torchvision.models.get_model_builder(name)
    kwargs: dict[str, object] = {"weights": None, "num_classes": num_classes}
    if "zero_init_residual" in inspect.signature(builder).parameters or _is_resnet(name):
        # torchvision's ResNets zero the last BN gamma of each block on request (Goyal et al. 5.1)
        kwargs["zero_init_residual"] = zero_init_residual
    return builder(**kwargs)


def _timm_model(name: str, num_classes: int) -> nn.Module:
    import timm  # only runs that name a timm model pay for its import

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ModelError(f"model.name={TIMM_PREFIX + name!r} is not a timm model"
                         + (f"; did you mean {[TIMM_PREFIX + c for c in close]}?" if close else ""))
    # pretrained=False: timm would otherwise fetch weights from the Hugging Face hub
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def classifier(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the classifier: timm's `get_classifier()`, else the last Linear layer."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    found = [(n, m) for n, m in model.named_modules()
             if (m is head if head is not None else isinstance(m, nn.Linear))]
    if not found:
        raise ModelError(f"{type(model).__name__} has no Linear classifier")
    return found[-1]


def is_classifier_param(model: nn.Module) -> Callable[[str], bool]:
    """A test of parameter names (as `named_parameters` gives them): does it belong to the classifier?"""
    prefix = classifier(model)[0] + "."
    return lambda name: name.startswith(prefix)


def freeze(model: nn.Module, what: str) -> None:
    """`model.freeze=backbone`: only the classifier trains, on the backbone's fixed features.

    The backbone's parameters get requires_grad=False, and each backbone module runs in eval mode
    whatever the Trainer asks (a forward pre-hook), so BatchNorm keeps the running statistics of the
    weights file and dropout/drop-path stay off: the features are those of the pretrained network,
    as with EcoTaxa's MLP on fixed deep features.
    """
    if what == "none":
        return
    if what != "backbone":
        raise ModelError(f"model.freeze must be one of {list(FREEZE)}, got {what!r}")
    head = is_classifier_param(model)
    for name, param in model.named_parameters():  # also a ViT's cls_token and pos_embed on the root
        if not head(name):
            param.requires_grad_(False)
    parts = classifier(model)[0].split(".")
    # the classifier and the modules that hold it ("" is the root: a timm head's dropout still trains)
    holders = {".".join(parts[:i]) for i in range(len(parts) + 1)}
    for name, module in model.named_modules():
        if name not in holders and not head(name + "."):
            module.register_forward_pre_hook(_hold_eval)


def _hold_eval(module: nn.Module, _inputs: object) -> None:
    module.training = False


def _is_resnet(name: str) -> bool:
    return name.startswith(("resnet", "resnext", "wide_resnet"))


def load_pretrained(model: nn.Module, path: Path) -> None:
    """Load a local state dict; the classifier is kept fresh when its shape differs (new classes)."""
    if not path.is_file():
        raise ModelError(f"model.pretrained={str(path)!r}: no such file (weights are never downloaded)")
    try:
        if path.suffix == ".safetensors":  # the Hugging Face hub's layout of timm weights
            state = safetensors.torch.load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated zip, non-tensor objects
        raise ModelError(f"model.pretrained={str(path)!r}: not a loadable weights file: {err}") from err
    state = _unwrap(state, path)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    head = set(mismatched) | set(missing)
    # only the classifier may differ: anything else means the wrong architecture for these weights
    if unexpected or not _only_head(head, model):
        raise ModelError(f"model.pretrained={str(path)!r} does not fit this model: "
                         f"{len(unexpected)} unexpected keys {unexpected[:3]}, missing or reshaped "
                         f"{sorted(head)[:5]}")
    model.load_state_dict({k: v for k, v in state.items() if k not in mismatched}, strict=False)
    log.info("loaded %d tensors from %s; classifier re-initialised: %s",
             len(state) - len(mismatched), path, sorted(head) or "no")


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    for key in _NESTED_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"model.pretrained={str(path)!r}: expected a state dict of tensors")
    out = {}
    for k, v in state.items():
        for prefix in _PREFIXES:
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def _only_head(keys: set[str], model: nn.Module) -> bool:
    """True when every key belongs to the classifier (the only part new classes may reshape)."""
    if not keys:
        return True
    try:
        head = is_classifier_param(model)
    except ModelError:
        return False
    return all(head(k) for k in keys)

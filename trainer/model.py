"""torchvision classifiers by name, with local pretrained weights and Goyal et al.'s zero-init.

Nothing is ever downloaded: compute nodes have no internet, and a silent download on a login node
would make the run depend on a cache nobody recorded. `model.pretrained` is a local file.
"""
from __future__ import annotations

import difflib
import inspect
import logging
from pathlib import Path

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


def build(name: str, num_classes: int, pretrained: str | None = None,
          zero_init_residual: bool = True) -> nn.Module:
    """A torchvision classification model with `num_classes` outputs, weights from a local file."""
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        raise ModelError(f"model.name={name!r} is not a torchvision classification model"
                         + (f"; did you mean {close}?" if close else ""))
    builder = torchvision.models.get_model_builder(name)
    kwargs: dict[str, object] = {"weights": None, "num_classes": num_classes}
    if "zero_init_residual" in inspect.signature(builder).parameters or _is_resnet(name):
        # torchvision's ResNets zero the last BN gamma of each block on request (Goyal et al. 5.1)
        kwargs["zero_init_residual"] = zero_init_residual
    model = builder(**kwargs)
    if pretrained:
        load_pretrained(model, Path(pretrained).expanduser())
    return model


def _is_resnet(name: str) -> bool:
    return name.startswith(("resnet", "resnext", "wide_resnet"))


def load_pretrained(model: nn.Module, path: Path) -> None:
    """Load a local state dict; the classifier is kept fresh when its shape differs (new classes)."""
    if not path.is_file():
        raise ModelError(f"model.pretrained={str(path)!r}: no such file (weights are never downloaded)")
    try:
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
    """True when every key belongs to the last Linear layer (the classifier)."""
    if not keys:
        return True
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return bool(linears) and all(k.rsplit(".", 1)[0] == linears[-1] for k in keys)

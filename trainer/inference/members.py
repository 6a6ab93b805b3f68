"""The trained members of a bag, loaded for inference: probabilities, test-time augmentation, embeddings.

Shared by `launch.evaluate`, `launch.predict` and `launch.features`. A member is loaded from its best
checkpoint (or its newest) with `weights_only=True`; its own config says which architecture, crop and
normalisation it was trained with, so members of different architectures can sit in one bag.

Test-time augmentation follows the classic views (torchvision's `FiveCrop`/`TenCrop`): `hflip` adds
the mirrored image; `fivecrop`/`tencrop` take the four corners and the centre (and their mirrors) of
the resized image instead of its centre crop alone. Probabilities (and embeddings) are averaged over
the views, as timm's TTA does.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from trainer import model
from trainer.checkpoint import Checkpointer
from trainer.data.transforms import AugmentConfig, Letterbox, Normalize, eval_transform, rgb
from trainer.runtime.exits import ConfigError
from trainer.state import TrainingState

log = logging.getLogger(__name__)
MEMBER_NAME = re.compile(r"[A-Za-z0-9_-]+")  # one path component that stays in the bag
TTA = ("none", "hflip", "fivecrop", "tencrop")


@dataclass
class Member:
    name: str
    net: nn.Module
    normalize: Normalize
    classes: list[str]
    config: dict          # the member's training config (resolved), as stored in its checkpoint
    step: int

    @property
    def model_name(self) -> str:
        return self.config["model"]["name"]


def member_dirs(bag: Path, subset: list[str]) -> list[tuple[str, Path]]:
    """(name, run directory) of each member of a bag (`bag.json`) or of a single run directory."""
    if (bag / "bag.json").is_file():
        found = [(n, bag / n) for n in bag_member_names(bag / "bag.json")]
    elif (bag / "checkpoints").is_dir():
        found = [(bag.name, bag)]
    else:
        raise ConfigError(f"bag={str(bag)!r}: neither a bag (bag.json) nor a run directory (checkpoints/)")
    if subset:
        unknown = sorted(set(subset) - {n for n, _ in found})
        if unknown:
            raise ConfigError(f"members: {unknown} not in {str(bag)!r} (has {[n for n, _ in found]})")
        found = [(n, d) for n, d in found if n in subset]
    return found


def bag_member_names(path: Path) -> list[str]:
    """The member names a `bag.json` lists. A name is used as a folder and a file name (export), so
    one that could leave the bag (`../x`, `a/b`) or is not a plain name is refused, naming it."""
    try:
        names = [m["name"] for m in json.loads(path.read_bytes())["members"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a bag description ({err!r})") from None
    for name in names:
        if not isinstance(name, str) or not MEMBER_NAME.fullmatch(name):
            raise ConfigError(f"{path}: member name {name!r} is not a plain name ([A-Za-z0-9_-], as "
                              "taxotrain-bag writes them); refusing to use it as a path")
    return names


def load_member(name: str, run_dir: Path, which: str, device: torch.device) -> Member:
    """A member in eval mode on `device`; `which` is best (the newest if there is none) or latest."""
    directory = run_dir / "checkpoints"
    best = directory / "best.pt"
    if which == "best" and best.is_file():
        state = TrainingState.read(best)
    else:
        state = TrainingState.read_latest(Checkpointer(directory, is_main=False))
    if state is None:
        raise ConfigError(f"member {name}: no checkpoint in {directory}")
    net = model.build(state.model_name, len(state.classes))
    net.load_state_dict(state.model)
    net.to(device).eval()
    norm = Normalize(state.config["data"]["mean"], state.config["data"]["std"]).to(device)
    log.info("member %s: %s at step %d", name, state.model_name, state.step)
    return Member(name, net, norm, list(state.classes), state.config, state.step)


def load_bag(bag: str | Path, subset: list[str], which: str, device: torch.device) -> list[Member]:
    members = [load_member(n, d, which, device) for n, d in member_dirs(Path(bag), subset)]
    for m in members[1:]:
        if m.classes != members[0].classes:
            raise ConfigError(f"member {m.name} has other classes than {members[0].name}")
        if _view(m) != _view(members[0]):
            raise ConfigError(f"member {m.name} sees {_view(m)} (crop, eval_crop_ratio, resize, background, "
                              f"upscale), {members[0].name} {_view(members[0])}: evaluate them separately")
    return members


def _view(m: Member) -> tuple:
    a = augment_config(m)
    return a.crop_size, a.eval_crop_ratio, a.resize, rgb(a.background), a.upscale


def augment_config(member: Member) -> AugmentConfig:
    """How the member's training saw an evaluation image; a checkpoint from before data.resize existed
    records none of the geometry keys, and was trained with their defaults (the centre crop)."""
    d = member.config["data"]
    return AugmentConfig(d["crop_size"], eval_crop_ratio=d["eval_crop_ratio"], resize=d.get("resize", "crop"),
                         background=d.get("background", 255), upscale=d.get("upscale", True))


def input_transform(aug: AugmentConfig, tta: str) -> Callable[[Tensor], Tensor]:
    """Per image, on the loader workers: the centre crop (letterbox: the padded square), or for multi-crop
    the larger square the views are cut from."""
    check_tta(tta)
    if tta in ("none", "hflip"):
        return eval_transform(aug)
    resize = round(aug.crop_size / aug.eval_crop_ratio)
    if aug.resize == "letterbox":  # the whole image in the larger square, which the views then crop
        return Letterbox(resize, aug.background, aug.upscale)
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(resize)])


def views(images: Tensor, tta: str, crop: int) -> list[Tensor]:
    """The batch as each test-time view sees it (uint8 [B, 3, crop, crop] each)."""
    check_tta(tta)
    if tta == "none":
        return [images]
    if tta == "hflip":
        return [images, images.flip(-1)]
    crops = F.five_crop(images, crop) if tta == "fivecrop" else F.ten_crop(images, crop)
    return list(crops)


def check_tta(tta: str) -> None:
    if tta not in TTA:
        raise ConfigError(f"tta: must be one of {list(TTA)}, got {tta!r}")


@torch.no_grad()
def view_logits(member: Member, images: Tensor, tta: str) -> Tensor:
    """float64 [V, B, C]: the logits of each test-time view (what temperature scaling is fitted on)."""
    crop = member.config["data"]["crop_size"]
    return torch.stack([member.net(member.normalize(v)).double() for v in views(images, tta, crop)])


def softmax_views(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """float64 [B, C]: softmax(logits / T) averaged over the views, as timm's TTA averages them."""
    scaled = logits if temperature == 1.0 else logits / temperature
    return torch.softmax(scaled, dim=-1).mean(0)


def probabilities(member: Member, images: Tensor, tta: str, temperature: float = 1.0) -> Tensor:
    """float64 [B, C]: softmax averaged over the test-time views."""
    return softmax_views(view_logits(member, images, tta), temperature)


@torch.no_grad()
def embeddings(member: Member, images: Tensor, tta: str) -> tuple[Tensor, Tensor]:
    """(penultimate features [B, D], probabilities [B, C]), both averaged over the test-time views."""
    crop = member.config["data"]["crop_size"]
    head = classifier(member.net)
    captured: list[Tensor] = []
    hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    try:
        probs = [torch.softmax(member.net(member.normalize(v)).double(), dim=1)
                 for v in views(images, tta, crop)]
    finally:
        hook.remove()
    return torch.stack(captured).float().mean(0), torch.stack(probs).mean(0)


def classifier(net: nn.Module) -> nn.Linear:
    """The classifier (`trainer.model.classifier`): the last Linear layer of a torchvision model, timm's
    `get_classifier()`; its input is the penultimate embedding (timm's `forward_head(pre_logits=True)`)."""
    try:
        head = model.classifier(net)[1]
    except model.ModelError:
        head = None
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"{type(net).__name__} has no Linear classifier to take embeddings from")
    return head

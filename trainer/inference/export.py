"""Members exported as safetensors (or ONNX) + JSON, and loaded back without pickle.

Layout of an export directory (`python -m launch.export`, default `<bag>/export`):
    <member>.safetensors   the model's state dict; header metadata {format: pt, taxotrain_format, model}
    <member>.onnx          instead, with format=onnx: uint8 images in, logits and calibrated probabilities
                           out (`trainer/inference/onnx_graph.py`); its JSON entry "onnx" names inputs,
                           outputs, opset, sha256 and temperature
    <member>.json          FORMAT: architecture, classes, input preprocessing, step, source and sha256s
    ensemble.onnx          format=onnx ensemble=true: the whole bag as one graph (members, mean, temperature)
    bag.json               BAG_FORMAT: the exported members and their combination (mean of probabilities),
                           and the ensemble graph's description ("ensemble") when there is one

A checkpoint is a pickle (a zip of pickled containers, even when read with `weights_only=True`) and
carries optimizer and RNG state nobody needs for inference. An export is tensors and JSON only:
`load_exported` reads the bytes once, checks them against the sha256 in the JSON, parses them with
safetensors and rebuilds the architecture with `trainer.model.build`, so no unpickling code is reached.
The JSON describes the input completely (resize or letterbox, crop, interpolation, scale, mean/std,
RGB), so the export can also be used without taxotrain; `preprocess(meta)` rebuilds it from taxotrain's
own transforms, exactly as evaluation applies them (for an ONNX graph, the transform alone: the graph
normalises).

Every file is written to a temporary name and renamed over the final one; the weights go first, then
their JSON (which holds their sha256), then bag.json, so a reader never sees a JSON that names weights
that are not complete. A reader racing a re-export can see new weights with the old JSON: the sha256
check then fails loudly instead of loading the wrong pair.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from trainer import model
from trainer.checkpoint import Checkpointer
from trainer.data.transforms import AugmentConfig, Normalize, eval_transform, rgb
from trainer.inference.calibration import BagCalibration
from trainer.inference.config import ExportConfig
from trainer.inference.members import member_dirs
from trainer.inference.scoring import ENSEMBLE, calibration_path
from trainer.runtime import lock
from trainer.runtime.exits import ConfigError, UsageError
from trainer.runtime.files import atomic_write, sha256_file
from trainer.state import TrainingState
from trainer.tracking.provenance import git_state, package_versions

log = logging.getLogger(__name__)

FORMAT = "taxotrain-export/1"
BAG_FORMAT = "taxotrain-export-bag/1"
_PREFIXES = ("module.", "_orig_mod.")  # added by DDP / torch.compile; our checkpoints hold neither
_PACKAGES = ("taxotrain", "torch", "torchvision", "timm", "safetensors", "onnx", "onnxscript")


class ExportError(UsageError, ValueError):
    """An export file is missing, corrupt, tampered with or does not fit its model; names the file."""


# ---------------------------------------------------------------------------------------------- export


def export_bag(bag: Path, subset: list[str], which: str, out: Path | None = None,
               calibration: str = "auto", fmt: str = "safetensors",
               ensemble: bool = False) -> tuple[Path, list[dict]]:
    """Export the members of a bag (or one run directory) into `out` (default `<bag>/export`).

    Returns the export directory and each member's metadata. Re-exporting overwrites the files.
    With `calibration=auto`, the bag's temperatures and acceptance thresholds go into bag.json (and,
    with `fmt=onnx`, into the graphs). `ensemble` (onnx only) adds ensemble.onnx.
    """
    if fmt not in ("safetensors", "onnx") or (ensemble and fmt != "onnx"):
        raise ConfigError(f"format={fmt!r}, ensemble={ensemble}: format is safetensors or onnx, and "
                          "ensemble=true needs format=onnx")
    bag = Path(bag)
    if not bag.is_dir():
        raise ConfigError(f"bag={str(bag)!r}: no such directory")
    found = member_dirs(bag, subset)
    out = Path(out) if out is not None else bag / "export"
    out.mkdir(parents=True, exist_ok=True)
    with lock.writing(out, "export"):
        return out, _export_into(out, bag, found, which, calibration, fmt, ensemble)


def calibration_record(bag: Path, use: str, names: list[str]) -> dict | None:
    """The bag's calibration as bag.json carries it (None without one), for these members only."""
    path = calibration_path(bag)
    if use == "none" or not path.is_file():
        if use != "none":
            log.warning("%s: no calibration.json: the export carries no temperatures or thresholds", bag)
        return None
    cal = BagCalibration.load(path)
    missing = sorted(set(names) - set(cal.members))
    if missing:
        raise ConfigError(f"{path}: no temperature for member(s) {missing}; calibrate the bag again or "
                          "export with calibration=none")
    whole = sorted(cal.members) == sorted(names)
    return {"temperatures": {n: cal.members[n] for n in names},
            # softmax(log(combined) / T); fitted for the whole bag only
            "ensemble_temperature": cal.ensemble if whole else 1.0,
            "thresholds": {m: t.to_dict() for m, t in cal.thresholds.items()
                           if m in names or (whole and m == ENSEMBLE)},
            "fitted_on": {"split": cal.split, "shards": cal.shards, "n": cal.n, "tta": cal.tta}}


def _export_into(out: Path, bag: Path, found: list[tuple[str, Path]], which: str,
                 calibration: str, fmt: str, ensemble: bool) -> list[dict]:
    """The files of `export_bag`, written while it holds `out`'s lock; returns each member's metadata."""
    # before any file is written: a calibration that lacks a member fails the command first
    cal = calibration_record(bag, calibration, [name for name, _ in found])
    if fmt == "onnx":
        temperatures = cal["temperatures"] if cal else {}
        exported = [export_onnx_member(name, run_dir, which, out, temperatures.get(name, 1.0))
                    for name, run_dir in found]
        metas, graphs = [meta for meta, _ in exported], [graph for _, graph in exported]
    else:
        metas, graphs = [export_member(name, run_dir, which, out) for name, run_dir in found], []
    for meta in metas[1:]:
        if meta["classes"] != metas[0]["classes"]:
            raise ConfigError(f"member {meta['name']} has other classes than {metas[0]['name']}")
    record = {
        "format": BAG_FORMAT,
        "combine": "mean",  # of the members' softmax probabilities (trainer.inference.ensemble.combine)
        "classes": metas[0]["classes"],
        "source": str(bag.resolve()),
        "members": [_bag_entry(m) for m in metas],
        # each member's softmax(logits / T), then the ensemble's temperature and acceptance thresholds
        "calibration": cal,
    }
    if ensemble:
        temperature = cal["ensemble_temperature"] if cal else 1.0
        record["ensemble"] = export_onnx_ensemble(out, metas, graphs, temperature)
    atomic_write(out / "bag.json", json.dumps(record, indent=1) + "\n")
    return metas


def _bag_entry(meta: dict) -> dict:
    """A member as bag.json lists it: its JSON, and its weights (safetensors) or graph (onnx) file."""
    kind = "weights" if "weights" in meta else "onnx"
    return {"name": meta["name"], "meta": f"{meta['name']}.json", kind: meta[kind]["file"],
            "model": meta["model"]}


def export_member(name: str, run_dir: Path, which: str, out: Path) -> dict:
    """Write `<out>/<name>.safetensors` and `<out>/<name>.json` from the member's chosen checkpoint."""
    source = source_checkpoint(name, run_dir, which)
    state = TrainingState.read(source)  # checks the checkpoint's size and sha256 against its marker
    weights = out / f"{name}.safetensors"
    tensors = plain_state_dict(state.model)
    header = {"format": "pt", "taxotrain_format": FORMAT, "model": state.model_name}
    _save_atomic(tensors, weights, header)
    described = {"file": weights.name, "sha256": sha256_file(weights), "tensors": len(tensors)}
    return _write_meta(out, name, state, source, which, {"weights": described})


def export_onnx_member(name: str, run_dir: Path, which: str, out: Path,
                       temperature: float = 1.0) -> tuple[dict, nn.Module]:
    """Write `<out>/<name>.onnx` and `<out>/<name>.json`; (the metadata, the exported graph module)."""
    from trainer.inference import onnx_graph  # onnx and the exporter load only when asked for

    source = source_checkpoint(name, run_dir, which)
    state = TrainingState.read(source)
    net = model.build(state.model_name, len(state.classes))
    net.load_state_dict(plain_state_dict(state.model))
    data = state.config["data"]
    graph = onnx_graph.MemberGraph(net, Normalize(data["mean"], data["std"]), temperature)
    described = onnx_graph.write(graph, ["logits", "probabilities"], int(data["crop_size"]),
                                 out / f"{name}.onnx")
    # probabilities = softmax(logits / temperature): the bag's calibration, 1.0 without one
    files = {"onnx": {**described, "temperature": temperature}}
    return _write_meta(out, name, state, source, which, files), graph


def export_onnx_ensemble(out: Path, metas: list[dict], graphs: list[nn.Module], temperature: float) -> dict:
    """Write `<out>/ensemble.onnx`, the members' graphs averaged and rescaled; its bag.json entry."""
    from trainer.inference import onnx_graph

    geometry = [{k: v for k, v in m["input"].items() if k not in ("mean", "std", "scale")} for m in metas]
    differ = [m["name"] for m, g in zip(metas, geometry) if g != geometry[0]]
    if differ:
        raise ConfigError(f"ensemble=true: members {differ} prepare images differently from "
                          f"{metas[0]['name']} ({geometry[0]}); export them without ensemble=true")
    whole = onnx_graph.EnsembleGraph(graphs, temperature)
    described = onnx_graph.write(whole, ["probabilities"], geometry[0]["crop_size"], out / "ensemble.onnx")
    return {**described, "members": [m["name"] for m in metas], "input": geometry[0],
            "temperatures": {m["name"]: m["onnx"]["temperature"] for m in metas},
            "ensemble_temperature": temperature,
            "computes": "p = mean over members of softmax(logits / T_member); with ensemble_temperature "
                        "T != 1, softmax(log(max(p, 1e-12)) / T)"}


def _write_meta(out: Path, name: str, state: TrainingState, source: Path, which: str, files: dict) -> dict:
    """`<out>/<name>.json` for a member whose model file(s) `files` describes; returns the metadata."""
    meta = {
        "format": FORMAT,
        "name": name,
        "model": state.model_name,
        "num_classes": len(state.classes),
        "classes": list(state.classes),
        "input": input_meta(state.config["data"]),
        "step": state.step,
        **files,
        "source": {"checkpoint": str(source.resolve()), "sha256": sha256_file(source), "requested": which},
        "software": {**package_versions(_PACKAGES), "git": git_state()},
        "exported_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write(out / f"{name}.json", json.dumps(meta, indent=1) + "\n")
    written = ", ".join(str(out / f["file"]) for f in files.values())
    log.info("exported %s (%s, step %d) from %s to %s", name, meta["model"], meta["step"], source, written)
    return meta


def source_checkpoint(name: str, run_dir: Path, which: str) -> Path:
    """best.pt (the newest if there is none) or the newest complete step checkpoint, as load_member picks.

    Unlike resuming, a corrupt newest checkpoint is an error here rather than a silent step back.
    """
    directory = run_dir / "checkpoints"
    best = directory / "best.pt"
    if which == "best" and best.is_file():
        return best
    latest = Checkpointer(directory, is_main=False).latest()
    if latest is None:
        raise ConfigError(f"member {name}: no checkpoint in {directory}")
    return latest


def plain_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, unshared tensors (safetensors refuses views and shared storage), no wrapper prefix."""
    out = {}
    for key, value in state.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value.detach().cpu().contiguous().clone()
    return out


def input_meta(data: dict[str, Any]) -> dict[str, Any]:
    """How an image must be prepared, as `trainer.data.transforms.eval_transform` + `Normalize` do it."""
    crop, ratio = int(data["crop_size"]), float(data["eval_crop_ratio"])
    if data.get("resize", "crop") == "letterbox":
        # no "resize" (a size) here: a reader that expects the centre crop fails instead of cutting the image
        geometry: dict[str, Any] = {"letterbox": {
            "background": list(rgb(data.get("background", 255))), "upscale": bool(data.get("upscale", True)),
            "how": "longer side to crop_size (never enlarged when upscale is false), centred on a "
                   "crop_size square of background"}}
    else:
        geometry = {"resize": round(crop / ratio)}  # the shorter side, then a centre crop of crop_size
    return {
        "crop_size": crop,
        "eval_crop_ratio": ratio,
        **geometry,
        "interpolation": "bilinear",
        "antialias": True,
        "channel_order": "RGB",
        "layout": "NCHW",
        "scale": "divide uint8 values by 255, then subtract mean and divide by std",
        "mean": [float(v) for v in data["mean"]],
        "std": [float(v) for v in data["std"]],
    }


def _save_atomic(tensors: dict[str, Tensor], path: Path, header: dict[str, str]) -> None:
    atomic_write(path, _sorted_metadata(safetensors.torch.save(tensors, metadata=header)))


def _sorted_metadata(data: bytes) -> bytes:
    """The same file with its header metadata in key order: safetensors writes it from a Rust hash map,
    in a random order per process, and the same checkpoint should always export to the same bytes."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    # a permutation of the same keys has the same length; keep safetensors' padding to 8 bytes
    return data[:8] + text.ljust(n) + data[8 + n:] if len(text) <= n else data


# ---------------------------------------------------------------------------------------------- loading


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on `device`, metadata) from `<name>.json` or `<name>.safetensors`; no pickle."""
    meta_path = Path(path)
    if meta_path.suffix == ".safetensors":
        meta_path = meta_path.with_suffix(".json")
    meta = read_meta(meta_path)
    weights = meta_path.parent / meta["weights"]["file"]
    try:
        data = weights.read_bytes()
    except OSError as e:
        raise ExportError(f"{weights}: cannot read the weights named by {meta_path.name}: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["weights"]["sha256"]:
        raise ExportError(f"{weights}: sha256 {digest} does not match {meta['weights']['sha256']} recorded "
                          f"in {meta_path.name} (corrupted, tampered with, or from another export)")
    try:
        state = safetensors.torch.load(data)  # the very bytes that were hashed
    except Exception as e:  # safetensors raises its own SafetensorError for malformed headers
        raise ExportError(f"{weights}: not a readable safetensors file: {e}") from e
    try:
        net = model.build(meta["model"], meta["num_classes"])
    except model.ModelError as e:
        raise ExportError(f"{meta_path}: {e}") from e
    _check_fits(net, state, weights)
    net.load_state_dict(state)
    return net.to(device).eval(), meta


def read_meta(path: Path) -> dict:
    """The parsed `<name>.json` of an export, checked for the keys the loader relies on."""
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: no such export metadata file") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable export metadata: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ExportError(f"{path}: not a {FORMAT} export (format {got!r})")
    if "weights" not in meta and isinstance(meta.get("onnx"), dict):
        raise ExportError(f"{path}: an ONNX export ({meta['onnx'].get('file')}): run it with onnxruntime; "
                          "load_exported reads safetensors exports")
    missing = [k for k in ("model", "num_classes", "classes", "input", "weights") if k not in meta]
    if missing or not {"file", "sha256"} <= set(meta.get("weights") or {}):
        raise ExportError(f"{path}: missing keys {missing or ['weights.file/sha256']}")
    if len(meta["classes"]) != meta["num_classes"]:
        raise ExportError(f"{path}: {len(meta['classes'])} class names but num_classes={meta['num_classes']}")
    return meta


def _check_fits(net: nn.Module, state: dict[str, Tensor], weights: Path) -> None:
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise ExportError(f"{weights} does not fit {type(net).__name__}: missing {missing[:3]} "
                          f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)}), "
                          f"other shapes {reshaped[:3]} ({len(reshaped)})")


def load_exported_bag(directory: str | Path,
                      device: str | torch.device = "cpu") -> list[tuple[nn.Module, dict]]:
    """Every member listed in `<directory>/bag.json`, loaded as `load_exported` does; same classes needed."""
    path = Path(directory) / "bag.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable export bag: {e}") from e
    if not isinstance(record, dict) or record.get("format") != BAG_FORMAT or not record.get("members"):
        raise ExportError(f"{path}: not a {BAG_FORMAT} record with members")
    loaded = [load_exported(path.parent / m["meta"], device) for m in record["members"]]
    for _, meta in loaded[1:]:
        if meta["classes"] != loaded[0][1]["classes"]:
            raise ExportError(f"{path}: member {meta['name']} has other classes than {loaded[0][1]['name']}")
    return loaded


def preprocess(meta: dict) -> tuple[Callable[[Tensor], Tensor], Normalize]:
    """(per-image transform on uint8 RGB [3, H, W] or [B, 3, H, W], normalisation to float NCHW).

    The same transforms as evaluation: `normalize(transform(images))` is what the model was trained to see.
    """
    spec = meta["input"]
    box = spec.get("letterbox")  # absent: the centre crop (every export before data.resize existed)
    geometry = {} if box is None else {"resize": "letterbox", "background": tuple(box["background"]),
                                       "upscale": box["upscale"]}
    aug = AugmentConfig(spec["crop_size"], eval_crop_ratio=spec["eval_crop_ratio"], **geometry)
    return eval_transform(aug), Normalize(spec["mean"], spec["std"])


def run(cfg: ExportConfig) -> int:
    """`taxotrain-export`: the files, then (logger.mode=offline|online) the folder as a W&B artifact."""
    out, metas = export_bag(Path(cfg.bag), cfg.members, cfg.checkpoint, Path(cfg.out) if cfg.out else None,
                            cfg.calibration, fmt=str(cfg.format), ensemble=cfg.ensemble)
    from trainer.inference import wandb_report  # wandb only when asked for

    wandb_report.log_export(Path(cfg.bag), out, metas, cfg.logger)
    names = ", ".join(f"{m['name']} ({m['model']}, step {m['step']})" for m in metas)
    how = (f"run {out}/<member>.onnx{' or ensemble.onnx' if cfg.ensemble else ''} with onnxruntime"
           if cfg.format == "onnx" else f"load with trainer.inference.export.load_exported_bag({str(out)!r})")
    print(f"exported {names} to {out}; {how}")
    return 0

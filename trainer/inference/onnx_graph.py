"""ONNX graphs of a bag: one per member, and optionally the whole ensemble, with calibration inside.

Every graph takes `images`: uint8 RGB, NCHW, [batch, 3, crop, crop], the image after the resize (or
letterbox) and centre crop that the export JSON's `input` describes, values 0..255. Scaling and each
member's mean/std happen inside the graph (as `trainer.data.transforms.Normalize` does on the device),
so members normalised differently can share one ensemble input. The batch dimension is dynamic.

A member graph returns `logits` and `probabilities` = softmax(logits / T), T its temperature from the
bag's calibration (1 without one). The ensemble graph returns `probabilities`: the mean of the members'
calibrated probabilities, then softmax(log p / T_ensemble) when the bag's ensemble temperature applies,
i.e. what `trainer.inference.scoring.Scorer` computes with tta=none and combine=mean (in float32, where
the Scorer uses float64: tests/test_onnx.py bounds the difference).

Export goes through `torch.onnx.export(dynamo=True)` (torch.export + onnxscript), the exporter torch
keeps; the TorchScript one warns that it will be removed. The serialised model is written with
`atomic_write` as one self-contained file (weights inside, no external data), so its sha256 in the
JSON covers everything a reader loads.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from trainer.data.transforms import Normalize
from trainer.inference.ensemble import EPS
from trainer.runtime.exits import UsageError
from trainer.runtime.files import atomic_write

log = logging.getLogger(__name__)

INPUT = "images"
EXPECTS = ("uint8 RGB NCHW [batch, 3, crop_size, crop_size], values 0..255, after the resize (or letterbox) "
           "and centre crop of `input`; the graph scales by 1/255 and applies mean/std itself")
_DTYPES = {onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.FLOAT: "float32",
           onnx.TensorProto.DOUBLE: "float64"}


class OnnxExportError(UsageError, ValueError):
    """A model that torch.onnx cannot export, or a file that cannot be written; names the file."""


class MemberGraph(nn.Module):
    """uint8 images -> (logits, softmax(logits / T)) of one member."""

    def __init__(self, net: nn.Module, normalize: Normalize, temperature: float = 1.0) -> None:
        super().__init__()
        self.net, self.normalize, self.temperature = net, normalize, float(temperature)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.net(self.normalize(images))
        return logits, torch.softmax(logits / self.temperature, dim=1)


class EnsembleGraph(nn.Module):
    """uint8 images -> the bag's probabilities: mean of calibrated members, then the ensemble's T."""

    def __init__(self, members: Sequence[MemberGraph], temperature: float = 1.0) -> None:
        super().__init__()
        self.members, self.temperature = nn.ModuleList(members), float(temperature)

    def forward(self, images: Tensor) -> Tensor:
        probs = torch.stack([member(images)[1] for member in self.members]).mean(0)
        if self.temperature == 1.0:  # as scoring.rescale: no renormalisation at T = 1
            return probs
        return torch.softmax(probs.clamp_min(EPS).log() / self.temperature, dim=1)


def write(graph: nn.Module, outputs: list[str], crop: int, path: Path) -> dict[str, Any]:
    """Export `graph` to `path` (atomically); its {file, sha256, opset, inputs, outputs, expects}."""
    example = torch.zeros(2, 3, crop, crop, dtype=torch.uint8)  # 2, not 1: torch.export specialises 0/1
    try:
        program = torch.onnx.export(graph.eval(), (example,), input_names=[INPUT], output_names=outputs,
                                    dynamic_shapes={INPUT: {0: torch.export.Dim("batch")}},
                                    dynamo=True, external_data=False, verbose=False)
        proto = program.model_proto
        data = proto.SerializeToString()
    except Exception as e:  # torch.export and onnxscript raise many kinds; all mean "not exportable"
        raise OnnxExportError(f"{path}: torch.onnx.export failed: {type(e).__name__}: {e}") from e
    sha256 = atomic_write(path, data)
    log.info("wrote %s (%.1f MB)", path, len(data) / 1e6)
    return {"file": path.name, "sha256": sha256, **describe(proto)}


def describe(proto: onnx.ModelProto) -> dict[str, Any]:
    """What a reader needs to call the graph, read back from the model itself: opset, inputs, outputs."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "inputs": [_value(v) for v in proto.graph.input],
            "outputs": [_value(v) for v in proto.graph.output], "expects": EXPECTS}


def _value(info: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = info.type.tensor_type
    shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tensor.shape.dim]
    return {"name": info.name, "dtype": _DTYPES.get(tensor.elem_type, str(tensor.elem_type)), "shape": shape}

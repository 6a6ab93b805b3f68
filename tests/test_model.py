"""Models by name, local pretrained weights, zero-init, and the optimizer's decay groups."""
from __future__ import annotations

import pytest
import torch

from trainer import model, optim


def test_unknown_name_suggests_close_ones():
    with pytest.raises(model.ModelError, match=r"resnt18.*did you mean.*resnet18"):
        model.build("resnt18", 3)


def test_zero_init_of_last_bn_in_each_residual_block():
    net = model.build("resnet18", 7)
    assert net.fc.out_features == 7
    blocks = [block for layer in (net.layer1, net.layer4) for block in layer]
    assert all(float(block.bn2.weight.abs().sum()) == 0 for block in blocks)
    assert float(model.build("resnet18", 7, zero_init_residual=False).layer1[0].bn2.weight.sum()) > 0


def test_pretrained_weights_load_and_a_new_head_is_kept_fresh(tmp_path):
    source = model.build("resnet18", 10)
    torch.nn.init.normal_(source.layer1[0].conv1.weight)
    path = tmp_path / "r18.pt"
    # nested and DDP-prefixed, as many checkpoints are
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    same = model.build("resnet18", 10, str(path))
    assert torch.equal(same.fc.weight, source.fc.weight)
    other = model.build("resnet18", 4, str(path))  # new classes: everything but the classifier
    assert torch.equal(other.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert other.fc.weight.shape == (4, 512)


def test_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(model.ModelError, match="nope.pt.*never downloaded"):
        model.build("resnet18", 3, str(tmp_path / "nope.pt"))
    torch.save(model.build("resnet18", 3).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(model.ModelError, match="r18.pt.*does not fit"):
        model.build("resnet34", 3, str(tmp_path / "r18.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(model.ModelError, match="junk.pt.*not a loadable"):
        model.build("resnet18", 3, str(tmp_path / "junk.pt"))


def test_no_weight_decay_on_norm_weights_and_biases():
    net = model.build("resnet18", 3)
    decay, no_decay = optim.param_groups(net, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    ids = {id(p) for p in decay["params"]} | {id(p) for p in no_decay["params"]}
    assert ids == {id(p) for p in net.parameters()}
    assert id(net.bn1.weight) in {id(p) for p in no_decay["params"]}
    opt = optim.build(net, "sgd", 0.1, 1e-4, momentum=0.9, nesterov=True)
    assert opt.defaults["nesterov"] and isinstance(optim.build(net, "adamw", 1e-3, 0.05), torch.optim.AdamW)

"""timm backbones (`model.name=timm/<name>`): tiny random models from timm's own `test_*` family, a
weights file each test writes itself, a frozen backbone, a lower backbone lr, and a timm member read
back by evaluate, predict, features and export."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from test_bag import bag_config
from test_conf import cli
from test_train import config, train
from train_fixtures import final_state, write_shardset

from trainer import model, optim, schedule
from trainer.inference.config import EvalData, EvaluateConfig, PredictConfig
from trainer.inference.evaluate import run as run_evaluate
from trainer.inference.export import export_bag, load_exported
from trainer.inference.members import classifier, embeddings, load_member
from trainer.inference.predict import run as run_predict
from trainer.jobs.bag import train_bag
from trainer.runtime.exits import EXIT_USAGE

EFFNET = "timm/test_efficientnet"  # ~100k parameters, BatchNorm, a Linear `classifier`
TIMM = [f"model.name={EFFNET}", "loader.workers=0", "model.channels_last=false"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shardset(tmp_path_factory.mktemp("shards"), {"train": [24, 24], "val": [6], "test": [9]})


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A 'pretrained' file: a 10-class model whose backbone is not timm's default init."""
    torch.manual_seed(5)
    source = model.build(EFFNET, 10)
    with torch.no_grad():
        for tensor in source.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) * 0.1)  # running stats too: they must survive
    path = tmp_path_factory.mktemp("weights") / "effnet.pt"
    torch.save(source.state_dict(), path)
    return path, source.state_dict()


def backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("classifier.")}


@pytest.mark.parametrize(("name", "head"), [(EFFNET, "classifier"), ("timm/test_resnet", "fc"),
                                            ("timm/test_vit", "head"), ("timm/test_convnext", "head.fc"),
                                            ("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3")])
def test_timm_and_torchvision_names_build_with_their_classifier(name, head):
    net = model.build(name, 4)
    found, module = model.classifier(net)
    assert found == head and module.out_features == 4 and classifier(net) is module
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 4)


def test_an_unknown_timm_name_is_refused_naming_model_name(shards, tmp_path):
    with pytest.raises(model.ModelError, match=r"model.name='timm/test_efficientnett'.*did you mean.*"
                                               r"timm/test_efficientnet"):
        model.build("timm/test_efficientnett", 3)
    run_dir = tmp_path / "run"
    done = cli("launch.train", f"data.shards={shards}", f"run_dir={run_dir}", "debug=cpu",
               "model.name=timm/no_such_net", cwd=tmp_path)
    assert done.returncode == EXIT_USAGE, done.stdout + done.stderr
    assert "model.name='timm/no_such_net'" in done.stdout + done.stderr


def test_weights_file_fills_the_backbone_and_a_new_head_fits_the_classes(weights, tmp_path):
    path, saved = weights
    for source in (path, tmp_path / "effnet.safetensors"):
        if source.suffix == ".safetensors":
            safetensors.torch.save_file({k: v.contiguous() for k, v in saved.items()}, source)
        net = model.build(EFFNET, 3, str(source))
        state = net.state_dict()
        assert all(torch.equal(state[k], v) for k, v in backbone(saved).items())
        assert net.get_classifier().weight.shape == (3, saved["classifier.weight"].shape[1])
        assert not torch.equal(state["classifier.bias"], saved["classifier.bias"][:3])
    same = model.build(EFFNET, 10, str(path))  # same classes: the head loads too
    assert torch.equal(same.state_dict()["classifier.weight"], saved["classifier.weight"])
    torch.save(model.build("timm/test_resnet", 3).state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(model.ModelError, match="resnet.pt.*does not fit"):
        model.build(EFFNET, 3, str(tmp_path / "resnet.pt"))


def test_frozen_backbone_trains_only_the_classifier(shards, weights, tmp_path):
    path, saved = weights
    cfg = config(shards, tmp_path / "run", *TIMM, f"model.pretrained={path}", "model.freeze=backbone",
                 "trainer.max_steps=4", "data.val_split=null")
    assert train(cfg) == 0
    trained = final_state(tmp_path / "run")
    assert trained["step"] == 4
    # parameters and BatchNorm running statistics: the file's, to the bit
    assert all(torch.equal(trained["model"][k], v) for k, v in backbone(saved).items())
    head = model.build(EFFNET, 3, str(path)).get_classifier()
    assert not torch.equal(trained["model"]["classifier.weight"], head.weight)  # it did train
    assert len(trained["optimizer"]["param_groups"]) == 2  # the classifier's decay and no-decay groups


def test_frozen_modules_stay_in_eval_mode_under_train():
    net = model.build(EFFNET, 3)
    model.freeze(net, "backbone")
    net.train()
    net(torch.rand(2, 3, 16, 16))
    assert not net.bn1.training and not net.blocks.training and net.training
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.weight", "classifier.bias"]


def test_backbone_lr_scale_gives_the_backbone_its_own_lr():
    net = model.build(EFFNET, 3)
    opt = optim.build(net, "sgd", 0.2, 1e-4, backbone_lr_scale=0.1)
    head = {id(p) for p in net.get_classifier().parameters()}
    groups = [(g["lr"], g["weight_decay"], {id(p) for p in g["params"]}) for g in opt.param_groups]
    lr_and_decay = [x for lr, wd, _ in groups for x in (lr, wd)]
    assert lr_and_decay == pytest.approx([0.2, 1e-4, 0.2, 0, 0.02, 1e-4, 0.02, 0])
    assert groups[0][2] | groups[1][2] == head
    assert sum(len(ids) for *_, ids in groups) == len(list(net.parameters()))
    sched = schedule.build_scheduler(opt, "cosine", 10, 0, 1.0, 0.0, [], 0.1)
    opt.step()
    sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == pytest.approx(10 * lrs[2]) and lrs[0] < 0.2  # one schedule, both scaled
    assert len(optim.build(net, "sgd", 0.2, 1e-4).param_groups) == 2  # scale 1: groups as before


def test_a_timm_member_through_evaluate_predict_features_and_export(shards, weights, tmp_path):
    bag = tmp_path / "bag"
    cfg = bag_config(shards, bag, "bag.members=1", *TIMM, f"model.pretrained={weights[0]}",
                     "optim.backbone_lr_scale=0.1")
    assert train_bag(cfg) == 0
    assert run_evaluate(EvaluateConfig(bag=str(bag), data=EvalData(str(shards), "test"), workers=0,
                                       plots=False, out=str(tmp_path / "eval"))) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["members"]["member-00"]["n"] == report["ensemble"]["n"] == 9
    out = tmp_path / "preds.tsv"
    assert run_predict(PredictConfig(bag=str(bag), input=str(shards), out=str(out), workers=0)) == 0
    assert len(out.read_text().splitlines()) == 1 + 9  # a header and the test split (predict's default)
    member = load_member("member-00", bag / "member-00", "best", torch.device("cpu"))
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    features, _ = embeddings(member, images, "none")
    with torch.no_grad():  # timm's public pre-logits: the classifier's input
        pre = member.net.forward_head(member.net.forward_features(member.normalize(images)), pre_logits=True)
    assert torch.allclose(features, pre, atol=1e-6)
    export_dir, _ = export_bag(bag, [], "best")
    net, meta = load_exported(export_dir / "member-00.json")
    assert meta["model"] == EFFNET
    x = member.normalize(images)
    with torch.no_grad():
        assert torch.allclose(net(x), member.net(x), atol=1e-6)

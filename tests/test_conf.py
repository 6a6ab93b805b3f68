"""The Hydra config tree: groups, presets and the typed schema behind them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from shards.config import ConfigError
from trainer import config as schema
from trainer.schedule import scaled_lr

CONF = Path(__file__).resolve().parents[1] / "conf"
schema.register()


def load(*overrides: str) -> schema.TrainConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        raw = compose("train", overrides=["data.shards=/d", "run_dir=/r", *overrides])
    return OmegaConf.to_object(raw)


def test_defaults_are_the_documented_recipe():
    cfg = load()
    assert (cfg.model.name, cfg.optim.name, cfg.schedule.kind, cfg.launcher.kind) == \
        ("resnet50", "sgd", "cosine", "local")
    assert cfg.optim.base_batch == 256 and cfg.logger.mode == "offline"


def test_imagenet_preset_is_goyal_8k():
    cfg = load("experiment=imagenet_r50_8k")
    world = cfg.launcher.nodes * cfg.launcher.ranks_per_node
    lr, global_batch = scaled_lr(cfg.optim.base_lr, cfg.loader.batch_size, world, cfg.optim.accum_steps,
                                 cfg.optim.base_batch)
    assert global_batch == 8192 and lr == pytest.approx(3.2)
    assert cfg.schedule.kind == "step" and cfg.schedule.milestones == [30, 60, 80]
    assert cfg.schedule.warmup_epochs == 5 and cfg.trainer.epochs == 90 and cfg.model.zero_init_residual
    assert cfg.launcher.kind == "slurm"


def test_demo_and_debug_presets_compose():
    demo = load("experiment=demo")
    assert demo.model.name == "resnet18" and demo.data.crop_size == 28
    debug = load("debug=cpu")
    assert debug.trainer.max_steps == 10 and debug.loader.workers == 0 and debug.logger.mode == "disabled"


def test_loader_backends_compose():
    synthetic = load("data=synthetic")
    assert synthetic.loader.backend == "synthetic" and synthetic.data.val_split is None
    dali = load("loader.backend=dali", "loader.dali.device=gpu")
    assert (dali.loader.backend, dali.loader.dali.device, dali.data.crop_size) == ("dali", "gpu", 224)


@pytest.mark.parametrize(("override", "key"), [
    ("loader.backend=ffcv", "loader.backend"),
    ("loader.dali.device=tpu", "loader.dali.device"),
    ("launcher.nodes=0", "launcher.nodes"),
    ("launcher.signal_lead_s=4000", "launcher.signal_lead_s"),
    ("trainer.signals=[SIGTERM]", "launcher.signal"),
    ("data.check=md5", "data.check"),
])
def test_impossible_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(override)


@pytest.mark.parametrize("override", ["launcher.nodez=2", "model=resnet51", "launcher.nodes=two"])
def test_misspelt_keys_groups_and_types_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        load(override)


def test_site_settings_in_conf_local_apply(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "local").mkdir(exist_ok=True)
    (conf / "local" / "default.yaml").write_text(
        "# @package _global_\nlauncher:\n  partition: gpu\n  setup: [module load python]\n"
        "paths:\n  runs: /scratch\n")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=["data.shards=/d", "run_dir=/r"]))
    assert cfg.launcher.partition == "gpu" and cfg.launcher.setup == ["module load python"]
    assert cfg.paths.runs == "/scratch"

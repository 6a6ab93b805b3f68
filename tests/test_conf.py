"""The Hydra config tree and the schema as its only judge: groups, presets, typed choices, cross-field
rules, unknown keys (also with `+`), and exit 2 before any work for a bad command."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from train_fixtures import write_shardset

from trainer import config as schema
from trainer.runtime.cli import judge
from trainer.runtime.exits import EXIT_USAGE, ConfigError
from trainer.schedule import scaled_lr

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SCHEMAS = {"train": schema.TrainConfig, "bag": schema.BagRunConfig, "curve": schema.CurveRunConfig}
for name, node in SCHEMAS.items():
    ConfigStore.instance().store(name=f"{name}_schema", node=node)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shardset(tmp_path_factory.mktemp("conf") / "s", {"train": [4], "val": [2], "test": [2]})


def compose_raw(shards: Path, *overrides: str, tool: str = "train", conf: Path = CONF):
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(tool, overrides=[f"data.shards={shards}", "run_dir=/r", *overrides])


def load(shards: Path, *overrides: str, tool: str = "train"):
    return judge(compose_raw(shards, *overrides, tool=tool), SCHEMAS[tool])


def test_defaults_are_the_documented_recipe(shards):
    cfg = load(shards)
    assert (cfg.model.name, cfg.optim.name, cfg.schedule.kind, cfg.launcher.kind) == \
        ("resnet50", "sgd", "cosine", "local")
    assert cfg.optim.base_batch == 256 and cfg.logger.mode == "offline"
    assert isinstance(cfg.optim.name, schema.OptimName)  # choices are typed, and still compare as strings


def test_imagenet_preset_is_goyal_8k(shards):
    cfg = load(shards, "experiment=imagenet_r50_8k")
    world = cfg.launcher.nodes * cfg.launcher.ranks_per_node
    lr, global_batch = scaled_lr(cfg.optim.base_lr, cfg.loader.batch_size, world, cfg.optim.accum_steps,
                                 cfg.optim.base_batch)
    assert global_batch == 8192 and lr == pytest.approx(3.2)
    assert cfg.schedule.kind == "step" and cfg.schedule.milestones == [30, 60, 80]
    assert cfg.schedule.warmup_epochs == 5 and cfg.trainer.epochs == 90 and cfg.model.zero_init_residual
    assert cfg.launcher.kind == "slurm"


def test_demo_and_debug_presets_compose(shards):
    demo = load(shards, "experiment=demo", tool="bag")
    assert demo.model.name == "resnet18" and demo.data.crop_size == 28 and demo.bag.members == 2
    debug = load(shards, "debug=cpu")
    assert debug.trainer.max_steps == 10 and debug.loader.workers == 0 and debug.logger.mode == "disabled"


def test_loader_backends_compose(shards):
    synthetic = load(Path("/nowhere"), "data=synthetic")  # synthetic data needs no shards
    assert synthetic.loader.backend == "synthetic" and synthetic.data.val_split is None
    dali = load(shards, "loader.backend=dali", "loader.dali.device=gpu")
    assert (dali.loader.backend, dali.loader.dali.device, dali.data.crop_size) == ("dali", "gpu", 224)
    assert load(shards, "loader.backend=torchvision-gpu").loader.backend == "torchvision-gpu"


@pytest.mark.parametrize(("override", "key"), [
    ("launcher.nodes=0", "launcher.nodes"),
    ("launcher.signal_lead_s=4000", "launcher.signal_lead_s"),
    ("trainer.signals=[SIGTERM]", "launcher.signal"),
    ("data.val_split=holdout", "data.val_split"),
])
def test_impossible_values_name_the_key(shards, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(shards, override)


@pytest.mark.parametrize(("tool", "overrides", "key"), [
    ("train", ["loader.backend=dali", "data.augment=trivialaugment"], "data.augment"),
    ("train", ["loader.backend=dali", "data.fraction=0.5"], "loader.backend"),
    ("bag", ["loader.backend=dali"], "bag.strategy"),
    ("curve", ["loader.backend=dali"], "loader.backend"),
    ("curve", ["curve.eval_split=holdout"], "curve.eval_split"),
])
def test_cross_field_rules_live_in_the_schema(shards, tool, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(shards, *overrides, tool=tool)


def test_a_missing_shard_set_is_named_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.shards: .*_info\.json"):
        load(tmp_path / "absent")


@pytest.mark.parametrize(("override", "key"), [("+logger.team=bag1", "logger.team"),
                                                ("+optim.class_weights=balanced", "optim.class_weights"),
                                                ("+bag.members=3", "bag")])  # train has no bag section
def test_keys_appended_with_plus_are_refused_by_name(shards, override, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ": not a setting"):
        load(shards, override)


@pytest.mark.parametrize("override", ["launcher.nodez=2", "model=resnet51", "launcher.nodes=two",
                                      "loader.backend=ffcv", "loader.dali.device=tpu", "data.check=md5"])
def test_misspelt_keys_groups_types_and_choices_fail_at_composition(shards, override):
    with pytest.raises(ConfigCompositionException):
        compose_raw(shards, override)


def test_site_settings_in_conf_local_apply(shards, tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "local").mkdir(exist_ok=True)
    (conf / "local" / "default.yaml").write_text(
        "# @package _global_\nlauncher:\n  partition: gpu\n  setup: [module load python]\n"
        "paths:\n  runs: /scratch\n")
    cfg = OmegaConf.to_object(compose_raw(shards, conf=conf))
    assert cfg.launcher.partition == "gpu" and cfg.launcher.setup == ["module load python"]
    assert cfg.paths.runs == "/scratch"


def cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(("module", "args", "named"), [
    ("launch.train", ["+logger.team=bag1"], "logger.team"),
    ("launch.train", ["loader.backend=dali", "data.augment=trivialaugment"], "data.augment"),
    ("launch.bag", ["+optim.class_weights=balanced"], "optim.class_weights"),
    ("launch.train", ["loader.bakend=dali"], "bakend"),             # Hydra's own composition error
    ("launch.learning_curve", ["curve.fractions=[0.5,0.2]"], "curve.fractions"),
])
def test_a_bad_command_exits_2_before_any_work(shards, tmp_path, module, args, named):
    run_dir = tmp_path / "run"
    done = cli(module, f"data.shards={shards}", f"run_dir={run_dir}", "debug=cpu", *args, cwd=tmp_path)
    assert done.returncode == EXIT_USAGE, done.stdout + done.stderr
    assert named in done.stdout + done.stderr
    assert not run_dir.exists()  # nothing was started: no run directory, no process group, no hashing


@pytest.mark.parametrize(("module", "args", "named"), [
    ("launch.evaluate", ["+plot_size=3"], "plot_size"),
    ("launch.predict", ["tta=rotate"], "tta"),
    ("launch.export", ["checkpoint=newest"], "checkpoint"),
    ("launch.features", ["data.shards=/absent"], "data.shards"),
    ("shards.build", ["source=demo", "+source.colour=1"], "source.colour"),
    ("shards.verify", ["+deep=true"], "deep"),
])
def test_every_tool_exits_2_on_a_bad_command(tmp_path, module, args, named):
    required = {"launch.evaluate": [f"bag={tmp_path}", f"data.shards={tmp_path}"],
                "launch.predict": [f"bag={tmp_path}", f"input={tmp_path}"],
                "launch.export": [f"bag={tmp_path}"], "launch.features": [f"bag={tmp_path}"],
                "shards.build": [f"out={tmp_path}/out"], "shards.verify": [f"dir={tmp_path}"]}[module]
    done = cli(module, *required, *args, cwd=tmp_path)
    assert done.returncode == EXIT_USAGE, done.stdout + done.stderr
    assert named in done.stdout + done.stderr

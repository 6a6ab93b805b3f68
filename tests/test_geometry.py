"""Plankton geometry (issue 16): letterbox keeps a whole elongated vignette, `upscale=false` keeps its pixel
size, vertical flips and right-angle rotations are seeded per sample; crop mode is today's, bit for bit."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train import config, train
from torchvision.transforms import v2
from train_fixtures import assert_same_training_state, final_state, write_shardset

from trainer.data import shardset
from trainer.data import streams as data
from trainer.data.gpu_decode import GpuDecodeLoader, RawStream
from trainer.data.streams import StreamConfig, seeded
from trainer.data.transforms import AugmentConfig, eval_transform, letterbox, train_transform
from trainer.inference.export import input_meta, preprocess
from trainer.inference.members import augment_config, input_transform, load_member
from trainer.runtime.exits import EXIT_PREEMPTED, EXIT_USAGE, ConfigError

LETTERBOX = ["data.resize=letterbox", "data.vflip=0.5", "data.rot90=true"]
SEEDS = range(40)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shardset(tmp_path_factory.mktemp("geometry") / "s", {"train": [9, 7], "val": [5]},
                          image_size=24, image_format="mixed")


def sliver(height: int, width: int) -> torch.Tensor:
    """A dark object filling the whole image, with texture so that flips and rotations show."""
    image = torch.arange(height * width, dtype=torch.int64).reshape(height, width) % 200
    return image.to(torch.uint8).expand(3, height, width).clone()


def box(image: torch.Tensor, background: int = 255) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), inclusive, of the pixels that are not background."""
    where = (image != background).any(0).nonzero()
    (top, left), (bottom, right) = where.min(0).values.tolist(), where.max(0).values.tolist()
    return top, bottom, left, right


@pytest.mark.parametrize(("height", "width"), [(30, 300), (300, 30)])
def test_letterbox_keeps_the_whole_elongated_object(height, width):
    aug = AugmentConfig(crop_size=64, resize="letterbox")
    out = eval_transform(aug)(sliver(height, width))
    assert out.shape == (3, 64, 64)
    top, bottom, left, right = box(out)
    long_side = (left, right) if width > height else (top, bottom)
    short = bottom - top + 1 if width > height else right - left + 1
    assert long_side == (0, 63) and short == round(64 * 30 / 300)  # the object spans the long side
    # the centre crop of today keeps 64 of 300 * 64/30 = 640 columns: a tenth of the organism
    cropped = eval_transform(AugmentConfig(crop_size=64))(sliver(height, width))
    assert (cropped != 255).all()  # nothing but object: its ends are cut away


def test_the_padding_is_the_background_setting():
    grey = letterbox(sliver(30, 300), 64, 0)
    assert (grey[:, :20] == 0).all() and (grey[:, -20:] == 0).all()
    coloured = letterbox(sliver(30, 300), 64, (10, 20, 30))
    assert coloured[:, 0, 0].tolist() == [10, 20, 30] and coloured[:, 63, 63].tolist() == [10, 20, 30]
    assert box(coloured[:1], 10) == box(grey[:1], 0)


def test_upscale_false_keeps_a_small_image_at_its_pixel_size():
    small = sliver(30, 12)
    out = eval_transform(AugmentConfig(crop_size=64, resize="letterbox", upscale=False))(small)
    top, left = (64 - 30) // 2, (64 - 12) // 2
    assert torch.equal(out[:, top:top + 30, left:left + 12], small)  # not resampled, only padded
    assert box(out) == (top, top + 29, left, left + 11)
    big = eval_transform(AugmentConfig(crop_size=64, resize="letterbox", upscale=False))(sliver(30, 300))
    assert box(big)[2:] == (0, 63)  # larger than the square: still shrunk to fit
    enlarged = eval_transform(AugmentConfig(crop_size=64, resize="letterbox"))(small)
    assert box(enlarged)[:2] == (0, 63)


def old_train_transform(cfg: AugmentConfig) -> v2.Compose:
    """trainer/data/transforms.py before data.resize existed (augment=none)."""
    return v2.Compose([v2.RandomResizedCrop(cfg.crop_size, scale=cfg.scale, ratio=cfg.ratio, antialias=True),
                       v2.RandomHorizontalFlip(cfg.hflip)])


def test_crop_mode_is_the_old_code_path_bit_for_bit():
    aug = AugmentConfig(crop_size=32, scale=(0.2, 1.0), resize="crop")
    old_eval = v2.Compose([v2.Resize(round(32 / 0.875), antialias=True), v2.CenterCrop(32)])
    for image in (sliver(30, 300), sliver(300, 30), torch.randint(0, 256, (3, 50, 40), dtype=torch.uint8)):
        reference = [seeded(old_train_transform(aug), image, s) for s in SEEDS]  # stored before the new path
        assert all(torch.equal(seeded(train_transform(aug), image, s), r) for s, r in zip(SEEDS, reference))
        assert torch.equal(eval_transform(aug)(image), old_eval(image))


@pytest.mark.parametrize("resize", ["crop", "letterbox"])
def test_vflip_and_rot90_are_seeded_per_sample(resize):
    image = sliver(20, 50)
    transform = train_transform(AugmentConfig(crop_size=32, scale=(1.0, 1.0), hflip=0.0, resize=resize,
                                              vflip=0.5, rot90=True))
    outs = [seeded(transform, image, s) for s in SEEDS]
    assert all(torch.equal(seeded(transform, image, s), o) for s, o in zip(SEEDS, outs))  # deterministic
    distinct = {o.numpy().tobytes() for o in outs}
    assert len(distinct) == 8  # 2 flips x 4 rotations: different seeds draw different geometry
    upright = seeded(transform, image, 0)
    assert any(torch.equal(o, upright.flip(-2)) for o in outs) and \
        any(torch.equal(o, torch.rot90(upright, 1, (-2, -1))) for o in outs)


def test_letterbox_training_zooms_within_scale_and_keeps_the_square():
    transform = train_transform(AugmentConfig(crop_size=32, scale=(0.25, 1.0), resize="letterbox"))
    outs = [seeded(transform, sliver(30, 300), s) for s in SEEDS]
    assert all(o.shape == (3, 32, 32) for o in outs)
    # a zoom in: the object's short side grows beyond its letterboxed 3 rows in some draws
    assert max(box(o)[1] - box(o)[0] for o in outs) > 3


def test_a_short_training_run_with_letterbox_flips_and_rotations_resumes_bitwise(shards, tmp_path):
    common = [*LETTERBOX, "data.background=[10,20,30]", "data.upscale=false", "trainer.max_steps=6",
              "loader.workers=0"]
    assert train(config(shards, tmp_path / "a", *common)) == 0
    assert final_state(tmp_path / "a")["step"] == 6
    assert train(config(shards, tmp_path / "b", *common, "trainer.stop_at_step=2")) == EXIT_PREEMPTED
    assert train(config(shards, tmp_path / "b", *common)) == 0
    assert_same_training_state(final_state(tmp_path / "a"), final_state(tmp_path / "b"))
    # the member's evaluation view is read from its checkpoint: the letterbox it was trained with
    aug = augment_config(load_member("a", tmp_path / "a", "latest", torch.device("cpu")))
    assert (aug.resize, list(aug.background), aug.upscale) == ("letterbox", [10, 20, 30], False)
    image = sliver(30, 300)
    assert torch.equal(input_transform(aug, "none")(image), letterbox(image, 16, (10, 20, 30), upscale=False))


def test_a_checkpoint_from_before_the_geometry_keys_evaluates_with_the_centre_crop():
    old = SimpleNamespace(config={"data": {"crop_size": 16, "eval_crop_ratio": 0.875}})
    aug = augment_config(old)
    assert (aug.resize, aug.upscale) == ("crop", True)
    image = sliver(30, 300)
    today = eval_transform(AugmentConfig(crop_size=16))
    assert torch.equal(input_transform(aug, "none")(image), today(image))


def test_an_export_describes_the_letterbox_and_rebuilds_it():
    data_cfg = {"crop_size": 16, "eval_crop_ratio": 0.875, "resize": "letterbox", "background": 0,
                "upscale": False, "mean": [0.5] * 3, "std": [0.25] * 3}
    meta = {"input": input_meta(data_cfg)}
    assert "resize" not in meta["input"]  # a reader expecting the centre crop must not find its size
    assert meta["input"]["letterbox"]["background"] == [0, 0, 0] and not meta["input"]["letterbox"]["upscale"]
    transform, _ = preprocess(meta)
    image = sliver(30, 300)
    assert torch.equal(transform(image), letterbox(image, 16, 0, upscale=False))


def test_torchvision_gpu_batches_are_the_webdataset_backends_with_the_new_geometry(shards):
    aug = AugmentConfig(crop_size=16, scale=(0.5, 1.0), resize="letterbox", background=0, vflip=0.5,
                        rot90=True)
    split = shardset.load(shards, "train")
    batches = data.steps_per_epoch(split.num_samples, 4, 1, 1)
    args = (split, train_transform(aug), StreamConfig(4, 7, 16, 4), 0, 1, 0, batches)
    want = list(data.ShardLoader(data.TrainStream(*args), 0).epoch(0))
    got = list(GpuDecodeLoader(RawStream(*args), 0, "cpu").epoch(0))  # nvJPEG's path, libjpeg on the CPU
    assert len(got) == len(want) > 0
    assert all(torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) for a, b in zip(want, got))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_geometry_runs_on_the_gpu_with_the_cpu_draws(shards):
    aug = AugmentConfig(crop_size=16, scale=(0.5, 1.0), resize="letterbox", upscale=False, vflip=0.5,
                        rot90=True)
    split = shardset.load(shards, "train")
    args = (split, train_transform(aug), StreamConfig(4, 7, 16, 4), 0, 1, 0,
            data.steps_per_epoch(split.num_samples, 4, 1, 1))
    want = list(data.ShardLoader(data.TrainStream(*args), 0).epoch(0))
    got = list(GpuDecodeLoader(RawStream(*args), 0, "cuda").epoch(0))
    for a, b in zip(want, got, strict=True):
        assert b.images.is_cuda and b.images.shape == a.images.shape
        # nvJPEG and the GPU resize differ by a few levels; the letterbox, flips and turns must be the same
        assert (b.images.cpu().float() - a.images.float()).abs().mean() < 4


@pytest.mark.parametrize(("override", "key"), [("data.resize=letterbox", "data.resize"),
                                               ("data.vflip=0.5", "data.vflip"),
                                               ("data.rot90=true", "data.rot90")])
def test_dali_refuses_the_geometry_naming_the_key(shards, tmp_path, override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: .* not available with loader\.backend=dali"):
        config(shards, tmp_path / "r", "loader.backend=dali", override)


def test_the_dali_refusal_exits_2_before_any_work(shards, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "launch.train", f"data.shards={shards}", f"run_dir={run_dir}",
               "debug=cpu",
               "loader.backend=dali", "data.resize=letterbox"]
    done = subprocess.run(command,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_USAGE, done.stdout + done.stderr
    assert "data.resize" in done.stderr + done.stdout and "loader.backend=dali" in done.stderr + done.stdout
    assert not run_dir.exists()


@pytest.mark.parametrize(("override", "key"), [("data.background=256", "data.background"),
                                               ("data.background=[1,2]", "data.background"),
                                               ("data.background=white", "data.background"),
                                               ("data.upscale=false", "data.upscale"),
                                               ("data.vflip=1.5", "data.vflip")])
def test_impossible_geometry_values_name_the_key(shards, tmp_path, override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        config(shards, tmp_path / "r", override)

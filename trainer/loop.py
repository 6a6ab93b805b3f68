"""`Trainer`: the one object that owns a training run, from process group to the last checkpoint.

`Trainer(cfg, env)` builds everything (data, model, optimizer, schedule, checkpoints, tracker) and
resumes from the newest valid checkpoint in `run_dir`; `fit()` returns an exit code (0 finished,
`EXIT_PREEMPTED` when stopped with a checkpoint written); `close()` runs on every path.

Step boundaries are where ranks talk outside the gradient all-reduce: before each optimizer step,
the micro-batches are fetched, then all ranks agree on a status (run, stop, failed). A stop
therefore always happens between two complete steps, which is what the checkpoint records.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from shards.keys import stable_hash
from trainer import checkpoint, imbalance, model, optim, resume, rng, schedule
from trainer.config import TrainConfig
from trainer.data import shardset
from trainer.data import streams as data
from trainer.data.gpu_decode import GpuDecodeLoader, RawStream
from trainer.data.streams import Batch, DataError, EpochPosition, StreamConfig
from trainer.data.transforms import AugmentConfig, Normalize, eval_transform, train_transform
from trainer.metrics import MetricState
from trainer.runtime import distributed, lock, logfile
from trainer.runtime.choices import plain
from trainer.runtime.distributed import DistEnv
from trainer.runtime.exits import EXIT_PREEMPTED, ConfigError
from trainer.runtime.signals import Status, StopFlag, agree
from trainer.state import TrainingState
from trainer.tracking import identity, provenance
from trainer.tracking.tracker import Tracker

if TYPE_CHECKING:
    from trainer.data.dali import DaliLoader

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run_dir).expanduser()
        self.tracker: Tracker | None = None
        self.run_lock: lock.FolderLock | None = None  # taken in _setup, on the main rank
        # built in _setup (the validation loader at the first evaluation); close() ends what exists
        self.loader: data.ShardLoader | data.SyntheticLoader | GpuDecodeLoader | DaliLoader | None = None
        self.val_loader: data.PassLoader | None = None
        self.checkpoints: checkpoint.Checkpointer | None = None
        self.stop = StopFlag(cfg.trainer.signals)  # first, so an early signal is not lost
        self._owns_group = not distributed.initialized()  # else a bag's launch owns it
        try:
            self.device = distributed.init(env, cfg.trainer.dist_timeout_s)
            self._setup()
        except BaseException:
            self.close(1)  # signal handlers and the process group must not outlive a failed setup
            raise

    # ------------------------------------------------------------ setup

    def _setup(self) -> None:
        cfg = self.cfg
        self.main = distributed.is_main(self.env)
        # resolved once: written to config.yaml, W&B and every checkpoint
        self.config_dict = provenance.redact_config(plain(cfg), warn=self.main)  # the run itself uses cfg
        self.workers = max(1, cfg.loader.workers)  # DataLoader workers, or 1 reading in-process
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # one writer per run_dir, taken before anything writes there: the Checkpointer below removes
        # stale temporaries, which are another live run's in-flight saves unless we hold this lock
        self.run_lock = lock.on_main(self.run_dir, "train", self.env)
        # train.log: everything the console shows, timestamped; here so torchrun, srun, Submitit jobs,
        # requeues and in-process bag members all get one
        logfile.attach(self.run_dir, "train", self.main)
        self._seed(cfg.trainer.seed)
        self._build_data()
        self._build_model()
        self._build_optimization()
        self.checkpoints = checkpoint.Checkpointer(self.run_dir / "checkpoints", cfg.trainer.keep_last,
                                                   is_main=self.main)
        self.step, self.epoch, self.position = 0, 0, EpochPosition()
        self.epoch_bad: list[data.BadRecord] = []
        self._saved_at = time.monotonic()  # trainer.checkpoint_every_s counts from here, then each save
        wandb_id = self._resume()
        self.start_step = self.step
        self._start_tracker(wandb_id)

    def _seed(self, seed: int) -> None:
        torch.manual_seed(seed)  # the same initial weights on every rank (DDP also broadcasts them)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        if self.cfg.trainer.deterministic:
            torch.use_deterministic_algorithms(True)

    def _build_data(self) -> None:
        cfg, env = self.cfg, self.env
        accum, batch = cfg.optim.accum_steps, cfg.loader.batch_size
        self.aug = AugmentConfig(cfg.data.crop_size, tuple(cfg.data.scale), hflip=cfg.data.hflip,
                                 augment=cfg.data.augment, color_jitter=cfg.data.color_jitter,
                                 eval_crop_ratio=cfg.data.eval_crop_ratio, resize=cfg.data.resize,
                                 background=cfg.data.background, upscale=cfg.data.upscale,
                                 vflip=cfg.data.vflip, rot90=cfg.data.rot90)
        if cfg.loader.backend == "synthetic":
            n, self.classes = cfg.data.synthetic_samples, tuple(map(str, range(cfg.data.synthetic_classes)))
            self.steps_per_epoch = data.steps_per_epoch(self._epoch_samples(n), batch, env.world_size, accum)
            self.loader = data.SyntheticLoader(n, len(self.classes), batch, cfg.data.crop_size,
                                               self.steps_per_epoch * accum, cfg.trainer.seed, env.rank)
            self.val_set, self.train_counts = None, None  # synthetic labels: no recorded class counts
            return
        train_set = shardset.load(cfg.data.shards, cfg.data.train_split)
        self.val_set = shardset.load(cfg.data.shards, cfg.data.val_split) if cfg.data.val_split else None
        # stamps in run_dir: a requeue or resume stats the shards instead of hashing them again
        shardset.check_across_ranks(train_set.shards + (self.val_set.shards if self.val_set else ()),
                                    cfg.data.check, self.env.rank, self.env.world_size,
                                    self.run_dir / shardset.STAMP_FILE)
        self.classes = train_set.classes
        self.train_counts = train_set.class_counts  # the loss's weights and priors (trainer/imbalance.py)
        if self.main:
            self._warn_rare_classes()
        self.steps_per_epoch = data.steps_per_epoch(self._epoch_samples(train_set.num_samples), batch,
                                                    env.world_size, accum)
        stream_cfg = StreamConfig(batch, cfg.trainer.seed, cfg.data.shuffle_buffer,
                                  min(100, cfg.data.shuffle_buffer), cfg.data.max_bad_fraction,
                                  cfg.data.bootstrap_member, cfg.data.bootstrap_seed,
                                  fraction=cfg.data.fraction, fraction_seed=cfg.data.fraction_seed)
        if cfg.loader.backend == "dali":
            self.loader = self._dali_loader(train_set, batch, self.steps_per_epoch * accum)
            return
        gpu_decode = cfg.loader.backend == "torchvision-gpu"
        if gpu_decode and self.device.type != "cuda":
            raise ConfigError("loader.backend=torchvision-gpu decodes with nvJPEG and needs a CUDA device; "
                              "on a CPU use loader.backend=webdataset")
        # one stream for both: RawStream only leaves the JPEGs encoded for the GPU to decode
        stream = (RawStream if gpu_decode else data.TrainStream)(
            train_set, train_transform(self.aug), stream_cfg, env.rank, env.world_size, cfg.loader.workers,
            self.steps_per_epoch * accum)
        workers, pin, prefetch, keep = cfg.loader.workers, self._pin(), cfg.loader.prefetch, \
            cfg.loader.persistent_workers
        self.loader = (GpuDecodeLoader(stream, workers, self.device, pin, prefetch, keep) if gpu_decode
                       else data.ShardLoader(stream, workers, pin, prefetch, keep))

    def _warn_rare_classes(self) -> None:
        """Once, at start: classes that validation never measures, and classes the loss settings weigh
        0 for want of training samples, with their counts."""
        o, val, warnings = self.cfg.optim, self.val_set, []
        if val is not None and val.class_counts is not None:
            warnings.append(imbalance.missing_validation_warning(self.classes, self.train_counts,
                                                                 val.class_counts, val.split))
        if self.train_counts is not None:
            warnings.append(imbalance.unseen_warning(self.classes, self.train_counts, o.class_weight,
                                                     o.logit_adjust_tau))
        for warning in filter(None, warnings):
            log.warning("%s", warning)

    def _dali_loader(self, train_set: shardset.ShardSet, batch: int, batches: int) -> DaliLoader:
        from trainer.data import dali  # optional: imported only when chosen

        cfg = self.cfg  # the schema refused what DALI cannot do (augment policies, bootstrap, fraction)
        gpu = cfg.loader.dali.device == "gpu"
        if gpu and self.device.type != "cuda":
            raise ConfigError("loader.dali.device=gpu needs a CUDA device; use loader.dali.device=cpu")
        options = dali.DaliOptions(cfg.loader.dali.device, cfg.loader.dali.threads, cfg.loader.prefetch,
                                   cfg.data.shuffle_buffer, self.device.index if gpu else None)
        return dali.DaliLoader(train_set, self.aug, batch, self.env.rank, self.env.world_size, batches,
                               cfg.trainer.seed, options)

    def _epoch_samples(self, num_samples: int) -> int:
        """Samples in an epoch: the split, or the expected size of its `data.fraction` subset (counting
        the exact subset would mean reading every shard before the first step)."""
        fraction = self.cfg.data.fraction
        return num_samples if fraction >= 1 else round(fraction * num_samples)

    def _pin(self) -> bool:
        return self.cfg.loader.pin_memory and self.device.type == "cuda"

    def _build_model(self) -> None:
        cfg = self.cfg.model
        net = model.build(cfg.name, len(self.classes), cfg.pretrained, cfg.zero_init_residual)
        if cfg.sync_bn and self.env.world_size > 1:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        model.freeze(net, cfg.freeze)  # after the SyncBatchNorm swap, which would drop its eval hooks
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.net = net.to(self.device, memory_format=fmt)
        self.ddp = (DDP(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                    if self.env.world_size > 1 else self.net)
        self.forward = torch.compile(self.ddp) if cfg.compile else self.ddp
        self.normalize = Normalize(self.cfg.data.mean, self.cfg.data.std, cfg.channels_last).to(self.device)
        o = self.cfg.optim
        source = ("loader.backend=synthetic" if self.cfg.loader.backend == "synthetic"
                  else f"data.shards={self.cfg.data.shards}")
        self.criterion = imbalance.criterion(self.train_counts, o.class_weight, o.logit_adjust_tau,
                                             o.label_smoothing, source).to(self.device)
        # each rank its own dropout/stochastic-depth stream from here on, reproducible from the seed
        torch.manual_seed(stable_hash("rank", self.cfg.trainer.seed, self.env.rank) & 0x7FFF_FFFF)

    def _build_optimization(self) -> None:
        cfg, o, s = self.cfg, self.cfg.optim, self.cfg.schedule
        steps = self.steps_per_epoch
        self.total_steps = cfg.trainer.max_steps or cfg.trainer.epochs * steps
        self.epochs = math.ceil(self.total_steps / steps)
        self.lr, self.global_batch = schedule.scaled_lr(o.base_lr, cfg.loader.batch_size,
                                                        self.env.world_size, o.accum_steps, o.base_batch)
        warmup = min(self.total_steps, round(s.warmup_epochs * steps))
        start = s.warmup_start_factor
        if start is None:
            start = schedule.goyal_start_factor(self.global_batch, o.base_batch)
            if warmup and start == 1.0:  # Goyal's warmup starts at the unscaled lr, which is the peak here
                log.warning("schedule.warmup_epochs=%s has no effect: the global batch %d is not above "
                            "optim.base_batch=%d, so the lr is not scaled up; set "
                            "schedule.warmup_start_factor to warm up anyway",
                            s.warmup_epochs, self.global_batch, o.base_batch)
        self.optimizer = optim.build(self.net, o.name, self.lr, o.weight_decay, o.momentum, o.nesterov,
                                     tuple(o.betas), o.backbone_lr_scale)
        milestones = [round(m * steps) for m in s.milestones] if s.kind == "step" else []
        try:
            self.scheduler = schedule.build_scheduler(self.optimizer, s.kind, self.total_steps, warmup, start,
                                                      s.min_factor, milestones, s.gamma)
        except ValueError as err:  # only knowable now: epochs became steps with the data's size
            raise ConfigError(f"schedule (epochs -> {steps} steps per epoch, {self.total_steps} steps): "
                              f"{err}") from err
        self.precision = _precision(cfg.trainer.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.recipe = schedule.describe(o.base_lr, cfg.loader.batch_size, self.env.world_size, o.accum_steps,
                                        self.total_steps, warmup, o.base_batch)
        self.recipe.update(warmup_start_factor=start, steps_per_epoch=steps, epochs=self.epochs,
                           precision=self.precision, device=str(self.device), classes=len(self.classes))
        if cfg.data.fraction < 1:  # only then: a full run's recipe stays as it was
            self.recipe.update(data_fraction=cfg.data.fraction, fraction_seed=cfg.data.fraction_seed)

    def _resume(self) -> str | None:
        state = TrainingState.read_latest(self.checkpoints)
        if state is None:
            return None
        # another model or class list: a message naming both runs, not a load_state_dict traceback
        state.check_resume(self.cfg.model.name, self.classes, self.run_dir)
        # any other setting that decides what a step computes: refused, naming each (trainer/resume.py)
        changes = resume.check(state.config, self.config_dict, state.position["world"], self.env.world_size,
                               f"run_dir={str(self.run_dir)!r} holds a run at step {state.step}")
        self.net.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        # the current length's schedule from the saved step on, not the checkpoint's (a new max_steps)
        note, history = resume.continue_schedule(self.scheduler, state.scheduler, state.recipe, self.lr)
        if history:  # config.yaml says the new length; the recipe keeps when the lr schedule changed
            self.recipe["lr_schedule_changes"] = history
        warning = resume.announce(changes, note, state.step)
        if warning and self.main:
            log.warning("%s", warning)
        if self.scaler is not None and state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self.step, self.epoch = state.step, state.epoch
        self.position = self._restore_position(state.position)
        rng.restore(state.rng[self.env.rank])  # the same ranks: resume.check refuses another world size
        log.info("resumed from step %d (epoch %d, batch %d of the epoch)", self.step, self.epoch,
                 self.position.batches)
        return state.wandb_id

    def _restore_position(self, saved: dict) -> EpochPosition:
        batches = int(saved["batches"])
        if saved["workers"] == self.workers:  # the world size is the same (resume.check refuses others)
            return EpochPosition(batches, int(saved["offset"]), list(saved["worker_batches"][self.env.rank]),
                                 list(saved["worker_consumed"][self.env.rank]))
        if batches:
            log.warning("data position saved for %s workers per rank, now %d: the rest of epoch %d is dealt "
                        "afresh from batch %d", saved["workers"], self.workers, self.epoch, batches)
        return EpochPosition(batches, offset=batches)

    def _start_tracker(self, wandb_id: str | None) -> None:
        config = self.config_dict
        if self.main:
            provenance.write(self.run_dir, config, world_size=self.env.world_size, rank=self.env.rank)
        logger = self.cfg.logger
        who = identity.training(logger, self.run_dir, self.cfg.model.name)  # a bag's group, readable names
        self.tracker = Tracker(self.run_dir, is_main=self.main, mode=str(logger.mode),
                               config={**config, "recipe": self.recipe}, run_id=wandb_id,
                               class_scalars=logger.class_scalars, **who.kwargs())
        if self.main:
            log.info("recipe: %s", ", ".join(f"{k}={v}" for k, v in self.recipe.items()))
            job = distributed.slurm_job()
            if job is not None:  # a requeued job shows how often it came back, and from which step
                log.info("SLURM job %s, requeued %d times, starting at step %d", job.job_id, job.restarts,
                         self.step)
                self.tracker.log({"split": "job", "requeues": job.restarts, "epoch": self.epoch}, self.step)

    # ------------------------------------------------------------ training

    def fit(self) -> int:
        """Train to `total_steps`; returns 0, or EXIT_PREEMPTED after checkpointing on a stop."""
        try:
            while self.step < self.total_steps:
                status = self._train_epoch()
                if status == Status.STOP:
                    self._save(metric=None)
                    log.info("stopped at step %d (%s): checkpoint written, exit %d", self.step,
                             self.stop.received or "trainer.stop_at_step", EXIT_PREEMPTED)
                    return EXIT_PREEMPTED
                self._end_epoch()
        finally:
            self._close_loaders()  # the workers live across epochs (loader.persistent_workers): end them
        self.tracker.summary({"step": self.step, **self._checkpoint_usage(),
                              **{f"recipe/{k}": v for k, v in self.recipe.items()}})
        return 0

    def _train_epoch(self) -> Status:
        accum, bpe = self.cfg.optim.accum_steps, self.loader.batches_per_epoch
        batches = self.loader.epoch(self.epoch, self.position)
        meter = _Meter(len(self.classes), self.device)
        self.ddp.train()
        try:
            while self.position.batches < bpe and self.step < self.total_steps:
                status, micro = self._next_step(batches, accum, meter)
                if status != Status.RUN:
                    return status
                self._optimizer_step(micro, meter)
                for batch in micro:
                    self.position.advance(batch, self.workers)
                self.step += 1
                if self.step % self.cfg.trainer.log_every == 0 or self.step == self.total_steps:
                    self._log_train(meter)
                if self.cfg.trainer.checkpoint_every and self.step % self.cfg.trainer.checkpoint_every == 0:
                    self._save(metric=None, wait=False)
        finally:
            # ends the epoch on every path; its workers stay for the next unless loader.persistent_workers
            # is false (fit() and close() end them)
            batches.close()
        return Status.RUN

    def _next_step(self, batches: Iterator[Batch], accum: int, meter: _Meter) -> tuple[Status, list[Batch]]:
        status, micro, error = Status.RUN, [], None
        limit = self.cfg.trainer.stop_at_step
        # stop_at_step fires only when this process reached it, so a resumed run goes on past it
        if self.stop.requested or (limit is not None and self.start_step < limit <= self.step):
            status = Status.STOP
        else:
            t0 = time.perf_counter()
            try:
                micro = [next(batches) for _ in range(accum)]
            except (DataError, StopIteration, RuntimeError) as err:
                status, error = Status.FAILED, err
            meter.wait += time.perf_counter() - t0
        status = agree(status, self.device)
        if status == Status.FAILED:
            if error is not None:
                raise DataError(f"rank {self.env.rank}: {error}") from error
            raise RuntimeError(f"rank {self.env.rank}: stopping because another rank failed (see its log)")
        return status, micro

    def _optimizer_step(self, micro: list[Batch], meter: _Meter) -> None:
        for i, batch in enumerate(micro):
            images = self.normalize(batch.images)
            labels = batch.labels.to(self.device, non_blocking=True)
            last = i == len(micro) - 1
            # gradients are all-reduced on the last micro-batch only (no_sync on the others)
            sync = contextlib.nullcontext() if last or self.ddp is self.net else self.ddp.no_sync()
            with sync:
                with _autocast(self.precision, self.device):
                    logits = self.forward(images)
                    loss = self.criterion(logits, labels)
                scaled = loss / len(micro)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            meter.update(logits.detach().float(), labels, loss.detach() * len(labels))
            self.epoch_bad.extend(batch.bad)
        self._clip_and_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def _clip_and_step(self) -> None:
        clip = self.cfg.optim.grad_clip
        if self.scaler is not None:
            if clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.net.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return
        if clip:
            nn.utils.clip_grad_norm_(self.net.parameters(), clip)
        self.optimizer.step()

    def _log_train(self, meter: _Meter) -> None:
        record = meter.flush(self.env.world_size)
        record.update(split="train", epoch=self.epoch, lr=self.scheduler.get_last_lr()[0])
        self.tracker.log(record, self.step)
        text = (f"epoch {self.epoch} loss {record['loss']:.4f} top1 {record['top1']:.4f} "
                f"lr {record['lr']:.4g} {record['images_per_s']:.0f} img/s "
                f"data-wait {100 * record['data_wait']:.0f}%")
        # a bar on a terminal; in a batch job a line each log_every steps, with the rate and the ETA
        self.tracker.progress(self.step, self.total_steps, text, every_s=0)

    def _report_bad(self) -> None:
        """Unusable samples of the epoch: counted on every rank, listed by rank 0 in bad_samples.tsv.

        Each (shard, key) once: batches report every read, and a slot that starts over on its shards
        (or a bootstrap repeat) reads the same bad sample again."""
        unique: dict[tuple[str, str], data.BadRecord] = {}
        for r in _gather(self.epoch_bad):
            unique.setdefault((r.shard, r.key), r)
        records = list(unique.values())
        self.epoch_bad = []
        if not records or not self.main:
            return
        with (self.run_dir / "bad_samples.tsv").open("a") as fh:
            for r in records:
                fh.write(f"{self.epoch}\t{r.shard}\t{r.key}\t{r.reason}\n")
        log.warning("epoch %d: %d unusable samples replaced by others (listed in %s), e.g. %s/%s: %s",
                    self.epoch, len(records), self.run_dir / "bad_samples.tsv", *records[0])
        self.tracker.log({"split": "train", "epoch": self.epoch, "bad_samples": len(records)}, self.step)

    def _end_epoch(self) -> None:
        self._report_bad()
        metric = None
        last = self.step >= self.total_steps
        if self.val_set is not None and ((self.epoch + 1) % self.cfg.trainer.eval_every == 0 or last):
            metric = self.evaluate()["top1"]
        self.epoch += 1
        self.position = EpochPosition()
        if self._epoch_save_due(metric, last):
            self._save(metric, wait=last)  # the run's last save is on disk when fit() returns

    def _epoch_save_due(self, metric: float | None, last: bool) -> bool:
        """Whether this epoch end saves: always, unless `trainer.checkpoint_every_s` spaces the saves out
        (epochs of seconds); then the last epoch and a better best metric still save, and a stop saves
        in fit(). Rank 0's clock and best record decide for every rank, as `_save` gathers from all."""
        every = self.cfg.trainer.checkpoint_every_s
        if every is None or last:
            return True
        due = self.main and (time.monotonic() - self._saved_at >= every
                             or (metric is not None and self.checkpoints.improves(metric)))
        return distributed.all_sum(torch.tensor([float(due)], device=self.device)).item() > 0

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Every validation sample once across ranks; metrics summed with one all_reduce."""
        if self.val_loader is None:  # one for the run: every evaluation reads the same batches
            stream = data.EvalStream(self.val_set, eval_transform(self.aug), self.cfg.loader.batch_size,
                                     self.env.rank, self.env.world_size, self.cfg.loader.workers,
                                     self.cfg.data.max_bad_fraction)
            self.val_loader = data.PassLoader(stream, self.cfg.loader.workers, self._pin(),
                                              persistent=self.cfg.loader.persistent_workers)
        state, bad = MetricState(len(self.classes), self.device), 0
        self.net.eval()
        for batch in self.val_loader:
            bad += len(batch.bad)
            if len(batch.labels):
                with _autocast(self.precision, self.device):
                    logits = self.net(self.normalize(batch.images))
                state.update(logits.float(), batch.labels.to(self.device))
        self.net.train()
        counts = distributed.all_sum(torch.tensor([bad], dtype=torch.float64, device=self.device))
        state.all_reduce()
        result = state.compute()
        result.update(split="val", epoch=self.epoch, bad_samples=int(counts.item()))
        self.tracker.log(result, self.step)
        self.tracker.per_class("val/recall", self.classes, result["per_class_recall"], self.step)
        if self.main:
            log.info("val epoch %d: top1 %.4f top5 %.4f mrr %.4f balanced %.4f loss %.4f (%d samples)",
                     self.epoch, result["top1"], result["top5"], result["mrr"], result["balanced_acc"],
                     result["loss"], result["n"])
        return result

    # ------------------------------------------------------------ checkpoints

    def _save(self, metric: float | None, wait: bool = True) -> None:
        """Every rank contributes its data position and RNG states; rank 0 writes. Unless `wait`, in the
        background with `trainer.checkpoint_async` (on disk by the next save or the end of the run)."""
        zeros = [0] * self.workers  # no batch taken yet in this epoch
        mine = {"batches": self.position.batches, "offset": self.position.offset,
                "worker_batches": self.position.worker_batches or zeros,
                "worker_consumed": self.position.worker_consumed or zeros, "rng": rng.capture()}
        ranks = _gather([mine])
        state = TrainingState(
            model=self.net.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler else None,
            step=self.step,
            epoch=self.epoch,
            position={"world": self.env.world_size, "workers": self.workers,
                      "batches": mine["batches"], "offset": mine["offset"],
                      "worker_batches": [r["worker_batches"] for r in ranks],
                      "worker_consumed": [r["worker_consumed"] for r in ranks]},
            rng=[r["rng"] for r in ranks],
            wandb_id=self.tracker.run_id if self.tracker else None,
            classes=tuple(self.classes),
            config=self.config_dict,
            recipe=self.recipe,
        )
        background = self.cfg.trainer.checkpoint_async and not wait
        self.checkpoints.save(state.to_dict(), self.step, metric=metric, background=background)
        self._saved_at = time.monotonic()
        if not background:
            distributed.barrier()  # nobody exits (or is killed) before rank 0 has the file on disk

    def _checkpoint_usage(self) -> dict:
        """The disk use of run_dir/checkpoints at the end of the run: one log line, and the summary's key."""
        if not self.main:
            return {}
        size, files = self.checkpoints.disk_usage()
        log.info("checkpoints: %.1f MB in %d files in %s (trainer.keep_last=%d; best.pt shares the bytes "
                 "of its step checkpoint while that is kept)", size / 1e6, files, self.checkpoints.directory,
                 self.cfg.trainer.keep_last)
        return {"checkpoint_bytes": size}

    def _close_loaders(self) -> None:
        for loader in (self.loader, self.val_loader):
            if loader is not None:
                loader.close()

    def _finish_checkpoint(self) -> None:
        """A background save still under way finishes before the run ends (it may be what a requeue
        resumes from); an error of it after the run failed otherwise is logged, not raised over that."""
        if self.checkpoints is None:
            return
        try:
            self.checkpoints.wait()
        except Exception as err:
            log.error("the background checkpoint write failed too: %s", err)

    def close(self, exit_code: int = 0) -> None:
        self._close_loaders()  # every path out of a run, a failed setup included: no worker outlives it
        self._finish_checkpoint()  # before the lock goes: a next job would clean up its temporaries
        if self.tracker is not None:
            self.tracker.finish(exit_code)
        if self.run_lock is not None:
            self.run_lock.release()  # after the tracker's last write into run_dir
        self.stop.restore()
        if self._owns_group:
            distributed.cleanup()


class _Meter:
    """Training metrics and throughput over one logging interval."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes, self.device = num_classes, device
        self._reset()

    def _reset(self) -> None:
        self.state = MetricState(self.num_classes, self.device)
        self.start, self.wait = time.perf_counter(), 0.0

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor) -> None:
        self.state.update(logits, labels, loss_sum, check=False)

    def flush(self, world: int) -> dict:
        elapsed = time.perf_counter() - self.start
        local_n = int(self.state.n)
        extra = distributed.all_sum(torch.tensor([self.wait], dtype=torch.float64, device=self.device))
        self.state.all_reduce()
        values = self.state.compute()
        record = {k: values[k] for k in ("loss", "top1", "top5", "mrr")}
        record.update(images_per_s=values["n"] / elapsed, images_per_s_rank=local_n / elapsed,
                      data_wait=float(extra[0]) / world / elapsed)
        self._reset()
        return record


def _gather(items: list) -> list:
    """Concatenation of every rank's list, on every rank."""
    return [x for part in distributed.gather(items, everywhere=True) for x in part]


def _precision(setting: str, device: torch.device) -> str:
    if setting == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return str(setting)  # the plain value, not the Choice: it goes into the recipe and checkpoints


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)

"""Typed schema of `conf/train.yaml`, checked once at start-up (`TrainConfig.validate` via `to_object`).

Hydra type-checks overrides against these dataclasses, so a misspelt key or a wrong type fails
before any work; `__post_init__` checks values and names the key. There is deliberately no field
for a W&B key or any other secret: W&B reads `WANDB_API_KEY` from the environment, and a secret in
the config would be written to `config.yaml` and sent to W&B with the run's config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.runtime.choices import Choice
from trainer.runtime.exits import ConfigError, require


class Check(Choice):
    sha256 = "sha256"
    size = "size"
    off = "off"


class Augment(Choice):
    none = "none"
    trivialaugment = "trivialaugment"
    colorjitter = "colorjitter"


class Resize(Choice):
    crop = "crop"
    letterbox = "letterbox"


# webdataset | dali (trainer/data/dali.py) | torchvision-gpu (trainer/data/gpu_decode.py) | synthetic
# The functional form, because OmegaConf matches a setting to a member by name and "torchvision-gpu"
# is no identifier.
Backend = Choice("Backend", [(n, n) for n in ("webdataset", "dali", "torchvision-gpu", "synthetic")])


class DaliDevice(Choice):
    cpu = "cpu"
    gpu = "gpu"


class OptimName(Choice):
    sgd = "sgd"
    adamw = "adamw"


class Freeze(Choice):
    none = "none"
    backbone = "backbone"


class ClassWeight(Choice):
    none = "none"
    balanced = "balanced"
    sqrt = "sqrt"


class ScheduleKind(Choice):
    cosine = "cosine"
    step = "step"


class Precision(Choice):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class LoggerMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class LauncherKind(Choice):
    local = "local"
    slurm = "slurm"


class SlurmSignal(Choice):
    USR1 = "USR1"
    USR2 = "USR2"
    TERM = "TERM"


class BagStrategy(Choice):
    bootstrap = "bootstrap"
    seed = "seed"


@dataclass
class DataConfig:
    shards: str = "???"
    train_split: str = "train"
    val_split: str | None = "val"   # null: no validation
    check: Check = Check.sha256     # compare shards with the manifest before training: sha256 | size | off
    crop_size: int = 224
    eval_crop_ratio: float = 0.875  # eval resizes to crop_size / ratio, then centre-crops (224/256)
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random crop area range (letterbox too)
    hflip: float = 0.5
    # crop: a random crop in training, short side + centre crop in evaluation (cuts elongated objects) |
    # letterbox: the whole image, longer side to crop_size, padded square; training zooms in within scale
    resize: Resize = Resize.crop
    background: Any = 255           # letterbox padding: grey level 0-255 or [r,g,b]; black backgrounds: 0
    # letterbox: false never enlarges a small image (size stays a taxonomic cue); crop_size ~ largest image
    upscale: bool = True
    vflip: float = 0.0              # probability of a vertical flip
    rot90: bool = False             # rotate by a random multiple of 90 degrees (uniform)
    augment: Augment = Augment.none  # none | trivialaugment | colorjitter
    color_jitter: float = 0.4
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    shuffle_buffer: int = 1000      # samples per reader; larger mixes shards better, costs memory
    max_bad_fraction: float = 0.01  # per shard: more undecodable samples than this stops the run
    synthetic_samples: int = 1_281_167  # loader.backend=synthetic: "dataset" size (ImageNet-1k train)
    synthetic_classes: int = 1000
    # bagging (set by launch.bag): this member's bootstrap resample of the training split; null: none
    bootstrap_member: int | None = None
    bootstrap_seed: int = 0
    # learning curves: train on the samples with stable_hash("subset", fraction_seed, key) / 2^64 < fraction,
    # about `fraction` of each class; a smaller fraction's subset lies inside a larger one's. Train split only
    fraction: float = 1.0
    fraction_seed: int = 0

    def __post_init__(self) -> None:
        require(self.crop_size > 0, "data.crop_size", "must be > 0")
        require(0 < self.eval_crop_ratio <= 1, "data.eval_crop_ratio", "must be in (0, 1]")
        require(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1, "data.scale",
                "must be [low, high] with 0 < low <= high <= 1")
        require(0 <= self.hflip <= 1, "data.hflip", "must be a probability in [0, 1]")
        require(0 <= self.vflip <= 1, "data.vflip", "must be a probability in [0, 1]")
        require(_is_background(self.background), "data.background",
                f"must be a grey level 0-255 or [r, g, b], got {self.background!r}")
        require(self.upscale or self.resize == Resize.letterbox, "data.upscale",
                "false needs data.resize=letterbox (a crop always fills crop_size)")
        require(len(self.mean) == 3 and len(self.std) == 3 and min(self.std) > 0, "data.mean/std",
                "need 3 values each, std > 0")
        require(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
        require(0 <= self.max_bad_fraction < 1, "data.max_bad_fraction", "must be in [0, 1)")
        require(self.synthetic_samples > 0 and self.synthetic_classes > 0, "data.synthetic_*", "must be > 0")
        require(self.bootstrap_member is None or self.bootstrap_member >= 0, "data.bootstrap_member",
                "must be >= 0 or null")
        require(0 < self.fraction <= 1, "data.fraction", f"must be in (0, 1], got {self.fraction}")


def _is_background(value: object) -> bool:
    """A grey level or an [r, g, b] list of ints in 0-255 (the schema cannot type "int or list")."""
    levels = value if isinstance(value, list | tuple) and len(value) == 3 else [value]
    return all(type(v) is int and 0 <= v <= 255 for v in levels)  # type: bool is no grey level


@dataclass
class DaliConfig:
    # cpu (runs anywhere) | gpu (nvJPEG "mixed" decoding, augmentation on the GPU)
    device: DaliDevice = DaliDevice.cpu
    threads: int = 4        # DALI worker threads per rank

    def __post_init__(self) -> None:
        require(self.threads >= 1, "loader.dali.threads", "must be >= 1")


@dataclass
class LoaderConfig:
    # webdataset | dali (trainer/data/dali.py) | torchvision-gpu (trainer/data/gpu_decode.py) | synthetic
    backend: Backend = Backend.webdataset
    batch_size: int = 64    # per rank and per micro-step; global batch = this x world x accum_steps
    workers: int = 4        # DataLoader processes per rank; 0 reads in the training process
    prefetch: int = 2       # batches queued per worker (DALI: per pipeline)
    pin_memory: bool = True
    # workers (training and validation) that live for the whole run, told each epoch where to start;
    # false: new ones forked, started and joined every epoch and every validation (the old behaviour)
    persistent_workers: bool = True
    dali: DaliConfig = field(default_factory=DaliConfig)

    def __post_init__(self) -> None:
        require(self.batch_size > 0, "loader.batch_size", "must be > 0")
        require(self.workers >= 0, "loader.workers", "must be >= 0")
        require(self.prefetch >= 1, "loader.prefetch", "must be >= 1")


@dataclass
class ModelConfig:
    # a torchvision classification model (torchvision.models.list_models) or timm/<name> (timm.list_models)
    name: str = "resnet50"
    pretrained: str | None = None   # local weights file (.pt/.pth or .safetensors); never downloaded
    # none | backbone: only the classifier trains, on the fixed features of the pretrained backbone
    freeze: Freeze = Freeze.none
    zero_init_residual: bool = True  # last BN gamma of each residual block = 0 (Goyal et al. 5.1)
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False

    def __post_init__(self) -> None:
        require(bool(self.name), "model.name", "must be set")


@dataclass
class OptimConfig:
    name: OptimName = OptimName.sgd  # sgd | adamw
    base_lr: float = 0.1            # lr for a global batch of base_batch (linear scaling rule)
    base_batch: int = 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4      # not applied to BatchNorm/LayerNorm weights and biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    accum_steps: int = 1            # micro-batches per optimizer step
    grad_clip: float | None = None  # max global grad norm; null: no clipping
    label_smoothing: float = 0.0
    backbone_lr_scale: float = 1.0  # lr of everything but the classifier, as a fraction of the lr
    # rare classes (trainer/imbalance.py), from the train split's class_counts in _info.json:
    # loss weight per class: none | balanced (n / (C n_c), sklearn's) | sqrt (its square root)
    class_weight: ClassWeight = ClassWeight.none
    # logit adjustment (Menon et al. 2021): the loss sees logits + tau log(prior); 1.0 is the paper's
    logit_adjust_tau: float = 0.0

    def __post_init__(self) -> None:
        require(self.base_lr > 0, "optim.base_lr", "must be > 0")
        require(self.base_batch > 0, "optim.base_batch", "must be > 0")
        require(0 <= self.momentum < 1, "optim.momentum", "must be in [0, 1)")
        require(not self.nesterov or self.momentum > 0, "optim.nesterov", "needs optim.momentum > 0")
        require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        require(self.accum_steps >= 1, "optim.accum_steps", "must be >= 1")
        require(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", "must be > 0 or null")
        require(0 <= self.label_smoothing < 1, "optim.label_smoothing", "must be in [0, 1)")
        require(self.backbone_lr_scale > 0, "optim.backbone_lr_scale", "must be > 0; model.freeze=backbone "
                "trains no backbone")
        require(self.logit_adjust_tau >= 0, "optim.logit_adjust_tau", "must be >= 0 (0: off)")


@dataclass
class ScheduleConfig:
    kind: ScheduleKind = ScheduleKind.cosine  # cosine | step
    warmup_epochs: float = 5.0      # gradual warmup, per iteration (Goyal et al. 2.2)
    # null: start at base_lr, i.e. base_batch / global_batch of the scaled lr, as in Goyal et al.
    warmup_start_factor: float | None = None
    min_factor: float = 0.0         # cosine: final lr as a fraction of the peak
    milestones: list[float] = field(default_factory=lambda: [30.0, 60.0, 80.0])  # step: in epochs
    gamma: float = 0.1

    def __post_init__(self) -> None:
        require(self.warmup_epochs >= 0, "schedule.warmup_epochs", "must be >= 0")
        require(self.warmup_start_factor is None or 0 <= self.warmup_start_factor <= 1,
                "schedule.warmup_start_factor", "must be in [0, 1] or null")


@dataclass
class TrainerConfig:
    epochs: int = 90
    max_steps: int | None = None    # total optimizer steps of the run across resumes; overrides epochs
    precision: Precision = Precision.auto  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0
    log_every: int = 50             # steps between train metric lines
    eval_every: int = 1             # epochs between validations (and best-checkpoint updates)
    keep_last: int = 3              # checkpoints kept besides best
    checkpoint_every: int | None = None  # extra checkpoints every N steps; null: at epoch ends only
    # an epoch end saves only once this many seconds passed since the last save (Lightning's
    # train_time_interval), for epochs of seconds; the last epoch, a better best metric and a stop
    # always save. null: every epoch end saves, as in timm and Lightning
    checkpoint_every_s: float | None = None
    # epoch-end and checkpoint_every saves: tensors copied to CPU memory, then serialised, written,
    # fsynced and linked by a background thread while training goes on; a stop, the last save and the
    # next save wait for it, and its write error fails the run; the CPU copy is kept for the next one
    # (memory the size of a checkpoint). false: every save on the critical path
    checkpoint_async: bool = True
    stop_at_step: int | None = None  # checkpoint and exit as if preempted after this step (time-boxed chunks)
    signals: list[str] = field(default_factory=lambda: ["SIGUSR2", "SIGTERM"])  # set the stop flag
    dist_timeout_s: float = 300.0   # collectives; well below NCCL's 10 min and gloo's 30 min
    deterministic: bool = False     # torch.use_deterministic_algorithms (slower on GPU)

    def __post_init__(self) -> None:
        require(self.epochs > 0, "trainer.epochs", "must be > 0")
        require(self.max_steps is None or self.max_steps > 0, "trainer.max_steps", "must be > 0 or null")
        require(self.log_every > 0, "trainer.log_every", "must be > 0")
        require(self.eval_every > 0, "trainer.eval_every", "must be > 0")
        require(self.keep_last >= 1, "trainer.keep_last", "must be >= 1")
        require(self.checkpoint_every is None or self.checkpoint_every > 0, "trainer.checkpoint_every",
                "must be > 0 or null")
        require(self.checkpoint_every_s is None or self.checkpoint_every_s > 0, "trainer.checkpoint_every_s",
                "must be > 0 or null")
        require(self.stop_at_step is None or self.stop_at_step > 0, "trainer.stop_at_step", "must be > 0")
        require(self.dist_timeout_s > 0, "trainer.dist_timeout_s", "must be > 0")
        import signal

        for name in self.signals:
            require(isinstance(getattr(signal, name, None), signal.Signals), "trainer.signals",
                    f"{name!r} is not a signal name (e.g. SIGUSR2)")
            # no handler can be installed for these: the run would die instead of checkpointing
            require(name not in ("SIGKILL", "SIGSTOP"), "trainer.signals",
                    f"{name} cannot be caught; use SIGUSR1, SIGUSR2, SIGTERM, SIGINT or SIGHUP")


# W&B rejects these in a project or entity name, and tags or group names beyond these lengths
_WANDB_NAME_CHARS = set("/\\#?%:")
MAX_TAG_LEN, MAX_GROUP_LEN = 64, 128


@dataclass
class LoggerConfig:
    """W&B on rank 0 (metrics.jsonl is written whatever the mode); the API key comes from WANDB_API_KEY or
    ~/.netrc, never from here. Every null below is filled by the tool so that a bag is one W&B group
    (docs/WANDB.md); entity and project usually live in conf/local/default.yaml."""

    mode: LoggerMode = LoggerMode.offline  # offline (compute nodes: `wandb sync` later) | online | disabled
    project: str | None = None      # null: taxotrain (evaluate: the bag's)
    entity: str | None = None       # W&B team or user; null: the key's default (evaluate: the bag's)
    group: str | None = None        # null: the bag's folder name (a lone run: its run_dir's name)
    name: str | None = None         # null: <bag>/member-XX for a bag's members, else the run_dir's name
    job_type: str | None = None     # null: the tool's own (train, evaluate, export)
    tags: list[str] = field(default_factory=list)  # added to the automatic ones: experiment preset, model
    # per-class recall at each validation: one W&B scalar val/recall/<class> each (charts across steps
    # and members) up to this many classes; above, one table per validation (W&B's UI slows down with
    # thousands of keys). metrics.jsonl keeps the full list either way.
    class_scalars: int = 100

    def __post_init__(self) -> None:
        for key in ("project", "entity"):
            value = getattr(self, key)
            require(value is None or (value.strip() != "" and not _WANDB_NAME_CHARS & set(value)),
                    f"logger.{key}", f"must be null or a W&B name without / \\ # ? % :, got {value!r}")
        require(self.group is None or 0 < len(self.group) <= MAX_GROUP_LEN, "logger.group",
                f"must be null or 1-{MAX_GROUP_LEN} characters")
        require(self.job_type is None or 0 < len(self.job_type) <= MAX_TAG_LEN, "logger.job_type",
                f"must be null or 1-{MAX_TAG_LEN} characters")
        bad = [t for t in self.tags if not 0 < len(t) <= MAX_TAG_LEN]
        require(not bad, "logger.tags", f"each tag must have 1-{MAX_TAG_LEN} characters, got {bad}")
        require(self.class_scalars >= 0, "logger.class_scalars", f"must be >= 0, got {self.class_scalars}")


@dataclass
class LauncherConfig:
    """Where the run executes: `local` (this process; torchrun/srun set the ranks) or `slurm` (Submitit)."""

    kind: LauncherKind = LauncherKind.local  # local | slurm
    nodes: int = 1
    gpus_per_node: int = 0          # one task (rank) per GPU; 0: CPU nodes, tasks_per_node ranks each
    tasks_per_node: int = 1         # used when gpus_per_node is 0
    cpus_per_task: int = 8          # DataLoader workers + the training process
    mem_gb: int | None = None       # per node; null: the partition's default
    time_min: int = 60              # wall-clock limit of each (re)start
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    setup: list[str] = field(default_factory=list)  # lines run before srun: module loads, venv activation
    sbatch_extra: dict[str, str] = field(default_factory=dict)  # other #SBATCH options: {mail-type: END}
    signal: SlurmSignal = SlurmSignal.USR2  # sent to every task signal_lead_s before the time limit
    signal_lead_s: int = 120        # time to finish a step and write a checkpoint
    max_requeues: int = 10          # preemptions/time limits after which the job is left to fail
    log_dir: str | None = None      # Submitit's folder (sbatch script, logs); default: run_dir/slurm
    job_name: str = "taxotrain"
    wait: bool = False              # block until the job ends and report its state
    dry_run: bool = False           # print the sbatch script that would be submitted; submit nothing

    def __post_init__(self) -> None:
        require(self.nodes >= 1, "launcher.nodes", "must be >= 1")
        require(self.gpus_per_node >= 0, "launcher.gpus_per_node", "must be >= 0")
        require(self.tasks_per_node >= 1, "launcher.tasks_per_node", "must be >= 1")
        require(self.cpus_per_task >= 1, "launcher.cpus_per_task", "must be >= 1")
        require(self.mem_gb is None or self.mem_gb > 0, "launcher.mem_gb", "must be > 0 or null")
        require(self.time_min >= 1, "launcher.time_min", "must be >= 1")
        require(0 < self.signal_lead_s < self.time_min * 60, "launcher.signal_lead_s",
                f"must be in (0, launcher.time_min x 60 = {self.time_min * 60})")
        require(self.max_requeues >= 0, "launcher.max_requeues", "must be >= 0")

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.tasks_per_node


@dataclass
class PathsConfig:
    """Site paths, usually set once in the git-ignored conf/local/default.yaml."""

    runs: str = "runs"              # only `-m` sweeps use it: Hydra's multirun.yaml in <runs>/sweeps/<time>/


@dataclass
class BagConfig:
    """K members trained into run_dir/member-XX, recorded in run_dir/bag.json."""

    members: int = 2
    # bootstrap: a Poisson(1) resample per member | seed: seeds only
    strategy: BagStrategy = BagStrategy.bootstrap
    seed: int = 0                   # the bag's seed: member i trains with seed*1000 + i
    models: list[str] = field(default_factory=list)  # architectures, cycled over members; empty: model.name
    only: int | None = None         # train just this member (an array task); null: all of them
    # after training every member locally: fit calibration.json on data.val_split (taxotrain-calibrate)
    calibrate: bool = True

    def __post_init__(self) -> None:
        require(self.members >= 1, "bag.members", "must be >= 1")
        require(self.only is None or 0 <= self.only < self.members, "bag.only",
                f"must be in [0, bag.members={self.members}) or null")


@dataclass
class CurveConfig:
    """One run per training fraction into run_dir/fraction-F.FFF."""

    fractions: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    eval_split: str = "test"        # each run's best checkpoint is evaluated on this split
    only: int | None = None         # train just fractions[only] (an array task); null: all of them
    report_only: bool = False       # train nothing: evaluate the finished runs and write the report

    def __post_init__(self) -> None:
        f = self.fractions
        require(len(f) > 0, "curve.fractions", "must not be empty")
        require(all(0 < x <= 1 for x in f), "curve.fractions", f"each must be in (0, 1], got {f}")
        require(all(a < b for a, b in zip(f, f[1:])), "curve.fractions",
                f"must be strictly increasing, got {f}")
        # run directories are named by the fraction to 3 decimals: two fractions must not share one
        require(len({f"{x:.3f}" for x in f}) == len(f), "curve.fractions",
                f"must differ in the first 3 decimals (run directory names), got {f}")
        require(bool(self.eval_split), "curve.eval_split", "must be set")
        require(self.only is None or 0 <= self.only < len(f), "curve.only",
                f"must be in [0, {len(f)}) (an index into curve.fractions) or null")


@dataclass
class TrainConfig:
    """`python -m launch.train`: one training run into run_dir."""

    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    run_dir: str = "???"            # checkpoints, metrics, config.yaml; an existing run there is resumed

    def __post_init__(self) -> None:
        if "SIG" + self.launcher.signal not in self.trainer.signals:
            raise ConfigError(f"launcher.signal={self.launcher.signal} is not in trainer.signals="
                              f"{self.trainer.signals}: the job would be killed instead of checkpointing")
        if self.schedule.kind == ScheduleKind.step and self.trainer.max_steps is None:
            require(all(self.schedule.warmup_epochs <= m <= self.trainer.epochs
                       for m in self.schedule.milestones), "schedule.milestones",
                    f"must lie in [warmup_epochs, trainer.epochs={self.trainer.epochs}]")
        if self.loader.backend == Backend.dali:
            self._check_dali()
        if self.loader.backend != Backend.synthetic:
            _check_shards(self.data)
        _check_writable_dir(self.run_dir, "run_dir")

    def _check_dali(self) -> None:
        require(self.data.augment == Augment.none, "data.augment",
                f"{self.data.augment} is not available with loader.backend=dali (only random-resized-crop "
                "and flips): use data.augment=none or loader.backend=webdataset")
        require(self.data.bootstrap_member is None and self.data.fraction >= 1, "loader.backend",
                "dali reads every sample once per pass: bagging's bootstrap resample and data.fraction "
                "need loader.backend=webdataset")
        # DALI's pipeline has only its own random-resized-crop and horizontal flip (trainer/data/dali.py);
        # torchvision-gpu runs the webdataset transforms, so it has the plankton geometry too
        d = self.data
        for name, asked in (("resize", d.resize != Resize.crop), ("vflip", d.vflip > 0), ("rot90", d.rot90)):
            require(not asked, f"data.{name}", f"{name}={getattr(d, name)} is not available with "
                    "loader.backend=dali (only random-resized-crop and horizontal flips): use "
                    "loader.backend=webdataset or torchvision-gpu")


def _check_writable_dir(path: str, key: str) -> None:
    """A folder that exists or can be made: no part of the path is a file (a typo'd run_dir, say)."""
    for part in (Path(path).expanduser(), *Path(path).expanduser().parents):
        if part.exists():
            require(part.is_dir(), key, f"{path}: {part} exists and is not a folder")
            return


def _check_shards(data: DataConfig, *more: tuple[str, str | None]) -> None:
    """The shard set exists and has the splits asked for: known before any process group or run_dir."""
    asked = (("data.train_split", data.train_split), ("data.val_split", data.val_split), *more)
    check_shard_set(data.shards, "data.shards",
                    [(f"{key}={split!r}", split) for key, split in asked if split is not None], labelled=True)


def check_shard_set(path: str, key: str, splits: list[tuple[str, str]], labelled: bool = False) -> None:
    """`path` holds a shard set (`key` names the setting) with samples in each `(label, split)`; the
    `ConfigError` of a missing split starts with its label. For every schema that reads shards;
    `labelled` for those that need true classes (training, evaluation, calibration)."""
    from shards.info import InfoError, read_info  # not needed by synthetic runs

    try:
        info = read_info(Path(path).expanduser())
    except InfoError as err:
        raise ConfigError(f"{key}: {err}") from None
    for label, split in splits:
        try:
            found = info.split(split)
        except InfoError as err:
            raise ConfigError(f"{label}: {err}") from None
        if labelled and not found.labelled:
            raise ConfigError(f"{label}: split {split!r} of {path} is an unlabelled set (no true classes): "
                              "it can be predicted (taxotrain-predict split=...) or exported as features, "
                              "not evaluated or trained on")


@dataclass
class BagRunConfig(TrainConfig):
    """`python -m launch.bag`: TrainConfig for every member, plus the bag."""

    bag: BagConfig = field(default_factory=BagConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loader.backend == Backend.dali and self.bag.strategy == BagStrategy.bootstrap:
            raise ConfigError("bag.strategy=bootstrap: loader.backend=dali cannot draw bootstrap resamples; "
                              "use loader.backend=webdataset or bag.strategy=seed")


@dataclass
class CurveRunConfig(TrainConfig):
    """`python -m launch.learning_curve`: TrainConfig for every run, plus the curve."""

    curve: CurveConfig = field(default_factory=CurveConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.loader.backend == Backend.webdataset, "loader.backend",
                f"{self.loader.backend}: a learning curve needs webdataset (data.fraction subsets)")
        _check_shards(self.data, ("curve.eval_split", self.curve.eval_split))

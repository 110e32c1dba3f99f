"""The typed configuration: one frozen section per concern.

Recipe files (raysnet/recipes/*.yaml) fill these in, then `key=value` overrides. The same
resolved config is Ray's `train_loop_config`, Tune's base `param_space` and MLflow's params.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from raysnet.errors import ConfigError

WORKERS = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


def worker_range(workers: str | int) -> tuple[int, int]:
    """run.workers as (min, max): "8" is (8, 8); "2-8" an elastic run of 2 to 8 workers."""
    match = WORKERS.fullmatch(str(workers))
    low, high = (int(match[1]), int(match[2] or match[1])) if match else (0, 0)
    if not match or not 1 <= low <= high:
        raise ConfigError(f"bad value for 'run.workers': {str(workers)!r}. Expected a number of workers of at least 1 "
                          "(run.workers=8), or MIN-MAX for an elastic run that starts once MIN fit and grows to MAX "
                          "as nodes join (run.workers=2-8, MIN at least 1 and at most MAX).")
    return low, high


@dataclass(frozen=True)
class ModelConfig:
    shortcut: Optional[Literal["A", "B", "C"]] = None  # None: the paper's (A for CIFAR, B for ImageNet)
    variant: Optional[Literal["v1", "v1.5"]] = None  # None: the paper's "v1"
    channels_last: bool = True
    compile: bool = False  # torch.compile the model in each worker
    # torch.compile's mode: "reduce-overhead" replays CUDA graphs of Inductor's kernels (small nets,
    # where kernel launches cost more than the kernels), "max-autotune" also tunes those kernels,
    # "default" neither; "cudagraphs" replays CUDA graphs of the eager kernels (torch.compile's
    # cudagraphs backend: no kernel generation, so it compiles in seconds).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs",
                          "cudagraphs"] = "default"
    # Fine-tuning: start from the weights at `init` (anything `raysnet.checkpoint.load_model` reads: a
    # checkpoint file, checkpoint or run directory, models:/NAME/VERSION, models:/NAME@alias,
    # runs:/RUN_ID/model, or a plain state dict read as this run's arch). Every tensor whose name and
    # shape fit this run's network is loaded; the head (fc) is left fresh when the classes differ.
    # An initialisation, not a resume: epoch 0, a fresh optimiser and schedule. Empty: random init.
    init: str = ""
    # The lr of every loaded parameter, as a fraction of optim.lr (the fresh head gets all of it).
    init_lr_scale: float = 0.1
    # Freeze everything up to and including this stage: "stem" (conv1, bn1), "layer1", "layer2", ...
    # (no gradient, no update, BatchNorm statistics kept). Needs `init`. Empty: train everything.
    freeze: str = ""


@dataclass(frozen=True)
class DataConfig:
    """A dataset recipe (raysnet/recipes/data/NAME.yaml): where the FFCV files are, how to augment."""

    name: str = "digits"
    # Dataset directory with train.beton, val.beton, meta.json (see `python -m raysnet.prepare`).
    # Empty: $RAYSNET_DATA/<name>, or ~/.cache/raysnet/data/<name>.
    root: str = ""
    # Prepare the dataset into `root` on first use: the embedded `digits`, or else `source`.
    auto_prepare: bool = False
    # With auto_prepare: an ImageFolder tree or a .tar/.tar.gz of one (relative to the working
    # directory), prepared as `python -m raysnet.prepare source=imagefolder root=SOURCE` would.
    source: str = ""
    # "cifar": pad + random crop + flip (paper §4.2); "scale": shorter side in scale_range,
    # random crop, flip (paper §3.4); "rrc": FFCV's RandomResizedCrop decode.
    train_aug: Literal["cifar", "scale", "rrc"] = "cifar"
    # "original": the image as stored (CIFAR test); "center": resize shorter side to val_resize, centre crop.
    val_aug: Literal["original", "center"] = "original"
    crop: int = 32
    pad: int = 4
    flip: bool = True  # random horizontal flip (off for digits: a mirrored digit is another shape)
    scale_range: tuple[int, int] = (256, 480)
    val_resize: int = 256
    # Colour augmentation, two separate switches, so the paper's and fb.resnet.torch's are told
    # apart. pca_lighting: AlexNet's "standard colour augmentation" that paper §3.4 cites
    # (Krizhevsky et al. 2012 §4.1): add sum_i a_i lambda_i p_i to every pixel, a_i ~ N(0,
    # pca_lighting), over the eigenvectors p_i and eigenvalues lambda_i of the training pixels' RGB
    # covariance (meta.json's `pca`, else ImageNet's published values); 0.1 as AlexNet, 0: off.
    # colour_jitter: brightness, contrast and saturation factors in [1 - m, 1 + m] (torchvision's
    # ColorJitter(m, m, m)), which fb.resnet.torch adds at 0.4; 0: off.
    pca_lighting: float = 0.0
    colour_jitter: float = 0.0
    # "ffcv": FFCV loaders decode and augment every batch on the CPU; "device": each split is decoded
    # once into device memory and batches are cut and augmented there (raysnet.data.resident: the
    # CIFAR recipe on datasets that fit, for small nets a CPU loader cannot feed).
    loader: Literal["ffcv", "device"] = "ffcv"
    loader_workers: int = 2  # FFCV decoding threads per Ray worker
    os_cache: bool = True  # let the OS page cache hold the .beton (small datasets); False: FFCV's QUASI_RANDOM
    # Progressive resizing (FFCV's ImageNet recipe: cheaper early epochs; train_aug=rrc only): the
    # training crop grows from res_start to res_end px, in steps of 32 px, between the fractions
    # res_start_epoch and res_end_epoch of the run (counted at each epoch's end; see
    # data.loaders.train_resolution).
    # 0: off, every epoch trains at `crop`, which is always the size validation sees.
    res_start: int = 0
    res_end: int = 0
    res_start_epoch: float = 0.75
    res_end_epoch: float = 0.875
    # Test-time flip: validation averages the logits of each image and of its mirror image.
    val_flip: bool = False


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.1  # for `ref_batch_size`; scaled linearly with the global batch when `scale_lr`
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    label_smoothing: float = 0.0
    # "step": divide by 10 at each milestone (fractions of the run: the paper's CIFAR steps at
    # 32k and 48k of 64k iterations are 0.5 and 0.75); "cosine"; "onecycle".
    schedule: Literal["step", "cosine", "onecycle"] = "step"
    milestones: tuple[float, ...] = (0.5, 0.75)
    # Warm-up: `warmup_iters` iterations at lr * warmup_factor ("constant", the paper's
    # 110-layer recipe) or ramping up from it ("linear", Goyal et al. for large batches).
    warmup_iters: int = 0
    warmup_factor: float = 0.1
    warmup: Literal["constant", "linear"] = "constant"
    scale_lr: bool = False  # the linear scaling rule: lr * batch_size / ref_batch_size
    ref_batch_size: int = 128
    # Weight decay on BN weights and biases too (the paper: "weight decay 0.0001" on everything).
    # False: two parameter groups, decay only on conv and fc weights (FFCV's ImageNet recipe).
    wd_bn_bias: bool = True


@dataclass(frozen=True)
class RunConfig:
    name: str = ""  # empty: <arch>-<data>-<time>; rerunning with the same name resumes
    # N workers, or MIN-MAX: an elastic run, which starts as soon as MIN fit, grows to MAX as nodes
    # join and shrinks as they leave, the global batch and schedule unchanged (README, "Elastic runs").
    # One key, so that a range is one value everywhere a size is given (a sweep, a resume).
    workers: str = "2"
    # None: 1 when the cluster has GPUs, else 0. A fraction shares a GPU: 0.2 puts five trials of a
    # sweep on one device, each process limited to that share of its memory.
    gpus_per_worker: Optional[float] = None
    cpus_per_worker: int = 1
    max_failures: int = 3  # worker/node failures survived by restarting from the last checkpoint
    storage: str = "outputs"  # Ray storage_path: checkpoints, results, local MLflow store
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    keep_checkpoints: int = 2
    eval_every: int = 1  # validate every N epochs (and always on the last)
    max_steps: Optional[int] = None  # stop each epoch after N steps (smoke tests)
    # DDP static_graph: the ResNets use every parameter in every step, so DDP may record the
    # graph once and skip re-tracing which gradients are ready, a cost paid on every step otherwise.
    ddp_static_graph: bool = True
    # Progress inside an epoch, from rank 0, so a long epoch is never silent: a tqdm bar when the
    # driver's stdout is a terminal, else a plain line every `progress_s` seconds (Ray job logs are
    # not terminals). 0: off.
    progress_s: float = 30.0
    # An elastic run's worker group is resized when Ray finds room for more workers, checked this
    # often (Ray's ScalingConfig.elastic_resize_monitor_interval_s): each resize restarts the
    # workers from the last checkpoint, so checks far apart lose less work to resizes.
    resize_check_s: float = 60.0

    @property
    def min_workers(self) -> int:
        return worker_range(self.workers)[0]

    @property
    def max_workers(self) -> int:
        return worker_range(self.workers)[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers < self.max_workers


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db
    experiment: str = ""  # empty: raysnet-<data>
    log_model: bool = True  # mlflow.pytorch.log_model at the end
    # Training loss and error of rank 0's last `step_every` steps, at MLflow step = global iteration
    # (metrics iter/*: curves against iterations, as the paper draws them). None: about 30 points
    # per epoch; 0: off.
    step_every: Optional[int] = None
    # System metrics (CPU, memory, disk, network, each GPU) of every node that hosts a worker, sampled
    # every `system_metrics_s` seconds into the run's "System metrics" as system/node<i>/... 0: off.
    system_metrics_s: float = 10.0
    # Register the final model in MLflow's model registry under this name (needs log_model); empty: no.
    register: str = ""


@dataclass(frozen=True)
class Config:
    recipe: str = "digits"
    arch: str = "resnet20"
    epochs: int = 164
    batch_size: int = 128  # global, split across workers
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

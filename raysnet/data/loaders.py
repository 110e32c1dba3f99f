"""FFCV loaders for one Ray Train worker, built from explicit `image_pipeline` / `label_pipeline` lists.

Batches arrive on `device` as float32 B x 3 x H x W images, normalised with the train split's
per-channel mean and std, and int64 labels of shape (B,). They are views of FFCV's reused
buffers: clone anything kept past the next few batches.

Resuming: each loader draws its order from (seed, epoch), and counts epochs itself from 0.
A run that resumes at epoch E calls `set_epoch(train_loader, E)` before iterating, so it sees
the order an uninterrupted run would have seen.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import raysnet.data.ffcv_import  # noqa: F401  (before any ffcv import: see there)
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.operation import Operation
from ffcv.transforms import NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order import QuasiRandom
from ffcv.traversal_order.base import TraversalOrder

from raysnet.config import DataConfig
from raysnet.data import order
from raysnet.data.dataset import dataset_dir
from raysnet.data.layout import BETON
from raysnet.data.transforms import (IMAGENET_EIGVAL, IMAGENET_EIGVEC, ColourJitter, PCALighting, PadRandomCrop,
                                     RandomFlip, ScaleCropRGBImageDecoder, TorchNormalize)
from raysnet.errors import UsageError


def _constant_size(meta: dict[str, Any], split: str) -> bool:
    size = meta["splits"][split]["image_size"]
    return size["height"]["min"] == size["height"]["max"] and size["width"]["min"] == size["width"]["max"]


def train_decoder_and_augment(data: DataConfig, meta: dict[str, Any]) -> list[Operation]:
    """The training image pipeline up to normalisation: uint8 crop x crop x 3 images."""
    if (data.res_start or data.res_end) and data.train_aug != "rrc":
        raise UsageError(f"progressive resizing (data.res_start={data.res_start}, data.res_end={data.res_end}) "
                         f"resizes FFCV's random-resized crop; it needs data.train_aug=rrc, not "
                         f"{data.train_aug}. Set data.res_start=0 data.res_end=0 to train at data.crop.")
    if data.train_aug == "cifar":
        if not _constant_size(meta, "train"):
            raise UsageError(f"data.train_aug=cifar needs training images of one size, but '{dataset_dir(data)}' "
                             "holds several; use data.train_aug=scale or rrc.")
        # Paper §4.2: pad 4, random 32x32 crop, horizontal flip.
        ops: list[Operation] = [SimpleRGBImageDecoder(), PadRandomCrop(data.pad, data.crop)]
    elif data.train_aug == "scale":
        # Paper §3.4: shorter side in [256, 480], random 224x224 crop, flip, colour.
        ops = [ScaleCropRGBImageDecoder(data.crop, tuple(data.scale_range))]
    else:  # "rrc": FFCV's ImageNet decode (Inception-style random-resized crop)
        # With progressive resizing the worker resizes this decoder's output every epoch
        # (`set_train_resolution`); it starts at res_start.
        size = data.res_start or data.crop
        ops = [RandomResizedCropRGBImageDecoder((size, size))]
    if data.flip:
        ops.append(RandomFlip())
    return ops + colour_ops(data, meta)


def pca_components(meta: dict[str, Any]) -> tuple[list[float], list[list[float]]]:
    """(eigenvalues, eigenvectors as columns) of the training pixels' RGB covariance, 0-1 scale:
    meta.json's, or ImageNet's published ones for a dataset prepared without them."""
    pca = meta.get("pca")
    if pca:
        return pca["eigval"], pca["eigvec"]
    return list(IMAGENET_EIGVAL), [list(row) for row in IMAGENET_EIGVEC]


def colour_ops(data: DataConfig, meta: dict[str, Any]) -> list[Operation]:
    """Colour augmentation, each switch on its own: fb.resnet.torch's order, jitter then lighting."""
    ops: list[Operation] = []
    if data.colour_jitter:
        ops.append(ColourJitter(data.colour_jitter))
    if data.pca_lighting:
        ops.append(PCALighting(data.pca_lighting, *pca_components(meta)))
    return ops


def val_decoder(data: DataConfig, meta: dict[str, Any]) -> list[Operation]:
    if data.val_aug == "original":
        if not _constant_size(meta, "val"):
            raise UsageError(f"data.val_aug=original needs validation images of one size, but "
                             f"'{dataset_dir(data)}' holds several; use data.val_aug=center.")
        return [SimpleRGBImageDecoder()]  # paper §4.2: "the single view of the original 32x32 image"
    # Shorter side to val_resize, centre crop x crop (the standard single-crop ImageNet evaluation).
    return [CenterCropRGBImageDecoder((data.crop, data.crop), ratio=data.crop / data.val_resize)]


def to_batch(meta: dict[str, Any], device: torch.device, channels_last: bool,
             on_device: bool | None = None) -> list[Operation]:
    """uint8 B x H x W x 3 -> normalised float32 B x 3 x H x W on `device`.

    `on_device` (default: on CUDA) copies uint8 to `device` and normalises there; tests run
    that path on the CPU.
    """
    mean, std = np.asarray(meta["mean"], dtype=np.float64), np.asarray(meta["std"], dtype=np.float64)
    std = np.maximum(std, 1e-3)  # a constant channel (grey digits have three equal ones) must not divide by 0
    if device.type == "cuda" if on_device is None else on_device:
        # Copy uint8 (4x fewer bytes than float32), then normalise on the GPU. FFCV's
        # NormalizeImage kernel is channels-last and needs cupy; otherwise plain torch.
        ops: list[Operation] = [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
        if device.type == "cuda" and channels_last and importlib.util.find_spec("cupy") is not None:
            return ops + [NormalizeImage(mean, std, np.float32)]
        return ops + [TorchNormalize(mean, std, channels_last)]
    # CPU: normalise in the numba stage (a lookup table per channel), then view as NCHW.
    return [NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage(channels_last=channels_last)]


def label_pipeline(device: torch.device) -> list[Operation]:
    ops: list[Operation] = [IntDecoder(), ToTensor(), Squeeze(1)]  # (B, 1) int64 -> (B,)
    return (ops + [ToDevice(device, non_blocking=True)]) if device.type == "cuda" else ops


def _rank_world(distributed: bool) -> tuple[int, int]:
    if distributed and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if distributed:
        raise RuntimeError("make_loaders(distributed=True) needs torch.distributed initialised "
                           "(Ray Train's TorchTrainer does this in each worker)")
    return 0, 1


class ReproducibleQuasiRandom(QuasiRandom):
    """FFCV's QUASI_RANDOM order as a function of (seed, epoch) only.

    FFCV 1.0.2 shuffles its page table in place, so epoch E's order depends on every order
    drawn before it (the Loader itself draws one at construction): a resumed run would see
    different batches. Here each epoch starts from the pristine table.
    """

    def __init__(self, loader: Loader):
        super().__init__(loader)
        self.pristine = self.page_to_samples_array.copy()

    def sample_order(self, epoch: int) -> np.ndarray:
        self.page_to_samples_array[:] = self.pristine
        return super().sample_order(epoch)


class ShardedOrder(TraversalOrder):
    """FFCV's traversal order for `raysnet.data.order`: this rank's shard of every global batch."""

    def __init__(self, loader: Loader, *, batch_size: int, rank: int, world: int, max_steps: int | None):
        super().__init__(loader)
        self.batch_size, self.rank, self.world, self.max_steps = batch_size, rank, world, max_steps

    def sample_order(self, epoch: int) -> np.ndarray:
        return order.rank_order(len(self.indices), self.batch_size, self.seed, epoch, self.rank, self.world,
                                self.max_steps)


def make_loaders(data: DataConfig, meta: dict[str, Any], batch_size: int, *, device: torch.device, seed: int,
                 distributed: bool, channels_last: bool, drop_last_train: bool = True,
                 max_steps: int | None = None) -> tuple[Loader, Loader]:
    """(train_loader, val_loader) for this worker; `batch_size` is the global batch. `max_steps`
    (run.max_steps) ends each training epoch there: no epoch is left decoding in FFCV's thread.

    Train: this rank's shard of every global batch of `raysnet.data.order` (the same batches at
    every world size; one worker: FFCV's RANDOM order); with data.os_cache=False and one worker,
    FFCV's QUASI_RANDOM instead. Val: sequential, every sample exactly once across the ranks (each
    rank takes every world-th sample; FFCV's sampler would pad with repeats).
    """
    root = dataset_dir(data)
    rank, world = _rank_world(distributed)
    if data.loader == "device":  # the whole dataset on the device (raysnet.data.resident)
        from raysnet.data import resident

        return resident.make_loaders(data, meta, batch_size, root=root, device=device, seed=seed, rank=rank,
                                     world=world, channels_last=channels_last)
    tail = to_batch(meta, device, channels_last)
    labels = label_pipeline(device)
    # QUASI_RANDOM reads pages in a shuffled-but-local order when the .beton does not fit the
    # page cache (data.os_cache=False); it has no distributed version. drop_last_train=False (one
    # process: tools and tests that read every sample) is FFCV's RANDOM, the last batch partial.
    quasi = not data.os_cache and not distributed
    ffcv_order = OrderOption.QUASI_RANDOM if quasi else OrderOption.SEQUENTIAL if drop_last_train else OrderOption.RANDOM
    workers = max(1, data.loader_workers)
    share = order.shard_sizes(batch_size, world)[rank]
    train = Loader(str(root / BETON["train"]), batch_size=share, num_workers=workers, os_cache=data.os_cache,
                   order=ffcv_order, seed=seed, drop_last=drop_last_train,
                   pipelines={"image": train_decoder_and_augment(data, meta) + tail, "label": labels})
    n_val = int(meta["splits"]["val"]["samples"])
    val = Loader(str(root / BETON["val"]), batch_size=share, num_workers=workers, os_cache=data.os_cache,
                 order=OrderOption.SEQUENTIAL, indices=np.arange(rank, n_val, world), drop_last=False,
                 pipelines={"image": val_decoder(data, meta) + to_batch(meta, device, channels_last),
                            "label": label_pipeline(device)})
    # FFCV 1.0.2 cannot take a custom order class (Loader calls an instance), so swap it in; the
    # loader's length is that of the first order it drew.
    if quasi:
        train.traversal_order = ReproducibleQuasiRandom(train)
    elif drop_last_train:
        train.traversal_order = ShardedOrder(train, batch_size=batch_size, rank=rank, world=world,
                                             max_steps=max_steps)
    train.first_traversal_order = train.next_traversal_order()
    if len(train) == 0:
        raise UsageError(f"batch_size {batch_size} is larger than the {meta['splits']['train']['samples']} "
                         f"training samples in '{root}'; lower batch_size.")
    return train, val


# Progressive resizing moves in whole steps of this many pixels: FFCV's ImageNet recipe rounds
# to multiples of 32, so a 160 -> 192 ramp is one switch. Fewer distinct input shapes mean fewer
# cuDNN autotuning rounds and torch.compile recompilations.
RES_STEP = 32


def train_resolution(data: DataConfig, epoch: int, epochs: int) -> int:
    """The training crop (px) of 0-based `epoch` of `epochs`: `data.crop` unless progressive resizing.

    Progress is counted at the end of the epoch, (epoch + 1) / epochs: res_start up to progress
    res_start_epoch, res_end from res_end_epoch, linear in between, rounded (half up) to whole
    RES_STEP steps from res_start. With 0.75 and 0.875 this is FFCV's ResNet-50 ramp for every
    preset (its configs start at 0.75 E - 1 and end at 0.875 E - 1, in 0-based epochs).
    """
    if not data.res_start or not data.res_end:
        return data.crop
    done, start, end = epoch + 1, data.res_start_epoch * epochs, data.res_end_epoch * epochs
    if done <= start:
        return data.res_start
    if done >= end:
        return data.res_end
    grow = (data.res_end - data.res_start) * (done - start) / (end - start)
    return data.res_start + math.floor(grow / RES_STEP + 0.5) * RES_STEP


def set_train_resolution(loader: Loader, size: int) -> bool:
    """Make the training loader's random-resized crop emit `size` x `size` images from its next epoch.

    FFCV sizes its buffers from each operation's declared output when code is generated, so a new
    size regenerates the pipeline (numba compiles it again: do this only when the size changes).
    -> True when the size changed.
    """
    spec = loader.pipeline_specs["image"]  # FFCV moves the pipeline's first op into spec.decoder
    decoders = [op for op in (spec.decoder, *spec.transforms) if isinstance(op, RandomResizedCropRGBImageDecoder)]
    if not decoders:
        raise UsageError("progressive resizing needs the random-resized crop decoder (data.train_aug=rrc).")
    decoder = decoders[0]
    if tuple(decoder.output_size) == (size, size):
        return False
    decoder.output_size = (size, size)
    loader.generate_code()
    return True


def set_epoch(loader: Loader, epoch: int) -> None:
    """Make the next `iter(loader)` produce epoch `epoch`'s order (0-based), e.g. after resuming."""
    loader.next_epoch = epoch

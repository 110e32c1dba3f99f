"""Device-resident loaders (`data.loader=device`): for datasets that fit in device memory (CIFAR-10
is 150 MB as uint8), decode each split once with FFCV into one uint8 tensor on the worker's device,
then cut every batch out of it there, with the recipe's augmentation done on the device.

Small nets on a GPU are starved by a CPU loader (their steps take less time than decoding and
augmenting a batch on a few cores); here a step costs a gather and a few
elementwise kernels, and no host sync. The semantics are the FFCV path's, so runs are comparable:

- order: the training order of epoch E is exactly the FFCV loader's (`data.loaders.make_loaders`)
  for the same seed: `raysnet.data.order`, each rank its shard of every global batch; whole
  batches only.
- augmentation (data.train_aug=cifar, paper §4.2): zero-pad `pad` pixels, a random crop x crop
  window, a mirror with probability 1/2 (data.flip). Random numbers come from a generator seeded
  by (seed, rank, epoch), so a resumed run sees the same crops as well as the same order.
- validation: the original images (data.val_aug=original), rank r taking every world-th sample.
- batches: float32 B x 3 x H x W normalised with the train split's mean and std (channels_last
  strides when asked), int64 labels (B,), as the FFCV loaders deliver them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from raysnet.config import DataConfig
from raysnet.data import order
from raysnet.errors import UsageError

DECODE_BATCH = 1024


def check(data: DataConfig, meta: dict[str, Any]) -> None:
    """data.loader=device supports what it implements; found before Ray starts."""
    unsupported = [f"data.{k}={v}" for k, v, ok in (
        ("train_aug", data.train_aug, data.train_aug == "cifar"),
        ("val_aug", data.val_aug, data.val_aug == "original"),
        ("pca_lighting", data.pca_lighting, not data.pca_lighting),
        ("colour_jitter", data.colour_jitter, not data.colour_jitter),
        ("res_start", data.res_start, not data.res_start)) if not ok]
    splits = (meta["splits"]["train"], meta["splits"]["val"])
    if len({s["image_size"][d][m] for s in splits for d in ("height", "width") for m in ("min", "max")}) != 1:
        unsupported.append(f"images of several sizes in '{data.root}'")
    if unsupported:
        raise UsageError(f"data.loader=device keeps the dataset on the device and implements the CIFAR recipe "
                         f"(data.train_aug=cifar, data.val_aug=original, no colour, no progressive resizing) on "
                         f"square images of one size; this run has {', '.join(unsupported)}. Use "
                         "data.loader=ffcv for this dataset or recipe.")


def decode_split(path: str, samples: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a .beton, in file order, as (uint8 N x H x W x 3, int64 N) on the CPU."""
    import raysnet.data.ffcv_import  # noqa: F401
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToTensor

    loader = Loader(path, batch_size=DECODE_BATCH, num_workers=max(1, workers), order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()],
                                                "label": [IntDecoder(), ToTensor(), Squeeze(1)]})
    images, labels, at = None, torch.empty(samples, dtype=torch.int64), 0
    for x, y in loader:  # views of FFCV's reused buffers: copy them out
        if images is None:
            images = torch.empty((samples, *x.shape[1:]), dtype=torch.uint8)
        images[at:at + len(x)], labels[at:at + len(x)] = x, y
        at += len(x)
    if images is None or at != samples:
        raise UsageError(f"'{path}' holds {at} samples, but its meta.json says {samples}; prepare the dataset again.")
    return images, labels


def pad_crop_flip(images: torch.Tensor, pad: int, crop: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """uint8 B x H x W x C -> B x crop x crop x C: a random window of the zero-padded image, mirrored
    with probability 1/2 when `flip`. One gather on the images' device."""
    n, h, w, _ = images.shape
    device = images.device
    dy = torch.randint(0, h + 2 * pad - crop + 1, (n, 1), device=device, generator=generator) - pad
    dx = torch.randint(0, w + 2 * pad - crop + 1, (n, 1), device=device, generator=generator) - pad
    steps = torch.arange(crop, device=device)
    mirrored = torch.rand((n, 1), device=device, generator=generator) < 0.5 if flip else \
        torch.zeros((n, 1), dtype=torch.bool, device=device)
    rows = dy + steps  # (B, crop): source rows
    cols = dx + torch.where(mirrored, crop - 1 - steps, steps)  # (B, crop): source columns, reversed when mirrored
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    batch = torch.arange(n, device=device)[:, None, None]
    window = images[batch, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    return window * inside[..., None].to(window.dtype)  # the padding is black (0), as in FFCV's PadRandomCrop


class ResidentLoader:
    """Batches of one split held on `device`; iterating draws the next epoch, as FFCV's Loader does
    (`next_epoch` is what `data.set_epoch` sets when a run resumes)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, mean: torch.Tensor,
                 std: torch.Tensor, channels_last: bool, seed: int, rank: int, world: int,
                 train: DataConfig | None):
        # `batch_size`: the global batch, of which this rank takes its shard each step
        self.images, self.labels, self.global_batch = images, labels, batch_size
        self.batch_size = order.shard_sizes(batch_size, world)[rank]
        self.mean, self.std, self.channels_last = mean, std, channels_last
        self.seed, self.rank, self.world, self.train = seed, rank, world, train
        self.next_epoch = 0

    def order(self, epoch: int) -> np.ndarray:
        if self.train is None:  # validation: sequential, every world-th sample
            return np.arange(self.rank, len(self.labels), self.world)
        return order.rank_order(len(self.labels), self.global_batch, self.seed, epoch, self.rank, self.world)

    def _steps(self, samples: int) -> int:
        """Training drops a last, partial batch (as the FFCV loader does); validation keeps it."""
        return samples // self.batch_size if self.train is not None else math.ceil(samples / self.batch_size)

    def __len__(self) -> int:
        return self._steps(len(self.order(0)))

    def _generator(self, epoch: int) -> torch.Generator:
        generator = torch.Generator(device=self.images.device)
        generator.manual_seed(int(np.random.SeedSequence([self.seed, self.rank, epoch]).generate_state(1)[0]))
        return generator

    def __iter__(self):
        epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
        indices = torch.from_numpy(self.order(epoch)).to(self.images.device)  # drawn once an epoch
        generator = self._generator(epoch) if self.train is not None else None
        for step in range(self._steps(len(indices))):
            index = indices[step * self.batch_size:(step + 1) * self.batch_size]
            images = self.images[index]
            if self.train is not None:
                images = pad_crop_flip(images, self.train.pad, self.train.crop, self.train.flip, generator)
            yield self._normalise(images), self.labels[index]

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 B x H x W x C -> float32 B x C x H x W; the permuted view has channels_last strides."""
        batch = ((images.float() - self.mean) / self.std).permute(0, 3, 1, 2)
        return batch if self.channels_last else batch.contiguous()


def make_loaders(data: DataConfig, meta: dict[str, Any], batch_size: int, *, root, device: torch.device, seed: int,
                 rank: int, world: int, channels_last: bool) -> tuple[ResidentLoader, ResidentLoader]:
    """(train, val) on `device`; `batch_size` is the global batch. Each worker decodes the whole of both
    splits (CIFAR-10: a few seconds) and keeps its own copy."""
    from raysnet.data.layout import BETON

    check(data, meta)
    mean = torch.as_tensor(meta["mean"], dtype=torch.float32, device=device)
    std = torch.as_tensor(np.maximum(np.asarray(meta["std"], dtype=np.float64), 1e-3), dtype=torch.float32,
                          device=device)  # a constant channel (grey digits) must not divide by 0
    loaders = []
    for split in ("train", "val"):
        images, labels = decode_split(str(root / BETON[split]), int(meta["splits"][split]["samples"]),
                                      data.loader_workers)
        loaders.append(ResidentLoader(images.to(device), labels.to(device), batch_size=batch_size, mean=mean,
                                      std=std, channels_last=channels_last, seed=seed, rank=rank, world=world,
                                      train=data if split == "train" else None))
    return loaders[0], loaders[1]

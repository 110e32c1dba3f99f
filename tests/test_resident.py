"""Device-resident loaders (data.loader=device) keep the FFCV path's semantics: the same order per
(seed, epoch), disjoint shards, the paper's pad-crop-flip, normalised batches. Run here on the CPU,
which is a device like any other to them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import CPU, RAW, coordinate_images, decoded_index, index_dataset, raw_meta, read_windows

from raysnet.config import DataConfig
from raysnet.data import check_dataset, make_loaders, set_epoch
from raysnet.data import resident as res
from raysnet.data.sources import from_arrays
from raysnet.data.writer import write_dataset
from raysnet.errors import UsageError

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# Windows that are the whole 8x8 index image: the order can be read back from pixel (0, 0).
WHOLE = {"train_aug": "cifar", "pad": 0, "crop": 8, "flip": False}


def data_config(root: Path, loader: str, **data: object) -> DataConfig:
    return DataConfig(name="test", root=str(root), loader=loader, loader_workers=1, **data)


def build(root: Path, meta: dict, loader: str = "device", batch_size: int = 16, seed: int = 0, rank: int = 0,
          world: int = 1, **data: object):
    cfg = data_config(root, loader, **data)
    if loader == "device":
        return res.make_loaders(cfg, meta, batch_size, root=root, device=CPU, seed=seed, rank=rank, world=world,
                                channels_last=True)
    return make_loaders(cfg, meta, batch_size, device=CPU, seed=seed, distributed=False, channels_last=True)


def order(loader) -> list[int]:
    """The samples of one epoch, read from the images (identity normalisation)."""
    return [i for x, _ in loader for i in decoded_index(x.permute(0, 2, 3, 1).round().to(torch.uint8).numpy())]


@pytest.fixture(scope="module")
def index_root(tmp_path_factory) -> tuple[Path, dict]:
    root = index_dataset(tmp_path_factory.mktemp("resident") / "index", 96, 50)
    return root, raw_meta(check_dataset(DataConfig(root=str(root))))


def test_training_order_is_the_ffcv_loaders(index_root):
    root, meta = index_root
    ffcv_train, ffcv_val = build(root, meta, "ffcv", **WHOLE)
    train, val = build(root, meta, **WHOLE)
    for _ in range(2):  # two epochs: the same batches, each epoch a new order
        assert order(train) == order(ffcv_train)
    assert order(val) == order(ffcv_val) == list(range(50))  # validation: stored order, every sample once
    assert len(train) == len(ffcv_train) == 96 // 16


def test_every_sample_once_per_epoch_in_disjoint_shards(index_root):
    root, meta = index_root
    ranks = [build(root, meta, batch_size=16, rank=r, world=2, **WHOLE) for r in (0, 1)]
    epochs = []
    for _ in range(2):
        (a, _), (b, _) = ((order(train), order(val)) for train, val in ranks)
        assert len(a) == len(b) == 48 and not set(a) & set(b) and sorted(a + b) == list(range(96))
        epochs.append(a)
    assert epochs[0] != epochs[1]
    vals = [order(val) for _, val in ranks]
    assert sorted(vals[0] + vals[1]) == list(range(50)) and vals[0] == list(range(0, 50, 2))


def test_resumed_run_sees_the_same_batches(tmp_path):
    """Order and crops both come from (seed, rank, epoch): epoch 2 after a restart is epoch 2."""
    n = 64
    write_dataset(from_arrays("coords", ["x"], (coordinate_images(n), np.zeros(n, int)),
                              (coordinate_images(4), np.zeros(4, int))), tmp_path / "ds", RAW)
    meta = raw_meta(check_dataset(DataConfig(root=str(tmp_path / "ds"))))
    first, _ = build(tmp_path / "ds", meta, seed=3)
    epochs = [[x.clone() for x, _ in first] for _ in range(3)]
    resumed, _ = build(tmp_path / "ds", meta, seed=3)
    set_epoch(resumed, 2)
    again = [x for x, _ in resumed]
    assert all(torch.equal(x, y) for x, y in zip(again, epochs[2], strict=True))
    assert not torch.equal(epochs[1][0], epochs[2][0])
    other, _ = build(tmp_path / "ds", meta, seed=4)
    assert not torch.equal(next(iter(other))[0], epochs[0][0])


def test_pad_crop_flip_distribution():
    """Paper §4.2 on the device: every one of the 9 x 9 offsets and both mirror states, uniformly."""
    generator = torch.Generator().manual_seed(0)
    images, pad = torch.from_numpy(coordinate_images(4000)), 4
    windows = read_windows(res.pad_crop_flip(images, pad, 32, True, generator).numpy(), pad)
    for axis in (0, 1):
        counts = Counter(w[axis] for w in windows)
        assert sorted(counts) == list(range(-4, 5))
        # 4000 draws over 9 offsets: 444 expected each, sd 20; 100 is 5 sd.
        assert all(abs(c - 4000 / 9) < 100 for c in counts.values()), counts
    assert 0.46 < np.mean([m for *_, m in windows]) < 0.54  # sd 0.008
    unflipped = read_windows(res.pad_crop_flip(images[:200], pad, 32, False, generator).numpy(), pad)
    assert not any(m for *_, m in unflipped)


def test_batches_are_normalised_and_channels_last(index_root):
    root, meta = index_root
    stats = {**meta, "mean": [100.0, 50.0, 25.0], "std": [2.0, 4.0, 8.0]}
    _, val = build(root, stats, **WHOLE)
    x, y = next(iter(val))
    assert x.dtype == torch.float32 and x.shape == (16, 3, 8, 8) and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    pixels = torch.tensor([100.0, 50.0, 25.0]).view(1, 3, 1, 1) + torch.tensor([2.0, 4.0, 8.0]).view(1, 3, 1, 1) * x
    assert torch.allclose(pixels[:, :, 1:, 1:], torch.full_like(pixels[:, :, 1:, 1:], 100.0))  # index_images' grey
    assert y.tolist() == [i % 4 for i in range(16)]


@pytest.mark.parametrize("bad", [{"train_aug": "scale"}, {"val_aug": "center"}, {"pca_lighting": 0.1},
                                 {"colour_jitter": 0.4}])
def test_what_it_does_not_implement_is_refused_before_ray(index_root, bad):
    root, meta = index_root
    with pytest.raises(UsageError) as e:
        res.check(data_config(root, "device", **bad), meta)
    message = str(e.value)
    assert f"data.{next(iter(bad))}=" in message and "data.loader=ffcv" in message

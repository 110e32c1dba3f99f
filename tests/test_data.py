"""The data layer: prepare -> check -> load round trips, failure handling, sharding, augmentation."""

from __future__ import annotations

import itertools
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import command, one_paragraph
from imagery import photo, stored_samples
from PIL import Image

from raysnet import cli
from raysnet.cli import UsageError
from raysnet.config import ConfigError, DataConfig
from raysnet.data import check_dataset, ensure_dataset, make_loaders, order, prepare, set_epoch, steps_per_epoch
from raysnet.data.dataset import read_beton_header
from raysnet.data.encode import pixel_sums
from raysnet.data.sources import ArraySamples, Split, digits_arrays, from_arrays
from raysnet.data.transforms import scale_crop
from raysnet.data.writer import WriteError, WriteSettings, write_dataset
from raysnet.prepare import parse_args

# numba's dispatcher finaliser trips over FFCV's per-loader compiled functions when a loader is
# garbage-collected; harmless, and not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CPU = torch.device("cpu")
RAW = WriteSettings("raw", None, 90, 0.5, 0, workers=2, progress=False)
IDENTITY = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}  # normalised values == stored pixels


def raw_meta(meta: dict) -> dict:
    return {**meta, **IDENTITY}


def loaders(root: Path, meta: dict, batch_size: int = 16, seed: int = 0, **data: object):
    cfg = DataConfig(name="test", root=str(root), loader_workers=1, **data)
    return make_loaders(cfg, raw_meta(meta), batch_size, device=CPU, seed=seed, distributed=False,
                        channels_last=False, drop_last_train=False)


def collect(loader) -> tuple[np.ndarray, np.ndarray]:
    """All batches as uint8 NHWC images and labels (the loaders' buffers are reused: copy)."""
    images, labels = [], []
    for x, y in loader:
        images.append(x.permute(0, 2, 3, 1).round().to(torch.uint8).numpy().copy())
        labels.append(y.numpy().copy())
    return np.concatenate(images), np.concatenate(labels)


def one_paragraph_exit(capsys, argv: list[str], run=None) -> str:
    """Run an entry point in-process; it must exit 2 with one paragraph and no traceback."""
    from raysnet.prepare import run as prepare_run

    with pytest.raises(SystemExit) as e:
        cli.main(run or prepare_run, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and "Traceback" not in err and "\n\n" not in err.strip()
    return " ".join(err.split())


def index_images(n: int, size: int = 8) -> np.ndarray:
    """Images that carry their own index in pixel (0, 0): red = i % 256, green = i // 256."""
    images = np.full((n, size, size, 3), 100, dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 0, 1] = np.arange(n) // 256
    return images


def decoded_index(images: np.ndarray) -> list[int]:
    return (images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)).tolist()


def index_dataset(out: Path, n_train: int, n_val: int) -> Path:
    train, val = index_images(n_train), index_images(n_val)
    write_dataset(from_arrays("index", ["a", "b", "c", "d"], (train, np.arange(n_train) % 4),
                              (val, np.arange(n_val) % 4)), out, RAW)
    return out


# --- prepare -> load round trips -------------------------------------------------------------


def test_ffcv_is_imported_with_its_image_modes_as_a_plain_dict():
    """raysnet.data.ffcv_import: FFCV's table of image modes holds its two entries, and numba's
    typed Dict is numba's again once FFCV is imported (a process of its own: this one has FFCV)."""
    script = ("import raysnet.data.loaders, numba.typed, numba.typed.typeddict\n"
              "from ffcv.fields import rgb_image\n"
              "print(type(rgb_image.IMAGE_MODES).__name__, sorted(rgb_image.IMAGE_MODES.items()),\n"
              "      numba.typed.Dict is numba.typed.typeddict.Dict)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "dict [('jpg', 0), ('raw', 1)] True", done.stdout + done.stderr


def test_digits_round_trip(digits, capsys):
    meta = check_dataset(DataConfig(name="digits", root=str(digits)), num_classes=10)
    (train_x, train_y), (val_x, val_y) = digits_arrays()
    assert meta["classes"] == [str(d) for d in range(10)]
    assert (meta["splits"]["train"]["samples"], meta["splits"]["val"]["samples"]) == (1437, 360)
    assert sum(meta["splits"]["train"]["per_class"].values()) + sum(meta["splits"]["val"]["per_class"].values()) == 1797
    assert np.allclose(meta["mean"], train_x.reshape(-1, 3).mean(0), atol=1e-3)
    assert meta["write"]["write_mode"] == "raw"

    train, val = loaders(digits, meta, train_aug="cifar", pad=0, flip=False, val_aug="original")
    images, labels = collect(val)  # sequential: stored order, every pixel as prepared
    assert np.array_equal(images, val_x) and np.array_equal(labels, val_y)
    images, labels = collect(train)  # shuffled: the same set
    order = np.lexsort(images.reshape(len(images), -1).T)
    expected = np.lexsort(train_x.reshape(len(train_x), -1).T)
    assert np.array_equal(images[order], train_x[expected]) and np.array_equal(labels[order], train_y[expected])

    # A second ensure_dataset finds it and prepares nothing.
    ensure_dataset(DataConfig(name="digits", root=str(digits), auto_prepare=True))
    assert "preparing" not in capsys.readouterr().out


def test_loaders_of_one_pipeline_share_their_compiled_operations(digits):
    """raysnet.data.ffcv_import: a second loader of the same pipeline reuses the first's compiled
    operations; one whose operation closes over another value (the crop) compiles that one anew."""
    meta = check_dataset(DataConfig(root=str(digits)))

    def operations(crop: int):
        train = loaders(Path(digits), meta, batch_size=64, train_aug="cifar", pad=4, crop=crop)[0]
        assert next(iter(train))[0].shape[-2:] == (crop, crop)
        return train, [f for stage, _ in train.code[0] for name, f in stage.__globals__.items()
                       if name.startswith("code_") and hasattr(f, "py_func")]  # compiled by numba

    (_, first), (_, again), (_, smaller) = operations(32), operations(32), operations(28)
    assert len(first) >= 3 and {id(f) for f in first} == {id(f) for f in again}
    assert {id(f) for f in first} & {id(f) for f in smaller} and {id(f) for f in first} != {id(f) for f in smaller}


def test_pixel_sums_are_the_exact_sums_and_products_of_the_channels():
    rng = np.random.default_rng(5)
    for rgb in (rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), np.full((4, 4, 3), 255, np.uint8),
                np.zeros((1, 1, 3), np.uint8)):
        flat = rgb.reshape(-1, 3).astype(np.float64)
        sums, products = pixel_sums(rgb)
        assert np.array_equal(sums, flat.sum(0)) and np.array_equal(products, flat.T @ flat)


@pytest.mark.parametrize("os_cache", [True, False])  # RANDOM, and QUASI_RANDOM for datasets beyond RAM
def test_order_depends_on_seed_and_epoch_only(digits, os_cache):
    data = DataConfig(name="digits", root=str(digits), os_cache=os_cache, loader_workers=1)
    meta = check_dataset(data)

    def labels(loader) -> list[int]:
        return [i for _, y in loader for i in y.tolist()]

    def build(seed: int):
        return make_loaders(data, meta, 64, device=CPU, seed=seed, distributed=False, channels_last=True)[0]

    train = build(0)
    epochs = [labels(train), labels(train)]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) != epochs[0]
    again = build(0)
    set_epoch(again, 1)  # resuming at epoch 1 sees epoch 1's batches
    assert labels(again) == epochs[1] and labels(again) != epochs[1]  # and then moves on to epoch 2
    assert labels(build(1)) != epochs[0]


@pytest.mark.parametrize("channels_last", [True, False])
def test_device_normalisation_path_matches_cpu_path(digits, channels_last):
    """The CUDA branch (uint8 to the device, then normalise there), run on the CPU."""
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.loader import Loader

    from raysnet.data.loaders import label_pipeline, to_batch

    meta = check_dataset(DataConfig(root=str(digits)))
    batches = {}
    for on_device in (False, True):
        loader = Loader(str(Path(digits) / "val.beton"), batch_size=100, num_workers=1, drop_last=False,
                        pipelines={"image": [SimpleRGBImageDecoder()] + to_batch(meta, CPU, channels_last, on_device),
                                   "label": label_pipeline(CPU)})
        batches[on_device] = [(x.clone(), y.clone()) for x, y in loader]
    for (x, y), (xd, yd) in zip(batches[False], batches[True]):
        assert xd.dtype == torch.float32 and xd.shape == x.shape == (len(y), 3, 32, 32)
        assert xd.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.allclose(x, xd, atol=1e-5) and torch.equal(y, yd) and yd.dtype == torch.int64


def write_cifar(root: Path, per_batch: int = 4, n_test: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                            np.ndarray]:
    """A tiny CIFAR-10 in the pickled release's layout; returns (train x, y, test x, y) as NHWC."""
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)  # R plane, G plane, B plane
        labels = rng.integers(0, 10, n).tolist()
        with open(d / name, "wb") as f:
            pickle.dump({"data": rows, "labels": labels, "batch_label": name}, f)
        xs.append(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(labels))
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"]}, f)
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


def test_cifar_round_trip(tmp_path):
    train_x, train_y, test_x, test_y = write_cifar(tmp_path / "src")
    meta = prepare(parse_args(["source=cifar10", f"root={tmp_path / 'src'}", f"out={tmp_path / 'cifar'}",
                               "download=false", "progress=false"]))
    assert meta["classes"][0] == "airplane" and meta["num_classes"] == 10
    assert meta["splits"]["train"]["samples"] == 20 and meta["splits"]["val"]["samples"] == 6
    assert list(meta["splits"]["train"]["per_class"].values()) == np.bincount(train_y, minlength=10).tolist()

    train, val = loaders(tmp_path / "cifar", check_dataset(DataConfig(root=str(tmp_path / "cifar"))),
                         batch_size=4, train_aug="cifar", pad=0, flip=False, val_aug="original")
    images, labels = collect(val)
    assert np.array_equal(images, test_x) and np.array_equal(labels, test_y)
    images, labels = collect(train)
    key = lambda x: [im.tobytes() for im in x]  # noqa: E731
    assert sorted(zip(key(images), labels.tolist())) == sorted(zip(key(train_x), train_y.tolist()))


def make_imagefolder(root: Path, classes=("cat", "dog", "eel"), n_train: int = 4, n_val: int = 2,
                     val_name: str = "val") -> dict[str, np.ndarray]:
    """Varied sizes, PNG and JPEG. Returns {relative path: the pixels PIL decodes from it}."""
    rng = np.random.default_rng(1)
    pixels = {}
    for split, n in (("train", n_train), (val_name, n_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(20, 70, 2)
                path = root / split / c / f"{i}.{'png' if i % 2 else 'jpg'}"
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
                pixels[str(path.relative_to(root))] = np.asarray(Image.open(path).convert("RGB"))
    return pixels


def stored_raw_images(beton: Path) -> list[np.ndarray]:
    """Read a raw-mode .beton's images straight from its bytes, in stored order."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    data = np.fromfile(beton, dtype=np.uint8)
    images = []
    for m in reader.metadata:
        ptr, h, w = int(m["f0"]["data_ptr"]), int(m["f0"]["height"]), int(m["f0"]["width"])
        assert m["f0"]["mode"] == 1  # raw
        images.append(data[ptr:ptr + h * w * 3].reshape(h, w, 3))
    return images


def test_imagefolder_round_trip(tmp_path):
    pixels = make_imagefolder(tmp_path / "src")
    meta = prepare(parse_args(["source=imagefolder", f"root={tmp_path / 'src'}", f"out={tmp_path / 'ds'}",
                               "storage=raw", "max_resolution=null", "workers=2", "progress=false"]))
    assert meta["classes"] == ["cat", "dog", "eel"] and meta["skipped"] == []
    assert meta["splits"]["train"]["per_class"] == {"cat": 4, "dog": 4, "eel": 4}
    sizes = [p.shape for k, p in pixels.items() if k.startswith("train")]
    assert meta["splits"]["train"]["image_size"]["height"]["min"] == min(s[0] for s in sizes)
    assert meta["splits"]["train"]["image_size"]["width"]["max"] == max(s[1] for s in sizes)
    all_train = np.concatenate([p.reshape(-1, 3) for k, p in pixels.items() if k.startswith("train")])
    assert np.allclose(meta["mean"], all_train.mean(0), atol=1e-3)
    assert np.allclose(meta["std"], all_train.std(0), atol=1e-3)

    # Every pixel as decoded from the source, in class then file-name order.
    for split in ("train", "val"):
        stored = stored_raw_images(tmp_path / "ds" / f"{split}.beton")
        expected = [pixels[k] for k in sorted(k for k in pixels if k.startswith(split))]
        assert len(stored) == len(expected)
        assert all(np.array_equal(a, b) for a, b in zip(stored, expected))

    # The ImageNet-style loaders bring every sample back with its label, at the crop size.
    train, val = loaders(tmp_path / "ds", meta, batch_size=5, train_aug="scale", crop=16, scale_range=(16, 24),
                         pca_lighting=0.1, colour_jitter=0.4, val_aug="center", val_resize=20)
    for loader, per_class in ((train, 4), (val, 2)):
        images, labels = collect(loader)
        assert images.shape[1:] == (16, 16, 3)
        assert np.bincount(labels).tolist() == [per_class] * 3


def test_max_resolution_and_jpeg_storage(tmp_path):
    src = tmp_path / "src"
    for split in ("train", "test"):  # test/ is accepted in place of val/
        (src / split / "x").mkdir(parents=True)
        Image.new("RGB", (300, 150), (200, 30, 30)).save(src / split / "x" / "big.jpg")
    meta = prepare(parse_args(["source=imagefolder", f"root={src}", f"out={tmp_path / 'ds'}", "max_resolution=100",
                               "progress=false"]))
    from ffcv.reader import Reader

    stored = Reader(str(tmp_path / "ds" / "train.beton")).metadata[0]["f0"]
    assert (int(stored["width"]), int(stored["height"]), int(stored["mode"])) == (100, 50, 0)  # 0: jpg
    assert meta["source"]["val"] == "test" and meta["write"]["storage"] == "jpeg"
    assert meta["splits"]["train"]["image_size"]["width"]["max"] == 300  # the source's size


def tar_of(tree: Path, archive: Path, under: str = "") -> Path:
    import tarfile

    with tarfile.open(archive, "w:gz") as tar:
        for p in sorted(tree.rglob("*")):
            tar.add(p, arcname=str(Path(under) / p.relative_to(tree)), recursive=False)
    return archive


@pytest.mark.parametrize("under", ["", "cifar10"])
def test_imagefolder_archive_prepares_like_its_tree(tmp_path, under, monkeypatch):
    """A .tar.gz of an ImageFolder tree (at its top or one folder down, as ../shared's CIFAR-10
    JPEGs are) gives the same dataset as the tree; tiny images are stored raw; nothing is left
    unpacked afterwards."""
    src = tmp_path / "src"
    for split, n in (("train", 3), ("test", 2)):
        for c in ("a", "b"):
            (src / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((32, 32, 3), 40 * i + (c == "b") * 100, np.uint8)).save(src / split / c / f"{i}.jpg")
    archive = tar_of(src, tmp_path / "imgs.tar.gz", under)
    scratch = tmp_path / "tmp"  # a temporary directory of its own: tests on the other worker unpack too
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    from_tree = prepare(parse_args(["source=imagefolder", f"root={src}", f"out={tmp_path / 'tree'}", "progress=false"]))
    from_tar = prepare(parse_args(["source=imagefolder", f"root={archive}", f"out={tmp_path / 'tar'}",
                                   "progress=false"]))
    assert not list(scratch.iterdir())
    assert from_tar["write"]["storage"] == from_tree["write"]["storage"] == "raw"  # 32 px: tiny
    assert from_tar["source"]["archive"] == str(archive.resolve())
    for key in ("classes", "mean", "std"):
        assert from_tar[key] == from_tree[key]
    for split in ("train", "val"):
        tree_images, tar_images = (stored_raw_images(tmp_path / d / f"{split}.beton") for d in ("tree", "tar"))
        assert len(tar_images) == len(tree_images) == {"train": 6, "val": 4}[split]
        assert all(np.array_equal(a, b) for a, b in zip(tar_images, tree_images))


def test_data_source_prepares_on_first_use(tmp_path, monkeypatch, capsys):
    """data.source + auto_prepare: the driver prepares the archive once, then reads it as is; a
    missing source is one paragraph naming the key and the path."""
    src = tmp_path / "src"
    make_imagefolder(src)
    tar_of(src, tmp_path / "mine.tar.gz", "mine")
    monkeypatch.chdir(tmp_path)  # data.source is relative to the working directory
    data = DataConfig(name="mine", root=str(tmp_path / "ds"), auto_prepare=True, source="mine.tar.gz")
    meta = ensure_dataset(data)
    assert meta["splits"]["train"]["samples"] == 12 and meta["write"]["storage"] == "jpeg"  # up to 69 px
    written = (tmp_path / "ds" / "train.beton").stat().st_mtime_ns
    assert ensure_dataset(data)["classes"] == ["cat", "dog", "eel"]
    assert (tmp_path / "ds" / "train.beton").stat().st_mtime_ns == written
    missing = DataConfig(name="gone", root=str(tmp_path / "gone"), auto_prepare=True, source="gone.tar.gz")
    with pytest.raises(UsageError, match="data.source 'gone.tar.gz' .* does not exist"):
        ensure_dataset(missing)
    assert not (tmp_path / "gone").exists()
    (tmp_path / "notar.tar.gz").write_bytes(b"not an archive")
    msg = one_paragraph_exit(capsys, ["source=imagefolder", f"root={tmp_path / 'notar.tar.gz'}",
                                      f"out={tmp_path / 'o'}"])
    assert "neither a directory nor a .tar/.tar.gz archive" in msg and not (tmp_path / "o").exists()


@pytest.mark.e2e
def test_a_process_that_holds_ray_prepares_in_a_fresh_one(ray_head, tmp_path):
    """A driver connected to Ray that needs a dataset on first use (a sweep's trial, a second run in
    one program) prepares it in a child process: a local prepare forks its image workers, and a
    process that holds Ray must not fork. Forking beside the driver is refused; prepared on the Ray
    cluster (engine=auto with RAY_ADDRESS set) nothing forks. Ray still answers after all three."""
    make_imagefolder(tmp_path / "src")
    tar_of(tmp_path / "src", tmp_path / "mine.tar.gz", "mine")
    driver = f"""
import ray
from raysnet.config import DataConfig
from raysnet.data import ensure_dataset, prepare
from raysnet.data.prepare import PrepareConfig
ray.init(logging_level="WARNING")
data = DataConfig(name="mine", root={str(tmp_path / "ds")!r}, auto_prepare=True, source={str(tmp_path / "mine.tar.gz")!r})
print("prepared", ensure_dataset(data)["splits"]["train"]["samples"])
try:
    prepare(PrepareConfig(source="imagefolder", root={str(tmp_path / "src")!r}, out={str(tmp_path / "direct")!r},
                          engine="local"))
except RuntimeError as e:
    print("refused:", e)
meta = prepare(PrepareConfig(source="imagefolder", root={str(tmp_path / "src")!r}, out={str(tmp_path / "on-ray")!r},
                             progress=False))
print("on ray", sum(meta["write"]["encoded_on"].values()))
print("cpus", ray.cluster_resources()["CPU"])
"""
    done = subprocess.run([sys.executable, "-c", driver], env=ray_head, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "prepared 12" in lines and "on ray 18" in lines and "cpus 4.0" in lines, done.stdout
    assert any(line.startswith("refused: refusing to fork image workers") for line in lines), done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "mine.tar.gz", "on-ray", "src"]  # nothing half-written


# --- failures: skipped files, existing output, interrupted writes, bad input ------------------


def test_corrupt_images_are_skipped_and_reported(tmp_path, capsys):
    make_imagefolder(tmp_path / "src")
    cat = tmp_path / "src" / "train" / "cat"
    (cat / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    good = (cat / "0.jpg").read_bytes()
    (cat / "truncated.jpg").write_bytes(good[:len(good) // 2])
    (cat / "notes.txt").write_text("not an image")

    from raysnet.prepare import run

    assert run(["source=imagefolder", f"root={tmp_path / 'src'}", f"out={tmp_path / 'ds'}", "progress=false"]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    reasons = {s["path"]: s["reason"] for s in meta["skipped"]}
    assert set(reasons) == {"train/cat/garbage.jpg", "train/cat/truncated.jpg", "train/cat/notes.txt"}
    assert "truncated" in reasons["train/cat/truncated.jpg"]
    assert "skipped 3 file(s)" in printed and "train/cat/garbage.jpg" in printed
    assert meta["splits"]["train"]["per_class"]["cat"] == 4  # the good ones are all there


def test_existing_output_is_untouched_without_overwrite(tmp_path, capsys):
    out = tmp_path / "ds"
    index_dataset(out, 8, 4)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    msg = one_paragraph_exit(capsys, ["source=digits", f"out={out}"])
    assert str(out) in msg and "overwrite=true" in msg
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    meta = prepare(parse_args(["source=digits", f"out={out}", "overwrite=true", "progress=false"]))
    assert meta["source"]["kind"] == "digits" and check_dataset(DataConfig(root=str(out)))["num_classes"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary directories left


class FailingSamples(ArraySamples):
    def __iter__(self):
        for i, image in enumerate(self.images):
            if i == 5:
                raise OSError("disk vanished")
            yield image


def test_interrupted_write_leaves_no_final_file(tmp_path):
    images = index_images(40)
    labels = np.arange(40) % 4
    source = from_arrays("index", list("abcd"), (images, labels), (images, labels))
    source.splits["val"] = Split(FailingSamples(images), labels)

    with pytest.raises(WriteError, match="val.beton"):
        write_dataset(source, tmp_path / "fresh", RAW)
    assert list(tmp_path.iterdir()) == []  # not even train.beton, which was finished

    index_dataset(tmp_path / "old", 8, 4)
    meta_before = (tmp_path / "old" / "meta.json").read_text()
    with pytest.raises(WriteError):
        write_dataset(source, tmp_path / "old", RAW, overwrite=True)
    assert (tmp_path / "old" / "meta.json").read_text() == meta_before  # the old dataset survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_truncated_beton_is_a_clear_error(digits, tmp_path, capsys):
    root = tmp_path / "digits"
    shutil.copytree(digits, root)
    beton = root / "train.beton"
    data = DataConfig(name="digits", root=str(root))
    with open(beton, "r+b") as f:
        f.truncate(beton.stat().st_size // 2)
    with pytest.raises(UsageError, match="truncated or corrupt") as e:
        check_dataset(data)
    assert str(beton) in str(e.value) and "python -m raysnet.prepare source=digits" in str(e.value)
    msg = one_paragraph_exit(capsys, [], run=lambda _: check_dataset(data))
    assert str(beton) in msg

    # Without the byte count in meta.json the header alone still catches it.
    with pytest.raises(UsageError, match="allocation table"):
        read_beton_header(beton)
    with open(beton, "r+b") as f:
        f.truncate(10)
    with pytest.raises(UsageError, match="header"):
        read_beton_header(beton)


def test_dataset_checks(digits, tmp_path):
    with pytest.raises(UsageError, match="10 classes but the model has 100"):
        check_dataset(DataConfig(root=str(digits)), num_classes=100)
    missing = DataConfig(name="cifar10", root=str(tmp_path / "nowhere"), auto_prepare=True)
    with pytest.raises(UsageError) as e:
        ensure_dataset(missing)
    assert f"python -m raysnet.prepare source=cifar10 out={tmp_path / 'nowhere'}" in str(e.value)
    with pytest.raises(UsageError, match="source=imagefolder root="):
        ensure_dataset(DataConfig(name="imagenet", root=str(tmp_path / "nowhere")))


def test_bad_imagefolders_are_clear_errors(tmp_path, capsys):
    make_imagefolder(tmp_path / "a")
    (tmp_path / "a" / "train" / "empty").mkdir()
    msg = one_paragraph_exit(capsys, ["source=imagefolder", f"root={tmp_path / 'a'}", f"out={tmp_path / 'o'}"])
    assert f"class folder '{tmp_path / 'a' / 'train' / 'empty'}' is empty" in msg

    make_imagefolder(tmp_path / "b", val_name="holdout")
    msg = one_paragraph_exit(capsys, ["source=imagefolder", f"root={tmp_path / 'b'}", f"out={tmp_path / 'o'}"])
    assert str(tmp_path / "b" / "val") in msg and str(tmp_path / "b" / "test") in msg
    assert not (tmp_path / "o").exists()


def test_prepare_arguments(capsys):
    with pytest.raises(ConfigError, match="Did you mean 'overwrite'"):
        parse_args(["source=digits", "overwrit=true"])
    with pytest.raises(ConfigError, match="'storage'"):
        parse_args(["source=digits", "storage=png"])
    with pytest.raises(ConfigError, match="missing key 'source'"):
        parse_args([])
    assert "source=imagefolder needs root" in one_paragraph_exit(capsys, ["source=imagefolder"])


@pytest.mark.e2e  # a real process: outside the quick loop, which runs everything in-process
def test_cli_exit_status(tmp_path):
    """The real `python -m raysnet.prepare` (the tests above call its entry point in this process):
    kept as a subprocess, as no cheaper prepare command exists (any of them imports FFCV)."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "keep.txt").write_text("mine")
    done = command("raysnet.prepare", "source=digits", f"out={tmp_path / 'ds'}", timeout=120)
    assert one_paragraph(done).startswith("error: output directory")
    assert (tmp_path / "ds" / "keep.txt").read_text() == "mine"


# --- steps per epoch: what the worker and the run driver count ---------------------------------


def test_steps_per_epoch_is_the_train_loaders_length(digits):
    """One worker: the FFCV train loader as the worker builds it (drop_last, not distributed)."""
    data = DataConfig(name="digits", root=str(digits), loader_workers=1)
    meta = check_dataset(data)
    samples = meta["splits"]["train"]["samples"]
    for batch_size in (64, 100):  # 1437 = 22 x 64 + 29 = 14 x 100 + 37: both drop a partial batch
        train, _ = make_loaders(data, meta, batch_size, device=CPU, seed=0, distributed=False, channels_last=False)
        assert steps_per_epoch(samples, batch_size, None) == len(train) == samples // batch_size
        assert steps_per_epoch(samples, batch_size, 5) == 5
        assert steps_per_epoch(samples, batch_size, 10**6) == len(train)
        capped, _ = make_loaders(data, meta, batch_size, device=CPU, seed=0, distributed=False, channels_last=False,
                                 max_steps=5)
        assert len(capped) == 5 and sum(1 for _ in capped) == 5  # run.max_steps ends the epoch in the loader
        # One worker trains in FFCV's own RANDOM order, so its runs see what they always saw.
        assert np.array_equal(train.next_traversal_order(), np.random.default_rng(0).permutation(samples)[:len(train) * batch_size])


@pytest.mark.parametrize("samples", [1437, 96, 50, 7])
def test_every_world_size_trains_the_same_global_batches(samples):
    """raysnet.data.order: the global batch of every step is the same set of samples at every world
    size, even when the world does not divide the batch; the shards of a step are disjoint, and an
    epoch trains no sample twice."""
    for batch_size in (1, 6, 7, 32):
        steps = order.steps_per_epoch(samples, batch_size)
        assert steps == samples // batch_size
        want = order.epoch_order(samples, 5, 2)[:steps * batch_size].reshape(steps, batch_size)
        for world in range(1, min(batch_size, 4) + 1):
            sizes = order.shard_sizes(batch_size, world)
            assert sum(sizes) == batch_size and max(sizes) - min(sizes) <= 1
            shards = [order.rank_order(samples, batch_size, 5, 2, rank, world).reshape(steps, sizes[rank])
                      for rank in range(world)]
            assert np.array_equal(np.concatenate(shards, axis=1), want)  # rank by rank, each step's batch
            seen = np.concatenate([s.reshape(-1) for s in shards])
            assert len(set(seen.tolist())) == len(seen) == steps * batch_size


def test_weighted_shards_give_the_global_batchs_gradient():
    """Uneven shards (7 over 3 workers: 3, 2, 2): each rank's mean loss times `loss_weight`,
    averaged over the ranks as DDP averages gradients, is the gradient of the global batch's mean."""
    torch.manual_seed(0)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    layer = torch.nn.Linear(5, 3)

    def grad(loss):
        layer.zero_grad()
        loss.backward()
        return layer.weight.grad.clone()

    whole = grad(torch.nn.functional.cross_entropy(layer(x), y))
    for world in (2, 3, 4):
        starts = np.cumsum([0, *order.shard_sizes(7, world)])
        ranks = [grad(torch.nn.functional.cross_entropy(layer(x[a:b]), y[a:b]) * order.loss_weight(7, r, world))
                 for r, (a, b) in enumerate(itertools.pairwise(starts))]
        assert torch.allclose(sum(ranks) / world, whole, atol=1e-6)


# --- sharding across training processes --------------------------------------------------------


def _record_shards(rank: int, config: dict) -> None:
    """One of the training processes of a gloo group, as Ray Train's workers are: which samples
    this rank sees, step by step and epoch by epoch, and with a fresh loader."""
    import torch.distributed as dist

    from raysnet.data import check_dataset, make_loaders, set_epoch

    world = config["world"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{config['port']}", rank=rank, world_size=world)
    data = DataConfig(name="index", root=config["root"], train_aug="cifar", pad=0, crop=8, flip=False,
                      loader_workers=1)
    meta = {**check_dataset(data), **IDENTITY}

    def build():
        return make_loaders(data, meta, config["batch"], device=torch.device("cpu"), seed=config["seed"],
                            distributed=True, channels_last=False)

    def seen(loader) -> list[list[int]]:
        return [decoded_index(x[:, :, :1, :1].permute(0, 2, 3, 1).round().byte().numpy()) for x, _ in loader]

    train, val = build()
    record = {"epochs": [seen(train), seen(train)], "val": sum(seen(val), [])}
    again, _ = build()
    record["same_seed"] = seen(again)
    set_epoch(again, 1)
    record["resumed_epoch1"] = seen(again)
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


@pytest.mark.e2e
def test_three_workers_train_one_workers_batches(tmp_path):
    """Three processes in one gloo group (what Ray Train gives its workers; the cluster's runs in
    tests/test_cluster.py train that way across nodes), each with its loaders, a global batch of 10
    (shards of 4, 3, 3): at every step the three shards make up the batch one worker trains on, no
    sample twice in an epoch; validation covers every sample once."""
    import torch.multiprocessing as mp
    from servers import free_port

    root = index_dataset(tmp_path / "index", 96, 50)
    config = {"root": str(root), "out": str(tmp_path), "seed": 3, "port": free_port(), "world": 3, "batch": 10}
    mp.spawn(_record_shards, args=(config,), nprocs=3, join=True)  # spawn, not fork
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    data = DataConfig(name="index", root=str(root), train_aug="cifar", pad=0, crop=8, flip=False, loader_workers=1)
    alone, _ = make_loaders(data, {**check_dataset(data), **IDENTITY}, 10, device=CPU, seed=3, distributed=False,
                            channels_last=False)
    for epoch in (0, 1):
        one = [decoded_index(x[:, :, :1, :1].permute(0, 2, 3, 1).round().byte().numpy()) for x, _ in alone]
        steps = [sum((r["epochs"][epoch][s] for r in ranks), []) for s in range(9)]
        assert [len(r["epochs"][epoch][0]) for r in ranks] == [4, 3, 3]
        assert steps == one and len(set(sum(steps, []))) == 90  # 96 // 10 steps of 10, none twice
    for r in ranks:
        assert r["epochs"][0] != r["epochs"][1]  # a new order every epoch
        assert r["same_seed"] == r["epochs"][0]  # the same order for the same seed
        assert r["resumed_epoch1"] == r["epochs"][1]  # set_epoch reproduces a resumed epoch
        assert r["val"] == sorted(r["val"])
    assert sorted(sum((r["val"] for r in ranks), [])) == list(range(50))  # every val sample exactly once


# --- augmentations do what the paper says ----------------------------------------------------


def coordinate_images(n: int, size: int = 32) -> np.ndarray:
    """Red encodes the row, green the column, blue is never 0: a crop's origin can be read back."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    image = np.stack([10 + 7 * rows, 10 + 7 * cols, np.full_like(rows, 200)], axis=-1).astype(np.uint8)
    return np.repeat(image[None], n, axis=0)


def read_windows(images: np.ndarray, pad: int = 4) -> list[tuple[int, int, bool]]:
    """(dy, dx, mirrored) of each 32x32 crop of `coordinate_images`, after checking every pixel: zeros
    exactly where the padding is, and the image shifted by (dy, dx) everywhere else."""
    windows = []
    for im in images.astype(int):
        inside = im[..., 2] != 0  # blue is 200 on the image, 0 on the padding
        r = np.argwhere(inside)[0][0]
        green = im[r, inside[r], 1]
        mirrored = bool(green[1] < green[0])  # columns run backwards
        if mirrored:
            im, inside = im[:, ::-1], inside[:, ::-1]
        r, c = np.argwhere(inside)[0]  # the window's first image pixel
        dy, dx = (im[r, c, 0] - 10) // 7 - r, (im[r, c, 1] - 10) // 7 - c  # window offset from the image
        assert abs(dy) <= pad and abs(dx) <= pad
        expected = np.zeros((32, 32), bool)
        expected[max(0, -dy):32 - max(0, dy), max(0, -dx):32 - max(0, dx)] = True
        assert np.array_equal(inside, expected)  # zeros exactly where the padding is
        rows, cols = np.nonzero(expected)
        assert np.array_equal(im[rows, cols, 0], 10 + 7 * (rows + dy))  # and the image, shifted
        assert np.array_equal(im[rows, cols, 1], 10 + 7 * (cols + dx))
        windows.append((int(dy), int(dx), mirrored))
    return windows


def test_cifar_pad_crop_and_flip(tmp_path):
    n = 200
    write_dataset(from_arrays("coords", ["x"], (coordinate_images(n), np.zeros(n, int)),
                              (coordinate_images(4), np.zeros(4, int))), tmp_path / "ds", RAW)
    meta = check_dataset(DataConfig(root=str(tmp_path / "ds")))
    train, _ = loaders(tmp_path / "ds", meta, batch_size=50, train_aug="cifar", pad=4, crop=32, flip=True)
    images = np.concatenate([collect(train)[0], collect(train)[0]])  # two epochs
    assert images.shape == (2 * n, 32, 32, 3)
    windows = read_windows(images)
    assert 0.4 < np.mean([m for *_, m in windows]) < 0.6  # p = 1/2; 400 draws put 0.1 at 4 standard deviations
    assert {dy for dy, *_ in windows} == set(range(-4, 5)) and {dx for _, dx, _ in windows} == set(range(-4, 5))


def test_scale_augmentation_shorter_side_in_range():
    rng = np.random.default_rng(0)
    crop, lo, hi = 224, 256, 480
    implied = []
    for _ in range(2000):
        h, w = (int(v) for v in rng.integers(200, 800, 2))
        i, j, side_h, side_w = scale_crop(h, w, np.array([lo, hi], float), float(crop))
        assert side_h == side_w and 0 <= i <= h - side_h and 0 <= j <= w - side_w
        # The shorter side the image was (virtually) resized to before the 224 crop.
        s = crop * min(h, w) / side_h
        implied.append(s)
        assert lo * (1 - 1 / side_h) - 1e-9 <= s <= hi * (1 + 1 / side_h)  # up to rounding the window
    implied = np.asarray(implied)
    assert abs(implied.mean() - (lo + hi) / 2) < 6 and implied.min() < lo + 10 and implied.max() > hi - 10


def test_colour_jitter_factors():
    from ffcv.pipeline.compiler import Compiler

    from raysnet.data.transforms import ColourJitter

    jitter = Compiler.compile(ColourJitter(0.4).generate_code())
    grey = np.full((300, 4, 4, 3), 100, dtype=np.uint8)
    out = jitter(grey.copy(), None).astype(int)
    # A flat grey image only feels brightness: 100 * U[0.6, 1.4], and stays grey.
    assert np.all(out == out[:, :1, :1, :1]) and 60 <= out.min() < 70 and 130 < out.max() <= 140
    colour = np.random.default_rng(0).integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
    assert (jitter(colour.copy(), None) != colour).mean() > 0.9


def test_crop_sizes_scale_rrc_center(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        (src / split / "x").mkdir(parents=True)
        for i, (h, w) in enumerate([(260, 300), (300, 270), (280, 280), (320, 260)]):
            # A left-to-right ramp: the centre crop's middle column keeps the source's middle value.
            ramp = np.broadcast_to(np.linspace(0, 255, w)[None, :, None], (h, w, 3)).astype(np.uint8)
            Image.fromarray(np.clip(ramp + rng.integers(0, 2, (h, w, 3)), 0, 255).astype(np.uint8)).save(
                src / split / "x" / f"{i}.png")
    meta = prepare(parse_args(["source=imagefolder", f"root={src}", f"out={tmp_path / 'ds'}", "progress=false"]))
    for aug in ("scale", "rrc"):
        train, val = loaders(tmp_path / "ds", meta, batch_size=4, train_aug=aug, crop=224, val_aug="center",
                             val_resize=256)
        images, _ = collect(train)
        assert images.shape == (4, 224, 224, 3)
    images, _ = collect(val)
    assert images.shape == (4, 224, 224, 3)
    assert np.all(np.abs(images[:, :, 112, 0].astype(int) - 128) < 12)  # centred


# --- one pass, as the two passes it replaced ---------------------------------------------------------

def odd_tree(root: Path) -> None:
    """An ImageFolder with every kind of image prepare treats apart: photographs decoded at a reduced
    DCT scale (a training one counted at full size), validation images wider than the test scales,
    PNG, greyscale and CMYK JPEG, a 16-bit PNG; and files it skips: truncated, not an image."""
    rng = np.random.default_rng(7)
    sizes = {"train/a": [(300, 400), (1300, 900), (120, 90)], "train/b": [(480, 360), (200, 260)],
             "val/a": [(700, 1400), (1400, 2000)], "val/b": [(300, 200)]}
    for folder, shapes in sizes.items():
        (root / folder).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            photo(rng, h, w).save(root / folder / f"{i}.jpg", quality=85)
    photo(rng, 64, 80).save(root / "train" / "b" / "p.png")
    photo(rng, 150, 100, "L").save(root / "train" / "b" / "grey.jpg")
    photo(rng, 140, 180, "CMYK").save(root / "train" / "a" / "cmyk.jpg")
    Image.fromarray((np.arange(90 * 70).reshape(90, 70) * 9).astype(np.uint16)).save(root / "val" / "b" / "g16.png")
    good = (root / "train" / "a" / "0.jpg").read_bytes()
    (root / "train" / "a" / "cut.jpg").write_bytes(good[:len(good) // 2])
    (root / "val" / "b" / "notes.jpg").write_text("not an image")


# The two passes as they were (a checking decode, then FFCV's writer decoding each kept file
# again), writing with FFCV's own writer: the reference the one-pass prepare must equal.
TWO_PASSES = """
import json, sys
import cv2, numpy as np
from PIL import Image
import raysnet.data.ffcv_import
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter
from raysnet.data.encode import EVAL_SHORT_SIDE, to_rgb
from raysnet.data.sources import imagefolder

root, out, skipped = sys.argv[1], sys.argv[2], set(json.loads(sys.argv[3]))

def load(path, max_resolution, short_side):
    with Image.open(path) as im:
        w, h = im.size
        k = min(max_resolution / max(w, h) if max_resolution else 1.0, short_side / min(w, h) if short_side else 1.0)
        if im.format == "JPEG" and k < 0.5:
            im.draft("RGB", (int(w * k) + 1, int(h * k) + 1))
        rgb = to_rgb(im)
    if short_side and min(rgb.shape[:2]) > short_side:
        ratio = short_side / min(rgb.shape[:2])
        size = (max(short_side, round(rgb.shape[1] * ratio)), max(short_side, round(rgb.shape[0] * ratio)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return rgb

class Files:
    def __init__(self, items, max_resolution, short_side):
        self.items, self.max_resolution, self.short_side = items, max_resolution, short_side
    def __len__(self):
        return len(self.items)
    def __getitem__(self, i):
        return load(self.items[i][0], self.max_resolution, self.short_side), self.items[i][1]

pixels = []
for name, split in imagefolder(root, EVAL_SHORT_SIDE).splits.items():
    items = [(p, int(l)) for p, n, l in zip(split.samples.paths, split.samples.names, split.labels) if n not in skipped]
    cap = None if split.short_side else 512
    if name == "train":
        pixels = [to_rgb(Image.open(p)).reshape(-1, 3) for p, _ in items]
    fields = {"image": RGBImageField(write_mode="jpg", max_resolution=cap, jpeg_quality=90), "label": IntField()}
    DatasetWriter(f"{out}/{name}.beton", fields, num_workers=1).from_indexed_dataset(
        Files(items, cap, split.short_side))
flat = np.concatenate(pixels).astype(np.float64)
print(json.dumps({"mean": flat.mean(0).tolist(), "std": flat.std(0).tolist()}))
"""


@pytest.mark.e2e  # two prepare processes
def test_one_pass_stores_what_the_two_passes_stored(tmp_path):
    """Each image read and decoded once (a training image counted at full size, stored from a
    reduced-scale decode, is the one exception) gives the same samples, in the same order, with
    the same labels and the same stored bytes as the checking pass plus FFCV's writer, the same
    skipped files, and the training pixels' statistics of every kept image."""

    odd_tree(tmp_path / "tree")
    done = command("raysnet.prepare", "source=imagefolder", f"root={tmp_path / 'tree'}", f"out={tmp_path / 'one'}",
                   "workers=2", "progress=false")
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads((tmp_path / "one" / "meta.json").read_text())
    assert {s["path"] for s in meta["skipped"]} == {"train/a/cut.jpg", "val/b/notes.jpg"}, meta["skipped"]
    (tmp_path / "two").mkdir()
    ref = subprocess.run([sys.executable, "-c", TWO_PASSES, str(tmp_path / "tree"), str(tmp_path / "two"),
                          json.dumps([s["path"] for s in meta["skipped"]])],
                         capture_output=True, text=True, timeout=300, check=False)
    assert ref.returncode == 0, ref.stderr[-3000:]
    for split, n in (("train", 8), ("val", 4)):
        one, two = (stored_samples(tmp_path / d / f"{split}.beton") for d in ("one", "two"))
        assert len(one) == n and one == two, split
    assert max(s.width for s in stored_samples(tmp_path / "one" / "val.beton")) > 640  # kept whole, not cropped
    stats = json.loads(ref.stdout.strip().splitlines()[-1])
    assert np.allclose(meta["mean"], stats["mean"], atol=1e-4) and np.allclose(meta["std"], stats["std"], atol=1e-4)

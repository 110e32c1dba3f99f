"""Datasets on object storage: a real S3 server (moto's, on 127.0.0.1), pyarrow as the client."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from clitools import one_paragraph, ray_started, run_cli
from servers import free_port, recorded_requests

from raysnet import storage
from raysnet.errors import UsageError


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A dataset directory as prepare leaves it: two .beton files and a meta.json with their digests."""
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.beton").write_bytes(os.urandom(3 << 20) + b"train")
    (d / "val.beton").write_bytes(os.urandom(1 << 20))
    (d / "meta.json").write_text(json.dumps({"classes": ["a", "b"], "files": storage.file_digests(d)}))
    return d


def _gets(recording: Path, key: str) -> int:
    return sum(1 for method, path in recorded_requests(recording) if method == "GET" and path.endswith(key))


def test_upload_then_fetch_is_a_verified_copy(s3, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSNET_CACHE", str(tmp_path / "cache"))
    storage.upload(dataset, "s3://data/round")
    assert storage.exists("s3://data/round")
    local = storage.fetch("s3://data/round")
    for name in ("train.beton", "val.beton"):
        assert (local / name).read_bytes() == (dataset / name).read_bytes()
    assert json.loads((local / "meta.json").read_text())["files"] == storage.file_digests(dataset)
    assert not list(local.glob("*.part"))


def _fetch(uri: str) -> str:
    return str(storage.fetch(uri))


def test_concurrent_workers_of_a_node_copy_once(s3, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSNET_CACHE", str(tmp_path / "cache"))
    storage.upload(dataset, "s3://data/once")
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        paths = pool.map(_fetch, ["s3://data/once"] * 3)
    assert len(set(paths)) == 1
    assert _gets(s3, "/once/train.beton") == 1  # one download for three workers
    storage.fetch("s3://data/once")  # and none for a later run on the same node
    assert _gets(s3, "/once/train.beton") == 1


def test_a_corrupt_remote_file_never_enters_the_cache(s3, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSNET_CACHE", str(tmp_path / "cache"))
    storage.upload(dataset, "s3://data/bad")
    filesystem, root = storage.open_uri("s3://data/bad")
    size = (dataset / "train.beton").stat().st_size
    with filesystem.open_output_stream(f"{root}/train.beton") as out:  # same size, other bytes
        out.write(b"\0" * size)
    with pytest.raises(UsageError, match="train.beton arrived corrupt") as e:
        storage.fetch("s3://data/bad")
    assert "data.root=s3://data/bad" in str(e.value) and "node " in str(e.value)
    local = storage.cache_dir("s3://data/bad")
    assert not (local / "train.beton").exists() and not (local / "meta.json").exists()
    assert not list(local.glob("*.part"))


def test_a_missing_dataset_names_the_node_and_the_uri(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSNET_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UsageError) as e:
        storage.fetch("s3://data/missing")
    text = str(e.value)
    assert "s3://data/missing" in text and "meta.json is missing" in text and socket.gethostname() in text
    assert not storage.exists("s3://data/missing")


def test_prepare_writes_to_object_storage_and_training_reads_it_back(s3, tmp_path, monkeypatch):
    """`raysnet.prepare out=s3://...`, the driver's check of data.root=s3://..., a worker's local copy."""
    from raysnet.config import DataConfig
    from raysnet.data import check_dataset, local_copy, prepare
    from raysnet.data.prepare import PrepareConfig

    monkeypatch.setenv("RAYSNET_CACHE", str(tmp_path / "cache"))
    meta = prepare(PrepareConfig(source="digits", out="s3://data/digits", progress=False))
    assert set(meta["files"]) == {"train.beton", "val.beton"}
    with pytest.raises(UsageError, match="already exists at out=s3://data/digits"):
        prepare(PrepareConfig(source="digits", out="s3://data/digits", progress=False))
    data = DataConfig(name="digits", root="s3://data/digits")
    assert check_dataset(data, num_classes=10)["classes"] == meta["classes"]
    local = local_copy(data)
    assert local.root == str(storage.cache_dir("s3://data/digits"))
    assert check_dataset(local, num_classes=10)["files"] == meta["files"]  # FFCV's headers, sizes: the real files
    with pytest.raises(UsageError, match="s3://data/nothing"):
        check_dataset(DataConfig(name="digits", root="s3://data/nothing"))


def test_prepare_reads_an_imagefolder_from_object_storage_as_a_prefix_or_an_archive(s3, tmp_path):
    """root=s3://bucket/tree and root=s3://bucket/tree.tar.gz prepare what root=DIR does: the same
    samples, labels, stored bytes and skipped files (a prefix's objects listed in the order a walk
    of the same folders gives)."""
    import tarfile

    import numpy as np
    from imagery import photo, stored_samples
    from pyarrow import fs

    from raysnet.data.prepare import PrepareConfig, prepare

    rng, tree = np.random.default_rng(2), tmp_path / "tree"
    for i, name in enumerate(("train/a/1.jpg", "train/a/0sub/0.jpg", "train/a/2.jpg", "train/b/0.png", "val/a/0.jpg",
                              "val/b/0.jpg")):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        photo(rng, 30 + i, 40).save(tree / name)  # its height tells which file a sample is
    (tree / "train" / "b" / "notes.txt").write_text("not an image")
    with tarfile.open(tmp_path / "tree.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname="tree")
    fs.copy_files(str(tree), "s3://data/tree")
    fs.copy_files(str(tmp_path / "tree.tar.gz"), "s3://data/tree.tar.gz")

    def made(root: str, out: str) -> tuple[list, list, list]:
        meta = prepare(PrepareConfig(source="imagefolder", root=root, out=str(tmp_path / out), workers=1, progress=False))
        return [stored_samples(tmp_path / out / f"{s}.beton") for s in ("train", "val")] + [meta["skipped"]]

    here = made(str(tree), "here")
    assert [s.height for s in here[0]] == [30, 32, 31, 33]  # a folder's files, then its folders (os.walk's order)
    assert [len(here[1]), [s["path"] for s in here[2]]] == [2, ["train/b/notes.txt"]]
    assert made("s3://data/tree", "prefix") == here
    assert made("s3://data/tree.tar.gz", "archive") == here


# --- a run on object storage, through the command line ---------------------------------------------

REPO = Path(__file__).resolve().parent.parent
FAST = ["arch=resnet20", "batch_size=64", "run.workers=2", "epochs=1", "run.max_steps=4"]


def train_cli(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m raysnet.train ARGS` with `env` (the session's Ray head: it connects to it)."""
    return subprocess.run([sys.executable, "-m", "raysnet.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False, env=env)


def _one_paragraph_exit_2(capsys, *args: str, words: tuple[str, ...]) -> None:
    """`python -m raysnet.train ARGS` (its entry point, in this process) stops before Ray: exit 2, one paragraph."""
    msg = one_paragraph(run_cli(capsys, "raysnet.train", *args))
    for word in words:
        assert word in msg, (word, msg)
    assert not ray_started()


@pytest.fixture(scope="module")
def s3_digits(s3, digits) -> str:
    from raysnet.data.prepare import PrepareConfig, prepare

    if not storage.exists("s3://data/cli-digits"):
        prepare(PrepareConfig(source="digits", out="s3://data/cli-digits", progress=False))
    return "s3://data/cli-digits"


def _listing(uri: str) -> dict[str, int]:
    from pyarrow import fs

    filesystem, root = storage.open_uri(uri)
    return {i.path: i.size for i in filesystem.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True))}


def test_bad_object_storage_stops_before_training_and_changes_nothing(s3, s3_digits, tmp_path, capsys, monkeypatch):
    before = _listing("s3://data")
    _one_paragraph_exit_2(capsys, *FAST, "data.root=s3://data/missing", f"run.storage={tmp_path}",
                          words=("data.root=s3://data/missing", "meta.json is missing"))
    _one_paragraph_exit_2(capsys, *FAST, f"data.root={s3_digits}", "run.storage=s3://data/runs",
                          words=("run.storage=s3://data/runs", "tracking.uri"))
    with monkeypatch.context() as unreachable:
        unreachable.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        _one_paragraph_exit_2(capsys, *FAST, f"data.root={s3_digits}", f"run.storage={tmp_path}",
                              words=(f"data.root={s3_digits}",))
    assert _listing("s3://data") == before  # nothing in the bucket changed
    assert not (tmp_path / "mlflow.db").exists()


# A run with its dataset, checkpoints and MLflow artifacts all in a bucket, and a bucket that does not
# exist refused before training: tests/test_cluster.py, on two nodes.

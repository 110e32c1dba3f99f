"""Datasets on object storage: a real S3 server (moto's, on 127.0.0.1), pyarrow as the client."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from raysnet import storage
from raysnet.errors import UsageError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback; the AWS_* variables point pyarrow and boto3 at it. -> its log file"""
    if shutil.which("moto_server") is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    port = _free_port()
    server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=open(log, "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, f"moto_server did not start; see {log}"
                time.sleep(0.2)
        import boto3

        boto3.client("s3").create_bucket(Bucket="data")
        yield log
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A dataset directory as prepare leaves it: two .beton files and a meta.json with their digests."""
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.beton").write_bytes(os.urandom(3 << 20) + b"train")
    (d / "val.beton").write_bytes(os.urandom(1 << 20))
    (d / "meta.json").write_text(json.dumps({"classes": ["a", "b"], "files": storage.file_digests(d)}))
    return d


def _gets(log: Path, key: str) -> int:
    return sum(1 for line in log.read_text().splitlines() if '"GET ' in line and key in line)


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

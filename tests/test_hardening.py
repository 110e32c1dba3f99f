"""Hostile or broken input, caught before Ray starts: hostile checkpoints never execute, run.name stays
inside run.storage, and a dataset or tracking URI that cannot work stops the run as one paragraph
(exit status 2, no traceback, nothing written)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import torchvision
from clitools import one_paragraph, ray_started, run_cli
from PIL import Image
from torch import nn

from raysnet import checkpoint
from raysnet.config import ConfigError, load_config
from raysnet.errors import UsageError


class Payload:
    """A pickle that runs `touch MARKER` when unpickled: what a hostile checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --- 1. checkpoints are read with weights_only=True ----------------------------------------------

@pytest.fixture
def hostile(tmp_path) -> tuple[Path, Path]:
    """(a torch.save'd file whose unpickling would create the marker, the marker)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker), "config": {}}, path)
    return path, marker


def _parts():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def test_a_hostile_pickle_is_refused_unexecuted(hostile):
    path, marker = hostile
    for read in (lambda: checkpoint.load_model(path),
                 lambda: checkpoint.restore(path, model=_parts()[0], optimizer=_parts()[1], scheduler=_parts()[2],
                                            device=torch.device("cpu"))):
        with pytest.raises(UsageError) as e:
            read()
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg
        assert "not a raysnet checkpoint or state dict" in msg and "was not executed" in msg
        assert "posix.system" in msg
    assert not marker.exists()


@pytest.mark.parametrize("module", ["raysnet.evaluate", "raysnet.analyze"])
def test_a_hostile_checkpoint_stops_the_command(capsys, hostile, module):
    path, marker = hostile
    msg = one_paragraph(run_cli(capsys, module, f"checkpoint={path}"))
    assert str(path) in msg and "not a raysnet checkpoint or state dict" in msg and "was not executed" in msg
    assert not marker.exists()


def test_a_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint\n")
    with pytest.raises(UsageError, match="is not a raysnet checkpoint|cannot be read by torch.load") as e:
        checkpoint.load_model(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_checkpoints_hold_plain_data_and_restore_every_random_state(tmp_path):
    model, optimizer, scheduler = _parts()
    cfg = load_config(["run.name=plain"])
    np.random.seed(7), random.seed(7), torch.manual_seed(7)
    expected = (np.random.get_state(), random.getstate(), torch.get_rng_state())
    checkpoint.save(tmp_path / "c.pt", model=model, optimizer=optimizer, scheduler=scheduler, epoch=4, cfg=cfg,
                    run_id="r", history=[{"epoch": 4, "val_err": 1.0}])
    # Loadable with torch's own weights-only defaults: no numpy object left in the file.
    torch.load(tmp_path / "c.pt", weights_only=True)
    np.random.seed(1), random.seed(1), torch.manual_seed(1)
    epoch, history = checkpoint.restore(tmp_path / "c.pt", model=model, optimizer=optimizer, scheduler=scheduler,
                                        device=torch.device("cpu"))
    assert epoch == 5 and history == [{"epoch": 4, "val_err": 1.0}]
    _assert_states(expected)


def _assert_states(expected) -> None:
    state = np.random.get_state()
    assert state[0] == expected[0][0] and np.array_equal(state[1], expected[0][1]) and state[2:] == expected[0][2:]
    assert random.getstate() == expected[1] and torch.equal(torch.get_rng_state(), expected[2])


@pytest.mark.parametrize("numpy_module", ["numpy._core.multiarray", "numpy.core.multiarray"])
def test_a_checkpoint_from_before_still_restores(tmp_path, numpy_module):
    """The old format kept np.random.get_state() as it is (an ndarray inside), pickled under numpy 2's
    module name or numpy 1's; exactly what rebuilds that array is allowed."""
    model, optimizer, scheduler = _parts()
    np.random.seed(3)
    expected = (np.random.get_state(), random.getstate(), torch.get_rng_state())
    old = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
           "scaler": None, "epoch": 0, "config": {}, "mlflow_run_id": "", "history": [],
           "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                   "cuda": None}}
    buf = io.BytesIO()
    torch.save(old, buf)
    path = tmp_path / "old.pt"
    _rename_in_pickle(buf.getvalue(), path, b"numpy._core.multiarray", numpy_module.encode())
    np.random.seed(1), random.seed(1)
    assert checkpoint.restore(path, model=model, optimizer=optimizer, scheduler=scheduler,
                              device=torch.device("cpu")) == (1, [])
    _assert_states(expected)


def _rename_in_pickle(data: bytes, path: Path, old: bytes, new: bytes) -> None:
    """A copy of a torch.save zip with a module renamed inside its pickle (as numpy 1 wrote it)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            body = zin.read(info)
            zout.writestr(info, body.replace(old, new) if info.filename.endswith("data.pkl") else body)


def test_a_torchvision_state_dict_still_loads(tmp_path):
    reference = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(reference.state_dict(), tmp_path / "tv.pt")
    loaded = checkpoint.load_model(tmp_path / "tv.pt", "resnet18")
    x = torch.randn(1, 3, 32, 32)
    assert loaded.config is None and torch.allclose(loaded.model(x), reference(x), atol=1e-5)


# --- 2. run.name is one safe directory name --------------------------------------------------------

@pytest.mark.parametrize("name", ["../../escaped", "/abs", "it's", 'say"hi', "a b", "tab\tbed", "a/b", "a\\b",
                                  "..", "a..b", ".hidden", "-dash", "x" * 129, "`tick`"])
def test_unsafe_run_names_are_refused(name):
    with pytest.raises(ConfigError) as e:
        load_config([f"run.name={name}"])
    assert "'run.name'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["", "my-run", "007", "resnet20-digits-20260101-120000", "a.b_c-1", "x" * 128])
def test_safe_run_names_pass(name):
    assert load_config([f"run.name={name}"]).run.name == name


@pytest.mark.parametrize("name", ["../../escaped", "/abs", "it's"])
def test_run_name_cannot_leave_run_storage(capsys, tmp_path, digits, name):
    storage = tmp_path / "x" / "inner"
    name = str(tmp_path / "abs") if name == "/abs" else name
    msg = one_paragraph(run_cli(capsys, "raysnet.train", f"data.root={digits}", f"run.storage={storage}",
                                f"run.name={name}"))
    assert "'run.name'" in msg and repr(name) in msg
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere, inside run.storage or out of it


# --- 3. what Ray would find only after starting, found before ---------------------------------------

def _train_fails_early(capsys, tmp_path: Path, *args: str) -> str:
    storage = tmp_path / "runs"
    start = time.monotonic()
    msg = one_paragraph(run_cli(capsys, "raysnet.train", f"run.storage={storage}", "run.name=early", *args))
    assert time.monotonic() - start < 60
    assert not ray_started()
    assert not (storage / "mlflow.db").exists() and not storage.exists()  # no MLflow store, no run config
    return msg


def test_a_batch_larger_than_the_training_split(capsys, tmp_path, digits):
    msg = _train_fails_early(capsys, tmp_path, f"data.root={digits}", "batch_size=100000")
    assert "batch_size=100000" in msg and "1437 samples" in msg and "zero steps" in msg
    assert "Lower batch_size to at most 1437" in msg


@pytest.mark.parametrize("workers", ["3-2", "0-2", "a-b"])
def test_a_worker_range_that_is_no_range(capsys, tmp_path, digits, workers):
    """An elastic run's MIN-MAX (issue: elastic training): one paragraph naming the key and the
    value, exit status 2, before Ray starts and with nothing written."""
    msg = _train_fails_early(capsys, tmp_path, f"data.root={digits}", f"run.workers={workers}")
    assert f"'run.workers': '{workers}'" in msg and "MIN-MAX" in msg


def test_zero_steps_per_epoch_from_max_steps(capsys, tmp_path, digits):
    msg = _train_fails_early(capsys, tmp_path, f"data.root={digits}", "run.max_steps=0")
    assert "'run.max_steps'" in msg and "zero training steps" in msg


@pytest.mark.parametrize("change, words", [
    (lambda m: m.update(num_classes=11), "num_classes is 11 but 'classes' lists 10"),
    (lambda m: m["splits"]["train"]["per_class"].pop("9"), "splits.train.per_class counts labels of 9 classes"),
    (lambda m: m["splits"]["val"]["per_class"].update({"3": 99}), "splits.val.per_class counts"),
])
def test_meta_json_that_contradicts_itself(capsys, tmp_path, digits, change, words):
    data = tmp_path / "digits"
    shutil.copytree(digits, data)
    meta = json.loads((data / "meta.json").read_text())
    change(meta)
    (data / "meta.json").write_text(json.dumps(meta))
    msg = _train_fails_early(capsys, tmp_path, f"data.root={data}")
    assert f"'{data / 'meta.json'}'" in msg and words in msg


def test_a_ray_address_where_nothing_listens(capsys, tmp_path, digits, monkeypatch):
    """RAY_ADDRESS naming a dead address: one paragraph within seconds (Ray's client would retry it for
    minutes), from a run and from a sweep, nothing written."""
    from servers import free_port

    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    msg = _train_fails_early(capsys, tmp_path, f"data.root={digits}")
    assert f"RAY_ADDRESS={address}" in msg and "nothing answers" in msg and "unset it" in msg
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\nrecipe: digits\ngrid: {arch: [resnet20]}\n")
    out = run_cli(capsys, "raysnet.tune", str(sweep), f"data.root={digits}", f"run.storage={tmp_path / 'sweeps'}")
    assert f"RAY_ADDRESS={address}" in one_paragraph(out) and not (tmp_path / "sweeps").exists()
    assert not ray_started()


def test_more_workers_than_a_local_machine_can_run(capsys, tmp_path, digits, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cores = os.cpu_count() or 1
    msg = _train_fails_early(capsys, tmp_path, f"data.root={digits}", "run.workers=64")
    assert "run.workers=64" in msg and f"has {cores} cores" in msg and "ray job submit" in msg


def test_keep_checkpoints_below_one(capsys, tmp_path, digits):
    msg = _train_fails_early(capsys, tmp_path, f"data.root={digits}", "run.keep_checkpoints=0")
    assert "'run.keep_checkpoints'" in msg and "at least 1" in msg


@pytest.mark.parametrize("uri", ["garbage://x", "s3://bucket/mlflow", "ftp://host/x"])
def test_a_tracking_uri_mlflow_cannot_use(capsys, tmp_path, digits, uri):
    msg = _train_fails_early(capsys, tmp_path, f"data.root={digits}", f"tracking.uri={uri}")
    assert "'tracking.uri'" in msg and repr(uri) in msg and "http:, https:, sqlite:" in msg


def test_tracking_schemes_mlflow_can_use(tmp_path):
    from raysnet.lifecycle import _check_tracking_uri

    for uri in ("", "http://127.0.0.1:5000", "https://x", "sqlite:///a.db", "postgresql+psycopg2://u@h/db",
                "mysql://u@h/db", "file:///tmp/mlruns", "databricks", "databricks://profile", str(tmp_path)):
        _check_tracking_uri(load_config([f"tracking.uri={uri}"]))


# --- 4. files: archives, output places, odd images, interruptions ------------------------------------

def _tree(root: Path, n: int = 2, size: tuple[int, int] = (40, 48)) -> Path:
    """A two-class ImageFolder of random JPEGs."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    return root


def _archive(path: Path, *members: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(b"x" * m.size) if m.isfile() else None)
    return path


def _member(name: str, **kw) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 1 if not kw else 0
    for k, v in kw.items():
        setattr(info, k, v)
    return info


@pytest.mark.parametrize("kind, words", [
    ("truncated", "cannot be unpacked (EOFError"),
    ("dotdot", "member '../escape.jpg' would be written outside"),
    ("symlink", "member 'train/a/link.jpg' is a link to '/etc/passwd'"),
    ("outward-link", "member 'train/a/up.jpg' is a link to '../../../x'"),
])
def test_archives_that_cannot_be_unpacked_safely(capsys, tmp_path, kind, words):
    if kind == "truncated":
        whole = tmp_path / "whole.tar.gz"
        with tarfile.open(whole, "w:gz") as tar:
            tar.add(_tree(tmp_path / "tree"), arcname="tree")
        archive = tmp_path / "a.tar.gz"
        archive.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    else:
        member = {"dotdot": _member("../escape.jpg"),
                  "symlink": _member("train/a/link.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
                  "outward-link": _member("train/a/up.jpg", type=tarfile.SYMTYPE, linkname="../../../x")}[kind]
        archive = _archive(tmp_path / "a.tar.gz", _member("train/a/0.jpg"), member)
    msg = one_paragraph(run_cli(capsys, "raysnet.prepare", "source=imagefolder", f"root={archive}",
                                f"out={tmp_path / 'ds'}", "progress=false"))
    assert f"archive '{archive}'" in msg and words in msg
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("tree", "whole.tar.gz")) == ["a.tar.gz"]
    assert not (tmp_path.parent / "escape.jpg").exists()


@pytest.fixture
def read_only(tmp_path) -> Path:
    """A read-only filesystem (root writes anywhere else, so permissions alone cannot show it)."""
    where = tmp_path / "ro"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)],
                                           capture_output=True, check=False).returncode:
        pytest.skip("needs root to mount a read-only tmpfs (CI runs as root)")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_prepare_into_a_read_only_place_stops_before_reading(capsys, tmp_path, read_only):
    tree = _tree(tmp_path / "tree", n=1)
    (tree / "train" / "a" / "0.jpg").write_bytes(b"not decoded: the output place is checked first")
    res = run_cli(capsys, "raysnet.prepare", "source=imagefolder", f"root={tree}", f"out={read_only / 'ds'}",
                  "progress=true")
    msg = one_paragraph(res)
    assert f"out={read_only / 'ds'}" in msg and "Read-only file system" in msg and "nothing was read" in msg
    assert "check images" not in res.out + res.err  # no image was decoded


@pytest.mark.parametrize("where", ["read-only", "file"])
def test_run_storage_that_cannot_hold_a_run(capsys, tmp_path, digits, where, request):
    storage = request.getfixturevalue("read_only") / "runs" if where == "read-only" else tmp_path / "afile"
    if where == "file":
        storage.write_text("a file")
    msg = one_paragraph(run_cli(capsys, "raysnet.train", f"data.root={digits}", f"run.storage={storage}",
                                "run.name=x"))
    assert f"run.storage={storage}" in msg
    assert ("Read-only file system" if where == "read-only" else "is a file; expected a directory") in msg
    assert not ray_started()


def test_prepare_out_that_is_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("mine")
    msg = one_paragraph(run_cli(capsys, "raysnet.prepare", "source=digits", f"out={tmp_path / 'f'}"))
    assert f"out={tmp_path / 'f'} is a file" in msg and (tmp_path / "f").read_text() == "mine"


def test_analyze_and_report_keep_what_exists(capsys, tmp_path):
    kept = tmp_path / "responses.json"
    kept.write_text("earlier results")
    msg = one_paragraph(run_cli(capsys, "raysnet.analyze", "checkpoint=whatever.pt", f"out={kept}"))
    assert f"out={kept} already exists" in msg and "overwrite=true" in msg and kept.read_text() == "earlier results"
    msg = one_paragraph(run_cli(capsys, "raysnet.analyze", "checkpoint=whatever.pt", f"out={tmp_path}"))
    assert "is a directory" in msg
    msg = one_paragraph(run_cli(capsys, "raysnet.report", "experiment=x", f"out={kept}"))
    assert f"out={kept} is a file" in msg and kept.read_text() == "earlier results"
    for uri, words in ((f"sqlite:///{kept}", "not an SQLite database"), (f"sqlite:///{tmp_path}/no.db", "no such file"),
                       (str(kept), "is a path, not a tracking URI")):
        msg = one_paragraph(run_cli(capsys, "raysnet.report", "experiment=x", f"tracking.uri={uri}",
                                    f"out={tmp_path / 'report'}"))
        assert f"tracking.uri={uri}" in msg and words in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["responses.json"]  # no empty store made, no report


def _stored(beton: Path) -> tuple[list[tuple[int, int]], list[np.ndarray]]:
    from ffcv.reader import Reader

    reader, data = Reader(str(beton)), np.fromfile(beton, dtype=np.uint8)
    sizes = [(int(m["f0"]["height"]), int(m["f0"]["width"])) for m in reader.metadata]
    raw = [data[int(m["f0"]["data_ptr"]):][:h * w * 3].reshape(h, w, 3) for m, (h, w) in zip(reader.metadata, sizes)
           if m["f0"]["mode"] == 1]
    return sizes, raw


def test_a_huge_image_does_not_inflate_the_pages(tmp_path):
    from raysnet.data.prepare import PrepareConfig, prepare

    tree = _tree(tmp_path / "tree", n=3)
    # A smooth 20-megapixel picture: as large once decoded as a photograph, quick to encode and decode.
    ramp = np.linspace(0, 255, 4000, dtype=np.float32)
    Image.fromarray(np.broadcast_to(ramp[None, :, None], (5000, 4000, 3)).astype(np.uint8)).save(
        tree / "train" / "a" / "huge.jpg", quality=50)
    meta = prepare(PrepareConfig(source="imagefolder", root=str(tree), out=str(tmp_path / "ds"), storage="raw",
                                 max_resolution=64, workers=1, progress=False))
    assert meta["write"]["page_size"]["train"] == 2 * 2**20  # FFCV's smallest: the huge one is stored at 64x51
    assert (tmp_path / "ds" / "train.beton").stat().st_size < 8 * 2**20
    assert (64, 51) in _stored(tmp_path / "ds" / "train.beton")[0]
    assert meta["splits"]["train"]["image_size"]["height"]["max"] == 5000  # the summary tells the source's size


def test_sixteen_bit_and_float_images(tmp_path):
    from raysnet.data.prepare import PrepareConfig, prepare

    tree = _tree(tmp_path / "tree", n=1)
    ramp = (np.arange(40 * 48).reshape(40, 48) * 34).astype(np.uint16)  # 0 ... 65246
    Image.fromarray(ramp).save(tree / "train" / "a" / "grey16.png")
    Image.fromarray(np.ones((8, 8), np.float32)).save(tree / "train" / "b" / "float.tif")
    meta = prepare(PrepareConfig(source="imagefolder", root=str(tree), out=str(tmp_path / "ds"), storage="raw",
                                 workers=1, progress=False))
    assert [(s["path"], "mode F" in s["reason"]) for s in meta["skipped"]] == [("train/b/float.tif", True)]
    assert Image.open(tree / "train" / "a" / "grey16.png").mode == "I;16"
    stored = _stored(tmp_path / "ds" / "train.beton")[1]
    grey = next(im for im in stored if im.shape[:2] == (40, 48) and (im[..., 0] == im[..., 1]).all())
    assert np.abs(grey[..., 0].astype(int) - np.round(ramp / 257)).max() <= 1  # a ramp, not clipped to white
    assert grey.max() >= 250 and grey.min() == 0


def _prepare_process(tmp_path: Path, out: Path) -> subprocess.Popen:
    tree = _tree(tmp_path / "tree", n=150, size=(256, 256))
    return subprocess.Popen([sys.executable, "-m", "raysnet.prepare", "source=imagefolder", f"root={tree}",
                             f"out={out}", "workers=2", "progress=false", "storage=jpeg"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})


def test_a_child_forked_before_it_sets_its_own_signals_still_ends_on_sigterm():
    """A child forked inside `signals_held` runs with its parent's stop handler until it calls
    `child_signals`. A SIGTERM there must end it as it would later (a pool terminated right after it
    started waited forever for a worker that had collected the SIGTERM), and Ctrl-C must not."""
    from raysnet import errors

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    child = None
    try:
        errors.stop_on_signals()
        with errors.signals_held():
            child = errors.fork_context().Process(target=time.sleep, args=(60,), daemon=True)
            child.start()  # no child_signals: the parent's handler, and its copy of the held stops
        os.kill(child.pid, signal.SIGINT)
        time.sleep(0.5)
        assert child.is_alive(), "Ctrl-C ended a child before the parent decided"
        child.terminate()
        child.join(20)
        assert child.exitcode == -signal.SIGTERM, child.exitcode
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if child is not None and child.is_alive():
            child.kill()
            child.join()


def _why_not_ended(proc: subprocess.Popen) -> str:
    """What kept a stopped prepare's output open. It happened once in a clean-clone run, after its
    one line: either the prepare had not exited (SIGABRT makes Python's fault handler print where
    each of its threads waits) or another process of its group still held its stderr."""
    group = []
    for p in psutil.process_iter(["pid", "status", "cmdline"]):
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(p.pid) == proc.pid:
                group.append(f"{p.info['pid']} {p.info['status']} {' '.join(p.info['cmdline'] or [])[:200]}")
    running = proc.poll() is None
    threads = ""
    if running:
        proc.send_signal(signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        os.set_blocking(proc.stderr.fileno(), False)  # whatever else holds it open: read what is there
        with contextlib.suppress(OSError):
            threads = os.read(proc.stderr.fileno(), 1 << 20).decode(errors="replace")
    state = "was still running; its threads:\n" + threads if running else f"had exited with {proc.returncode}"
    return ("the stopped prepare's output was still open after 60 s. The processes of its group:\n"
            + "\n".join(group) + f"\nThe prepare {state}")


@pytest.mark.e2e  # a real process: outside the quick loop, which runs everything in-process
@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_a_stopped_prepare_leaves_nothing(tmp_path, how):
    out = tmp_path / "out" / "ds"
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / ".ds.partial-999999999-x"  # from a prepare killed earlier (no such process)
    stale.mkdir()
    (stale / "train.beton").write_bytes(b"x" * 1000)
    alive = tmp_path / "out" / f".ds.partial-{os.getpid()}-y"  # a running prepare's: left alone
    alive.mkdir()
    proc = _prepare_process(tmp_path, out)
    try:
        deadline = time.time() + 120
        # Its own staging directory (by its pid), and the processes it forked to decode or write:
        # stopped in the middle of the work, not before or after it.
        while time.time() < deadline and not (list((tmp_path / "out").glob(f".ds.partial-{proc.pid}-*"))
                                              and psutil.Process(proc.pid).children()):
            time.sleep(0.05)
        if how == "SIGTERM":
            proc.terminate()  # `kill PID`: the main process only
        else:
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(_why_not_ended(proc)) from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == (143 if how == "SIGTERM" else 130), stderr
    assert "Traceback" not in stderr and stderr.strip().count("\n") == 0, stderr
    assert f"stopped by {'SIGTERM' if how == 'SIGTERM' else 'Ctrl-C'}" in stderr
    assert f"removed {stale}" in stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [alive.name]


# --- 5. a failure inside training: one paragraph, a FAILED run with its reason, no lock-out ----------

@pytest.mark.e2e
def test_a_failure_inside_training(tmp_path, digits, ray_head):
    """A dataset whose meta.json lists 5 classes while its files hold labels 0-9: nothing before
    Ray can see it (reading every label would cost a pass over the data); the loss fails on the
    workers. Then the corrected rerun under the same run.name is not refused."""
    from mlflow import MlflowClient

    from raysnet import lifecycle
    from raysnet.tracking import FAILURE_TAG

    data = tmp_path / "five"
    shutil.copytree(digits, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["classes"], meta["num_classes"] = meta["classes"][:5], 5
    for split in meta["splits"].values():
        counts = list(split["per_class"].values())
        split["per_class"] = {c: n for c, n in zip(meta["classes"], [*counts[:4], sum(counts[4:])])}
    (data / "meta.json").write_text(json.dumps(meta))
    args = [f"data.root={data}", f"run.storage={tmp_path / 'runs'}", "run.name=labels", "arch=resnet20",
            "batch_size=64", "run.workers=1", "run.max_failures=0", "tracking.log_model=false"]
    done = subprocess.run([sys.executable, "-m", "raysnet.train", *args], capture_output=True, text=True, timeout=600,
                          env=ray_head, check=False)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    failure = " ".join(done.stderr.split())  # the one paragraph, and nothing else: Ray's copy of the traceback left out
    assert failure.startswith("error: raysnet.train failed: IndexError: Target") and failure.count("error") == 1
    assert "out of bounds" in failure and "--debug" in failure and "Traceback" not in done.stderr
    records = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [run] = records.search_runs(records.get_experiment_by_name("raysnet-digits").experiment_id)
    assert run.info.status == "FAILED" and "out of bounds" in run.data.tags[FAILURE_TAG]

    corrected = lifecycle.finalize(load_config([a for a in args if not a.startswith("data.root")] +
                                               [f"data.root={digits}"]))
    assert lifecycle.check_resume(corrected) is False  # starts afresh: nothing was trained under that name
    assert str(digits) in (tmp_path / "runs" / "labels" / "raysnet-config.yaml").read_text()


def test_the_root_cause_of_a_chain_that_loops_back():
    """Some of Ray's wrapped errors are their own cause, a chain with no end: the failure is still
    one paragraph, not a driver that spins for ever."""
    from raysnet.errors import root_cause

    inner, outer = ValueError("the port is taken"), RuntimeError("ray.init failed")
    outer.__cause__, inner.__cause__ = inner, outer
    assert root_cause(outer) in ("ValueError: the port is taken", "RuntimeError: ray.init failed")
    looped = OSError("itself")
    looped.__cause__ = looped
    assert root_cause(looped) == "OSError: itself"

"""Issue 13, the part caught before Ray starts: hostile checkpoints never execute, run.name stays
inside run.storage, and a dataset or tracking URI that cannot work stops the run as one paragraph
(exit status 2, no traceback, nothing written)."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from clitools import one_paragraph, ray_started, run_cli
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
    assert "Lower batch_size to at most 1438" in msg


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

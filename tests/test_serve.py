"""The MLflow model a run logs and registers (raysnet.serving): logged with raysnet's own tracking
functions into a real SQLite store, loaded back with mlflow.pyfunc, and served by `mlflow models
serve`; it answers images with class names, as raysnet.classifier does."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from PIL import Image
from servers import free_port, wait_until_up
from trained import images

from raysnet import serving, tracking
from raysnet.classifier import Classifier
from raysnet.config import load_config

NAME = "digits-serve"
MODEL = f"models:/{NAME}/1"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, digits, trained_digits, _empty_mlflow_db):
    """The model of `trained_digits` logged by tracking.finish_run and registered as digits-serve
    version 1, in a store of this module's own. -> its tracking URI"""
    tmp = tmp_path_factory.mktemp("serve")
    shutil.copyfile(_empty_mlflow_db, tmp / "mlflow.db")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config([f"data.root={digits}", f"run.storage={tmp}", f"tracking.uri={uri}", "run.name=serve",
                       "tracking.experiment=serve", f"tracking.register={NAME}", "tracking.log_model=true"])
    run_id, _ = tracking.open_run(cfg, {}, {})
    with tempfile.TemporaryDirectory() as slim:
        assert tracking.finish_run(cfg, run_id, None, serving.package(trained_digits, slim)) == f"{NAME} version 1"
    return uri


@pytest.fixture(scope="module")
def pngs(tmp_path_factory, digits) -> tuple[list[str], np.ndarray]:
    """The digits' validation images as PNG files. -> (paths, labels)"""
    folder = tmp_path_factory.mktemp("val-png")
    pixels, labels = images(digits, "val")
    paths = [str(folder / f"{i:03d}.png") for i in range(len(pixels))]
    for p, x in zip(paths, pixels):
        Image.fromarray(x).save(p)
    return paths, labels


def same_rows(got, expected) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g["path"], list(g["classes"]), g["note"], g["error"]) == \
            (e["path"], e["classes"], e["note"], e["error"])
        np.testing.assert_allclose(list(g["probs"]), e["probs"], atol=1e-5)


def test_the_registered_model_names_the_classes_of_image_paths_and_bytes(registered, trained_digits, pngs):
    paths, labels = pngs
    # The same device as the served model's (its GPU when there is one): the same sums, to 1e-5.
    reference = Classifier.load(trained_digits, device="cuda" if torch.cuda.is_available() else "cpu")
    data = [Path(p).read_bytes() for p in paths]
    items = [reference.preprocess(d) for d in data]
    with tracking.fluent_uri(registered):
        model = mlflow.pyfunc.load_model(MODEL)
        by_path = model.predict(paths).to_dict("records")
        by_bytes = model.predict(data).to_dict("records")
        framed = model.predict(pd.DataFrame({"path": paths[:3]})).to_dict("records")
        odd = model.predict([b"not an image", paths[0], str(Path(paths[0]).with_name("missing.png"))],
                            params={"k": 2}).to_dict("records")
        with pytest.raises(mlflow.exceptions.MlflowException, match="no column 'image' or 'path'"):
            model.predict(pd.DataFrame({"picture": data[:1]}))
    same_rows(by_path, reference.rows(paths, items))
    same_rows(by_bytes, reference.rows([""] * len(data), items))
    same_rows(framed, reference.rows(paths[:3], items[:3]))
    right = np.mean([r["classes"][0] == str(y) for r, y in zip(by_path, labels)])
    assert right >= 0.95, right
    # A bad entry is a row saying why; the others go on (top k=2 as asked).
    assert odd[0]["classes"] == [] and "not an image" in odd[0]["error"]
    assert len(odd[1]["classes"]) == 2 and odd[1]["error"] == ""
    assert odd[2]["classes"] == [] and "cannot read the file" in odd[2]["error"]
    # The model carries the slim checkpoint: raysnet.classifier loads the registered model too.
    assert Classifier.load(MODEL, tracking_uri=registered).classes == reference.classes


def _jpeg(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).resize((64, 64)).save(out, "JPEG", quality=95)
    return out.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@contextlib.contextmanager
def served(uri: str, log: Path):
    """`mlflow models serve` of the registered model on 127.0.0.1, as the README says. -> its base URL"""
    port = free_port()
    start = time.perf_counter()
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL, "--env-manager",
                                   "local", "--host", "127.0.0.1", "--port", str(port)],
                                  env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", 60)
        print(f"mlflow models serve answered /ping after {time.perf_counter() - start:.1f} s")
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


@pytest.mark.e2e
def test_mlflow_models_serve_answers_a_jpeg_with_its_class(registered, digits, tmp_path):
    """A JPEG, base64 in the JSON (MLflow's way for a binary column), gets its class; bad requests
    get a 4xx with a message."""
    pixels, labels = images(digits, "val")
    with served(registered, tmp_path / "serve.log") as base:

        def ask(body):
            return requests.post(base + "/invocations", json=body, timeout=30)

        picks = [0, 1, 2]
        split = {"dataframe_split": {"columns": ["image"], "data": [[_b64(_jpeg(pixels[i]))] for i in picks]}}
        answer = ask(split)
        assert answer.status_code == 200, answer.text
        rows = answer.json()["predictions"]
        assert [r["classes"][0] for r in rows] == [str(labels[i]) for i in picks], rows
        assert len(rows[0]["classes"]) == 5 and abs(sum(rows[0]["probs"]) - 1) < 0.01
        records = ask({"dataframe_records": [{"image": _b64(_jpeg(pixels[0]))}], "params": {"k": 2}})
        assert records.status_code == 200 and records.json()["predictions"][0]["classes"][0] == str(labels[0])
        assert len(records.json()["predictions"][0]["classes"]) == 2
        # {"inputs": ...} is not decoded from base64 by MLflow (3.17): the row says where to send it.
        inputs = ask({"inputs": [_b64(_jpeg(pixels[0]))]})
        assert inputs.status_code == 200 and "dataframe_split" in inputs.json()["predictions"][0]["error"]
        # An undecodable image in a valid request: its row says why.
        broken = ask({"dataframe_split": {"columns": ["image"], "data": [[_b64(b"GIF89a truncated")]]}})
        assert broken.status_code == 200, broken.text
        assert broken.json()["predictions"][0]["classes"] == [] and broken.json()["predictions"][0]["error"]
        # Malformed requests: a 4xx with a message, no traceback.
        for bad, words in (({"data": b"not json {", "headers": {"Content-Type": "application/json"}}, "JSON"),
                           ({"json": {"dataframe_split": {"columns": ["picture"], "data": [["aGk="]]}}},
                            "no column 'image' or 'path'"),
                           ({"json": {"image": _b64(_jpeg(pixels[0]))}}, "dataframe_split")):
            reply = requests.post(base + "/invocations", timeout=30, **bad)
            assert 400 <= reply.status_code < 500, (reply.status_code, reply.text[:2000])
            assert words in reply.json()["message"] and "Traceback" not in reply.text, reply.text[:2000]

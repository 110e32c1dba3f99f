"""The MLflow model a run logs and registers: images in, class names and probabilities out.

    mlflow models serve -m models:/digits/1 --env-manager local --port 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
      -d '{"dataframe_split": {"columns": ["image"], "data": [["<the image file, base64>"]]}}'
    mlflow.pyfunc.load_model("models:/digits/1").predict(["a.png", "b.jpg"])   # or [bytes, ...]

One row per image, in order, the shape of every raysnet prediction (raysnet.classifier.row): path,
classes, probs (the top k, params {"k": 5}), note, error. A file that is not a readable image gets a
row with its error, never an exception. The model carries the run's slim checkpoint (config,
weights, class names, normalisation) as its artifact `checkpoint` and this file as its code
(MLflow 3's models from code: no pickled object); raysnet.classifier does the rest.

The signature's input is one unnamed binary column, not named columns: MLflow's schema enforcement
turns a plain list into a DataFrame with the column 0, which a signature with named columns drops
(leaving no rows), so `predict(["a.png"])` would predict nothing. Unnamed, the column keeps its
values and its name: `image` (bytes; in a JSON request base64, which MLflow decodes for a binary
column of dataframe_split/dataframe_records), `path` (local files: a local call's way, not a
server's) or 0 (a list: bytes are images, strings are paths).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from raysnet.classifier import TOP_K, Classifier, Item, row
from raysnet.tracking import MODEL_ARTIFACT, ServedModel

CODE = Path(__file__)  # what MLflow copies into the model and runs when it loads it
COLUMNS = tuple(row("", [], []))  # path, classes, probs, note, error
INPUT_COLUMNS = ("image", "path")
BATCH = 256  # images per forward pass: a long list of ImageNet images stays within memory
# What the model's code imports when it loads and predicts, by pip's names (cv2: whichever OpenCV
# wheel is installed), pinned to the running versions in its requirements.
DISTRIBUTIONS = ("raysnet", "torch", "torchvision", "numpy", "pillow", "omegaconf", "pandas",
                 ("opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"))
BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\s]{16,}")


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """raysnet.classifier.Classifier as an MLflow python_function model."""

    def load_context(self, context) -> None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.classifier = Classifier.load(context.artifacts[MODEL_ARTIFACT], device=device)

    # model_input: what MLflow's schema enforcement hands over. A DataFrame hint asks MLflow for no
    # checks of its own (a list[...] hint would replace the signature, and base64 decoding with it).
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        k = _top_k(params)
        entries = _entries(model_input)
        rows = []
        for start in range(0, len(entries), BATCH):
            chunk = entries[start:start + BATCH]
            items = [_item(e, self.classifier.preprocess) for e in chunk]
            rows += self.classifier.rows([_name(e) for e in chunk], items, k)
        return pd.DataFrame(rows, columns=list(COLUMNS))


def _bad_input(message: str) -> Exception:
    # MLflow's scoring server answers an MlflowException with its HTTP status (400 here) and message.
    return mlflow.exceptions.MlflowException.invalid_parameter_value(message)


def _top_k(params: dict[str, Any] | None) -> int:
    k = (params or {}).get("k", TOP_K)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise _bad_input(f"bad value for the parameter 'k': {k!r}. Expected a whole number >= 1 (how many "
                         "classes each row names, most probable first).")
    return int(k)


def _entries(model_input) -> list:
    """The images asked for, in order: each bytes (the file's contents) or a str (a local path)."""
    if isinstance(model_input, pd.DataFrame):
        return list(model_input[_column(model_input)])
    if isinstance(model_input, (bytes, str)):
        return [model_input]
    if isinstance(model_input, (list, tuple, pd.Series, np.ndarray)):
        return list(model_input)
    raise _bad_input(f"expected images as a DataFrame with a column 'image' or 'path', or a list of image "
                     f"bytes or file paths; got {type(model_input).__name__}.")


def _column(frame: pd.DataFrame) -> Any:
    for name in INPUT_COLUMNS:
        if name in frame.columns:
            return name
    if list(frame.columns) == [0]:  # a plain list, made a DataFrame by MLflow's schema enforcement
        return 0
    raise _bad_input(f"no column 'image' or 'path' in the input (its columns: {list(frame.columns)}). Send "
                     "{\"dataframe_split\": {\"columns\": [\"image\"], \"data\": [[\"<the image file, "
                     "base64>\"]]}}, or from Python a list of image bytes or file paths.")


def _name(entry) -> str:
    return str(entry) if isinstance(entry, (str, os.PathLike)) else ""


def _item(entry, preprocess) -> Item:
    """One entry made ready for the network, or an Item saying why it cannot be."""
    if isinstance(entry, (bytes, bytearray, memoryview)):
        data = bytes(entry)
    elif isinstance(entry, (str, os.PathLike)):
        try:
            data = Path(entry).expanduser().read_bytes()
        except OSError as e:
            return Item(None, error=f"cannot read the file ({type(e).__name__}: {e.strerror or e})")
    else:
        return Item(None, error=f"expected image bytes or a file path, got {type(entry).__name__}: {entry!r:.80}")
    item = preprocess(data)
    if item.error and BASE64_TEXT.fullmatch(data):
        # MLflow decodes base64 only in dataframe_split/dataframe_records, not in {"inputs": ...}.
        return item._replace(error=f"{item.error}; the bytes look like base64 text: send images in "
                                   "dataframe_split or dataframe_records, where MLflow decodes base64")
    return item


def signature():
    """What the model takes and returns, as the MLmodel file and the MLflow UI show it."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    outputs = Schema([ColSpec(DataType.string, "path"), ColSpec(Array(DataType.string), "classes"),
                      ColSpec(Array(DataType.double), "probs"), ColSpec(DataType.string, "note"),
                      ColSpec(DataType.string, "error")])
    return ModelSignature(inputs=Schema([ColSpec(DataType.binary)]), outputs=outputs,
                          params=ParamSchema([ParamSpec("k", DataType.long, TOP_K)]))


def requirements() -> list[str]:
    """pip requirements, explicit: MLflow's own inference of them imports the world and takes minutes."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for names in DISTRIBUTIONS:
        for name in (names,) if isinstance(names, str) else names:
            try:
                pinned.append(f"{name}=={version(name).split('+')[0]}")  # 2.14.1+cu130: pip knows 2.14.1
                break
            except PackageNotFoundError:
                continue
    return pinned


def package(checkpoint_file: str | Path, folder: str | Path) -> ServedModel:
    """This model for a run's checkpoint: its slim copy written into `folder` (a temporary directory
    the caller removes after logging)."""
    from raysnet.checkpoint import CHECKPOINT_FILE, save_model_only

    slim = Path(folder) / CHECKPOINT_FILE  # the name raysnet.checkpoint.from_mlflow looks for
    save_model_only(checkpoint_file, slim)
    return ServedModel(str(CODE), {MODEL_ARTIFACT: str(slim)}, signature(), requirements(), example())


def example() -> pd.DataFrame:
    """A grey 32 x 32 PNG. MLflow checks the model on it when logging (under a second) and keeps it
    beside the model as the request to copy: serving_input_example.json."""
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(png, "PNG")
    return pd.DataFrame({"image": [png.getvalue()]})


# MLflow runs this file as the logged model's code under a module name of its own: there it names
# the model. Imported as raysnet.serving, it sets nothing.
if __name__ != "raysnet.serving":
    mlflow.models.set_model(ImageClassifier())

"""A trained model used on images: bytes in, class names and probabilities out.

One place for what every consumer of a model does the same way (`python -m raysnet.predict`,
its Ray Data pipeline, the MLflow model that `mlflow models serve` answers with):

    prep = Preprocess.of(loaded)           # the model's own validation view and normalisation
    item = prep(image_bytes)               # decoded, checked, viewed: Item(views, note, error)
    clf = Classifier.load("models:/digits/1")
    rows = clf.rows(["a.png"], [item])     # [{"path", "classes", "probs", "note", "error"}]

`Preprocess` is plain data and runs anywhere (a Ray task on a CPU node); `Classifier` holds the
network (a Ray actor, on a GPU when there is one). A file that is not a readable image becomes an
`Item` with an error, never an exception: its row says why and the other images go on.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# torchvision's ImageNet normalisation on the 0-255 scale: for a plain state dict, which carries none.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
MODES = ("single", "10crop")
TOP_K = 5


class Item(NamedTuple):
    """One image made ready for the network: (views, 3, crop, crop) float32, or an error."""

    views: np.ndarray | None
    note: str = ""  # how a readable but unusual image was converted (CMYK, 16-bit)
    error: str = ""  # why there is no prediction


def decode(data: bytes) -> tuple[np.ndarray, str]:
    """-> (H x W x 3 uint8 RGB, note). Converted as prepare converts (raysnet.data.encode.to_rgb),
    so the model sees what it was trained on; raises ValueError saying why a file is unusable."""
    from PIL import Image

    from raysnet.data.encode import SIXTEEN_BIT, _why, to_rgb

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # the whole file: truncated data fails here
            mode, kind = im.mode, im.format or "image"
            rgb = to_rgb(im)
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds; each means "not usable"
        raise ValueError(_why(e)) from None
    if mode == "CMYK":
        return rgb, f"{kind} in CMYK, converted to RGB as prepare does"
    if mode in SIXTEEN_BIT:
        return rgb, f"16-bit {kind} ({mode}), scaled to 8 bits as prepare does"
    return rgb, ""


@dataclass(frozen=True)
class Preprocess:
    """The model's validation view, as training validated: the centre crop x crop of the image with
    shorter side resized to val_resize (data.val_aug=center; FFCV's centre-crop decoder, area
    resampling), or the whole image at crop x crop (data.val_aug=original: CIFAR's 32 x 32);
    10crop: the paper's ten crops of the image resized to shorter side val_resize. Then (x - mean) / std."""

    crop: int
    val_resize: int
    center: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mode: str = "single"

    @classmethod
    def of(cls, cfg, labels: dict | None, mode: str = "single") -> Preprocess:
        """From a checkpoint's config and labels (None for a plain state dict: ImageNet's view)."""
        if mode not in MODES:
            from raysnet.errors import UsageError

            raise UsageError(f"bad value for 'mode': {mode!r}. Expected one of {', '.join(MODES)}.")
        if cfg is None:
            return cls(224, 256, True, IMAGENET_MEAN, IMAGENET_STD, mode)
        mean, std = (labels["mean"], labels["std"]) if labels else (IMAGENET_MEAN, IMAGENET_STD)
        return cls(cfg.data.crop, cfg.data.val_resize, cfg.data.val_aug == "center",
                   tuple(float(m) for m in mean), tuple(float(s) for s in std), mode)

    def __call__(self, data: bytes) -> Item:
        try:
            rgb, note = decode(data)
        except ValueError as e:
            return Item(None, error=str(e))
        return Item(self.views(rgb), note=note)

    def views(self, rgb: np.ndarray) -> np.ndarray:
        if self.mode == "10crop":
            return self._ten_crops(rgb)
        return self._normalise(self._centre(rgb))[None]

    def _centre(self, rgb: np.ndarray) -> np.ndarray:
        """FFCV's CenterCropRGBImageDecoder: the centred square of side ratio * shorter side, resized
        to crop x crop by area averaging."""
        import cv2

        h, w = rgb.shape[:2]
        side = int((self.crop / self.val_resize if self.center else 1.0) * min(h, w))
        top, left = (h - side) // 2, (w - side) // 2
        square = rgb[top:top + side, left:left + side]
        if side == self.crop:
            return np.ascontiguousarray(square)
        return cv2.resize(square, (self.crop, self.crop), interpolation=cv2.INTER_AREA)

    def _normalise(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 H x W x 3 -> float32 3 x H x W, by FFCV's table (computed in float64, then float32)."""
        mean, std = np.asarray(self.mean, np.float64), np.maximum(np.asarray(self.std, np.float64), 1e-3)
        table = ((np.arange(256)[:, None] - mean[None]) / std[None]).astype(np.float32)  # 256 x 3
        return np.stack([table[rgb[..., c], c] for c in range(3)])

    def _ten_crops(self, rgb: np.ndarray) -> np.ndarray:
        import torch

        from raysnet.inference import views

        image = torch.from_numpy(self._normalise(rgb))
        return torch.stack(views(image, "10crop", self.crop, (), self.val_resize if self.center else None)).numpy()


class Classifier:
    """A network with its class names and preprocessing, on one device."""

    def __init__(self, model, classes: list[str], preprocess: Preprocess, source: str = "", device: str = "cpu"):
        import torch

        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.classes, self.preprocess, self.source = classes, preprocess, source

    @classmethod
    def load(cls, source: str | Path, *, tracking_uri: str | None = None, mode: str = "single",
             device: str = "cpu", arch: str | None = None) -> Classifier:
        """A raysnet checkpoint (file, checkpoint or run directory), an MLflow model URI, or a plain
        state dict with `arch` (then classes are numbered and ImageNet's view and normalisation are used)."""
        from raysnet.checkpoint import load_model

        loaded = load_model(source, arch, tracking_uri=tracking_uri)
        n = loaded.model.fc.out_features
        labels = loaded.labels
        classes = list(labels["classes"]) if labels else [str(i) for i in range(n)]
        return cls(loaded.model, classes, Preprocess.of(loaded.config, labels, mode), str(source), device)

    def probabilities(self, views: np.ndarray) -> np.ndarray:
        """(N, V, 3, crop, crop) -> (N, classes): softmax averaged over each image's V views."""
        import torch

        n, v = views.shape[:2]
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(views, dtype=np.float32)).to(self.device)
            probs = self.model(x.reshape(n * v, *x.shape[2:])).float().softmax(1)
        return probs.reshape(n, v, -1).mean(1).cpu().numpy()

    def rows(self, paths: list[str], items: list[Item], k: int = TOP_K) -> list[dict[str, Any]]:
        """One row per image, in order: its top-k class names and probabilities, or why there are none."""
        good = [i for i, item in enumerate(items) if item.views is not None]
        probs = self.probabilities(np.stack([items[i].views for i in good])) if good else np.zeros((0, 0))
        out = [row(p, [], [], item.note, item.error) for p, item in zip(paths, items)]
        k = min(k, len(self.classes))
        for i, p in zip(good, probs):
            best = np.argsort(-p, kind="stable")[:k]
            out[i] = row(paths[i], [self.classes[j] for j in best], [float(p[j]) for j in best], items[i].note, "")
        return out


def row(path: str, classes: list[str], probs: list[float], note: str = "", error: str = "") -> dict[str, Any]:
    """The one shape of a prediction, in every output (JSON lines, CSV, Parquet, the MLflow model)."""
    return {"path": path, "classes": classes, "probs": probs, "note": note, "error": error}

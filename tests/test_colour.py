"""Colour augmentation: AlexNet's PCA lighting and the brightness/contrast/saturation
jitter, each its own switch, and the recipes that say which is on."""

from __future__ import annotations

import numpy as np
import pytest
import raysnet.data.ffcv_import  # noqa: F401  (before any ffcv import: see there)
from ffcv.pipeline.compiler import Compiler

from raysnet.config import ConfigError, DataConfig, from_dict, load_config, to_dict
from raysnet.data.loaders import colour_ops, pca_components
from raysnet.data.transforms import IMAGENET_EIGVAL, IMAGENET_EIGVEC, ColourJitter, PCALighting, lighting_basis

META = {"mean": [0.0] * 3, "std": [1.0] * 3}


def test_pca_lighting_shift_has_alexnets_covariance_and_zero_mean():
    # One flat grey pixel per draw: whatever is added to it is the image's shift.
    np.random.seed(0)
    lighting = Compiler.compile(PCALighting(0.1, IMAGENET_EIGVAL, IMAGENET_EIGVEC).generate_code())
    draws = 40_000
    grey = np.full((draws, 2, 2, 3), 128, dtype=np.uint8)
    out = lighting(grey.copy(), None).astype(np.float64)
    assert np.all(out == out[:, :1, :1, :])  # one shift per image, the same for every pixel
    shift = out[:, 0, 0, :] - 128
    # a ~ N(0, 0.1^2 I), shift = B a with B's columns 255 lambda_i p_i: Cov = 0.01 B B^T, plus the
    # rounding to whole pixel values (uniform, variance 1/12 per channel).
    basis = lighting_basis(IMAGENET_EIGVAL, IMAGENET_EIGVEC)
    expected = 0.01 * basis @ basis.T + np.eye(3) / 12
    assert np.abs(np.cov(shift.T) - expected).max() < 0.05 * np.abs(expected).max()
    assert np.abs(shift.mean(0)).max() < 4 * np.sqrt(expected.diagonal().max() / draws)
    # Along the first principal component ImageNet's lighting moves about 5.5 grey levels (1 sd).
    assert np.std(shift @ np.asarray(IMAGENET_EIGVEC)[:, 0]) == pytest.approx(0.1 * 255 * 0.2175, rel=0.03)


def test_the_two_switches_are_independent():
    def kinds(**colour) -> list[type]:
        return [type(op) for op in colour_ops(DataConfig(**colour), META)]

    assert kinds() == []
    assert kinds(pca_lighting=0.1) == [PCALighting]
    assert kinds(colour_jitter=0.4) == [ColourJitter]
    assert kinds(pca_lighting=0.1, colour_jitter=0.4) == [ColourJitter, PCALighting]  # fb.resnet.torch's order
    jitter_only = colour_ops(DataConfig(colour_jitter=0.3), META)[0]
    assert jitter_only.magnitude == 0.3


def test_lighting_uses_the_datasets_components_else_imagenets():
    assert pca_components(META) == (list(IMAGENET_EIGVAL), [list(r) for r in IMAGENET_EIGVEC])
    own = {**META, "pca": {"eigval": [0.3, 0.02, 0.01], "eigvec": np.eye(3).tolist()}}
    op = colour_ops(DataConfig(pca_lighting=0.1), own)[0]
    assert np.allclose(op.basis, 255 * np.diag([0.3, 0.02, 0.01]))


def test_the_recipes_say_which_is_on():
    from raysnet.config import RECIPES

    # The dataset recipe of recipe=imagenet-paper spells out both switches.
    lines = (RECIPES / "data" / "imagenet.yaml").read_text().splitlines()
    assert "pca_lighting: 0.1" in lines and "colour_jitter: 0.0" in lines
    paper = load_config(["recipe=imagenet-paper"]).data  # AlexNet's lighting, as the paper cites it
    assert (paper.pca_lighting, paper.colour_jitter) == (0.1, 0.0)
    fast = load_config(["recipe=imagenet-fast"]).data
    assert (fast.pca_lighting, fast.colour_jitter) == (0.0, 0.0)
    cifar = load_config(["recipe=cifar-paper"]).data
    assert (cifar.pca_lighting, cifar.colour_jitter) == (0.0, 0.0)  # paper §4.2: no colour augmentation
    both = load_config(["recipe=imagenet-paper", "data.colour_jitter=0.4"]).data  # fb.resnet.torch's
    assert (both.pca_lighting, both.colour_jitter) == (0.1, 0.4)


def test_the_old_key_says_what_replaced_it():
    with pytest.raises(ConfigError) as e:
        load_config(["data.colour=true"])
    assert "data.pca_lighting=0.1" in str(e.value) and "data.colour_jitter=0.4" in str(e.value)
    with pytest.raises(ConfigError, match="data.pca_lighting"):
        load_config(["data.pca_lighting=-0.1"])
    # A checkpoint written before the split still loads: colour=true was the jitter at 0.4.
    old = to_dict(load_config([]))
    old["data"] = {k: v for k, v in old["data"].items() if k not in ("pca_lighting", "colour_jitter")} | {"colour": True}
    assert (from_dict(old).data.colour_jitter, from_dict(old).data.pca_lighting) == (0.4, 0.0)


def test_prepare_records_the_training_pixels_principal_components(tmp_path):
    from PIL import Image

    from raysnet.data.prepare import PrepareConfig, prepare
    from raysnet.data.sources import from_arrays
    from raysnet.data.writer import WriteSettings, write_dataset

    rng = np.random.default_rng(1)
    # Correlated channels, so the components are not the axes: green follows red, blue is its own.
    base = rng.integers(0, 200, (6, 10, 12, 1))
    images = np.concatenate([base, base + rng.integers(0, 40, base.shape), rng.integers(0, 256, base.shape)],
                            axis=3).astype(np.uint8)
    pixels = images.reshape(-1, 3) / 255.0
    values, vectors = np.linalg.eigh(np.cov(pixels.T, bias=True))

    def check(pca: dict) -> None:
        assert np.allclose(pca["eigval"], values[::-1], rtol=1e-4)
        columns = np.asarray(pca["eigvec"])
        for i in range(3):  # each eigenvector (a column, largest first) up to its sign
            assert abs(abs(columns[:, i] @ vectors[:, 2 - i]) - 1) < 1e-4

    labels = np.zeros(len(images), dtype=np.int64)
    raw = WriteSettings("raw", None, 90, 0.5, 0, workers=1, progress=False)
    check(write_dataset(from_arrays("t", ["a"], (images, labels), (images[:1], labels[:1])), tmp_path / "arrays",
                        raw)["pca"])
    for split in ("train", "val"):
        (tmp_path / "tree" / split / "a").mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / "tree" / split / "a" / f"{i}.png")
    check(prepare(PrepareConfig(source="imagefolder", root=str(tmp_path / "tree"), out=str(tmp_path / "files"),
                                max_resolution=None, workers=1, progress=False))["pca"])

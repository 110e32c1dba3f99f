"""The paper's augmentations as FFCV pipeline stages (numba-compiled, run on the loader's threads).

- `PadRandomCrop`: CIFAR, §4.2: "4 pixels are padded on each side, and a 32x32 crop is randomly
  sampled from the padded image or its horizontal flip".
- `ScaleCropRGBImageDecoder`: ImageNet, §3.4: "the image is resized with its shorter side randomly
  sampled in [256, 480] for scale augmentation. A 224x224 crop is randomly sampled".
- `PCALighting`: ImageNet, §3.4: "the standard color augmentation in [21] is used", [21] being
  AlexNet (Krizhevsky et al. 2012, §4.1).
- `ColourJitter`: brightness, contrast and saturation, which fb.resnet.torch adds to the lighting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import raysnet.data.ffcv_import  # noqa: F401  (before any ffcv import: see there)
from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State


class PadRandomCrop(Operation):
    """Zero-pad `pad` pixels on every side, then take a random `crop` x `crop` window.

    Works on a batch of equal-size HxWx3 uint8 images. The padding is black (0) in pixel
    space, before normalisation, as in the common CIFAR implementations.
    """

    def __init__(self, pad: int, crop: int):
        super().__init__()
        self.pad, self.crop = pad, crop

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        pad, crop = self.pad, self.crop

        def pad_crop(images, dst):
            n, h, w, c = images.shape
            for i in my_range(n):
                # Offset of the window's top-left corner from the image's, in [-pad, pad].
                dy = np.random.randint(0, h + 2 * pad - crop + 1) - pad
                dx = np.random.randint(0, w + 2 * pad - crop + 1) - pad
                # Plain loops: numba compiles them in a second, sliced copies in ~8 s (parallel).
                for r in range(crop):
                    sr = r + dy
                    for q in range(crop):
                        sq = q + dx
                        inside = 0 <= sr < h and 0 <= sq < w
                        for k in range(c):
                            dst[i, r, q, k] = images[i, sr, sq, k] if inside else 0
            return dst

        pad_crop.is_parallel = True
        return pad_crop

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        h, w, c = previous_state.shape
        if min(h, w) + 2 * self.pad < self.crop:
            raise ValueError(f"a {self.crop}x{self.crop} crop does not fit {h}x{w} images padded by {self.pad}")
        shape = (self.crop, self.crop, c)
        return replace(previous_state, jit_mode=True, shape=shape), AllocationQuery(shape, previous_state.dtype)


class RandomFlip(Operation):
    """Mirror each image left-right with probability 1/2 (paper §3.4 and §4.2), in place.

    Unflipped images are not touched and flipped ones swap column pairs: a quarter of the
    memory traffic of FFCV's RandomHorizontalFlip, which copies every image, and plain loops
    that numba compiles in under a second (its sliced copies take ~5 s in parallel mode).
    """

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()

        def flip(images, _):
            n, h, w, c = images.shape
            for i in my_range(n):
                if np.random.random() < 0.5:
                    for r in range(h):
                        for q in range(w // 2):
                            for k in range(c):
                                left = images[i, r, q, k]
                                images[i, r, q, k] = images[i, r, w - 1 - q, k]
                                images[i, r, w - 1 - q, k] = left
            return images

        flip.is_parallel = True
        return flip

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, None]:
        return replace(previous_state, jit_mode=True), None


class ColourJitter(Operation):
    """Random brightness, contrast and saturation, each a factor in [1 - m, 1 + m], in place.

    torchvision's ColorJitter(m, m, m), applied in that order with one rounding at the end: what
    fb.resnet.torch adds (m = 0.4) on top of AlexNet's PCA lighting; not part of the paper's
    recipe. One fused pass of plain loops: FFCV's three separate ops compile for ~5 s.
    """

    def __init__(self, magnitude: float):
        super().__init__()
        self.magnitude = magnitude

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        m = self.magnitude

        def jitter(images, _):
            n, h, w, _c = images.shape
            for i in my_range(n):
                b = np.random.uniform(1 - m, 1 + m)
                con = np.random.uniform(1 - m, 1 + m)
                sat = np.random.uniform(1 - m, 1 + m)
                grey_sum = 0.0  # mean luminance (ITU-R 601) of the image, for the contrast blend
                for r in range(h):
                    for q in range(w):
                        grey_sum += 0.299 * images[i, r, q, 0] + 0.587 * images[i, r, q, 1] + 0.114 * images[i, r, q, 2]
                grey_mean = b * grey_sum / (h * w)
                for r in range(h):
                    for q in range(w):
                        # brightness: scale; contrast: blend with the mean grey
                        red = con * b * images[i, r, q, 0] + (1 - con) * grey_mean
                        green = con * b * images[i, r, q, 1] + (1 - con) * grey_mean
                        blue = con * b * images[i, r, q, 2] + (1 - con) * grey_mean
                        # saturation: blend with the pixel's own grey
                        grey = 0.299 * red + 0.587 * green + 0.114 * blue
                        red = sat * red + (1 - sat) * grey
                        green = sat * green + (1 - sat) * grey
                        blue = sat * blue + (1 - sat) * grey
                        images[i, r, q, 0] = min(max(red + 0.5, 0.0), 255.0)
                        images[i, r, q, 1] = min(max(green + 0.5, 0.0), 255.0)
                        images[i, r, q, 2] = min(max(blue + 0.5, 0.0), 255.0)
            return images

        jitter.is_parallel = True
        return jitter

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, None]:
        return replace(previous_state, jit_mode=True), None


# ImageNet's RGB principal components as fb.resnet.torch publishes them (datasets/imagenet.lua),
# for pixels on a 0-1 scale: eigenvalues, and a matrix whose columns are the eigenvectors (rows R, G, B).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))


def lighting_basis(eigval, eigvec) -> np.ndarray:
    """3x3, 0-255 scale: column i is 255 * lambda_i * p_i, so one image's shift is basis @ a."""
    return 255.0 * np.asarray(eigvec, dtype=np.float64) * np.asarray(eigval, dtype=np.float64)[None, :]


class PCALighting(Operation):
    """AlexNet's colour augmentation (Krizhevsky et al. 2012, §4.1), in place, on uint8 pixels.

    Each image gets one draw a_i ~ N(0, std), i = 1..3, and every pixel gets sum_i a_i lambda_i p_i
    added, where p_i, lambda_i are the eigenvectors and eigenvalues of the 3x3 covariance of the
    training set's RGB pixel values (on a 0-1 scale, as fb.resnet.torch's ImageNet values; the
    shift is scaled back to 0-255 here). AlexNet: std 0.1.
    """

    def __init__(self, std: float, eigval, eigvec):
        super().__init__()
        self.std = float(std)
        self.basis = lighting_basis(eigval, eigvec)

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        std = self.std
        # Nine scalars rather than a captured array: numba freezes them as constants either way.
        (b00, b01, b02), (b10, b11, b12), (b20, b21, b22) = self.basis.tolist()

        def lighting(images, _):
            n, h, w, _c = images.shape
            for i in my_range(n):
                a0, a1, a2 = np.random.normal(0.0, std), np.random.normal(0.0, std), np.random.normal(0.0, std)
                red = b00 * a0 + b01 * a1 + b02 * a2
                green = b10 * a0 + b11 * a1 + b12 * a2
                blue = b20 * a0 + b21 * a1 + b22 * a2
                for r in range(h):
                    for q in range(w):
                        images[i, r, q, 0] = min(max(images[i, r, q, 0] + red + 0.5, 0.0), 255.0)
                        images[i, r, q, 1] = min(max(images[i, r, q, 1] + green + 0.5, 0.0), 255.0)
                        images[i, r, q, 2] = min(max(images[i, r, q, 2] + blue + 0.5, 0.0), 255.0)
            return images

        lighting.is_parallel = True
        return lighting

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, None]:
        return replace(previous_state, jit_mode=True), None


def scale_crop(height: int, width: int, scale_range: np.ndarray, crop: float) -> tuple[int, int, int, int]:
    """Paper §3.4 scale augmentation as one crop window of the stored image: (top, left, h, w).

    Resizing so the shorter side is s ~ U[scale_range], then cutting a random crop x crop
    window, equals cutting a (crop * short / s)-pixel square from the stored image and
    resizing that square to crop x crop. Only the window is ever resized: no full-size
    intermediate image.
    """
    short = min(height, width)
    s = np.random.uniform(scale_range[0], scale_range[1])
    side = min(short, max(1, int(round(crop * short / s))))  # s < crop (a config below the paper's) clips
    i = np.random.randint(0, height - side + 1)
    j = np.random.randint(0, width - side + 1)
    return i, j, side, side


class ScaleCropRGBImageDecoder(ResizedCropRGBImageDecoder):
    """Decode with paper §3.4 scale augmentation: shorter side in `scale_range`, random `crop` square.

    FFCV's ResizedCropRGBImageDecoder decodes, asks `get_crop_generator(height, width,
    self.scale, self.ratio)` for a window and resizes it to the output size; the window here
    comes from `scale_crop`, with `scale` = the shorter-side range and `ratio` = the crop.
    """

    def __init__(self, crop: int, scale_range: tuple[int, int]):
        super().__init__((crop, crop))
        self.scale = np.asarray(scale_range, dtype=np.float64)
        self.ratio = float(crop)

    @property
    def get_crop_generator(self) -> Callable:
        return scale_crop


class TorchNormalize(Operation):
    """(x - mean) / std on a B x C x H x W uint8 tensor, on its device, as float32.

    The GPU fallback for FFCV's NormalizeImage, whose GPU kernel needs cupy.
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray, channels_last: bool):
        super().__init__()
        self.mean, self.std, self.channels_last = mean, std, channels_last

    def generate_code(self) -> Callable:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format

        def normalize(images, _):
            mean = torch.as_tensor(self.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
            std = torch.as_tensor(self.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
            return ((images.float() - mean) / std).contiguous(memory_format=fmt)

        return normalize

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, None]:
        return replace(previous_state, dtype=torch.float32), None

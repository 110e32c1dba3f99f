"""The paper's testing modes: the mechanics of the views (raysnet.inference), and the command
(raysnet.evaluate) on a real checkpoint."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from clitools import command, one_paragraph, run_cli
from PIL import Image
from torch import nn

from raysnet.checkpoint import SHOW_KEYS, load_model
from raysnet.config import ConfigError, load_config
from raysnet.data.sources import digits_arrays
from raysnet.errors import UsageError
from raysnet.evaluate import EvalConfig, load_for_testing, normalisation
from raysnet.inference import WholeImages, predict, predictions, views
from raysnet.models import build_model

# Corner patches of a test image, one colour each, and its centre: the views must find them.
TL, TR, BL, BR, MID, GREY = (250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 250), (250, 250, 0), (90, 90, 90)


def cornered(h: int, w: int, patch: int) -> np.ndarray:
    """A grey H x W x 3 uint8 image whose corners (patch x patch) and centre have distinct colours."""
    image = np.full((h, w, 3), GREY, dtype=np.uint8)
    image[:patch, :patch], image[:patch, -patch:], image[-patch:, :patch], image[-patch:, -patch:] = TL, TR, BL, BR
    image[h // 2 - patch // 2:h // 2 + patch // 2, w // 2 - patch // 2:w // 2 + patch // 2] = MID
    return image


def chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float()


def colour(view: torch.Tensor, y: int, x: int) -> tuple[int, ...]:
    return tuple(round(c) for c in view[:, y, x].tolist())


@pytest.mark.parametrize("h, w", [(300, 400), (400, 300)])  # landscape and portrait 4:3
def test_ten_crop_views_come_from_the_whole_resized_rectangle(h, w):
    ten = views(chw(cornered(h, w, 40)), "10crop", 224, (), resize=256)
    assert len(ten) == 10 and all(v.shape == (3, 224, 224) for v in ten)
    # five_crop's order: top-left, top-right, bottom-left, bottom-right, centre; each touches its
    # corner of the image resized to shorter side 256 (a centre square would miss the corners).
    assert [colour(ten[0], 0, 0), colour(ten[1], 0, -1), colour(ten[2], -1, 0), colour(ten[3], -1, -1)] == \
        [TL, TR, BL, BR]
    assert colour(ten[4], 112, 112) == MID
    assert torch.equal(ten[5], ten[1].flip(-1))  # the mirror image's top-left is the top-right, mirrored
    assert colour(ten[5], 0, 0) == TR


@pytest.mark.parametrize("h, w", [(300, 400), (450, 200)])
def test_multiscale_views_are_the_whole_image_at_each_shorter_side(h, w):
    multi = views(chw(cornered(h, w, 60)), "multiscale", 224, (224, 256, 640))
    for view, side in zip(multi, (224, 256, 640)):
        assert min(view.shape[1:]) == side and abs(view.shape[2] / view.shape[1] - w / h) < 0.01
        assert [colour(view, 0, 0), colour(view, 0, -1), colour(view, -1, 0), colour(view, -1, -1)] == \
            [TL, TR, BL, BR]
    image = torch.rand(3, 32, 32)
    assert views(image, "single", 32, ()) == [image]


def test_modes_agree_on_a_crop_and_flip_invariant_model():
    # Global average pooling of a constant image is the same for every crop, flip and scale.
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5)).eval()
    images = [torch.rand(3, 1, 1).expand(3, h, w).contiguous() for h, w in ((256, 300), (300, 256), (260, 260))]
    single = predict(model, images, "single", 224, ())
    for mode in ("10crop", "multiscale"):
        assert torch.allclose(predict(model, images, mode, 224, (224, 256, 384), resize=256), single, atol=1e-6)


class Probe(nn.Module):
    """Records the shape of every batch it sees; predicts nothing in particular."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return torch.zeros(x.shape[0], 2)


def test_whole_validation_images_are_stored_read_and_batched_by_size(tmp_path):
    from raysnet.data.prepare import prepare
    from raysnet.prepare import parse_args

    src, sizes = tmp_path / "src", [(120, 160), (90, 120), (160, 120), (700, 900)]  # (h, w): 4:3, 3:4, big
    for split in ("train", "val"):
        for k, (h, w) in enumerate(sizes):
            (src / split / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(cornered(h, w, max(16, h // 5))).save(src / split / f"c{k % 2}" / f"{k}.png")
    meta = prepare(parse_args(["source=imagefolder", f"root={src}", f"out={tmp_path / 'ds'}", "progress=false",
                               "workers=1", "max_resolution=128"]))
    assert meta["splits"]["val"]["short_side"] == 640 and len(meta["pca"]["eigval"]) == 3
    whole = WholeImages(tmp_path / "ds" / "val.beton")
    # Stored as JPEG, whole: every aspect ratio kept, the shorter side capped at 640, not at max_resolution.
    stored = {whole[i][0].shape[:2] for i in range(len(whole))}
    assert stored == {(120, 160), (90, 120), (160, 120), (640, 823)}
    for i in range(len(whole)):
        image = whole[i][0].astype(int)
        for (y, x), expected in (((0, 0), TL), ((0, -1), TR), ((-1, 0), BL), ((-1, -1), BR)):
            assert np.abs(image[y, x] - expected).max() <= 12, (image.shape, y, x)
    data = load_config(["data=imagefolder", f"data.root={tmp_path / 'ds'}"]).data
    probe = Probe()
    norm = normalisation(meta, (), ())
    assert sum(len(labels) for _, labels in predictions(probe, data, meta, "multiscale", norm, (224, 256), 4)) == 4
    # One batch per view size: 4:3 images share theirs (the two landscape ones), 3:4 theirs.
    assert sorted(probe.shapes) == sorted([(2, 3, 224, 299), (1, 3, 299, 224), (1, 3, 224, 288),
                                           (2, 3, 256, 341), (1, 3, 341, 256), (1, 3, 256, 329)])
    probe.shapes.clear()
    list(predictions(probe, data, meta, "10crop", norm, (224, 256), 4))
    assert probe.shapes == [(4, 3, 224, 224)] * 10  # 40 crops of one size, in batches of 4


def test_an_outside_state_dict_with_its_own_normalisation_predicts_as_in_pytorch(tmp_path, digits):
    torch.manual_seed(0)
    reference = build_model("resnet20", num_classes=10, shortcut="A", variant="v1")
    for m in reference.modules():  # BN statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    reference.eval()
    # As published elsewhere: wrapped by DataParallel ("module."), without BN's num_batches_tracked.
    state = {f"module.{k}": v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state}, tmp_path / "outside.pt")
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # the model's (0-1 scale), not the dataset's
    ecfg = EvalConfig(checkpoint=str(tmp_path / "outside.pt"), arch="resnet20", mean=mean, std=std, batch_size=32,
                      max_batches=2)
    model, cfg, _ = load_for_testing(ecfg, ["data=digits", f"data.root={digits}"])
    meta = json.loads((Path(digits) / "meta.json").read_text())
    norm = normalisation(meta, ecfg.mean, ecfg.std)
    got = torch.cat([p for p, _ in predictions(model, cfg.data, meta, "single", norm, ecfg.scales, ecfg.batch_size,
                                               ecfg.max_batches)])

    _, (images, _) = digits_arrays()  # the validation images, in the prepared order
    x = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference(x).softmax(1)
    assert torch.allclose(got, expected, atol=1e-4) and torch.equal(got.argmax(1), expected.argmax(1))
    assert normalisation(meta, mean, std) == normalisation(meta, tuple(255 * m for m in mean),
                                                           tuple(255 * s for s in std))
    with pytest.raises(ConfigError, match="three values"):
        normalisation(meta, (0.5, 0.5), (0.2, 0.2))


def test_a_torchvision_state_dict_evaluates_as_the_v15_b_variant(tmp_path):
    reference = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "tv.pt"
    torch.save(reference.state_dict(), path)
    model, cfg, _ = load_for_testing(EvalConfig(checkpoint=str(path), arch="resnet18"), ["data=digits"])
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(model(x), reference(x), atol=1e-5)


def test_a_failed_load_lists_the_keys_and_shapes_that_do_not_fit(tmp_path):
    state = build_model("resnet20", shortcut="A").state_dict()
    state["conv1.weight"] = torch.zeros(16, 1, 3, 3)
    state["head.bias"] = torch.zeros(10)
    torch.save(state, tmp_path / "a.pt")
    with pytest.raises(UsageError) as e:  # option B has projection shortcuts this file lacks
        load_model(tmp_path / "a.pt", "resnet20", shortcut="B")
    msg = str(e.value)
    assert "\n" not in msg and "(shortcut B, variant v1)" in msg
    # Two projections (layer2.0, layer3.0), each a conv weight and BN weight, bias, mean, var: 10 keys, capped.
    assert "10 key(s) missing: layer2.0.downsample.0.weight, layer2.0.downsample.1.weight" in msg
    assert f"and {10 - SHOW_KEYS} more" in msg and "layer3.0.downsample.1.bias" not in msg
    assert "1 key(s) unexpected: head.bias" in msg
    assert "conv1.weight (16, 1, 3, 3) in the file, (16, 3, 3, 3) in the model" in msg
    assert "shortcut=A|B|C" in msg


def save_checkpoint(folder: Path, digits: str, run_id: str = "", *args: str) -> Path:
    """A raysnet checkpoint of an untrained ResNet-20 over the prepared digits, in `folder`."""
    from raysnet.checkpoint import save
    from raysnet.models import build_model
    from raysnet.train.worker import make_optimizer

    cfg = load_config([f"data.root={digits}", *args])
    model = build_model("resnet20")
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    folder.mkdir(parents=True, exist_ok=True)
    save(folder / "checkpoint.pt", model=model, optimizer=opt, scheduler=sched, epoch=0, cfg=cfg, run_id=run_id,
         history=[])
    return folder / "checkpoint.pt"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, digits) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("eval"), digits)


def test_evaluate_command_prints_every_mode(capsys, checkpoint):
    out = run_cli(capsys, "raysnet.evaluate", f"checkpoint={checkpoint}", "scales=[32,48]", "max_batches=2",
                  "log=false")
    assert out.code == 0, out.err
    lines = [line for line in out.out.splitlines() if "top-1 error" in line]
    assert [line.split()[1] for line in lines] == ["single:", "10crop:", "multiscale:"]
    assert all("(64 images of digits)" in line for line in lines)


def test_evaluate_rejects_bad_input_clearly(capsys, tmp_path, checkpoint):
    for args, words in ((["checkpoint=/nope.pt"], "no raysnet checkpoint at '/nope.pt'"),
                        ([f"checkpoint={checkpoint}", "mode=5crop"], "mode"),
                        ([f"checkpoint={checkpoint}", "optim.lr=1"], "unknown key 'optim.lr'"),
                        # A raysnet checkpoint names its network: arch= describes a plain state dict.
                        ([f"checkpoint={checkpoint}", "arch=resnet56"], "arch=resnet56 (it holds resnet20)"),
                        ([f"checkpoint={checkpoint}", "shortcut=B"], "shortcut=B (it holds A)")):
        assert words in one_paragraph(run_cli(capsys, "raysnet.evaluate", *args)), args


def test_a_run_directory_is_evaluated_and_only_a_whole_evaluation_is_logged(capsys, tmp_path, digits, mlflow_db):
    """checkpoint= takes what analyze takes (a file, its directory, a run directory: the latest
    checkpoint). A partial evaluation (max_batches) never writes the run's test_* metrics in
    MLflow; a whole one does."""
    from mlflow import MlflowClient

    uri = mlflow_db
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / "checkpoint_2026-01-01_00-00-00.000000", digits, run_id, f"tracking.uri={uri}")
    out = run_cli(capsys, "raysnet.evaluate", f"checkpoint={run_dir}", "mode=single", "max_batches=1",
                  "arch=resnet20")  # the checkpoint's own arch: allowed
    assert out.code == 0, out.err
    assert "not logged to MLflow: max_batches=1" in out.out and "(32 images of digits)" in out.out
    assert not client.get_run(run_id).data.metrics
    out = run_cli(capsys, "raysnet.evaluate", f"checkpoint={run_dir}", "mode=single")
    assert out.code == 0 and f"logged to MLflow run {run_id}" in out.out, out.err
    assert set(client.get_run(run_id).data.metrics) == {"test_single_err", "test_single_err_top5"}


@pytest.mark.e2e  # a real process: outside the quick loop, which runs everything in-process
def test_the_evaluate_command_line_itself():
    """`python -m raysnet.evaluate` as typed (the tests above call its entry point in this process)."""
    assert "unknown key 'optim.lr'" in one_paragraph(command("raysnet.evaluate", "checkpoint=/nope.pt", "optim.lr=1"))


def test_a_dataset_prepared_before_whole_validation_images_is_evaluated_with_a_warning():
    from raysnet.evaluate import _stored_whole

    size = {"height": {"min": 100, "max": 512}, "width": {"min": 120, "max": 512}}
    old = {"splits": {"val": {"image_size": size}}, "write": {"max_resolution": 512}}
    with pytest.warns(UserWarning, match="Prepare it again"):
        _stored_whole({**old, "splits": {"val": {"image_size": {**size, "width": {"min": 120, "max": 900}}}}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _stored_whole(old)  # nothing was capped
        _stored_whole({**old, "splits": {"val": {"image_size": size, "short_side": 640}}})  # stored whole

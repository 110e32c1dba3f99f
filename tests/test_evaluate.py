"""The paper's testing modes: the mechanics of the views, and the command on a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from clitools import command, one_paragraph, run_cli
from torch import nn

from raysnet.config import load_config
from raysnet.evaluate import EvalConfig, load_for_testing, predict, views


def test_ten_crop_and_multiscale_views():
    images = torch.randn(2, 3, 256, 256)
    ten = views(images, "10crop", 224, ())
    assert len(ten) == 10 and all(v.shape == (2, 3, 224, 224) for v in ten)
    assert torch.equal(ten[4], images[:, :, 16:240, 16:240])  # the centre
    assert torch.equal(ten[5], ten[1].flip(-1))  # the flipped image's top-left is the top-right, mirrored
    multi = views(images, "multiscale", 224, (224, 256, 384, 480, 640))
    assert [v.shape[-1] for v in multi] == [224, 256, 384, 480, 640]
    assert views(images, "single", 224, ()) == [images]


def test_modes_agree_on_a_crop_and_flip_invariant_model():
    # Global average pooling of a constant image is the same for every crop, flip and scale.
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5)).eval()
    images = torch.rand(4, 3, 1, 1).expand(4, 3, 256, 256).contiguous()
    single = predict(model, images, "single", 224, ())
    for mode in ("10crop", "multiscale"):
        assert torch.allclose(predict(model, images, mode, 224, (224, 256, 384)), single, atol=1e-6)


def test_a_torchvision_state_dict_evaluates_as_the_v15_b_variant(tmp_path):
    reference = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "tv.pt"
    torch.save(reference.state_dict(), path)
    model, cfg, _ = load_for_testing(EvalConfig(checkpoint=str(path), arch="resnet18"), ["data=digits"])
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(model(x), reference(x), atol=1e-5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, digits) -> Path:
    """A raysnet checkpoint of an untrained ResNet-20 over the prepared digits."""
    from raysnet.checkpoint import save
    from raysnet.models import build_model
    from raysnet.train.worker import make_optimizer

    tmp = tmp_path_factory.mktemp("eval")
    cfg = load_config([f"data.root={digits}"])
    model = build_model("resnet20")
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save(tmp / "checkpoint.pt", model=model, optimizer=opt, scheduler=sched, epoch=0, cfg=cfg, run_id="", history=[])
    return tmp / "checkpoint.pt"


def test_evaluate_command_prints_every_mode(capsys, checkpoint):
    out = run_cli(capsys, "raysnet.evaluate", f"checkpoint={checkpoint}", "scales=[32,48]", "max_batches=2",
                  "log=false")
    assert out.code == 0, out.err
    lines = [line for line in out.out.splitlines() if "top-1 error" in line]
    assert [line.split()[1] for line in lines] == ["single:", "10crop:", "multiscale:"]
    assert all("(64 images of digits)" in line for line in lines)


def test_evaluate_rejects_bad_input_clearly(capsys, tmp_path, checkpoint):
    for args, words in ((["checkpoint=/nope.pt"], "is not a file"), ([f"checkpoint={checkpoint}", "mode=5crop"], "mode"),
                        ([f"checkpoint={checkpoint}", "optim.lr=1"], "unknown key 'optim.lr'")):
        assert words in one_paragraph(run_cli(capsys, "raysnet.evaluate", *args)), args


def test_the_evaluate_command_line_itself():
    """`python -m raysnet.evaluate` as typed (the tests above call its entry point in this process)."""
    assert "unknown key 'optim.lr'" in one_paragraph(command("raysnet.evaluate", "checkpoint=/nope.pt", "optim.lr=1"))

"""Fig. 7's layer responses: which layers, what statistic, and the command on a real checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clitools import command, one_paragraph
from torch import nn

from raysnet import cli
from raysnet.analyze import layer_stds, response_layers
from raysnet.checkpoint import load_model
from raysnet.config import load_config, to_dict
from raysnet.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba/FFCV finaliser


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so eval-mode responses differ per layer."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.2, generator=g)
    return model.eval()


@pytest.mark.parametrize("arch, n", [("resnet20", 18), ("plain20", 18), ("resnet56", 54), ("resnet110", 108),
                                     ("resnet34", 32), ("resnet50", 16), ("plain18", 16)])
def test_every_3x3_layer_of_the_blocks_in_order(arch, n):
    layers = [name for name, _ in response_layers(build_model(arch))]
    assert len(layers) == n
    if arch == "resnet50":  # bottleneck: only the middle conv is 3x3
        assert layers[:2] == ["layer1.0.conv2", "layer1.1.conv2"]
    else:
        assert layers[:3] == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1"]
    assert layers[-1].startswith(f"layer{3 if arch.endswith(('20', '56', '110')) else 4}.")


def test_the_cifar_stem_counts_only_when_asked():
    assert response_layers(build_model("resnet20"), stem=True)[0][0] == "conv1"
    assert len(response_layers(build_model("resnet18"), stem=True)) == 16  # ImageNet's 7x7 stem is not 3x3


@pytest.mark.parametrize("arch", ["resnet20", "plain20", "resnet50"])
def test_std_matches_a_direct_computation_with_hooks(arch):
    model = _randomise_bn(build_model(arch, num_classes=10))
    size = 32 if arch.endswith("20") else 64
    batches = [torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    stds = layer_stds(model, batches)

    # Direct: keep a copy of every BN output after a 3x3 conv (before the in-place ReLU), then std.
    outputs: dict[str, list[torch.Tensor]] = {}
    hooks = [bn.register_forward_hook(lambda m, i, o, name=name: outputs.setdefault(name, []).append(o.clone()))
             for name, bn in response_layers(model)]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    assert [n for n, _ in stds] == list(outputs)
    for (name, std) in stds:
        direct = torch.cat(outputs[name]).double().std(unbiased=False).item()
        assert std == pytest.approx(direct, rel=1e-6), name
    assert not model.training
    # The hooks are gone: another forward pass changes nothing.
    assert all(not bn._forward_hooks for _, bn in response_layers(model))


def _checkpoint(tmp_path: Path, root: str, arch: str = "plain20") -> Path:
    cfg = load_config([f"arch={arch}", f"data.root={root}"])
    model = _randomise_bn(build_model(arch, num_classes=10))
    path = tmp_path / "run" / "checkpoint_000000" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "epoch": 0}, path)
    return path


def test_analyze_a_checkpoint_on_the_validation_set(tmp_path, digits):
    """`python -m raysnet.analyze` (its entry point, in this process): a run directory's latest
    checkpoint, the data.root override, JSON out; the numbers are the statistic on the same batches."""
    from raysnet.analyze import run, validation_batches

    path = _checkpoint(tmp_path, "/nonexistent")  # the data.root override wins over the checkpoint's
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as done:
        cli.main(run, [f"checkpoint={tmp_path / 'run'}", f"data.root={digits}", "batches=2", "batch=100",
                       f"out={out}"])
    assert done.value.code == 0
    result = json.loads(out.read_text())
    assert result["checkpoint"] == str(path) and result["arch"] == "plain20" and not result["residual"]
    assert result["images"] == 200 and len(result["std"]) == len(result["layers"]) == 18
    loaded = load_model(path)
    model, cfg = loaded.model, loaded.config
    batches = [b.clone() for b in validation_batches(cfg, digits, 100, 2)]
    assert result["std"] == pytest.approx([s for _, s in layer_stds(model, batches)], rel=1e-6)


def test_cli_rejects_unknown_keys(tmp_path, capsys):
    from raysnet.analyze import run

    with pytest.raises(SystemExit) as bad:
        cli.main(run, [f"checkpoint={tmp_path}", "batchs=2"])
    err = capsys.readouterr().err
    assert bad.value.code == 2 and "batchs" in err and "batches" in err
    with pytest.raises(SystemExit) as missing:
        cli.main(run, [f"checkpoint={tmp_path}"])
    assert missing.value.code == 2 and "no raysnet checkpoint" in capsys.readouterr().err


@pytest.mark.e2e  # a real process: outside the quick loop, which runs everything in-process
def test_the_analyze_command_line_itself(tmp_path):
    """`python -m raysnet.analyze` as typed (the tests above call its entry point in this process)."""
    proc = command("raysnet.analyze", f"checkpoint={tmp_path}", "batchs=2", timeout=120)
    msg = one_paragraph(proc)
    assert "'batchs'" in msg and "batches" in msg and proc.stdout == ""

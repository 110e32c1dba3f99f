"""The model family against the paper (He et al. 2015) and torchvision, on CPU.

Numbers come from the paper (Tables 1 and 6) and torchvision's published parameter counts,
never from raysnet's own stage tables, so a wrong table fails here.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torchvision
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from raysnet.models import build_model, list_models

CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
IMAGENET_DEPTHS = (18, 34, 50, 101, 152)
# Paper Table 1: blocks per stage (not read from raysnet, so a wrong stage table is caught).
IMAGENET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
BOTTLENECK = {50, 101, 152}


def skeleton(name: str, **kwargs) -> nn.Module:
    """The network on the meta device: its modules and shapes without allocating or initialising a
    weight, for the tests that look only at its structure (fast, even for ResNet-152)."""
    with torch.device("meta"):
        return build_model(name, **kwargs)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def n_blocks(name: str) -> int:
    depth = int(name.removeprefix("resnet").removeprefix("plain"))
    return 3 * (depth - 2) // 6 if depth in CIFAR_DEPTHS else sum(IMAGENET_BLOCKS[depth])


def convs_per_block(name: str) -> int:
    return 3 if int(name.removeprefix("resnet").removeprefix("plain")) in BOTTLENECK else 2


def n_projections(name: str, shortcut: str) -> int:
    """Convs beyond the stem and the main path of each block: the 1x1 projection shortcuts."""
    convs = sum(isinstance(m, nn.Conv2d) for m in skeleton(name, shortcut=shortcut).modules())
    return convs - 1 - n_blocks(name) * convs_per_block(name)


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)) or \
        (node.op == "call_method" and node.target in ("add", "add_"))


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


# --- registry and errors ----------------------------------------------------------------------

def test_list_models_is_the_22_names():
    depths = IMAGENET_DEPTHS + CIFAR_DEPTHS
    expected = {f"{p}{d}" for p in ("resnet", "plain") for d in depths}
    names = list_models()
    assert len(names) == 22 and set(names) == expected


@pytest.mark.parametrize("kwargs, bad, choices", [
    (dict(name="resnet19"), "resnet19", list_models()),
    (dict(name="resnet20", shortcut="D"), "D", ["A", "B", "C"]),
    (dict(name="resnet50", variant="v2"), "v2", ["v1", "v1.5"]),
])
def test_wrong_choice_raises_listing_valid_ones(kwargs, bad, choices):
    with pytest.raises(ValueError) as err:
        build_model(**kwargs)
    message = str(err.value)
    assert f"'{bad}'" in message
    for choice in choices:
        assert choice in message


# --- sizes: paper Tables 1 and 6, torchvision -------------------------------------------------

@pytest.mark.parametrize("depth, millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7),
                                             (1202, 19.4)])
def test_cifar_parameter_counts_match_table_6(depth, millions):
    count = n_params(skeleton(f"resnet{depth}"))
    # Table 6 prints 2 significant figures below 1M (0.27M) and 2-3 above (1.7M, 19.4M).
    digits = 2 if millions < 1 else 1
    assert round(count / 1e6, digits) == millions


@pytest.mark.parametrize("depth, count", [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032),
                                          (101, 44_549_160), (152, 60_192_808)])
def test_imagenet_parameter_counts_match_torchvision_exactly(depth, count):
    assert n_params(skeleton(f"resnet{depth}", shortcut="B", variant="v1.5")) == count


@pytest.mark.parametrize("depth, gmacs", [(18, 1.8), (34, 3.6), (50, 3.8), (101, 7.6), (152, 11.3)])
def test_multiply_adds_match_table_1(depth, gmacs):
    # Meta tensors: the flop counter sees every conv and matmul without doing the arithmetic.
    with torch.device("meta"):
        model = build_model(f"resnet{depth}")  # the paper's default: v1, option B
        x = torch.empty(1, 3, 224, 224)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    macs = counter.get_total_flops() / 2
    assert macs == pytest.approx(gmacs * 1e9, rel=0.05)


def test_num_classes_defaults_and_override():
    for name in list_models():
        if "1202" in name:
            continue
        expected = 10 if int(name.removeprefix("resnet").removeprefix("plain")) in CIFAR_DEPTHS else 1000
        assert skeleton(name).fc.out_features == expected, name
    assert build_model("resnet20", num_classes=100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert build_model("resnet18", num_classes=7).fc.out_features == 7


# --- shortcuts: paper Table 3 -----------------------------------------------------------------

@pytest.mark.parametrize("depth", [20, 56, 18, 34, 50])
def test_option_a_adds_no_parameters(depth):
    assert n_params(skeleton(f"resnet{depth}", shortcut="A")) == n_params(skeleton(f"plain{depth}"))
    assert n_projections(f"resnet{depth}", "A") == 0


@pytest.mark.parametrize("name, expected", [
    ("resnet20", 2), ("resnet110", 2),  # stages 2 and 3
    ("resnet18", 3), ("resnet34", 3),  # stages 2-4
    ("resnet50", 4), ("resnet101", 4), ("resnet152", 4),  # stages 2-4, plus stage 1's 64 -> 256
])
def test_option_b_projects_only_where_shapes_change(name, expected):
    assert n_projections(name, "B") == expected
    # And only in the first block of a stage.
    model = skeleton(name, shortcut="B")
    with_projection = {n.rsplit(".", 2)[0] for n, m in model.named_modules()
                       if isinstance(m, nn.Conv2d) and ".downsample" in n}
    assert with_projection and all(n.endswith(".0") for n in with_projection)


@pytest.mark.parametrize("name", ["resnet20", "resnet34", "resnet50"])
def test_option_c_projects_every_shortcut(name):
    assert n_projections(name, "C") == n_blocks(name)
    assert n_params(skeleton(name, shortcut="C")) > n_params(skeleton(name, shortcut="B"))


@pytest.mark.parametrize("name", ["plain20", "plain56", "plain34", "plain50"])
@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
def test_plain_nets_have_no_shortcuts_whatever_the_option(name, shortcut):
    assert n_projections(name, shortcut) == 0
    assert n_params(skeleton(name, shortcut=shortcut)) == n_params(skeleton(name))


@pytest.mark.parametrize("name", ["resnet20", "plain20", "resnet56", "plain56", "resnet18", "plain34",
                                  "resnet50", "plain50", "resnet152"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_additions_in_the_traced_graph(name, shortcut):
    gm = fx.symbolic_trace(skeleton(name, shortcut=shortcut))
    adds = [n for n in gm.graph.nodes if is_add(n)]
    assert len(adds) == (n_blocks(name) if name.startswith("resnet") else 0)
    for add in adds:
        # Fig. 2: the addition takes the residual branch after its last BN, and ReLU follows it.
        operands = [module_of(gm, a) for a in add.args if isinstance(a, fx.Node)]
        assert any(isinstance(m, nn.BatchNorm2d) for m in operands), add
        assert [type(module_of(gm, u)) for u in add.users] == [nn.ReLU], add


def test_option_a_shortcut_subsamples_and_zero_pads():
    block = build_model("resnet20").layer2[0]  # 16 -> 32 channels, 32x32 -> 16x16
    x = torch.rand(2, 16, 8, 8)  # non-negative, as every block input is (it follows a ReLU)
    expected = torch.cat([x[:, :, ::2, ::2], torch.zeros(2, 16, 4, 4)], dim=1)
    # The shortcut on its own.
    assert torch.equal(block.downsample(x), expected)
    # And through the block: with the residual branch zeroed, the block's output is its shortcut.
    with torch.no_grad():
        block.conv1.weight.zero_()
        block.conv2.weight.zero_()
    block.eval()
    assert torch.equal(block(x), expected)
    assert sum(p.numel() for p in block.downsample.parameters()) == 0


# --- v1 (paper) vs v1.5 (torchvision) ---------------------------------------------------------

@pytest.mark.parametrize("variant, conv1_stride, conv2_stride", [("v1", 2, 1), ("v1.5", 1, 2)])
def test_bottleneck_stride_position(variant, conv1_stride, conv2_stride):
    model = build_model("resnet50", variant=variant)
    block = model.layer2[0]
    assert block.conv1.kernel_size == (1, 1) and block.conv2.kernel_size == (3, 3)
    assert block.conv1.stride == (conv1_stride,) * 2
    assert block.conv2.stride == (conv2_stride,) * 2
    assert block.downsample[0].stride == (2, 2)
    # Both variants halve the map: 64x64 input -> 2x2 after layer4.
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    # Neither variant strides anywhere else in the blocks after the first of a stage.
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and name.startswith("layer") and ".0." not in name:
            assert m.stride == (1, 1), name


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_torchvision_weights_load_strictly_and_agree(depth):
    torch.manual_seed(depth)
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    # Non-trivial BN state, so a misplaced or mis-named BN shows in the outputs.
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    model = build_model(f"resnet{depth}", shortcut="B", variant="v1.5")
    model.load_state_dict(reference.state_dict(), strict=True)
    reference.eval(), model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert torch.allclose(got, expected, atol=1e-5)


# --- paper §3.3/3.4: BN after every conv, no dropout, He init ---------------------------------

@pytest.mark.parametrize("name, shortcut", [("resnet20", "A"), ("resnet20", "C"), ("plain20", None),
                                            ("resnet34", "B"), ("resnet50", "B"), ("resnet50", "C")])
def test_every_conv_feeds_a_batchnorm_and_no_dropout(name, shortcut):
    model = skeleton(name, shortcut=shortcut)
    modules = list(model.modules())
    assert not any(isinstance(m, nn.Dropout | nn.Dropout2d) for m in modules)
    assert sum(isinstance(m, nn.Conv2d) for m in modules) == sum(isinstance(m, nn.BatchNorm2d) for m in modules)
    gm = fx.symbolic_trace(model)
    convs = [n for n in gm.graph.nodes if isinstance(module_of(gm, n), nn.Conv2d)]
    assert convs
    for conv in convs:
        assert [type(module_of(gm, u)) for u in conv.users] == [nn.BatchNorm2d], conv.target


@pytest.mark.parametrize("name", ["resnet56", "resnet50"])
def test_he_init(name):
    torch.manual_seed(0)
    for module_name, m in build_model(name).named_modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() >= 400:
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            std = m.weight.std().item()
            assert std == pytest.approx(math.sqrt(2 / fan_out), rel=0.15), module_name
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), module_name


# --- every network runs -----------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in list_models() if "1202" not in n])
def test_forward_backward(name):
    torch.manual_seed(0)
    model = build_model(name)
    cifar = int(name.removeprefix("resnet").removeprefix("plain")) in CIFAR_DEPTHS
    x = torch.randn(2, 3, *((32, 32) if cifar else (64, 64)))
    out = model(x)
    assert out.shape == (2, 10 if cifar else 1000)
    out.logsumexp(1).sum().backward()
    for param_name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), param_name
    assert model.conv1.weight.grad.abs().sum() > 0


def test_resnet1202_builds():
    # Too slow to run forward in the fast suite; its size is checked against Table 6 above.
    model = build_model("resnet1202")
    assert n_params(model) == pytest.approx(19.4e6, rel=0.005)
    assert n_projections("resnet1202", "A") == 0

"""Forward+backward images/s of raysnet's ResNets against torchvision's same networks.

    python benchmarks/model.py [--archs resnet18 resnet50] [--batch 32] [--size 224] [--rounds 5]

Same network (v1.5 stride placement, option B: torchvision's), same input, same settings (bf16
autocast and channels_last on a GPU, fp32 on a CPU), timed in alternating rounds so drift in the
machine's speed hits both sides alike. Goal: raysnet never slower (ratio >= 1.0, within noise).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torchvision

from raysnet.models import build_model


def rate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, dtype) -> float:
    """images/s over `steps` forward+backward passes."""
    def step():
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up (cuDNN autotuning, allocator)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return steps * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on a GPU, 16 on a CPU")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="passes per round; default 20 GPU, 3 CPU")
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    batch, steps = args.batch or (256 if gpu else 16), args.steps or (20 if gpu else 3)
    dtype = torch.bfloat16 if gpu else None
    torch.backends.cudnn.benchmark = True
    x = torch.randn(batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    if gpu:
        x = x.contiguous(memory_format=torch.channels_last)
    results = {}
    for arch in args.archs:
        models = {"raysnet": build_model(arch, shortcut="B", variant="v1.5"),
                  "torchvision": getattr(torchvision.models, arch)()}
        for m in models.values():
            m.to(device, memory_format=torch.channels_last if gpu else torch.contiguous_format).train()
        rounds = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, m in models.items():
                rounds[name].append(rate(m, x, y, steps, dtype))
        med = {name: statistics.median(r) for name, r in rounds.items()}
        results[arch] = {"raysnet_images_per_sec": round(med["raysnet"], 1),
                         "torchvision_images_per_sec": round(med["torchvision"], 1),
                         "ratio": round(med["raysnet"] / med["torchvision"], 3)}
        print(f"{arch}: raysnet {med['raysnet']:.1f} images/s, torchvision {med['torchvision']:.1f} images/s "
              f"(median of {args.rounds} alternating rounds)", file=sys.stderr)
    name = torch.cuda.get_device_name(0) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(json.dumps({"device": name, "batch": batch, "size": args.size, "dtype": str(dtype or "float32"),
                      "results": results}))


if __name__ == "__main__":
    main()

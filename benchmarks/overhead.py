"""Training throughput: a plain PyTorch loop vs raysnet's Ray Train worker, same model, data, threads.

    python benchmarks/overhead.py [--arch resnet20] [--epochs 6] [--threads 2] [key=value ...]

Both sides use the same FFCV loaders, model, optimiser and train step; they differ only in what
raysnet adds: Ray Train's worker process, DDP wrapping, per-epoch checkpoint and report, MLflow
logging. The first epoch of each (warm-up: loader JIT, allocator) is excluded. Order: plain,
raysnet, plain; the plain figure is the mean of its two runs. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def plain_loop(cfg, meta, threads: int) -> float:
    """images/s of a hand-written loop over the same pieces, epochs after the first."""
    import torch

    from raysnet.data import make_loaders, set_epoch
    from raysnet.models import build_model
    from raysnet.train.schedule import lr_factor
    from raysnet.train.worker import EpochStats, make_optimizer, train_step

    torch.set_num_threads(threads)
    device = torch.device("cpu")
    train_loader, _ = make_loaders(cfg.data, meta, cfg.batch_size, device=device, seed=0, distributed=False,
                                   channels_last=cfg.model.channels_last)
    model = build_model(cfg.arch, num_classes=len(meta["classes"]))
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg, device)
    total = len(train_loader) * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg.optim))
    rates = []
    for epoch in range(cfg.epochs):
        set_epoch(train_loader, epoch)
        model.train()
        stats, start = EpochStats(device), time.perf_counter()
        for step, (images, labels) in enumerate(train_loader):
            train_step(model, images, labels, opt, sched, stats, step, None)
        n = stats.reduce()["n"]
        rates.append(n / (time.perf_counter() - start))
    return statistics.mean(rates[1:])


def raysnet_worker(cfg) -> float:
    """images/s reported by raysnet's own worker (1 Ray Train worker), epochs after the first."""
    from mlflow import MlflowClient

    from raysnet.lifecycle import run_one

    assert run_one(cfg) == 0
    client = MlflowClient(f"sqlite:///{cfg.run.storage}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name(f"raysnet-{cfg.data.name}").experiment_id])[0]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "images_per_sec"))
    return statistics.mean(v for _, v in history[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides (= run.cpus_per_worker)")
    parser.add_argument("overrides", nargs="*", help="raysnet key=value overrides (e.g. data.root=...)")
    args = parser.parse_args()

    from raysnet.config import load_config
    from raysnet.data import ensure_dataset

    storage = tempfile.mkdtemp(prefix="raysnet-overhead-")
    cfg = load_config([f"arch={args.arch}", f"epochs={args.epochs}", f"batch_size={args.batch}", "run.workers=1",
                       f"run.cpus_per_worker={args.threads}", f"run.storage={storage}", "run.name=overhead",
                       "run.eval_every=1000", "tracking.log_model=false", *args.overrides])
    meta = ensure_dataset(cfg.data)
    print(f"{cfg.arch} on {cfg.data.name}, batch {cfg.batch_size}, {cfg.epochs} epochs, {args.threads} threads",
          file=sys.stderr)
    plain = [plain_loop(cfg, meta, args.threads)]
    print(f"plain loop: {plain[0]:.1f} images/s", file=sys.stderr)
    ray_rate = raysnet_worker(cfg)
    print(f"raysnet worker: {ray_rate:.1f} images/s", file=sys.stderr)
    plain.append(plain_loop(cfg, meta, args.threads))
    print(f"plain loop again: {plain[1]:.1f} images/s", file=sys.stderr)
    plain_rate = statistics.mean(plain)
    print(json.dumps({"arch": cfg.arch, "data": cfg.data.name, "batch": cfg.batch_size, "threads": args.threads,
                      "plain_images_per_sec": round(plain_rate, 1), "raysnet_images_per_sec": round(ray_rate, 1),
                      "ratio": round(ray_rate / plain_rate, 3)}))


if __name__ == "__main__":
    main()

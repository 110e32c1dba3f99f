"""The pieces of the worker on their own: schedules, the train step, the on-device statistics."""

from __future__ import annotations

import time

import pytest
import torch

from raysnet.config import load_config
from raysnet.models import build_model
from raysnet.train.schedule import base_lr, lr_factor
from raysnet.train.worker import EpochStats, autocast_dtype, make_optimizer, train_step


def spy_host_syncs(monkeypatch, names: tuple[str, ...]) -> list[str]:
    """Record every call of these torch.Tensor methods (each one a host sync on a GPU). -> the list they go to"""
    calls: list[str] = []
    for name in names:
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **k):
            calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


def test_paper_cifar_steps_fall_at_32k_and_48k_of_64k():
    optim = load_config(["recipe=cifar-paper"]).optim
    f = [lr_factor(s, 64_000, optim) for s in (0, 31_999, 32_000, 47_999, 48_000, 63_999)]
    assert f == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_110_layer_warmup_is_lr_001_for_400_iterations():
    cfg = load_config(["recipe=cifar-paper-110"])
    assert cfg.arch == "resnet110"
    lrs = [base_lr(cfg) * lr_factor(s, 64_000, cfg.optim) for s in (0, 399, 400)]
    assert lrs == pytest.approx([0.01, 0.01, 0.1])


def test_cosine_onecycle_and_linear_scaling():
    cosine = load_config(["optim.schedule=cosine"]).optim
    assert lr_factor(0, 100, cosine) == pytest.approx(1) and lr_factor(100, 100, cosine) == pytest.approx(0)
    onecycle = load_config(["optim.schedule=onecycle"]).optim
    assert lr_factor(25, 100, onecycle) == pytest.approx(1) and lr_factor(100, 100, onecycle) == pytest.approx(0)
    cfg = load_config(["recipe=imagenet-paper", "batch_size=1024", "optim.scale_lr=true"])
    assert base_lr(cfg) == pytest.approx(0.4)  # 0.1 x 1024 / 256
    assert base_lr(load_config(["recipe=imagenet-paper", "batch_size=1024"])) == pytest.approx(0.1)


def test_autocast_is_bf16_on_gpu_and_off_on_cpu():
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype("fp32", torch.device("cuda")) is None


def _step_setup(channels_last: bool = False):
    cfg = load_config([])
    model = build_model("resnet20")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    return model, opt, sched, images, labels


def test_train_step_never_waits_for_the_host(monkeypatch):
    model, opt, sched, images, labels = _step_setup()
    stats = EpochStats(torch.device("cpu"))
    calls = spy_host_syncs(monkeypatch, ("item", "cpu", "tolist", "__bool__"))
    for step in range(3):
        train_step(model, images, labels, opt, sched, stats, step, None)
    monkeypatch.undo()
    assert calls == []
    out = stats.reduce()
    assert out["n"] == 24 and out["bad_step"] == -1 and 0 <= out["err"] <= 100


def test_stats_find_the_first_nonfinite_step_and_count_errors():
    stats = EpochStats(torch.device("cpu"))
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1, 0], [5.0, 6, 4, 3, 2, 1, 0]])  # ranks 0,1,2,... / 1,0,2,...
    stats.add(torch.tensor(1.0), logits, torch.tensor([0, 2]), 0)  # one right, one wrong (but in top 5)
    stats.add(torch.tensor(float("nan")), logits, torch.tensor([0, 1]), 1)
    stats.add(torch.tensor(float("inf")), logits, torch.tensor([0, 1]), 2)
    out = stats.reduce()
    assert out["bad_step"] == 1
    assert out["err"] == pytest.approx(100 / 6) and out["err_top5"] == pytest.approx(0.0)  # 1 of 6 wrong


def test_channels_last_batches_reach_the_model():
    model, opt, sched, images, labels = _step_setup(channels_last=True)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    train_step(model, images.contiguous(memory_format=torch.channels_last), labels, opt, sched,
               EpochStats(torch.device("cpu")), 0, None)
    assert seen == [True]


def test_the_progress_watch_never_waits_for_the_host_either(monkeypatch, capsys):
    """Rank 0's watch (progress lines, step-level points every step here) adds no transfer to a step:
    its one read of the device comes when a line is due (run.progress_s) or the epoch ends."""
    from raysnet.train.progress import Watch

    cfg = load_config(["run.progress_s=3600", "tracking.step_every=1", "epochs=2"])
    model, opt, sched, images, labels = _step_setup()
    stats = EpochStats(torch.device("cpu"))
    watch = Watch(cfg, steps=4, world=2, tracker=None, mode="lines")
    watch.start_epoch(1)
    calls = spy_host_syncs(monkeypatch, ("item", "cpu", "tolist", "__bool__", "numpy"))
    for step in range(3):
        lr = opt.param_groups[0]["lr"]
        train_step(model, images, labels, opt, sched, stats, step, None)
        watch.after_step(step, stats.sums, lr)
    monkeypatch.undo()
    assert calls == []
    assert [g for g, _, _ in watch.now.snaps] == [5, 6, 7]  # global steps: epoch 1 of 4-step epochs, 1-based
    watch.end_epoch(stats.sums, lr)
    assert watch.now.snaps == [] and watch.now.logged[3] == 24  # flushed: 3 steps of 8 images
    assert "the first step" in capsys.readouterr().out


def test_progress_lines_say_where_the_epoch_and_the_run_are(capsys):
    from raysnet.train.progress import Watch, duration

    cfg = load_config(["run.progress_s=0.01", "epochs=3", "batch_size=16"])
    watch = Watch(cfg, steps=10, world=2, tracker=None, mode="lines")
    watch.start_epoch(0)
    sums = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    for step in range(4):
        sums += torch.tensor([2.0 * 8, 6, 8, 8], dtype=torch.float64)  # loss 2, 6 of 8 right
        time.sleep(0.02)
        watch.after_step(step, sums, 0.1)
    line = [x for x in capsys.readouterr().out.splitlines() if "step 4/10" in x][-1]
    assert "epoch 1/3" in line and "loss 2.000" in line and "err 25.00%" in line and "images/s" in line
    assert "epoch ETA" in line and "run ETA" in line
    epoch_left, run_left = watch.etas(per_step=1.0)
    assert epoch_left == 6 and run_left == 6 + 2 * 10  # no whole epoch yet: the next ones as long as this one's steps
    assert [duration(s) for s in (5, 65, 3 * 3600 + 120, 2 * 86400 + 4 * 3600)] == ["5 s", "1 min 05 s", "3 h 02 min",
                                                                                    "2 d 04 h"]


def test_a_terminal_driver_turns_progress_lines_into_a_bar(capsys):
    """On a terminal the driver draws rank 0's lines, as Ray forwards them, as one tqdm bar per epoch."""
    from raysnet.train.progress import Bars

    bars = Bars()
    line = "(RayTrainWorker pid=7) raysnet: epoch 2/3 step {}/22 at 5.6 s: loss 2.460 err 85.76% (rank 0, running) " \
           "| 214 images/s | epoch ETA 4 s, run ETA 17 s"
    assert bars.take(line.format(9)) and bars.bar.n == 9 and bars.epoch == (2, 3)
    assert bars.take(line.format(17)) and bars.bar.n == 17
    assert "run ETA 17 s" in bars.bar.postfix and "epoch ETA" not in bars.bar.postfix
    assert not bars.take("(TrainController pid=8) epoch 2/3: train_err 4.00%  val_err 3.00%")
    bars.close()
    assert bars.bar is None

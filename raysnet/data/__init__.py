"""The data layer: prepare FFCV datasets, check them, and load them in Ray Train workers.

    prepare(PrepareConfig(source="digits", out=DIR))  # write DIR/train.beton, val.beton, meta.json
    meta = ensure_dataset(cfg.data, num_classes)      # the driver, before anything heavy starts
    data = local_copy(cfg.data)                       # in each worker: data.root on object storage, fetched once
    train, val = make_loaders(data, meta, cfg.batch_size, device=..., seed=..., distributed=True,
                              channels_last=True)      # in each worker: its shard of each global batch
    set_epoch(train, start_epoch)                     # when resuming
    steps_per_epoch(samples, cfg.batch_size, cfg.run.max_steps)  # len(train) at any world size, anywhere

The loaders' names are imported from raysnet.data.loaders when first used: importing FFCV compiles
numba code for seconds, which checking a dataset or a config need not wait for.
"""

from raysnet.data.dataset import check_dataset, dataset_dir, ensure_dataset, local_copy, prepare_command
from raysnet.data.order import steps_per_epoch
from raysnet.data.prepare import PrepareConfig, prepare

LOADERS = ("make_loaders", "set_epoch")

__all__ = ["PrepareConfig", "check_dataset", "dataset_dir", "ensure_dataset", "local_copy", "make_loaders", "prepare",
           "prepare_command", "set_epoch", "steps_per_epoch"]


def __getattr__(name: str):
    if name in LOADERS:
        from raysnet.data import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The data layer: prepare FFCV datasets, check them, and load them in Ray Train workers.

    prepare(PrepareConfig(source="digits", out=DIR))  # write DIR/train.beton, val.beton, meta.json
    meta = ensure_dataset(cfg.data, num_classes)      # the driver, before anything heavy starts
    data = local_copy(cfg.data)                       # in each worker: data.root on object storage, fetched once
    train, val = make_loaders(data, meta, batch_size, device=..., seed=..., distributed=True,
                              channels_last=True)      # in each worker
    set_epoch(train, start_epoch)                     # when resuming
    steps_per_epoch(samples, cfg.batch_size, cfg.run.workers, cfg.run.max_steps)  # len(train), anywhere
"""

from raysnet.data.dataset import check_dataset, dataset_dir, ensure_dataset, local_copy, prepare_command
from raysnet.data.loaders import make_loaders, set_epoch, steps_per_epoch
from raysnet.data.prepare import PrepareConfig, prepare

__all__ = ["PrepareConfig", "check_dataset", "dataset_dir", "ensure_dataset", "local_copy", "make_loaders", "prepare",
           "prepare_command", "set_epoch", "steps_per_epoch"]

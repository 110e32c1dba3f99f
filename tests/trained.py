"""A ResNet-20 trained on the prepared digits in this process (no Ray: about 11 s on one core, 98%
right on the validation images), saved as a raysnet checkpoint with its labels: the model the
tests of predict, the MLflow model and serving use. Training through Ray is the train tests' job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

EPOCHS, BATCH = 2, 32


def images(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N x 32 x 32 x 3 uint8, N labels) of a prepared digits split, as stored."""
    from raysnet.inference import WholeImages

    stored = WholeImages(Path(root) / f"{split}.beton")
    pixels, labels = zip(*(stored[i] for i in range(len(stored))))
    return np.stack(pixels), np.array(labels)


def train_digits(folder: Path, root: str) -> Path:
    """-> the checkpoint.pt of a ResNet-20 trained on the digits at `root` (one-cycle SGD, seed 0)."""
    from raysnet import checkpoint
    from raysnet.config import load_config
    from raysnet.data import check_dataset
    from raysnet.models import build_model

    cfg = load_config([f"data.root={root}", f"epochs={EPOCHS}", "run.name=trained-digits"])
    meta = check_dataset(cfg.data)
    pixels, labels = images(root, "train")
    mean, std = torch.tensor(meta["mean"]).view(1, 3, 1, 1), torch.tensor(meta["std"]).view(1, 3, 1, 1)
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - mean) / std
    y = torch.from_numpy(labels)
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=len(meta["classes"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    steps = EPOCHS * (len(x) // BATCH)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=steps)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x))
        for start in range(0, len(x) - BATCH + 1, BATCH):
            batch = order[start:start + BATCH]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / checkpoint.CHECKPOINT_FILE
    checkpoint.save(path, model=model.eval(), optimizer=optimizer, scheduler=scheduler, epoch=EPOCHS - 1, cfg=cfg,
                    run_id="", history=[], dataset=checkpoint.labels(meta))
    return path

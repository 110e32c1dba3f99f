"""Elastic runs (run.workers=MIN-MAX), the parts that need no cluster: what a resize says and
counts, and the driver's watch on the minimum. The batches that stay the same at every size are
in tests/test_data.py; shrinking, growing and resuming on a real cluster in tests/test_cluster.py."""

from __future__ import annotations

import re
import time

from raysnet.config import load_config
from raysnet.train import elastic


def node(cpus: float, alive: bool = True, gpus: float = 0) -> dict:
    return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


def test_room_counts_the_workers_live_nodes_hold():
    nodes = [node(0), node(1), node(3), node(8, alive=False)]  # a head without CPUs, a dead node
    assert elastic.room(nodes, {"CPU": 1}) == 4
    assert elastic.room(nodes, {"CPU": 2}) == 1
    assert elastic.room([node(96, gpus=8), node(96)], {"CPU": 10, "GPU": 1}) == 8  # GPUs bound it


def test_the_minimum_watch_says_so_once_each_way():
    watch = elastic.MinimumWatch(load_config(["run.workers=2-3"]), {"CPU": 1})
    looks = [[node(0), node(1), node(1), node(1)], [node(0), node(1), node(1)], [node(0), node(1)],
             [node(0), node(1)], [node(0), node(1, alive=False)], [node(0), node(1), node(1)], [node(0), node(1), node(1)]]
    lines = [watch.check(nodes) for nodes in looks]
    said = [(i, line) for i, line in enumerate(lines) if line]
    assert [i for i, _ in said] == [2, 5], lines  # below the minimum at 2, room again at 5: nothing between
    assert "hold 1 of this run's workers, fewer than the 2 of run.workers=2-3" in said[0][1]
    assert "hold 2 workers again" in said[1][1]


def test_a_resize_is_one_line_and_counted(capsys):
    class Tags:
        def __init__(self):
            self.tags = {}

        def set_tag(self, key, value):
            self.tags[key] = value

    cfg = load_config(["run.workers=2-3", "epochs=6"])
    history = [{"epoch": e, "world_size": w, elastic.END_TIME: time.time() - 12} for e, w in enumerate([3, 3, 2])]
    tracker = Tags()
    elastic.note_resize(cfg, tracker, history, 3)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "resized from 2 to 3 workers (the cluster had room for more workers)" in out
    lost = re.search(r"epoch 4/6 starts again ([\d.]+) s after the last checkpoint", out)
    assert lost and float(lost[1]) >= 12 and tracker.tags == {elastic.RESIZES_TAG: "2"}
    elastic.note_resize(cfg, tracker, history, 2)  # a restart at the same size is no resize
    elastic.note_resize(cfg, tracker, [], 3)  # nor is a new run's start
    assert capsys.readouterr().out == "" and tracker.tags == {elastic.RESIZES_TAG: "2"}

"""End to end on a real multi-node Ray cluster (issue 14): `ray job submit` of a 2-worker run
whose workers land on two nodes, and a run that loses a node and finishes from its checkpoint.

The cluster (tests/cluster_harness.py): a head with no CPUs and 1-CPU worker nodes, each in a
network namespace of its own, token authentication on; an S3 server and an MLflow server (its
artifacts in the bucket) in another. Needs root and `ip netns`; about four minutes on 2 cores.

Two causes found on the way, for the record:
- Gloo binds to the address the hostname resolves to, 127.0.0.1 here (/etc/hosts), so a group
  spread over two nodes failed in connectFullMesh; raysnet.train.network points each worker's
  Gloo at the interface of its node's Ray IP.
- `--working-dir .` died with FileNotFoundError from os.getcwd() in the driver when nodes
  shared a temp dir (one filesystem, the default /tmp/ray): each node's runtime-env agent
  unpacks the job's package with overwrite=True, so a worker node replaced the directory the
  head's driver ran in. Ray nodes sharing a filesystem need their own --temp-dir; each node here has one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster_harness import SUBNET, Net, RayCluster, Stores, unavailable, wait_for

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "raysnet-digits"


@dataclass
class World:
    net: Net
    cluster: RayCluster
    stores: Stores
    root: Path


def _root_links() -> str:
    return subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def world():
    why = unavailable()
    if why:
        pytest.skip(f"the multi-node harness needs root and network namespaces: {why}")
    Net.remove_stale()  # what a killed test process left
    links, user_ray = _root_links(), _listing(Path.home() / ".ray")
    root = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))  # short: Ray's socket paths live under it
    net = Net()
    try:
        with ThreadPoolExecutor(1) as pool:
            stores = pool.submit(Stores, net, root)  # the servers start while the Ray nodes do
            cluster = RayCluster(net, root, workers=2)
            yield World(net, cluster, stores.result(), root)
    finally:
        net.close()
        shutil.rmtree(root, ignore_errors=True)
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    left = [ns for ns in namespaces.split() if ns.startswith(net.prefix)]
    assert not left, f"namespaces left behind: {left}"
    assert _root_links() == links, "the root namespace's interfaces changed"
    assert _listing(Path.home() / ".ray") == user_ray, "~/.ray changed (the harness has a HOME of its own)"


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) if folder.is_dir() else []


def train(world: World, digits, name: str, epochs: int) -> list[str]:
    # 12 steps an epoch (of 22): epochs of a few seconds, still long enough to kill a node in one.
    return ["python", "-m", "raysnet.train", "arch=resnet20", f"epochs={epochs}", "run.workers=2", "batch_size=64",
            "run.max_steps=12", "tracking.log_model=false", f"data.root={digits}", f"run.storage={world.root}/out",
            f"run.name={name}", f"tracking.uri={world.stores.tracking_uri}"]


def assert_isolated(world: World) -> None:
    """Each node sees lo and its veth on the test subnet, nothing else; no process of the harness
    has a socket in the root namespace (where the routable address lives)."""
    import psutil

    for name in world.net.addr:
        interfaces = world.net.interfaces(name)
        assert set(interfaces) == {"lo", "eth0"}, (name, interfaces)
        assert [a for a in interfaces["eth0"] if not a.startswith("fe80:")] == [f"{world.net.addr[name]}/24"]
        subnet_only = f"{SUBNET}.0/24 dev eth0 proto kernel scope link src {world.net.addr[name]} "
        assert world.net.routes(name) == [subnet_only], world.net.routes(name)
    ours = {pid for name in world.net.addr for pid in world.net.pids(name)}
    in_root = [c for c in psutil.net_connections("all") if c.pid in ours]
    assert not in_root, in_root


def checkpointed(world: World, name: str) -> int:
    """Epochs with a checkpoint, as Ray Train's controller records them on (shared) disk the
    moment it registers one: earlier and steadier than the epoch lines, which arrive through
    two log relays."""
    snapshot = world.root / "out" / name / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, json.JSONDecodeError):  # not yet, or being written
        return 0
    return latest["metrics"]["epoch"] + 1 if latest else 0


def wait_checkpointed(world: World, job, name: str, epochs: int, timeout: float = 420) -> float:
    """Wait until `epochs` epochs of run `name` are checkpointed. -> when that was seen"""
    wait_for(f"{name}: a checkpoint of epoch {epochs}", lambda: checkpointed(world, name) >= epochs, timeout,
             job.proc, job.log)
    return time.monotonic()


def mlflow_epochs(world: World, name: str) -> tuple[str, list[int]]:
    """(status, the MLflow steps of val_err) of the one run called `name`, read from the server's SQLite."""
    from raysnet.tracking import RUN_NAME_TAG

    client = world.stores.client()
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_err"))
    return runs[0].info.status, steps


def test_nodes_see_only_the_test_network(world):
    assert_isolated(world)


def test_the_cluster_demands_its_token(world):
    """Token authentication is on: the dashboard refuses a request without the token."""
    script = ("import sys, urllib.request, urllib.error\n"
              "def status(headers):\n"
              "    request = urllib.request.Request(sys.argv[1] + '/api/jobs/', headers=headers)\n"
              "    try:\n"
              "        return urllib.request.urlopen(request, timeout=30).status\n"
              "    except urllib.error.HTTPError as e:\n"
              "        return e.code\n"
              "print(status({}), status({'Authorization': 'Bearer ' + sys.argv[2]}))\n")
    done = world.net.run("head", [sys.executable, "-c", script, world.cluster.dashboard, world.cluster.token],
                         capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["401", "200"]


def test_a_worker_finds_the_interface_of_its_node_ip(world):
    """raysnet.train.network, inside a node: the node's address is on eth0, loopback on lo."""
    script = ("import sys\n"
              "from raysnet.train.network import interface_of\n"
              "print(interface_of(sys.argv[1]), interface_of('127.0.0.1'), interface_of('192.0.2.1'))\n")
    done = world.net.run("w1", [sys.executable, "-c", script, world.net.addr["w1"]], cwd=str(REPO),
                         capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["eth0", "lo", "None"]


def test_submit_runs_two_workers_on_two_nodes(world, digits):
    job = world.cluster.submit(train(world, digits, "submit", epochs=2), cwd=str(REPO), name="submit")
    first = wait_checkpointed(world, job, "submit", 1)
    assert job.wait(timeout=300) == 0, job.output()[-4000:]
    print(f"\nsubmit -> first epoch checkpointed: {first - job.started:.1f} s; "
          f"the whole job: {time.monotonic() - job.started:.1f} s")
    assert "Job 'submit' succeeded" in job.output()
    assert job.epochs() == [1, 2]

    workers = world.cluster.train_workers("submit")
    assert len(workers) == 2 and len({a["node_id"] for a in workers}) == 2, workers
    assert {a["node_ip"] for a in workers} == {world.net.addr["w1"], world.net.addr["w2"]}

    status, steps = mlflow_epochs(world, "submit")
    assert (status, steps) == ("FINISHED", [0, 1])
    assert any("/artifacts/checkpoint/" in key for key in world.stores.objects("mlartifacts/")), \
        "the run's checkpoint artifacts are not in the bucket"
    assert_isolated(world)


def test_a_lost_node_is_replaced_and_the_run_finishes_from_its_checkpoint(world, digits):
    world.cluster.add_node()  # three 1-CPU nodes: the two survivors can take the two workers
    job = world.cluster.submit(train(world, digits, "nodeloss", epochs=3), cwd=str(REPO), name="nodeloss")
    wait_checkpointed(world, job, "nodeloss", 1)
    hosts = sorted(n for n in world.cluster.hosting("RayTrainWorker") if n != "head")
    assert len(hosts) == 2, hosts
    victim = hosts[0]
    killed = time.monotonic()
    world.cluster.kill_node(victim)
    done = checkpointed(world, "nodeloss")
    assert done < 3, "the run ended before the node was lost"
    recovered = wait_checkpointed(world, job, "nodeloss", done + 1)
    assert job.wait(timeout=420) == 0, job.output()[-4000:]
    print(f"\nnode {victim} killed after epoch {done} -> epoch {done + 1} checkpointed: {recovered - killed:.1f} s")

    # The worker groups, by placement group: the first lost a worker with the node; every later
    # one ran on the two nodes left.
    groups: dict[str, list[dict]] = {}
    for worker in world.cluster.train_workers("nodeloss"):
        groups.setdefault(worker["placement_group_id"], []).append(worker)
    lost = world.net.addr[victim]
    later = [g for g in groups.values() if all(w["node_ip"] != lost for w in g)]
    survivors = {world.net.addr[n] for n in world.cluster.nodes if n not in ("head", victim)}
    assert len(groups) == len(later) + 1 and later, groups
    assert all(len(g) == 2 and {w["node_ip"] for w in g} == survivors for g in later), groups
    assert job.epochs() == [1, 2, 3], "each epoch once: resumed from the checkpoint, not from the start"
    assert mlflow_epochs(world, "nodeloss") == ("FINISHED", [0, 1, 2])

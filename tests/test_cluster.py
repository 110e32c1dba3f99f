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

import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster_harness import SUBNET, Net, RayCluster, Stores, unavailable

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
    links = _root_links()
    root = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))  # short: Ray's socket paths live under it
    net = Net()
    try:
        # The servers start while the Ray nodes do (each takes tens of seconds on 2 cores).
        stores: list[Stores | BaseException] = []
        starting = threading.Thread(target=lambda: stores.append(_try(Stores, net, root)))
        starting.start()
        try:
            cluster = RayCluster(net, root, workers=2)
        finally:
            starting.join()
        if isinstance(stores[0], BaseException):
            raise stores[0]
        yield World(net, cluster, stores[0], root)
    finally:
        net.close()
        shutil.rmtree(root, ignore_errors=True)
    left = [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
            if ns.startswith(net.prefix)]
    assert not left, f"namespaces left behind: {left}"
    assert _root_links() == links, "the root namespace's interfaces changed"


def _try(make, *args):
    try:
        return make(*args)
    except BaseException as e:  # handed to the main thread
        return e


def train(world: World, digits, name: str, epochs: int) -> list[str]:
    return ["python", "-m", "raysnet.train", "arch=resnet20", f"epochs={epochs}", "run.workers=2", "batch_size=64",
            "tracking.log_model=false", f"data.root={digits}", f"run.storage={world.root}/out", f"run.name={name}",
            f"tracking.uri={world.stores.tracking_uri}"]


def assert_isolated(world: World) -> None:
    """Each node sees lo and its veth on the test subnet, nothing else; no process of the harness
    has a socket in the root namespace (where the routable address lives)."""
    import psutil

    for name in world.net.addr:
        interfaces = world.net.interfaces(name)
        assert set(interfaces) == {"lo", "eth0"}, (name, interfaces)
        assert [a for a in interfaces["eth0"] if not a.startswith("fe80:")] == [f"{world.net.addr[name]}/24"]
        assert world.net.routes(name) == [f"{SUBNET}.0/24 dev eth0 proto kernel scope link src "
                                          f"{world.net.addr[name]} "], world.net.routes(name)
    ours = {pid for name in world.net.addr for pid in world.net.pids(name)}
    in_root = [c for c in psutil.net_connections("all") if c.pid in ours]
    assert not in_root, in_root


def job_id(world: World, submission_id: str) -> str:
    return next(j["job_id"] for j in world.cluster.state("jobs") if j["submission_id"] == submission_id)


def worker_actors(world: World, submission_id: str, *filters: str) -> list[dict]:
    """The Ray Train worker actors of a job, with the IP of the node each ran on."""
    ips = {n["node_id"]: n["node_ip"] for n in world.cluster.state("nodes")}
    job = job_id(world, submission_id)
    actors = [a for a in world.cluster.state("actors", "class_name=RayTrainWorker", *filters) if a["job_id"] == job]
    return [{**a, "node_ip": ips[a["node_id"]]} for a in actors]


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


def test_submit_runs_two_workers_on_two_nodes(world, digits):
    job = world.cluster.submit(train(world, digits, "submit", epochs=2), cwd=str(REPO), name="submit")
    first = job.wait_epochs(1, timeout=420)
    assert job.wait(timeout=300) == 0, job.output()[-4000:]
    print(f"\nsubmit -> first finished epoch: {first - job.started:.1f} s; the whole job {time.monotonic() - job.started:.1f} s")
    assert "Job 'submit' succeeded" in job.output()
    assert job.epochs() == [1, 2]

    workers = worker_actors(world, "submit")
    assert len({a["node_id"] for a in workers}) == 2, workers
    assert {a["node_ip"] for a in workers} == {world.net.addr["w1"], world.net.addr["w2"]}

    status, steps = mlflow_epochs(world, "submit")
    assert (status, steps) == ("FINISHED", [0, 1])
    assert any("/artifacts/checkpoint/" in key for key in world.stores.objects("mlartifacts/")), \
        "the run's checkpoint artifacts are not in the bucket"
    assert_isolated(world)


def test_a_lost_node_is_replaced_and_the_run_finishes_from_its_checkpoint(world, digits):
    world.cluster.add_node()  # three 1-CPU nodes: the two survivors can take the two workers
    job = world.cluster.submit(train(world, digits, "nodeloss", epochs=4), cwd=str(REPO), name="nodeloss")
    job.wait_epochs(1, timeout=420)
    hosts = sorted(n for n in world.cluster.hosting("RayTrainWorker") if n != "head")
    assert len(hosts) == 2, hosts
    victim = hosts[0]
    killed = time.monotonic()
    world.cluster.kill_node(victim)
    done = len(job.epochs())
    next_epoch = job.wait_epochs(done + 1, timeout=420)
    print(f"\nnode {victim} killed after {done} epoch(s) -> next finished epoch: {next_epoch - killed:.1f} s")
    survivors = {world.net.addr[n] for n in world.cluster.nodes if n not in ("head", victim)}
    resumed = worker_actors(world, "nodeloss", "state=ALIVE")  # while the run goes on
    assert {a["node_ip"] for a in resumed} == survivors and len({a["node_id"] for a in resumed}) == 2, resumed
    assert job.wait(timeout=420) == 0, job.output()[-4000:]

    assert job.epochs() == [1, 2, 3, 4], "each epoch once: resumed from the checkpoint, not from the start"
    assert mlflow_epochs(world, "nodeloss") == ("FINISHED", [0, 1, 2, 3])

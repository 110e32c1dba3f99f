"""End to end on a real multi-node Ray cluster, with the dataset, the checkpoints and
MLflow's artifacts in a bucket of a real S3 server: a sweep submitted as a job, its trials
training on two nodes at once, stopped and submitted again; then `ray job submit` of a 2-worker
run whose workers land on two nodes, each node fetching the dataset once, which loses one of its
nodes and goes on from its checkpoint in the bucket on the nodes left, is stopped mid-run and,
submitted again, resumes from the bucket and finishes.

The cluster (tests/cluster_harness.py): a head with no CPUs and 1-CPU worker nodes, each in a
network namespace of its own, token authentication on, each with its own HOME (its own dataset
cache) and the AWS_* variables of the S3 server, which its workers inherit; an S3 server and an
MLflow server (its artifacts in the bucket) in another namespace. Needs root and `ip netns`;
about five minutes on 2 otherwise idle cores.

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

import contextlib
import json
import math
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

# Every test here drives jobs on four Ray nodes sharing two cores; the first also starts them.
pytestmark = [pytest.mark.e2e, pytest.mark.budget(480, "jobs on a four-node Ray cluster in network namespaces")]

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "raysnet-digits"
DATA = f"s3://{Stores.BUCKET}/digits"  # prepared there by the fixture `world`
RUNS = "runs"  # run.storage=s3://<bucket>/runs


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
        stores = Stores(net, root, start=False)
        with ThreadPoolExecutor(1) as pool:
            # The servers start, and the dataset goes to the bucket, while the Ray nodes start.
            ready = pool.submit(lambda: _prepare_in_bucket(net, stores.start()))
            cluster = RayCluster(net, root, workers=2, env=stores.s3_env)
            ready.result()
        yield World(net, cluster, stores, root)
    finally:
        net.close()
        shutil.rmtree(root, ignore_errors=True)
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    left = [ns for ns in namespaces.split() if ns.startswith(net.prefix)]
    assert not left, f"namespaces left behind: {left}"
    assert _root_links() == links, "the root namespace's interfaces changed"
    assert _listing(Path.home() / ".ray") == user_ray, "~/.ray changed (the harness has a HOME of its own)"


def _prepare_in_bucket(net: Net, stores: Stores) -> None:
    """The dataset goes to the bucket as a user puts it there, from the store's namespace (the root
    namespace has no route to the bucket)."""
    done = net.run("store", [sys.executable, "-m", "raysnet.prepare", "source=digits", f"out={DATA}", "progress=false"],
                   env=stores.env, cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"prepare out={DATA} failed:\n{done.stdout}\n{done.stderr}"


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) if folder.is_dir() else []


def train(world: World, name: str, epochs: int, log_model: bool = False, steps: int = 8) -> list[str]:
    # 8 steps an epoch (of 22): epochs of a few seconds, still long enough to kill a node in one.
    return ["python", "-m", "raysnet.train", "arch=resnet20", f"epochs={epochs}", "run.workers=2", "batch_size=64",
            f"run.max_steps={steps}", f"tracking.log_model={str(log_model).lower()}", f"data.root={DATA}",
            f"run.storage=s3://{Stores.BUCKET}/{RUNS}", f"run.name={name}", f"tracking.uri={world.stores.tracking_uri}"]


def dataset_fetches(world: World) -> float:
    """How many whole copies of the dataset's train.beton the S3 server has served, counted from
    the requests it recorded: a copy reads raysnet.storage.CHUNK bytes at a time, each read one
    ranged GET. With `cached` (which nodes hold a copy) this gives each node's count: as many
    copies as caches means each node downloaded once."""
    from raysnet import storage

    size = json.loads(world.stores.read(f"{DATA.removeprefix(f's3://{Stores.BUCKET}/')}/meta.json"))
    per_copy = math.ceil(size["files"]["train.beton"]["size"] / storage.CHUNK)
    key = f"/{DATA.removeprefix('s3://')}/train.beton"
    return sum(1 for method, path in world.stores.requests() if method == "GET" and path == key) / per_copy


def caches(world: World) -> set[str]:
    """The nodes whose cache holds the dataset."""
    return {node for node in world.cluster.nodes if cached(world, node)}


def cached(world: World, node: str) -> bool:
    """Node `node`'s cache (under its own HOME) holds the dataset, finished (meta.json is written last)."""
    return any((world.cluster.home(node) / ".cache" / "raysnet" / "remote").glob("digits-*/meta.json"))


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
    """Epochs with a checkpoint, as Ray Train's controller records them in run.storage (the
    bucket) the moment it registers one: earlier and steadier than the epoch lines, which arrive
    through two log relays."""
    snapshot = world.stores.read(f"{RUNS}/{name}/checkpoint_manager_snapshot.json")
    try:
        latest = json.loads(snapshot)["latest_checkpoint_result"]
    except (TypeError, json.JSONDecodeError):  # not yet, or being written
        return 0
    return latest["metrics"]["epoch"] + 1 if latest else 0


def wait_checkpointed(world: World, job, name: str, epochs: int, timeout: float = 420) -> float:
    """Wait until `epochs` epochs of run `name` are checkpointed. -> when that was seen"""
    wait_for(f"{name}: a checkpoint of epoch {epochs} in the bucket", lambda: checkpointed(world, name) >= epochs,
             timeout, job.proc, job.log)
    return time.monotonic()


def mlflow_run(world: World, name: str):
    """The one MLflow run called `name`, read from the server's SQLite."""
    from raysnet.tracking import RUN_NAME_TAG

    client = world.stores.client()
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def mlflow_epochs(world: World, name: str) -> tuple[str, list[int]]:
    """(status, the MLflow steps of val_err) of the one run called `name`."""
    run = mlflow_run(world, name)
    steps = sorted(m.step for m in world.stores.client().get_metric_history(run.info.run_id, "val_err"))
    return run.info.status, steps


def checkpoints_in_bucket(world: World, name: str) -> set[str]:
    """The checkpoint directories of run `name` in run.storage (the bucket)."""
    return {key.split("/")[2] for key in world.stores.objects(f"{RUNS}/{name}/")
            if key.split("/")[2].startswith("checkpoint_") and key.count("/") >= 3}


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


SWEEP = """\
name: cluster
description: two trials side by side on two nodes, a test's sweep
recipe: digits
overrides: {run.workers: 1, batch_size: 64, run.max_steps: 12, tracking.log_model: false}
trials: [{arch: plain20, epochs: 1}, {arch: resnet20, epochs: 6}]
max_concurrent_trials: 2
"""


def sweep_children(world: World) -> dict[str, object]:
    """arch -> the sweep's MLflow child run of that arch (each arch is one trial here)."""
    client = world.stores.client()
    exp = client.get_experiment_by_name("cluster")
    runs = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags] if exp else []
    assert len(runs) == len({r.data.tags["arch"] for r in runs}), "two MLflow runs for one trial"
    return {r.data.tags["arch"]: r for r in runs}


def test_a_sweep_job_spreads_its_trials_and_resumes_without_rerunning_finished_ones(world):
    """`python -m raysnet.tune` submitted as a job: its two trials train on the two nodes at once; the
    job stopped once the short trial has finished and submitted again, the short trial is not
    rerun, the long one continues, and MLflow has one child run per trial, each epoch once."""
    file = world.root / "cluster.yaml"  # the driver runs on the head, which shares this filesystem
    file.write_text(SWEEP)
    command = ["python", "-m", "raysnet.tune", str(file), f"data.root={DATA}", f"run.storage=s3://{Stores.BUCKET}/{RUNS}",
               f"tracking.uri={world.stores.tracking_uri}"]
    job = world.cluster.submit(command, cwd=str(REPO), name="sweep-1")
    def short_finished() -> bool:
        run = sweep_children(world).get("plain20")
        return run is not None and run.info.status == "FINISHED"

    wait_for("the short trial's MLflow run FINISHED", short_finished, 420, job.proc, job.log)
    world.cluster.stop_job("sweep-1")
    job.wait(timeout=120)
    workers = world.cluster.train_workers("sweep-1")  # Ray's state API lists them after their end too
    assert {w["node_ip"] for w in workers} == {world.net.addr["w1"], world.net.addr["w2"]}, workers
    before = sweep_children(world)
    assert before["resnet20"].info.status != "FINISHED", "the long trial ended before the sweep was stopped"

    again = world.cluster.submit(command, cwd=str(REPO), name="sweep-2")
    assert again.wait(timeout=600) == 0, again.output()[-4000:]
    assert "resuming sweep" in again.output(), again.output()[-4000:]
    after = sweep_children(world)
    assert sorted(after) == ["plain20", "resnet20"] and all(r.info.status == "FINISHED" for r in after.values())
    short = after["plain20"]
    assert short.info.run_id == before["plain20"].info.run_id and short.info.end_time == before["plain20"].info.end_time
    client = world.stores.client()
    steps = {arch: sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_err"))
             for arch, run in after.items()}
    assert steps == {"plain20": [0], "resnet20": list(range(6))}, steps  # nothing trained or logged twice
    state = world.stores.objects(f"{RUNS}/sweeps/")
    assert any("/tune/" in key for key in state) and any(key.endswith("/summary/summary.md") for key in state), state


def latest_size(world: World, name: str) -> tuple[int, int]:
    """(epochs checkpointed, the world size of the last), from the controller's record in the bucket."""
    snapshot = world.stores.read(f"{RUNS}/{name}/checkpoint_manager_snapshot.json")
    try:
        latest = json.loads(snapshot)["latest_checkpoint_result"]
    except (TypeError, json.JSONDecodeError):
        return 0, 0
    return (latest["metrics"]["epoch"] + 1, latest["metrics"]["world_size"]) if latest else (0, 0)


def wait_size(world: World, job, name: str, size: int, after: int, timeout: float = 240) -> tuple[int, float]:
    """Wait for an epoch after epoch `after` checkpointed at world size `size`. -> (its epochs, when seen)"""
    def ready() -> bool:
        epochs, world_size = latest_size(world, name)
        return epochs > after and world_size == size

    wait_for(f"{name}: an epoch after {after} checkpointed by {size} workers", ready, timeout, job.proc, job.log)
    return latest_size(world, name)[0], time.monotonic()


def test_an_elastic_job_shrinks_grows_is_stopped_and_submitted_again_and_finishes_from_the_bucket(world):
    """`ray job submit` of an elastic run (run.workers=2-3) on three 1-CPU nodes: three workers, each
    node that hosts one fetches the dataset once. One node is lost (SIGKILL, no replacement): the
    run goes on with two workers from its checkpoint in the bucket. A node joins: at the next resize
    check the run grows back to three. Then the job is stopped (`ray job stop`) and the same command
    submitted again resumes from the bucket and finishes: one MLflow run, each epoch once, every
    epoch the same number of steps and images and the learning rate of a run that never resized."""
    try:
        _elastic_job(world)
    except BaseException:
        # A job left running would hold the nodes the module's next tests need.
        for job in ("submit-1", "submit-2"):
            with contextlib.suppress(Exception):
                world.cluster.stop_job(job)
        raise


def _elastic_job(world: World) -> None:
    world.cluster.add_node()  # three 1-CPU nodes: the run starts on all three
    # 64 over 3 workers: shards of 22, 21, 21. Enough epochs to outlast a loss and a join: Ray sees a
    # node come and go within 20 s (its AutoscalingCoordinator's refresh), a new node starts in ~15 s.
    epochs, steps, batch = 20, 16, 64
    command = train(world, "submit", epochs=epochs, log_model=True, steps=steps) + [
        "run.workers=2-3", "run.resize_check_s=5", "tracking.system_metrics_s=1"]
    job = world.cluster.submit(command, cwd=str(REPO), name="submit-1")
    first = wait_checkpointed(world, job, "submit", 1)
    print(f"\nsubmit -> first epoch checkpointed in the bucket: {first - job.started:.1f} s")
    # Ray's view of the nodes is refreshed every 20 s: a run started right after a node joined may
    # start with two workers and grow at its first resize check. Three workers before the loss:
    wait_size(world, job, "submit", 3, 0)
    hosts = sorted(n for n in world.cluster.nodes if n != "head")
    groups = {}
    for worker in world.cluster.train_workers("submit-1"):
        groups.setdefault(worker["placement_group_id"], set()).add(worker["node_ip"])
    assert {world.net.addr[n] for n in hosts} in groups.values(), (hosts, groups)  # one worker on each node
    assert dataset_fetches(world) == len(caches(world)), "a node downloaded the dataset twice"

    victim = hosts[0]
    killed = time.monotonic()
    world.cluster.kill_node(victim)
    lost_at = checkpointed(world, "submit")
    shrunk_at, shrunk = wait_size(world, job, "submit", 2, lost_at)
    print(f"\nnode {victim} killed after epoch {lost_at} -> epoch {shrunk_at} checkpointed by 2 workers: "
          f"{shrunk - killed:.1f} s")
    # A fixed-size run without a spare node waits for one; the elastic one goes on at once (a loss is
    # detected in about 4 s here, the restart takes seconds: 60 s is several times what it needs).
    assert shrunk - killed < 60, job.output()[-6000:]
    joined = world.cluster.add_node(wait=False)
    arrived = time.monotonic()
    grown_at, grown = wait_size(world, job, "submit", 3, shrunk_at)
    print(f"\nnode {joined} started -> epoch {grown_at} checkpointed by 3 workers: {grown - arrived:.1f} s "
          "(the node's start, the 5 s resize check, the restart, the epoch)")
    assert grown_at < epochs, "the run ended before it grew"
    stopped = time.monotonic()  # at once: the epochs left take seconds, and the stop must come before their end
    world.cluster.stop_job("submit-1")
    job.wait(timeout=120)
    # The worker groups, by placement group (Ray's state API lists them after their end too): three
    # on every node, two on the nodes left, three again with the new one.
    groups: dict[str, list[dict]] = {}
    for worker in world.cluster.train_workers("submit-1"):
        groups.setdefault(worker["placement_group_id"], []).append(worker)
    on = [sorted(n for n, ip in world.net.addr.items() if ip in {w["node_ip"] for w in g}) for g in groups.values()]
    survivors = [n for n in hosts if n != victim]
    assert sorted(hosts) in on and survivors in on and sorted([*survivors, joined]) in on, on
    out = job.output()
    assert "raysnet: resized from 3 to 2 workers (a worker or its node was lost)" in out, out[-4000:]
    assert "raysnet: resized from 2 to 3 workers (the cluster had room for more workers)" in out, out[-4000:]

    assert "stopped" in out.lower(), out[-4000:]
    done = checkpointed(world, "submit")  # what the bucket holds once the driver is gone
    assert grown_at <= done < epochs, f"{done} epochs checkpointed: the run was not stopped mid-run"
    printed = job.epochs()  # the last line may still be on its way when a job stops: no repeat, none left out
    assert printed == list(range(1, len(printed) + 1)), "restarted from the checkpoint, not from epoch 0"
    fetched = dataset_fetches(world)
    assert fetched == len(caches(world)), "a node downloaded the dataset twice"

    again = world.cluster.submit(command, cwd=str(REPO), name="submit-2")
    resumed = wait_checkpointed(world, again, "submit", done + 1)
    assert again.wait(timeout=420) == 0, again.output()[-4000:]
    print(f"\ndriver stopped after epoch {done} -> resubmitted -> epoch {done + 1} checkpointed: "
          f"{resumed - again.started:.1f} s after the resubmit, {resumed - stopped:.1f} s after the stop")
    # The stopped run's resource request is cancelled by its successor (lifecycle._take_over_reservation):
    # left to expire, it kept the nodes from the resubmitted run for 180 s.
    assert resumed - again.started < 120, again.output()[-4000:]
    assert "Job 'submit-2' succeeded" in again.output()
    assert "raysnet: resuming" in again.output(), again.output()[-4000:]
    assert again.epochs() == list(range(done + 1, epochs + 1)), "resumed from the bucket, not from epoch 0"
    assert dataset_fetches(world) == fetched, "a node that had the dataset downloaded it again"

    # What a resize must not change: every epoch trained steps x batch images (the shards of each
    # global batch across the workers), and the learning rate at every step is the schedule's as a
    # run of one size computes it (raysnet.train.schedule, over global steps).
    from raysnet.config import load_config
    from raysnet.train.schedule import base_lr, lr_factor

    run = mlflow_run(world, "submit")
    client = world.stores.client()
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
               for key in ("world_size", "train_images", "iter/lr")}
    sizes = [int(v) for _, v in history["world_size"]]
    changes = [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]
    assert changes[-3:] == [3, 2, 3] and changes[:-3] in ([], [2]), sizes  # [2]: it started before Ray saw w3
    assert history["train_images"] == [(e, steps * batch) for e in range(epochs)]
    cfg = load_config(["arch=resnet20", f"epochs={epochs}", f"batch_size={batch}", f"run.max_steps={steps}"])
    lrs = history["iter/lr"]
    assert lrs and lrs[-1][0] == epochs * steps, lrs[-3:]  # the optimiser steps of a run that never resized
    assert all(math.isclose(v, base_lr(cfg) * lr_factor(step - 1, epochs * steps, cfg.optim), rel_tol=1e-6)
               for step, v in lrs), lrs
    assert run.data.tags["raysnet.resizes"] == str(len(changes) - 1)

    assert len(checkpoints_in_bucket(world, "submit")) >= 1, world.stores.objects(f"{RUNS}/submit/")
    assert f"{RUNS}/submit/raysnet-config.yaml" in world.stores.objects(f"{RUNS}/submit/")
    assert not (REPO / "outputs" / "submit").exists() and not list(world.root.glob("**/submit/checkpoint_*"))

    assert mlflow_epochs(world, "submit") == ("FINISHED", list(range(epochs)))
    run = mlflow_run(world, "submit")
    models = world.stores.client().search_logged_models(experiment_ids=[run.info.experiment_id])
    mine = [m for m in models if m.source_run_id == run.info.run_id]
    assert mine, models
    # MLflow's system metrics from each node that hosts a worker, one series per node.
    assert {k.split("/")[1] for k in run.data.metrics if k.startswith("system/")} == {"node0", "node1", "node2"}, \
        sorted(run.data.metrics)
    keys = world.stores.objects(f"mlartifacts/{run.info.experiment_id}/models/")
    assert any(f"/models/{m.model_id}/artifacts/MLmodel" in key for m in mine for key in keys), keys
    assert any("/artifacts/checkpoint/" in key for key in world.stores.objects("mlartifacts/")), \
        "the run's checkpoint artifacts are not in the bucket"
    assert_isolated(world)

    # A bucket that does not exist: one paragraph before any training, and nothing written anywhere.
    before = world.stores.objects()
    command = [a if not a.startswith("run.storage=") else "run.storage=s3://no-such-bucket/runs"
               for a in train(world, "nobucket", epochs=1)]
    refused = world.net.run("store", [sys.executable, *command[1:]], cwd=str(REPO), env=world.stores.env,
                            capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "run.storage=s3://no-such-bucket/runs" in refused.stderr and "\n\n" not in refused.stderr.strip()
    assert world.stores.objects() == before




UPLOAD = "import sys\nfrom pyarrow import fs\nfs.copy_files(sys.argv[1], sys.argv[2])\n"


def photo_tree(root: Path) -> None:
    """480 photograph-like JPEGs in 3 classes (450 train, 30 val), a truncated one and a file that is not an image."""
    import numpy as np
    from imagery import photo

    rng = np.random.default_rng(3)
    for split, n in (("train", 150), ("val", 10)):
        for c in ("ant", "bee", "cat"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                photo(rng, int(rng.integers(120, 200)), int(rng.integers(120, 200))).save(root / split / c / f"{i}.jpg")
    good = (root / "train" / "ant" / "0.jpg").read_bytes()
    (root / "train" / "bee" / "cut.jpg").write_bytes(good[:len(good) // 2])
    (root / "val" / "cat" / "readme.jpg").write_text("not an image")


def bucket_dataset(world: World, prefix: str, into: Path) -> Path:
    into.mkdir(parents=True)
    for name in ("train.beton", "val.beton", "meta.json"):
        (into / name).write_bytes(world.stores.read(f"{prefix}/{name}"))
    return into


def test_prepare_on_the_cluster_is_the_local_prepare_even_when_a_node_is_lost(world, tmp_path):
    """`ray job submit -- python -m raysnet.prepare root=s3://... out=s3://...`: the images are read
    from the bucket and encoded by Ray tasks on both worker nodes at once, and one writer on the
    head assembles the dataset. One of the nodes is killed while it encodes: its tasks run again on
    the node left, and the dataset is the one a local prepare of the same tree writes (samples,
    order, labels, stored bytes, skipped files and why, statistics)."""
    from imagery import stored_samples

    photo_tree(tmp_path / "tree")
    started = time.monotonic()
    local = subprocess.run([sys.executable, "-m", "raysnet.prepare", "source=imagefolder", f"root={tmp_path / 'tree'}",
                            f"out={tmp_path / 'local'}", "engine=local", "progress=false"], cwd=str(REPO),
                           capture_output=True, text=True, timeout=300, check=False)
    assert local.returncode == 0, local.stderr[-2000:]
    upload = world.net.run("store", [sys.executable, "-c", UPLOAD, str(tmp_path / "tree"), f"s3://{Stores.BUCKET}/tree"],
                           env=world.stores.env, capture_output=True, text=True, timeout=300)
    assert upload.returncode == 0, upload.stderr[-2000:]
    uploaded = time.monotonic()
    while len(live := [n for n in world.cluster.nodes if n != "head" and world.net.pids(n)]) < 2:
        world.cluster.add_node()

    job = world.cluster.submit(["python", "-m", "raysnet.prepare", "source=imagefolder", f"root=s3://{Stores.BUCKET}/tree",
                                f"out=s3://{Stores.BUCKET}/tree-ds"], cwd=str(REPO), name="prepare")
    wait_for("tasks encoding images on two nodes at once", lambda: set(live[:2]) <= set(world.cluster.hosting("_encode")),
             120, job.proc, job.log)
    world.cluster.kill_node(live[0])
    killed = time.monotonic()
    assert job.proc.poll() is None, "the prepare ended before the node was lost"
    assert job.wait(timeout=420) == 0, job.output()[-4000:]
    print(f"\nlocal prepare and upload: {uploaded - started:.1f} s; the job, a node killed {killed - job.started:.1f} s "
          f"in: {time.monotonic() - job.started:.1f} s")
    attempts = world.cluster.tasks("prepare", "_encode_on_node")
    assert any(t["attempt_number"] > 0 for t in attempts), attempts  # run again after the node was lost

    there = bucket_dataset(world, "tree-ds", tmp_path / "there")
    for split, samples in (("train.beton", 450), ("val.beton", 30)):
        expected = stored_samples(tmp_path / "local" / split)
        assert len(expected) == samples and stored_samples(there / split) == expected, split
    meta, mine = (json.loads((d / "meta.json").read_text()) for d in (there, tmp_path / "local"))
    assert (meta["skipped"], meta["mean"], meta["std"], meta["pca"]) == \
        (mine["skipped"], mine["mean"], mine["std"], mine["pca"])
    assert [s["path"] for s in meta["skipped"]] == ["train/bee/cut.jpg", "val/cat/readme.jpg"]
    assert sum(meta["write"]["encoded_on"].values()) == 482, meta["write"]  # files read, by Ray node id


# Ray's state API, asked from inside the head: the nodes that ran a job's Ray Data work of raysnet.predict,
# by node address: its model actors, and its reading tasks (a stage of their own, not fused into the actors).
PREDICT_NODES = (
    "import json, sys\n"
    "from ray.util.state import list_actors, list_jobs, list_nodes, list_tasks\n"
    "job = next(j.job_id for j in list_jobs() if j.submission_id == sys.argv[1])\n"
    "ips = {n.node_id: n.node_ip for n in list_nodes(limit=10000)}\n"
    "actors = list_actors(filters=[('job_id', '=', job)], limit=10000, detail=True, raise_on_missing_output=False)\n"
    "tasks = list_tasks(filters=[('job_id', '=', job)], limit=10000, detail=True, raise_on_missing_output=False)\n"
    "ran = lambda nodes: sorted({ips[n] for n in nodes if n in ips})  # a task not yet placed has no node\n"
    "print(json.dumps({'actors': ran(a.node_id for a in actors if a.class_name == 'MapWorker(MapBatches(Predict))'),\n"
    "                  'tasks': ran(t.node_id for t in tasks if t.name == 'MapBatches(read_and_preprocess)')}))\n")


def test_predict_on_the_cluster_reads_the_bucket_spreads_over_both_nodes_and_gives_the_local_rows(world, tmp_path,
                                                                                                 trained_digits, digits):
    """`ray job submit -- python -m raysnet.predict model=s3://... images=s3://... out=s3://...
    engine=ray concurrency=2`: the model and the images in the bucket, Ray Data's reading tasks on
    both worker nodes, its model actors on the workers, and the rows written to the bucket are a
    local run's."""
    from test_predict import make_folder, same_rows

    from raysnet import predict
    from raysnet.predict_io import read_rows

    started = time.monotonic()
    folder = make_folder(tmp_path / "imgs", digits)
    assert predict.run([f"model={trained_digits}", f"images={folder}", f"out={tmp_path / 'local.jsonl'}",
                        "engine=local"]) == 0
    where = f"s3://{Stores.BUCKET}/predict"
    for src, dst in ((folder, f"{where}/imgs"), (trained_digits, f"{where}/model/checkpoint.pt")):
        upload = world.net.run("store", [sys.executable, "-c", UPLOAD, str(src), dst], env=world.stores.env,
                               capture_output=True, text=True, timeout=120)
        assert upload.returncode == 0, upload.stderr[-2000:]
    while len(live := [n for n in world.cluster.nodes if n != "head" and world.net.pids(n)]) < 2:
        world.cluster.add_node()  # the tests before lost nodes
    ready = time.monotonic()

    job = world.cluster.submit(["python", "-m", "raysnet.predict", f"model={where}/model/checkpoint.pt",
                                f"images={where}/imgs", f"out={where}/preds.jsonl", "engine=ray", "concurrency=2",
                                "batch_size=48"], cwd=str(REPO), name="predict")
    assert job.wait(timeout=300) == 0, job.output()[-4000:]
    print(f"\npredict on the cluster: local run and upload {ready - started:.1f} s, the job "
          f"{time.monotonic() - job.started:.1f} s")
    there = [json.loads(line) for line in world.stores.read("predict/preds.jsonl").decode().splitlines()]
    same_rows(read_rows(tmp_path / "local.jsonl"), there, (str(folder), f"{where}/imgs"))
    assert "152 predicted, 2 unreadable" in job.output(), job.output()[-4000:]

    done = world.net.run("head", [sys.executable, "-c", PREDICT_NODES, "predict"], env=world.cluster.env,
                         capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    nodes = json.loads(done.stdout.splitlines()[-1])
    workers = {world.net.addr[n] for n in live}
    # Two model actors of half a CPU each: Ray may place both on one node (it did, once reading tasks
    # held the other's CPU); the reading tasks run on both.
    assert 1 <= len(nodes["actors"]) <= 2 and set(nodes["actors"]) <= workers, (nodes, live)
    assert len(nodes["tasks"]) >= 2 and set(nodes["tasks"]) <= workers, (nodes, live)

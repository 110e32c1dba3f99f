"""A multi-node Ray cluster, an S3 server and an MLflow server on one machine.

Every node and server runs in a network namespace of its own, joined to the others by veth pairs
on a bridge that lives in a namespace of its own (10.77.0.0/24, no route anywhere else). Nothing
is added to the root namespace, so nothing the harness starts can reach the machine's routable
address; and Ray, which advertises a routable address unless told otherwise, advertises the
namespace's one, so its nodes form a real multi-node cluster.

    with Net() as net:
        stores = Stores(net, root)                   # moto's S3 server + MLflow server
        cluster = RayCluster(net, root, workers=2, env=stores.s3_env)  # head (0 CPUs) + two 1-CPU nodes
        job = cluster.submit(["python", "-m", "raysnet.train", "run.workers=2", "data.root=s3://raysnet/digits"],
                             cwd=repo, name="a")
        assert job.wait(timeout=600) == 0

The test process stays in the root namespace: it reads results from files (all namespaces share
the filesystem) or runs a short command inside a namespace. On close every process of every
namespace is SIGKILLed by pid (`ip netns pids`) and every namespace deleted, which deletes its
veth too; a test that fails still gets there through its fixture's `with`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar, Self

from servers import recorded_requests, recording_env

SUBNET = "10.77.0"
PREFIX = "raysnet-"  # every namespace of the harness: raysnet-<pid of the test process>-<node>
BIN = str(Path(sys.executable).parent)  # ray, mlflow, moto_server and python of this interpreter


def unavailable() -> str | None:
    """Why the harness cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"{PREFIX}probe-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False).returncode != 0:
        return "`ip netns add` fails here"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def wait_for(what: str, ready, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `ready()` until it returns something truthy (-> that); fail naming `what`, with the
    log's tail, when `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            value = ready()  # its last words may be what we wait for
            if value:
                return value
            break
        time.sleep(0.2)
    why = f"exited with {proc.returncode}" if proc is not None and proc.poll() is not None else \
        f"not ready after {timeout:.0f} s"
    tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"{what}: {why}\n{tail}")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Net:
    """A bridge in a namespace of its own, and a namespace per node with lo and one veth on it."""

    def __init__(self):
        self.prefix = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{self.prefix}-br"
        self.addr: dict[str, str] = {}  # node name -> its address
        self._lock = threading.Lock()
        self._namespaces: list[str] = []
        self._new_namespace(self.bridge)
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def _new_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._namespaces.append(ns)

    @staticmethod
    def _port(name: str) -> str:
        return f"p-{name}"[:15]  # interface names are at most 15 bytes

    def add(self, name: str) -> str:
        """A namespace for node `name`, on the bridge. -> its address"""
        with self._lock:
            ip, ns, port = f"{SUBNET}.{10 + len(self.addr)}", self.ns(name), self._port(name)
            self.addr[name] = ip
            self._new_namespace(ns)
        # Both ends are created inside their namespaces: the root namespace never holds either.
        _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.bridge)
        _ip("-n", self.bridge, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return ip

    def exec(self, name: str, cmd: list[str], **popen_kw) -> subprocess.Popen:
        """Start `cmd` in node `name`'s namespace (`ip netns exec` execs it: the same pid)."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns(name), *cmd], **popen_kw)

    def run(self, name: str, cmd: list[str], check: bool = False, **run_kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns(name), *cmd], check=check, **run_kw)

    def pids(self, name: str) -> list[int]:
        """Every process living in node `name`'s namespace."""
        return _namespace_pids(self.ns(name))

    def kill_all(self, name: str) -> None:
        """SIGKILL every process of node `name`'s namespace, by pid, until none is left."""
        _kill_namespace(self.ns(name))

    def cut(self, name: str) -> None:
        """Take node `name` off the network (its bridge port goes down; its processes live on)."""
        _ip("-n", self.bridge, "link", "set", self._port(name), "down")

    def interfaces(self, name: str) -> dict[str, list[str]]:
        """interface -> its addresses, inside node `name`'s namespace."""
        out = subprocess.run(["ip", "-n", self.ns(name), "-br", "addr"], capture_output=True, text=True,
                             check=True).stdout
        return {f[0].split("@")[0]: f[2:] for f in (line.split() for line in out.splitlines())}

    def routes(self, name: str) -> list[str]:
        out = subprocess.run(["ip", "-n", self.ns(name), "route"], capture_output=True, text=True, check=True).stdout
        return out.splitlines()

    def close(self) -> None:
        for ns in reversed(self._namespaces):
            _delete_namespace(ns)
        self._namespaces.clear()

    @staticmethod
    def remove_stale() -> list[str]:
        """Delete the namespaces (and kill the processes) a harness whose test process is gone
        left behind, e.g. after a SIGKILL. -> their names"""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        stale = {ns for ns in re.findall(rf"^({PREFIX}(\d+)-\S+)", listed, re.MULTILINE) if not _alive(int(ns[1]))}
        for ns, _ in stale:
            _delete_namespace(ns)
        return sorted(ns for ns, _ in stale)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _namespace_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def _kill_namespace(ns: str, timeout: float = 15) -> None:
    """SIGKILL every process of a namespace, by pid, until none is left."""
    deadline = time.monotonic() + timeout
    while (pids := _namespace_pids(ns)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _delete_namespace(ns: str) -> None:
    """Kill what lives in a namespace, then delete it (its end of a veth pair goes with it, and
    takes the other end along)."""
    _kill_namespace(ns)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def base_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of everything the harness starts: this interpreter's tools first on PATH,
    a HOME of its own (Ray's token file, MLflow's and pip's caches never touch the user's), and
    no inherited Ray, MLflow or AWS settings (the test process sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
    with which Ray refuses a second node)."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    env.update(PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}", HOME=str(home), RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Service:
    """A long-running process in a namespace, in a session of its own, its output in a log file."""

    def __init__(self, net: Net, node: str, cmd: list[str], log: Path, env: dict[str, str], cwd: str | None = None):
        self.node, self.log = node, log
        with open(log, "ab") as out:  # the child keeps its own copy
            self.proc = net.exec(node, cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                 start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Job(Service):
    """A `ray job submit`, which waits for its job and tails the job's log."""

    def __init__(self, *args, **kwargs):
        self.started = time.monotonic()
        super().__init__(*args, **kwargs)

    def epochs(self) -> list[int]:
        """The epoch lines raysnet printed so far ("epoch 2/3: ..." -> 2), in order."""
        return [int(n) for n in re.findall(r"epoch (\d+)/\d+: ", self.output())]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the job did not end in {timeout:.0f} s\n{self.output()[-4000:]}") from None


# How soon the head declares a killed node dead: Ray's GCS checks each raylet every 3 s and gives
# up after 5 failed checks (about 15 s before a run or a task can move on). A killed node refuses
# at once, so every 1 s and 4 failures: 4 s; a live but busy node (2 cores under four nodes) still
# has 4 checks of up to 5 s each to answer one.
NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "4",
              "RAY_health_check_timeout_ms": "5000"}


class RayCluster:
    """A head with no CPUs (the job's driver and Ray Train's controller need none) and 1-CPU
    worker nodes, each a `ray start --block` in its own namespace, all with token authentication.
    Each node has its own temp dir: nodes sharing one on a shared filesystem delete each other's
    copy of a job's working directory (see test_cluster.py), and its own HOME: its own dataset
    cache (~/.cache/raysnet/remote), as on separate machines. `env`: more variables for every node
    and the submitter (e.g. the AWS_* of Stores.s3_env: a job's workers inherit their node's)."""

    def __init__(self, net: Net, root: Path, workers: int = 2, env: dict[str, str] | None = None):
        self.net, self.root = net, root
        self.token = secrets.token_hex(32)
        self.nodes: dict[str, Service] = {}
        self.head_ip = net.add("head")
        self.gcs, self.dashboard = f"{self.head_ip}:6379", f"http://{self.head_ip}:8265"
        # RAY_API_SERVER_ADDRESS: Ray's state API clients inside the cluster (Ray Train's placement
        # group cleaner polls it every second) otherwise guess "the local cluster" from every
        # gcs_server process they can see (the process table is shared) and /tmp/ray, and find
        # other Ray instances of this machine there.
        self.env = base_env(root / "home", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                            RAY_API_SERVER_ADDRESS=self.dashboard, **NODE_DEATH, **(env or {}))
        self._start("head", ["--head", "--port=6379", f"--dashboard-host={self.head_ip}", "--dashboard-port=8265",
                             "--num-cpus=0"])
        for _ in range(workers):
            self.add_node(wait=False)
        for name in self.nodes:
            self._wait_started(name)

    def _start(self, name: str, args: list[str]) -> None:
        # Short temp dirs: Ray's Unix socket paths under them are limited to 107 bytes. A small
        # object store: every node's lives in the machine's one /dev/shm.
        tmp = tempfile.mkdtemp(prefix=f"{name}-", dir=self.root)
        cmd = ["ray", "start", "--block", f"--node-ip-address={self.net.addr[name]}", f"--temp-dir={tmp}",
               "--disable-usage-stats", "--object-store-memory=100000000", *args]
        home = self.home(name)
        home.mkdir(parents=True, exist_ok=True)
        self.nodes[name] = Service(self.net, name, cmd, self.root / f"{name}.log", {**self.env, "HOME": str(home)})

    def home(self, name: str) -> Path:
        """Node `name`'s HOME (its dataset cache is under .cache/raysnet/remote)."""
        return self.root / f"home-{name}"

    def _wait_started(self, name: str, timeout: float = 180) -> None:
        node = self.nodes[name]
        wait_for(f"ray node {name}", lambda: "Ray runtime started" in node.output(), timeout, node.proc, node.log)

    def add_node(self, wait: bool = True) -> str:
        """One more 1-CPU worker node. -> its name"""
        name = f"w{sum(n != 'head' for n in self.nodes) + 1}"
        self.net.add(name)
        self._start(name, [f"--address={self.gcs}", "--num-cpus=1"])
        if wait:
            self._wait_started(name)
        return name

    def kill_node(self, name: str) -> None:
        """Lose a node at once: SIGKILL its raylet, its workers and every other process of it, by pid."""
        self.net.kill_all(name)

    def hosting(self, process_name: str) -> list[str]:
        """The nodes with a live process whose name contains `process_name` (e.g. RayTrainWorker)."""
        import psutil

        def has(name: str) -> bool:
            for pid in self.net.pids(name):
                try:
                    if process_name in psutil.Process(pid).name():
                        return True
                except psutil.Error:
                    continue
            return False

        return [name for name in self.nodes if has(name)]

    def submit(self, entrypoint: list[str], *, cwd: str, name: str, node: str = "head",
               working_dir: str | None = ".", env_vars: dict[str, str] | None = None) -> Job:
        """`ray job submit` (it waits and tails the job's log) from inside node `node`'s namespace."""
        cmd = ["ray", "job", "submit", "--address", self.dashboard, "--submission-id", name]
        cmd += ["--working-dir", working_dir] if working_dir else []
        cmd += ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
        return Job(self.net, node, [*cmd, "--", *entrypoint], self.root / f"job-{name}.log", self.env, cwd=cwd)

    def stop_job(self, submission_id: str) -> None:
        """`ray job stop` (it waits until the job has stopped), from inside the head's namespace, with the token."""
        done = self.net.run("head", ["ray", "job", "stop", "--address", self.dashboard, submission_id], env=self.env,
                            capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise AssertionError(f"ray job stop {submission_id} failed:\n{done.stdout}\n{done.stderr}")

    def tasks(self, submission_id: str, name: str) -> list[dict]:
        """The attempts of a job's Ray tasks called `name`, from Ray's state API (asked from inside
        the head): [{"task_id", "attempt_number", "state", "node_ip"}] (a retried task: one per attempt)."""
        script = (
            "import json, sys\n"
            "from ray.util.state import list_jobs, list_nodes, list_tasks\n"
            "job = next(j.job_id for j in list_jobs() if j.submission_id == sys.argv[1])\n"
            "ips = {n.node_id: n.node_ip for n in list_nodes(limit=10000)}\n"
            "tasks = list_tasks(filters=[('name', '=', sys.argv[2]), ('job_id', '=', job)], limit=10000,\n"
            "                   detail=True, raise_on_missing_output=False)\n"
            "print(json.dumps([{'task_id': t.task_id, 'attempt_number': t.attempt_number, 'state': t.state,\n"
            "                   'node_ip': ips.get(t.node_id)} for t in tasks]))\n")
        done = self.net.run("head", [sys.executable, "-c", script, submission_id, name], env=self.env,
                            capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise AssertionError(f"Ray's state API failed:\n{done.stdout}\n{done.stderr}")
        return json.loads(done.stdout.splitlines()[-1])

    def train_workers(self, submission_id: str) -> list[dict]:
        """The Ray Train worker actors of a job, from Ray's state API (asked from inside the head):
        [{"actor_id", "state", "node_id", "node_ip", "placement_group_id"}] (one placement group
        per worker group: a restarted run has several)."""
        script = (
            "import json, sys\n"
            "from ray.util.state import list_actors, list_jobs, list_nodes\n"
            "job = next(j.job_id for j in list_jobs() if j.submission_id == sys.argv[1])\n"
            "ips = {n.node_id: n.node_ip for n in list_nodes(limit=10000)}\n"
            "actors = list_actors(filters=[('class_name', '=', 'RayTrainWorker'), ('job_id', '=', job)],\n"
            "                     limit=10000, detail=True, raise_on_missing_output=False)\n"
            "print(json.dumps([{'actor_id': a.actor_id, 'state': a.state, 'node_id': a.node_id,\n"
            "                   'node_ip': ips[a.node_id], 'placement_group_id': a.placement_group_id}\n"
            "                  for a in actors]))\n")
        done = self.net.run("head", [sys.executable, "-c", script, submission_id], env=self.env, capture_output=True,
                            text=True, timeout=120)
        if done.returncode:
            raise AssertionError(f"Ray's state API failed:\n{done.stdout}\n{done.stderr}")
        return json.loads(done.stdout.splitlines()[-1])


class Stores:
    """In a namespace of its own: an S3 server (moto's standalone server: a real server speaking
    the S3 protocol) and an MLflow tracking server with a SQLite store and its artifacts in a
    bucket of that S3 server."""

    S3_PORT, MLFLOW_PORT, BUCKET = 9000, 5000, "raysnet"
    KEYS: ClassVar[dict[str, str]] = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                                      "AWS_DEFAULT_REGION": "us-east-1"}

    def __init__(self, net: Net, root: Path, node: str = "store", start: bool = True):
        self.net, self.root, self.node = net, root, node
        ip = net.add(node)
        self.s3, self.tracking_uri = f"http://{ip}:{self.S3_PORT}", f"http://{ip}:{self.MLFLOW_PORT}"
        self.db = root / "mlflow.db"
        self.recording = root / "s3-requests.jsonl"  # every request the S3 server receives (servers.recording_env)
        # What a client of the bucket needs (every Ray node gets it; its workers inherit it).
        self.s3_env = {**self.KEYS, "AWS_ENDPOINT_URL": self.s3, "MLFLOW_S3_ENDPOINT_URL": self.s3}
        self.env = base_env(root / "home", **self.s3_env)
        self.services: list[Service] = []
        self._reader: subprocess.Popen | None = None
        self._reader_lock = threading.Lock()
        if start:
            self.start()

    def start(self) -> Self:
        """Start both servers and wait until they answer (their addresses are known before: pass
        s3_env to the Ray nodes while this runs). -> self"""
        ip = self.net.addr[self.node]
        self.services = [
            Service(self.net, self.node, ["moto_server", "-H", ip, "-p", str(self.S3_PORT)], self.root / "moto.log",
                    {**self.env, **recording_env(self.recording)}),
            Service(self.net, self.node, ["mlflow", "server", "--host", ip, "--port", str(self.MLFLOW_PORT),
                                          "--workers", "1", "--backend-store-uri", f"sqlite:///{self.db}",
                                          "--artifacts-destination", f"s3://{self.BUCKET}/mlartifacts"],
                    self.root / "mlflow.log", self.env)]
        self._wait_up()
        return self

    def _wait_up(self) -> None:
        # From inside: create the bucket once S3 answers, then wait for MLflow's /health.
        script = ("import sys, time, boto3, urllib.request\n"
                  "for url, bucket in ((sys.argv[1], sys.argv[3]), (sys.argv[2] + '/health', None)):\n"
                  "    for _ in range(900):\n"
                  "        try:\n"
                  "            urllib.request.urlopen(url, timeout=2)\n"
                  "            break\n"
                  "        except Exception:\n"
                  "            time.sleep(0.2)\n"
                  "    else:\n"
                  "        sys.exit(f'{url} never answered')\n"
                  "    if bucket:\n"
                  "        boto3.client('s3').create_bucket(Bucket=bucket)\n")
        done = self.net.run(self.node, [sys.executable, "-c", script, self.s3, self.tracking_uri, self.BUCKET],
                            env=self.env, capture_output=True, text=True, timeout=240)
        if done.returncode:
            logs = "\n".join(f"--- {s.log.name}\n{s.output()[-2000:]}" for s in self.services)
            raise AssertionError(f"the S3 or MLflow server did not start: {done.stderr}\n{logs}")

    # One S3 client that stays up in the store's namespace (the test process cannot reach the
    # bucket from the root namespace): a request a line on its stdin, an answer a line on its
    # stdout. Cheap enough to poll every fraction of a second, which a new process each time is not.
    _READER = ("import base64, json, sys, boto3\n"
               "s3 = boto3.client('s3')\n"
               "for line in sys.stdin:\n"
               "    op, bucket, key = json.loads(line)\n"
               "    try:\n"
               "        if op == 'get':\n"
               "            out = base64.b64encode(s3.get_object(Bucket=bucket, Key=key)['Body'].read()).decode()\n"
               "        else:\n"
               "            pages = s3.get_paginator('list_objects_v2').paginate(Bucket=bucket, Prefix=key)\n"
               "            out = [o['Key'] for p in pages for o in p.get('Contents', [])]\n"
               "    except s3.exceptions.NoSuchKey:\n"
               "        out = None\n"
               "    print(json.dumps(out), flush=True)\n")

    def _ask(self, op: str, key: str):
        with self._reader_lock:
            if self._reader is None or self._reader.poll() is not None:
                self._reader = self.net.exec(self.node, [sys.executable, "-c", self._READER], env=self.env,
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                             start_new_session=True)
            self._reader.stdin.write(json.dumps([op, self.BUCKET, key]) + "\n")
            self._reader.stdin.flush()
            line = self._reader.stdout.readline()
        if not line:
            raise AssertionError(f"the S3 reader in {self.node} died (exit {self._reader.wait()})")
        return json.loads(line)

    def objects(self, prefix: str = "") -> list[str]:
        """Keys in the bucket under `prefix`, listed from inside the store's namespace over S3."""
        return self._ask("list", prefix)

    def read(self, key: str) -> bytes | None:
        """An object of the bucket, or None when there is none."""
        data = self._ask("get", key)
        return None if data is None else base64.b64decode(data)

    def requests(self) -> list[tuple[str, str]]:
        """Every request the S3 server received so far: (method, path)."""
        return recorded_requests(self.recording)

    def client(self):
        """An MlflowClient on the server's SQLite store, read directly from the root namespace."""
        from mlflow import MlflowClient

        return MlflowClient(f"sqlite:///{self.db}")

"""Which network interface the Ray Train workers' process group uses: the node's own, so that a group
spans nodes, and nothing beyond it, so that a local run opens no socket off loopback.

Gloo, unless GLOO_SOCKET_IFNAME names an interface, binds to the address the machine's hostname
resolves to. Where the hostname resolves to 127.0.0.1 (Debian's and many images' /etc/hosts,
containers, this test machine) every worker advertises loopback, and a group spread over two
nodes fails in `connectFullMesh` ("remote=[127.0.0.1]:…"). Ray knows the right address: the
node's IP, which Ray Train also gives rank 0's TCP store as MASTER_ADDR. So each worker, before
its process group starts, sets GLOO_SOCKET_IFNAME to the interface that holds its node's IP:
the node's network on a cluster, loopback on a local run (where Ray's node IP is 127.0.0.1).
NCCL_SOCKET_IFNAME is set the same way (NCCL needs GPUs: no test lists its sockets). A
variable the user set is kept.

The process group's rendezvous is rank 0's TCP store, and torch's own store server listens on every
interface ("::" or 0.0.0.0) whatever host it is given (on a local run, the one socket that was not
on loopback, open to anyone who could reach the machine). So rank 0 opens the listening socket
itself, on its node's Ray IP (127.0.0.1 on a local run), and hands it to
`TCPStore(master_listen_fd=...)`; every worker then joins the group through that store.

`NodeNetworkTorchConfig` is the hook: Ray Train's TorchConfig, whose backend does both on every
worker: `use_node_interface`, then `join_process_group` in place of Ray's own set-up.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ray.train.torch import TorchConfig

SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def interface_of(ip: str) -> str | None:
    """The name of the network interface holding `ip` (Linux), or None when none does."""
    if ipaddress.ip_address(ip).version == 6:
        return _ipv6_interface(ipaddress.ip_address(ip).exploded.replace(":", ""))
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                ifreq = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
        if socket.inet_ntoa(ifreq[20:24]) == ip:
            return name
    return None


def _ipv6_interface(hex_address: str) -> str | None:
    table = Path("/proc/net/if_inet6")
    for line in table.read_text().splitlines() if table.exists() else []:
        fields = line.split()  # address, index, prefix length, scope, flags, name
        if fields[0] == hex_address:
            return fields[5]
    return None


# Gloo's, and NCCL's for its bootstrap and socket transport (NCCL otherwise takes the first
# interface that is not loopback, whatever Ray's node IP: on a local run, a routable address).
SOCKET_IFNAME = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def use_node_interface() -> str | None:
    """On a Ray Train worker: point Gloo and NCCL at the interface of this node's Ray IP. -> Gloo's"""
    import ray

    name = interface_of(ray.util.get_node_ip_address())
    for variable in SOCKET_IFNAME:
        if name and not os.environ.get(variable):
            os.environ[variable] = name
    return os.environ.get("GLOO_SOCKET_IFNAME")


_listener: socket.socket | None = None  # rank 0's store socket, between opening it and the store taking it


def listen_on_node() -> tuple[str, int]:
    """On rank 0: a listening socket on this node's Ray IP only, for the group's TCP store. -> (ip, port)"""
    import ray

    global _listener
    ip = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    _listener = socket.create_server((ip, 0), family=family, backlog=128)
    return ip, _listener.getsockname()[1]


def join_process_group(backend: str, ip: str, port: int, timeout_s: int) -> None:
    """On every worker: the environment torch.distributed's users expect (as Ray sets it), then the
    process group, through rank 0's store on `ip`:`port` (rank 0 serves it on its own socket)."""
    import ray.train
    import torch.distributed as dist

    global _listener
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(ctx.get_local_rank()),
                       "LOCAL_WORLD_SIZE": str(ctx.get_local_world_size()), "NODE_RANK": str(ctx.get_node_rank()),
                       "MASTER_ADDR": ip, "MASTER_PORT": str(port)})
    if backend == "nccl":  # as Ray does: a timed-out collective fails instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    listen_fd = None
    if rank == 0:
        listen_fd, _listener = _listener.detach(), None  # the store owns the socket from here
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(ip, port, world, is_master=rank == 0, timeout=timeout, master_listen_fd=listen_fd)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


class NodeNetworkBackend(TorchConfig().backend_cls):  # Ray's torch backend (its class is private)
    def on_start(self, worker_group, backend_config):
        """Ray's set-up, but with the store bound to rank 0's node address (see the module's doc)."""
        import ray

        worker_group.execute(use_node_interface)
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        ip, port = worker_group.execute_single(0, listen_on_node)
        ray.get([worker_group.execute_single_async(i, join_process_group, backend=backend, ip=ip, port=port,
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])


@dataclass
class NodeNetworkTorchConfig(TorchConfig):
    """TorchConfig whose workers bind their process group, and rank 0 its store, to their node's Ray IP."""

    @property
    def backend_cls(self):
        return NodeNetworkBackend

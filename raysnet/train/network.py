"""Which network interface the Ray Train workers' process group uses (issue 14).

Gloo, unless GLOO_SOCKET_IFNAME names an interface, binds to the address the machine's hostname
resolves to. Where the hostname resolves to 127.0.0.1 (Debian's and many images' /etc/hosts,
containers, this test machine) every worker advertises loopback, and a group spread over two
nodes fails in `connectFullMesh` ("remote=[127.0.0.1]:…"). Ray knows the right address: the
node's IP, which Ray Train also gives rank 0's TCP store as MASTER_ADDR. So each worker, before
its process group starts, sets GLOO_SOCKET_IFNAME to the interface that holds its node's IP:
the node's network on a cluster, loopback on a local run (where Ray's node IP is 127.0.0.1).
A GLOO_SOCKET_IFNAME the user set is kept.

`NodeNetworkTorchConfig` is the hook: Ray Train's TorchConfig, whose backend runs
`use_node_interface` on every worker before its own set-up (which calls init_process_group).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
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


def use_node_interface() -> str | None:
    """On a Ray Train worker: point Gloo at the interface of this node's Ray IP. -> the interface"""
    import ray

    name = interface_of(ray.util.get_node_ip_address())
    if name and not os.environ.get("GLOO_SOCKET_IFNAME"):
        os.environ["GLOO_SOCKET_IFNAME"] = name
    return os.environ.get("GLOO_SOCKET_IFNAME")


class NodeNetworkBackend(TorchConfig().backend_cls):  # Ray's torch backend (its class is private)
    def on_start(self, worker_group, backend_config):
        worker_group.execute(use_node_interface)
        super().on_start(worker_group, backend_config)


@dataclass
class NodeNetworkTorchConfig(TorchConfig):
    """TorchConfig whose workers bind their process group to their node's Ray IP."""

    @property
    def backend_cls(self):
        return NodeNetworkBackend

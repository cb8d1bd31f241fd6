"""A multi-node Ray on one machine: the tests' cluster, also run by ``make cluster-test``.

Each node is a ``ray start --block`` in its own Linux network namespace, with an address on a
bridge this harness creates in 198.18.0.0/15 (reserved for network benchmarks, never routed off
the machine), and in its own mount and UTS namespaces: private ``/tmp``, ``/dev/shm`` and
``HOME`` (Ray's session folder and object store, every cache), so no file one node writes is
visible on another, and its own host name. Only the installed project is shared, as a container
image is. One S3 server (moto) on the bridge's address, in this process, is the only shared
storage. A command runs "on" a node by entering its namespaces (``nsenter``); the driver runs on
the head's machine, as a user's would.

Needs root and iproute2. Every name carries a tag made from this process's id; :meth:`stop`
kills the processes in each namespace (``ip netns pids``), deletes the namespaces and the
bridge, and :meth:`leftovers` names anything of this cluster still there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
TOOLS = ("ip", "nsenter", "unshare", "mount")


def unavailable() -> str | None:
    """Why the harness cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    return f"needs {', '.join(missing)}" if missing else None


@dataclass
class Node:
    name: str  # its network namespace
    ip: str
    cpus: int
    process: subprocess.Popen | None = None
    log: Path | None = None


@dataclass
class LocalCluster:
    """One Ray node per entry of ``cpus`` (its logical CPUs), the first the head."""

    cpus: list[int]
    env: dict[str, str] = field(default_factory=dict)  # every node's environment, beside PATH
    work: Path = Path("/tmp")  # where node logs go (in this process's view)
    tag: str = field(default_factory=lambda: f"ms{os.getpid() % 100000}")
    endpoint: str = ""  # the shared S3 server's URL, once started
    nodes: list[Node] = field(default_factory=list)

    @property
    def subnet(self) -> str:
        return f"198.18.{os.getpid() % 250}"

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    @property
    def bridge_ip(self) -> str:
        return f"{self.subnet}.1"

    @property
    def address(self) -> str:
        return f"{self.nodes[0].ip}:6379"

    def start(self, timeout: float = 120) -> None:
        self.create_bridge()
        self.start_nodes(timeout)

    def create_bridge(self) -> None:
        """The bridge and its address in this namespace (where a shared server may then listen)."""
        ip(["link", "add", self.bridge, "type", "bridge"])
        ip(["addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge])
        ip(["link", "set", self.bridge, "up"])

    def start_nodes(self, timeout: float = 120) -> None:
        """Each node's namespaces, its link to the bridge and its Ray; waits until all have joined."""
        for index, cpus in enumerate(self.cpus):
            node = Node(f"{self.tag}n{index}", f"{self.subnet}.{10 + index}", cpus)
            self.nodes.append(node)
            ip(["netns", "add", node.name])
            veth = f"{self.tag}v{index}"
            ip(["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", node.name])
            ip(["link", "set", veth, "master", self.bridge, "up"])
            for args in (["addr", "add", f"{node.ip}/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                         ["link", "set", "lo", "up"]):
                ip(["-n", node.name, *args])
            self._start_ray(node, head=index == 0)
        self.wait_for_nodes(len(self.cpus), timeout)

    def _start_ray(self, node: Node, head: bool) -> None:
        role = ["--head", "--port", "6379", "--include-dashboard", "false"] if head else ["--address", self.address]
        ray = [str(BIN / "ray"), "start", "--block", "--node-ip-address", node.ip, "--num-cpus", str(node.cpus),
               "--disable-usage-stats", *role]
        # a private /tmp, /dev/shm and HOME, and the node's own host name, then Ray in the foreground
        setup = (f"mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /dev/shm && mkdir -p /tmp/home "
                 f"&& hostname {node.name} && exec \"$@\"")
        node.log = self.work / f"{node.name}.log"
        with open(node.log, "wb") as log:
            node.process = subprocess.Popen(
                ["ip", "netns", "exec", node.name, "unshare", "--mount", "--uts", "--propagation", "private",
                 "sh", "-c", setup, "sh", *ray], env=self.node_env(), stdout=log, stderr=subprocess.STDOUT)

    def node_env(self) -> dict[str, str]:
        return {"PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp/home", "TMPDIR": "/tmp",
                "LANG": "C.UTF-8", **self.env}

    def run(self, node: int, command: list[str], timeout: float = 600, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``command`` on node ``node`` (its network, mount and host name), with the nodes'
        environment; output captured as text."""
        target = self.nodes[node].process.pid
        done = subprocess.run(["nsenter", "-t", str(target), "-n", "-m", "-u", "--", *command],
                              env={**self.node_env(), **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"on {self.nodes[node].name}: {' '.join(command)} exited {done.returncode}\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def wait_for_nodes(self, count: int, timeout: float) -> None:
        script = ("import ray, sys, time\n"
                  f"ray.init(address='{self.address}', logging_level='ERROR', log_to_driver=False)\n"
                  f"deadline = time.time() + {timeout}\n"
                  f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
                  "    if time.time() > deadline: sys.exit('nodes missing')\n"
                  "    time.sleep(0.5)\n")
        deadline = time.time() + timeout
        while True:  # the head's GCS takes a while to listen
            done = self.run(0, [str(BIN / "python"), "-c", script], timeout=timeout, check=False)
            if done.returncode == 0:
                return
            if time.time() > deadline or any(n.process.poll() is not None for n in self.nodes):
                logs = "\n".join(f"--- {n.name}\n{n.log.read_text()[-2000:]}" for n in self.nodes if n.log)
                raise RuntimeError(f"the cluster did not come up: {done.stderr[-2000:]}\n{logs}")
            time.sleep(1)

    def stop(self) -> None:
        """Kill every process in this cluster's namespaces, then remove the namespaces and bridge."""
        names = [node.name for node in self.nodes]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in (pid for name in names for pid in namespace_pids(name)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + 5
            while any(namespace_pids(name) for name in names) and time.time() < deadline:
                time.sleep(0.2)
        for index, node in enumerate(self.nodes):
            if node.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.process.wait(timeout=5)
            ip(["link", "del", f"{self.tag}v{index}"], check=False)  # both ends, now (a namespace's go later)
            ip(["netns", "del", node.name], check=False)
        ip(["link", "del", self.bridge], check=False)

    def leftovers(self) -> list[str]:
        """This cluster's namespaces, links and processes still present."""
        found = [f"namespace {line.split()[0]}" for line in ip(["netns", "list"]).splitlines()
                 if line.startswith(self.tag)]
        found += [f"link {line.split(':')[1].strip()}" for line in ip(["-o", "link"]).splitlines()
                  if f" {self.tag}" in line]
        found += [f"process {node.process.pid}" for node in self.nodes
                  if node.process is not None and node.process.poll() is None]
        return found


def ip(args: list[str], check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def namespace_pids(name: str) -> list[int]:
    return [int(pid) for pid in ip(["netns", "pids", name], check=False).split()]


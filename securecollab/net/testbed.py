"""Network profiles: each party on its own host (a network namespace) behind a link of stated bandwidth.

`Testbed(profile, hosts)` builds, for every named host, a namespace with one
veth link to a bridge in a hub namespace, and shapes both directions of the
link with `tc tbf` (uplink: the host's egress; downlink: the bridge port's
egress). One host may stay in this process's own namespace (`here=`), so an
in-process client (the HE benchmark's) sits behind a shaped link too. Leaving
the context deletes every namespace and link it made, also after a failure.

This kernel has no `netem`: links get bandwidth, not delay. What delay would add is
modelled instead (`latency_model`): the measured round trips of a protocol step
times a profile's stated round-trip time.

`Placement` is the picklable view the launchers use: where a party binds,
the address its peers dial, the command prefix that starts it on its host, and
`enter()` for a freshly started child process (before it opens any socket).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
_BUILT = itertools.count()


@dataclass(frozen=True)
class Link:
    up_mbit: float
    down_mbit: float


@dataclass(frozen=True)
class Profile:
    name: str
    client: Link | None  # None: loopback, no testbed
    server: Link | None
    rtt_ms: float  # stated, not emulated: used only by the latency model
    summary: str


PROFILES = {
    "loopback": Profile("loopback", None, None, 0.0, "every party on this host's loopback, no shaping"),
    "lan": Profile("lan", Link(1000, 1000), Link(1000, 1000), 0.5, "every host on a 1 Gbit/s link"),
    "wan": Profile("wan", Link(100, 100), Link(100, 100), 40.0, "every host on a 100 Mbit/s link"),
    "uplink": Profile("uplink", Link(20, 100), Link(1000, 1000), 30.0,
                      "clients on 20 Mbit/s up / 100 Mbit/s down access links, servers on 1 Gbit/s"),
}


class NetworkUnavailable(RuntimeError):
    """The testbed cannot be built here (not root, no `ip`/`tc`, namespaces refused)."""


@dataclass
class Placement:
    """Where each party runs. Empty (the default): everyone on loopback of this host."""
    namespaces: dict[str, str] = field(default_factory=dict)  # party -> netns ('' : this process's own)
    addresses: dict[str, str] = field(default_factory=dict)   # party -> IP on the testbed
    profile: str = "loopback"
    env: dict[str, str] = field(default_factory=dict)  # for every process started on the testbed

    def _check(self, party: str) -> None:
        if self.addresses and party not in self.addresses:
            raise KeyError(f"party {party!r} has no host on the {self.profile} testbed "
                           f"(hosts: {', '.join(sorted(self.addresses))})")

    def bind(self, party: str) -> str:
        self._check(party)
        return self.addresses.get(party, "127.0.0.1")

    def address(self, party: str) -> str:
        self._check(party)
        return self.addresses.get(party, "localhost")

    def command(self, party: str, cmd: list[str]) -> list[str]:
        self._check(party)
        ns = self.namespaces.get(party)
        return ["ip", "netns", "exec", ns, *cmd] if ns else cmd

    def enter(self, party: str) -> None:
        """Move the calling thread into the party's namespace; call first thing in a new process, so that every
        thread and socket it makes afterwards is there."""
        self._check(party)
        ns = self.namespaces.get(party)
        if not ns:
            return
        with open(f"/run/netns/{ns}") as f:
            if ctypes.CDLL(None, use_errno=True).setns(f.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {ns} failed")

    def hosts(self) -> list[str]:
        return sorted(set(self.addresses.values()))


LOOPBACK = Placement()


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetworkUnavailable(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.returncode}")


def _shape(ns: str | None, dev: str, mbit: float) -> None:
    # burst: 10 ms at the rate, and at least a 64 KB segment (veth passes GSO packets that large)
    burst = max(int(mbit * 1e6 / 8 * 0.01), 128 * 1024)
    _run(*(["ip", "netns", "exec", ns] if ns else []), "tc", "qdisc", "add", "dev", dev, "root", "tbf",
         "rate", f"{mbit}mbit", "burst", str(burst), "latency", "200ms")


class Testbed:
    """One namespace per host, each on its own shaped veth link to a bridge; see the module docstring."""

    def __init__(self, profile: Profile, clients: list[str], servers: list[str], here: str | None = None):
        if profile.client is None:
            raise ValueError("the loopback profile needs no testbed")
        if len(clients) + len(servers) > 250:
            raise ValueError("a testbed holds at most 250 hosts (one /24)")
        self.profile, self.here = profile, here
        self.roles = {**{c: profile.client for c in clients}, **{s: profile.server for s in servers}}
        n = next(_BUILT)  # several testbeds of one process at once get distinct names and subnets
        key = (os.getpid() * 31 + n) % 12_800
        self.prefix = f"sc{os.getpid() % 100_000}{chr(97 + n % 26)}"
        self.subnet = f"10.{200 + key // 256}.{key % 256}"
        self.hub = f"{self.prefix}-hub"
        self.made: list[str] = []  # namespaces made, for tear-down
        self.links: list[str] = []  # veth ends made in this namespace (most move out: deleting those fails, harmlessly)
        # Servers keep serving a while before they stop, so that their last replies cross the slow links whole:
        # long enough for 100 MB from a server down to a client.
        linger = max(1.0, 800 / min(profile.server.up_mbit, profile.client.down_mbit))
        self.placement = Placement(profile=profile.name, env={"SECURECOLLAB_LINGER_S": f"{linger:g}"})

    def __enter__(self) -> Placement:
        if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")):
            raise NetworkUnavailable(f"the {self.profile.name} network profile runs parties in network namespaces "
                                     "joined by shaped veth links: it needs root and iproute2's `ip` and `tc` "
                                     "(use --network loopback otherwise)")
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self.placement

    def _build(self) -> None:
        _run("ip", "netns", "add", self.hub)
        self.made.append(self.hub)
        _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i, (party, link) in enumerate(self.roles.items(), start=2):
            ns = "" if party == self.here else f"{self.prefix}-h{i}"
            inner, outer, ip = f"{self.prefix}h{i}a", f"{self.prefix}h{i}b", f"{self.subnet}.{i}"
            _run("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
            self.links.append(inner)
            if ns:
                _run("ip", "netns", "add", ns)
                self.made.append(ns)
                _run("ip", "link", "set", inner, "netns", ns)
            _run("ip", "link", "set", outer, "netns", self.hub)
            _run("ip", "-n", self.hub, "link", "set", outer, "master", "br0", "up")
            at = ["ip", "netns", "exec", ns] if ns else []
            _run(*at, "ip", "addr", "add", f"{ip}/24", "dev", inner)
            _run(*at, "ip", "link", "set", inner, "up")
            if ns:
                _run(*at, "ip", "link", "set", "lo", "up")
            _shape(ns or None, inner, link.up_mbit)
            _shape(self.hub, outer, link.down_mbit)
            self.placement.namespaces[party] = ns
            self.placement.addresses[party] = ip

    def close(self) -> None:
        """Delete what was made; deleting a namespace deletes its ends of the veth pairs, and with them the peers."""
        for link in self.links:  # the here host's, and any a failure left before it moved
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        self.links.clear()
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def network_description(profile: Profile) -> dict:
    """What a benchmark's JSON says of its network."""
    if profile.client is None:
        return {"profile": "loopback", "summary": profile.summary, "emulated_delay": False}
    return {"profile": profile.name, "summary": profile.summary, "stated_rtt_ms": profile.rtt_ms,
            "emulated_delay": False,
            "client_link_mbit": {"up": profile.client.up_mbit, "down": profile.client.down_mbit},
            "server_link_mbit": {"up": profile.server.up_mbit, "down": profile.server.down_mbit},
            "shaping": "tc tbf on both ends of each host's veth link to one bridge"}


def latency_model(round_trips_per_step: float, profile: Profile) -> dict:
    """What the stated round-trip time would add per step: no delay is emulated here (no netem in this kernel)."""
    return {"round_trips_per_step": round_trips_per_step, "stated_rtt_ms": profile.rtt_ms,
            "added_s_per_step": round_trips_per_step * profile.rtt_ms / 1000}


def testbed_or_loopback(profile: str, clients: list[str], servers: list[str], here: str | None = None):
    """A context giving a Placement: the loopback one, or a testbed built for the profile."""
    from contextlib import nullcontext
    if profile not in PROFILES:
        raise ValueError(f"unknown network profile {profile!r}; choose from {', '.join(PROFILES)}")
    p = PROFILES[profile]
    return nullcontext(LOOPBACK) if p.client is None else Testbed(p, clients, servers, here=here)

"""Launching the parties of a protocol as separate OS processes on this machine (demo, tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from securecollab.net.certs import make_certs
from securecollab.net.testbed import LOOPBACK, Placement


def securecollab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "securecollab", *args]


class ProcessGroup:
    """Starts child processes with logs to files; on exit, stops whatever is still running."""

    def __init__(self, log_dir: Path, placement: Placement = LOOPBACK):
        self.log_dir = Path(log_dir)
        self.placement = placement  # which host each process starts on (a network profile's namespace)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, tuple[list[str], dict | None]] = {}
        self.restart_on: dict[str, tuple[int, ...]] = {}
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self, name: str, cmd: list[str], env: dict | None = None, *, append_log: bool = False,
              restart_on: tuple[int, ...] = ()) -> subprocess.Popen:
        """Start `name`; if it later exits with a code in `restart_on`, it is started again (appending to its log)."""
        log = open(self.log_dir / f"{name}.log", "ab" if append_log else "wb")
        # Many parties share few cores: one math thread each avoids oversubscription.
        proc = subprocess.Popen(self.placement.command(name, cmd), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                env={"OMP_NUM_THREADS": "1", **os.environ, **self.placement.env, **(env or {})})
        log.close()
        self.procs[name] = proc
        self.commands[name] = (cmd, env)
        if restart_on:
            self.restart_on[name] = restart_on
            self._supervise()
        return proc

    def _supervise(self) -> None:
        """Like a container restart policy: a watcher thread restarts processes that asked for it."""
        if self._watcher is not None:
            return

        def watch():
            while not self._stopping.wait(0.2):
                for name, codes in list(self.restart_on.items()):
                    if self.procs[name].poll() in codes:
                        try:
                            self.restart(name)
                        except OSError:  # tried again on the next tick
                            pass

        self._watcher = threading.Thread(target=watch, daemon=True)
        self._watcher.start()

    def restart(self, name: str, env: dict | None = None) -> subprocess.Popen:
        """Start `name` again with the command it was started with (after it died or was killed);
        `env`, if given, replaces the environment it was started with."""
        if self.procs[name].poll() is None:
            raise RuntimeError(f"{name} is still running")
        cmd, old_env = self.commands[name]
        return self.start(name, cmd, old_env if env is None else env, append_log=True,
                          restart_on=self.restart_on.get(name, ()))

    def start_service(self, name: str, cmd: list[str], *, timeout: float = 120.0,
                      env: dict | None = None, wait: bool = True) -> int | None:
        """Start a server given `--port 0`; returns the port it bound (read from its port file)."""
        port_file = self.log_dir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        self.start(name, [*cmd, "--port", "0", "--port-file", str(port_file)], env=env)
        return self.wait_port(name, timeout) if wait else None

    def wait_port(self, name: str, timeout: float = 120.0) -> int:
        """The port a started service bound, once it serves."""
        return self.wait_ports([name], timeout)[0]

    def wait_ports(self, names: list[str], timeout: float = 120.0, watch: tuple[str, ...] = ()) -> list[int]:
        """The ports of services started together that serve only once they all run (compute parties
        forming their world), as soon as every one serves. Fails at once, naming it, when one of them or of
        `watch` exits for good first: its peers would otherwise wait for it until the timeout."""
        deadline, ports = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            for name in names:
                if name not in ports and (self.log_dir / f"{name}.port").exists():
                    ports[name] = int((self.log_dir / f"{name}.port").read_text())
            if len(ports) == len(names):
                return [ports[name] for name in names]
            for name in (*names, *watch):
                code = self.procs[name].poll()
                if name not in ports and code is not None and code not in self.restart_on.get(name, ()):
                    raise RuntimeError(f"{name} exited with {code} before serving:\n{self.tail(name)}")
            time.sleep(0.05)
        waiting = [name for name in names if name not in ports]
        raise TimeoutError(f"{', '.join(waiting)} did not start serving within {timeout:.0f}s:\n"
                           + "\n".join(self.tail(name) for name in waiting))

    def wait(self, name: str, timeout: float) -> int:
        try:
            code = self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{name} still running after {timeout:.0f}s:\n{self.tail(name)}") from None
        if code != 0:
            raise RuntimeError(f"{name} exited with {code}:\n{self.tail(name)}")
        return code

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop_all(self, grace: float = 5.0) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self):
        # SIGTERM's default action ends this process at once, leaving every child serving: turned into
        # SystemExit here, it unwinds through __exit__, which stops them (only the main thread may set it)
        self._previous_sigterm = None
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def __exit__(self, *exc):
        try:
            self.stop_all()
        finally:
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
        return False


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def ensure_certs(cert_dir: Path, parties: list[str], placement: Placement = LOOPBACK) -> Path:
    """Issue any missing party certificates from the project CA in cert_dir; on a testbed, issue them all again,
    naming every host address of this testbed (its addresses change from one testbed to the next)."""
    missing = [p for p in parties if placement.addresses or not (cert_dir / f"{p.split(':')[0]}.pem").exists()]
    if missing:
        make_certs(cert_dir, missing, hosts=placement.hosts())
    return cert_dir

"""Starting services as processes: ports chosen in advance, and services that serve only together."""

from __future__ import annotations

import sys
import time

import pytest

from securecollab.launch import ProcessGroup
from securecollab.runs.training import free_port


def test_free_ports_are_below_the_ephemeral_range_and_never_repeat():
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50 and all(1024 <= p < low for p in ports)


def test_launchers_side_by_side_draw_ports_from_parts_of_their_own(monkeypatch):
    """SECURECOLLAB_PORT_SLICE=i/n (the test workers set it): the i-th of n disjoint parts of the range."""
    from securecollab.runs.training import PORT_SLICE_ENV, port_range
    monkeypatch.delenv(PORT_SLICE_ENV, raising=False)
    whole = port_range()
    parts = []
    for i in range(3):
        monkeypatch.setenv(PORT_SLICE_ENV, f"{i}/3")
        parts.append(port_range())
        assert all(parts[-1][0] <= free_port() < parts[-1][1] for _ in range(20))
    assert whole[0] == parts[0][0] and parts[0][1] == parts[1][0] and parts[1][1] == parts[2][0] <= whole[1]
    assert parts[2][1] - parts[0][0] > 0.99 * (whole[1] - whole[0])
    for bad in ("3/3", "x/2", "1", "0/1000"):  # not a part (or parts too small to draw from): the whole range
        monkeypatch.setenv(PORT_SLICE_ENV, bad)
        assert port_range() == whole


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_waiting_for_services_that_serve_together_fails_at_once_when_one_of_them_dies(tmp_path):
    with ProcessGroup(tmp_path / "logs") as group:
        serves = f"import time; open({str(tmp_path / 'logs' / 'a.port')!r}, 'w').write('1234'); time.sleep(60)"
        group.start("a", _python(serves))
        group.start("b", _python("import time; time.sleep(60)"))  # waits for a peer that never comes
        group.start("dealer", _python("import sys; print('cannot bind'); sys.exit(3)"))
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="dealer exited with 3 before serving") as err:
            group.wait_ports(["a", "b"], timeout=60, watch=("dealer",))
        assert time.monotonic() - started < 10 and "cannot bind" in str(err.value)
    with ProcessGroup(tmp_path / "logs2") as group:
        for name in ("a", "b"):
            group.start(name, _python(f"import time; time.sleep(0.5); "
                                      f"open({str(tmp_path / 'logs2' / (name + '.port'))!r}, 'w').write('7'); "
                                      f"time.sleep(60)"))
        assert group.wait_ports(["a", "b"], timeout=30) == [7, 7]


def test_a_launcher_stopped_with_sigterm_stops_the_processes_it_started(tmp_path):
    """`kill PID` of a sweep or benchmark must not leave its parties serving (SIGTERM's default action
    would end the launcher without unwinding its ProcessGroup)."""
    import os
    import signal
    import subprocess

    pid_file = tmp_path / "child.pid"
    launcher = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from securecollab.launch import ProcessGroup\n"
        f"with ProcessGroup(Path({str(tmp_path)!r}) / 'logs') as group:\n"
        "    child = group.start('child', [sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"    Path({str(pid_file)!r}).write_text(str(child.pid))\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher])
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):  # reaped by the launcher: gone, not a zombie
        os.kill(child, 0)

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

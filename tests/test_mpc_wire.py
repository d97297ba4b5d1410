"""What a network observer between two compute parties sees of the MPC.

Over the grpc transport (mutual TLS) a recording TCP proxy on the link between party 0 and party 1
captures the whole MPC of a norm-bounded round, and no 8-byte word of any share a party holds,
any value it sends during the MPC (its shares of opened values, its part of each reveal) or its
result share appears in the capture; meanwhile an intruder with a client's certificate, or with a
certificate of another CA, keeps knocking at every party and the dealer, is refused, and the round
completes. Positive control: the same round over gloo, captured on the loopback interface (needs
root for a packet socket), shows those words in the clear.
"""

from __future__ import annotations

import os
import socket
import threading

import grpc
import numpy as np
import pytest

from tests.test_mpc import SCALE, _reconstruct, _run_round, _updates_with_norms

pytestmark = pytest.mark.timeout(180)


class RecordingProxy:
    """Forwards every connection to 127.0.0.1:target and keeps all bytes, both directions."""

    def __init__(self, target: int):
        self.target, self.data, self.lock = target, bytearray(), threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst):
        try:
            while chunk := src.recv(1 << 16):
                with self.lock:
                    self.data += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def secret_words(workdir, n_parties: int) -> np.ndarray:
    """Every int64 word of the parties' input shares, what they sent during the MPC, and their result
    shares; small values (counts, flags, zeros) are left out, they could match by chance."""
    arrays = [np.load(workdir / f"{kind}{r}.npy").reshape(-1) for r in range(n_parties) for kind in ("in", "sent", "out")]
    words = np.unique(np.concatenate(arrays))
    return words[np.abs(words) >= 2**40]


def found_in(capture: bytes, words: np.ndarray) -> np.ndarray:
    """Which words occur in the capture at any byte offset (a binary search per 8 bytes: no sort of the
    capture, whose size is the traffic's)."""
    raw = np.frombuffer(bytes(capture), dtype=np.uint8)
    order = np.argsort(words)
    table = words[order]
    found = np.zeros(len(words), dtype=bool)
    for offset in range(8):
        n = (len(raw) - offset) // 8
        if n <= 0 or not table.size:
            continue
        view = raw[offset:offset + 8 * n].view("<i8")
        at = np.minimum(np.searchsorted(table, view), table.size - 1)
        found[order[at[table[at] == view]]] = True
    return found


class Intruder:
    """Keeps calling every MPC endpoint and the dealer with a client's certificate and with another CA's.

    A fresh channel for every call: a channel that failed to connect (an endpoint not up yet) backs off
    for longer and longer, and could miss the whole round."""

    def __init__(self, certs, other, ports):
        from securecollab.net.certs import TlsFiles
        self.codes, self.stop = {"client-0": [], "other-ca": []}, threading.Event()
        self.calls = []
        for base, who in ((certs, "client-0"), (other, "other-ca")):
            tls = TlsFiles.for_party(base, "party-1" if who == "other-ca" else who)
            for i, port in enumerate(ports):
                dealer = i == len(ports) - 1
                self.calls.append((who, tls, f"localhost:{port}", "dealer" if dealer else f"party-{i}", dealer))
        # one thread per (identity, endpoint): a call left unanswered by one must not starve the others
        self.threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in self.calls]

    def start(self):
        for t in self.threads:
            t.start()

    def join(self, timeout: float):
        for t in self.threads:
            t.join(timeout)

    @staticmethod
    def _call(tls, target, name, dealer):
        from securecollab.generated.v1 import mpc_pb2 as pb
        from securecollab.generated.v1 import mpc_pb2_grpc as pb_grpc
        from securecollab.net.transport import make_channel
        with make_channel(target, tls=tls, server_name=name) as channel:
            if dealer:
                pb_grpc.DealerStub(channel).Seed(pb.SeedRequest(world=bytes(32), world_size=3), timeout=1)
            else:
                pb_grpc.MpcPeerStub(channel).Hello(pb.MpcHello(world_size=3, nonce=bytes(32)), timeout=1)

    def _run(self, call):
        who, *args = call
        while not self.stop.wait(0.1):
            try:
                self._call(*args)
                self.codes[who].append("OK")
            except grpc.RpcError as e:
                self.codes[who].append(e.code().name)


def test_the_tls_link_between_two_parties_shows_no_word_of_the_mpc_and_intruders_are_refused(tmp_path):
    from securecollab.net.certs import make_certs
    rng = np.random.default_rng(7)
    norms = rng.uniform(0.2, 0.9, size=10)
    norms[3] = 50.0
    updates = _updates_with_norms(norms, 1000, rng)
    proxies, intruder = [], []

    def route_0_1_through_proxies(ports):
        (tmp_path / "record").touch()
        to_1, to_0 = RecordingProxy(ports[1]), RecordingProxy(ports[0])
        proxies.extend([to_1, to_0])
        (tmp_path / "peers0.txt").write_text(f"localhost:{ports[0]},localhost:{to_1.port},localhost:{ports[2]}")
        (tmp_path / "peers1.txt").write_text(f"localhost:{to_0.port},localhost:{ports[1]},localhost:{ports[2]}")
        make_certs(tmp_path / "certs", ["client-0"])
        make_certs(tmp_path / "other-ca", ["party-1"])
        intruder.append(Intruder(tmp_path / "certs", tmp_path / "other-ca", ports))
        intruder[0].start()

    try:
        out = _run_round(tmp_path, updates, 3, norm_bound=1.0, transport="grpc", before_start=route_0_1_through_proxies)
    finally:
        for p in proxies:
            p.close()
        if intruder:
            intruder[0].stop.set()
            intruder[0].join(10)
    np.testing.assert_allclose(_reconstruct(out), np.delete(updates, 3, axis=0).sum(0), rtol=0, atol=10 / SCALE)
    capture = proxies[0].data + proxies[1].data
    assert len(capture) > 200_000, "the MPC did not go through the proxies"
    assert capture[:2] == b"\x16\x03"  # a TLS handshake record: nothing before TLS
    words = secret_words(tmp_path, 3)
    assert len(words) > 50_000  # input shares, opened-value shares, reveals and results
    assert found_in(capture, words).sum() == 0
    # the intruder got nowhere: a client's certificate is refused by every endpoint (no answer at all only
    # while an endpoint was not up yet: the channel retries; CANCELLED when an endpoint stops, at the end of
    # the run, with the intruder's call in flight); another CA's never completes a TLS handshake
    client, other = set(intruder[0].codes["client-0"]), set(intruder[0].codes["other-ca"])
    no_answer = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}
    assert "PERMISSION_DENIED" in client and client <= {"PERMISSION_DENIED", *no_answer}, client
    assert other and other <= no_answer, other


class LoopbackCapture:
    """The TCP payloads on the loopback interface (a packet socket: root only), each segment once.

    A packet socket on lo sees every frame twice (sent, then received): only the received copy is kept,
    and only what TCP carried (no Ethernet, IP or TCP header), so the capture is the size of the data."""

    PACKET_OUTGOING = 4

    def __init__(self):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 26)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self.chunks, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def _run(self):
        while not self.stop.is_set():
            try:
                frame, address = self.sock.recvfrom(1 << 17)
            except socket.timeout:
                continue
            if address[2] != self.PACKET_OUTGOING and (payload := tcp_payload(frame)):
                self.chunks.append(payload)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def tcp_payload(frame: bytes) -> bytes:
    """What a TCP segment in an Ethernet frame (IPv4 or IPv6) carries; b"" for anything else."""
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == 0x0800 and frame[23] == 6:  # IPv4, TCP
        ip = 14 + (frame[14] & 0x0F) * 4
        end = 14 + int.from_bytes(frame[16:18], "big")
    elif ethertype == 0x86DD and frame[20] == 6:  # IPv6, TCP (no extension headers on loopback)
        ip = 14 + 40
        end = ip + int.from_bytes(frame[18:20], "big")
    else:
        return b""
    return frame[ip + (frame[ip + 12] >> 4) * 4:end]


@pytest.mark.skipif(os.geteuid() != 0, reason="capturing loopback traffic needs a packet socket (root)")
def test_positive_control_over_gloo_the_same_words_cross_the_link_in_the_clear(tmp_path):
    rng = np.random.default_rng(7)
    norms = rng.uniform(0.2, 0.9, size=10)
    norms[3] = 50.0
    updates = _updates_with_norms(norms, 1000, rng)
    capture = LoopbackCapture()
    try:
        (tmp_path / "record").touch()
        out = _run_round(tmp_path, updates, 3, norm_bound=1.0, transport="gloo")
    finally:
        capture.close()
    np.testing.assert_allclose(_reconstruct(out), np.delete(updates, 3, axis=0).sum(0), rtol=0, atol=10 / SCALE)
    sent = np.unique(np.concatenate([np.load(tmp_path / f"sent{r}.npy") for r in range(3)]))
    sent = sent[np.abs(sent) >= 2**40]
    found = found_in(capture.data, sent)
    # gloo forwards partial sums in its collectives, so not every word crosses as sent; most do
    assert found.mean() > 0.3, found.mean()

"""`securecollab demo-web`: the HE client serves a local page where a person draws or picks a digit.

This process is the client: it holds the CKKS secret key, encrypts what the page sends, queries the HE
server over mutual TLS and decrypts the logits. The page never talks to the HE server, and the HE server
never sees the page. Flask routes the page's few JSON calls; waitress serves them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from flask import Flask, jsonify, request, send_from_directory

from securecollab.net.certs import TlsFiles
from securecollab.transcript import TranscriptRecorder
from services.he_client import HEClient

log = logging.getLogger(__name__)
PAGE_DIR = Path(__file__).parent / "web"
# Codes after which this client's channel or session is gone: the next request connects afresh.
_RECONNECT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED}


class FrontError(Exception):
    """What the page shows instead of a result, with the HTTP status its JSON carries."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class HEFront:
    """The page's side of one HE client: connects on demand, one query at a time, reconnects after a failure."""

    def __init__(self, target: str, *, tls: TlsFiles, party_id: str, server_name: str | None = None,
                 examples: tuple[np.ndarray, np.ndarray] | None = None,
                 transcript: TranscriptRecorder | None = None, connect_timeout: float = 10.0):
        self.target, self.tls, self.party_id, self.server_name = target, tls, party_id, server_name
        self.examples = examples  # (images, labels) the page offers to pick from
        self.transcript = transcript
        self.connect_timeout = connect_timeout
        self._client: HEClient | None = None
        self._lock = threading.Lock()  # one query at a time: the client's counters and session are not shared

    # -- connection ---------------------------------------------------------------------------------
    def _connected(self) -> HEClient:
        if self._client is None:
            client = None
            try:
                client = HEClient(self.target, tls=self.tls, party_id=self.party_id, server_name=self.server_name,
                                  transcript=self.transcript, connect_timeout=self.connect_timeout)
                client.open_session()
            except BaseException:
                if client is not None:
                    client.close()
                raise
            self._client = client
        return self._client

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _call(self, fn):
        """fn(client) with the HE server's failures turned into what the page should say."""
        for attempt in (0, 1):
            try:
                return fn(self._connected())
            except TimeoutError as e:
                self._drop()
                raise FrontError(503, f"the HE server at {self.target} is not reachable ({e}): is it running, "
                                      "and is this the right address?") from None
            except grpc.RpcError as e:
                code = e.code()
                if code in _RECONNECT:
                    self._drop()
                if code == grpc.StatusCode.NOT_FOUND and attempt == 0:
                    continue  # the server evicted or forgot our session: open a new one, once
                if code == grpc.StatusCode.UNAVAILABLE:
                    raise FrontError(503, f"the HE server at {self.target} is not reachable: {e.details()}") from None
                raise FrontError(502, f"the HE server refused: {code.name}: {e.details()}") from None
            except ValueError as e:  # e.g. it describes parameters this client cannot build
                self._drop()
                raise FrontError(502, f"cannot work with the HE server at {self.target}: {e}") from None
        raise AssertionError("unreachable")

    # -- what the page asks -------------------------------------------------------------------------
    def status(self) -> dict:
        with self._lock:
            def describe(client: HEClient) -> dict:
                d = client.description
                return {"model": d.model, "input_shape": list(d.input_shape), "num_classes": d.num_classes,
                        "ckks": d.ckks, "session": {k: client.session[k] for k in
                                                    ("context_bytes", "keygen_s", "server_setup_s", "slot_count")}}
            return {"target": self.target, "party": self.party_id, **self._call(describe)}

    def example_list(self) -> list[dict]:
        if self.examples is None:
            return []
        images, labels = self.examples
        return [{"index": i, "label": int(labels[i]), "pixels": images[i].reshape(-1).tolist()}
                for i in range(len(images))]

    def classify(self, x: np.ndarray, *, compare_plain: bool) -> dict:
        """Encrypt x, have the server evaluate it, decrypt; with the plain API's answer if asked."""
        with self._lock:
            def query(client: HEClient) -> dict:
                shape = client.description.input_shape
                if x.size != math.prod(shape):
                    raise FrontError(400, f"the model takes {math.prod(shape)} values {list(shape)}, got {x.size}")
                xs = x.reshape(shape).astype(np.float32)
                before, t = client.meter.snapshot()["by_method"], client.single
                server0, enc0, dec0 = t.server_s, t.encrypt_s, t.decrypt_s
                t0 = time.perf_counter()
                logits = client.infer(xs)
                end_to_end = time.perf_counter() - t0
                after = client.meter.snapshot()["by_method"]
                sent, received = (_delta(before[d], after[d], "/Infer") for d in ("sent", "received"))
                out = {"pixels": xs.reshape(-1).tolist(), "shape": list(shape),
                       "prediction": int(np.argmax(logits)), "logits": logits.tolist(),
                       "bytes_sent": sent, "bytes_received": received, "server_s": t.server_s - server0,
                       "encrypt_s": t.encrypt_s - enc0, "decrypt_s": t.decrypt_s - dec0, "end_to_end_s": end_to_end}
                if compare_plain:
                    plain = client.predict_plain(xs[None])[0]
                    out["plain"] = {"prediction": int(np.argmax(plain)), "logits": plain.tolist(),
                                    "max_abs_difference": float(np.abs(plain - logits).max())}
                return out
            return self._call(query)

    def close(self) -> None:
        with self._lock:
            self._drop()


def _delta(before: dict, after: dict, suffix: str) -> int:
    return sum(v - before.get(k, 0) for k, v in after.items() if k.endswith(suffix))


def parse_query(body, front: HEFront) -> np.ndarray:
    """The page's request: {"pixels": [...]} in [0, 1], or {"index": i} of an offered test image."""
    if not isinstance(body, dict):
        raise FrontError(400, "send a JSON object: {\"pixels\": [...]} or {\"index\": N}")
    if "index" in body:
        i = body["index"]
        count = 0 if front.examples is None else len(front.examples[0])
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < count:
            raise FrontError(400, f"index must be an integer in [0, {count})")
        return front.examples[0][i]
    pixels = body.get("pixels")
    if not isinstance(pixels, list) or not pixels or len(pixels) > 65536 \
            or not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in pixels):
        raise FrontError(400, "pixels must be a non-empty list of numbers")
    try:
        x = np.asarray(pixels, dtype=np.float64)
    except OverflowError:  # an integer too large for a float
        raise FrontError(400, "pixels must be finite and within [0, 1] (ink intensity)") from None
    if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
        raise FrontError(400, "pixels must be finite and within [0, 1] (ink intensity)")
    return x.astype(np.float32)


def make_app(front: HEFront) -> Flask:
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20

    @app.errorhandler(FrontError)
    def front_error(e: FrontError):
        return jsonify(error=str(e)), e.status

    @app.errorhandler(400)
    @app.errorhandler(404)
    @app.errorhandler(405)
    @app.errorhandler(413)
    def http_error(e):
        return jsonify(error=e.description), e.code

    @app.get("/")
    def page():
        return send_from_directory(PAGE_DIR, "he_demo.html")

    @app.get("/api/status")
    def status():
        return jsonify(front.status())

    @app.get("/api/examples")
    def examples():
        return jsonify(front.example_list())

    @app.post("/api/classify")
    def classify():
        body = request.get_json(silent=True)
        x = parse_query(body, front)
        return jsonify(front.classify(x, compare_plain=bool(body.get("compare_plain", True))))

    return app


def serve_web(front: HEFront, host: str, port: int, port_file: Path | None = None, threads: int = 4,
              announce=None):
    """Serve the page until interrupted; returns after closing the HE session."""
    from waitress.server import create_server
    server = create_server(make_app(front), host=host, port=port, threads=threads)
    bound = server.effective_port
    if port_file:
        port_file.write_text(str(bound))
    if announce:
        announce(bound)
    try:
        server.run()
    finally:
        server.close()
        front.close()
    return bound

"""The HE inference service over real processes and mutual TLS: exact in argmax, no secret key on the server."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest
import tenseal as ts

from securecollab.generated.v1 import he_pb2 as pb
from securecollab.he import make_context
from securecollab.he.context import _MAGIC, split_public
from securecollab.he.net import encrypt_input_bytes, kit_of
from securecollab.launch import ProcessGroup
from securecollab.net.certs import TlsFiles
from securecollab.net.wire import encode_tensor, iter_chunks
from securecollab.plans import HEModelPlan
from securecollab.runs.inference import CLIENT, PLAIN_CLIENT, agreement, prepare, start_server
from securecollab.training import predict_logits
from securecollab.transcript import TranscriptRecorder, load_transcript
from services.he_client import HEClient

pytestmark = pytest.mark.slow
LOGIT_TOL = 0.05


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model, dataset, certs, target, server pid, out dir) with a convnet HE server process running."""
    work = tmp_path_factory.mktemp("he")
    model, ds, weights, certs = prepare(HEModelPlan(), work)
    with ProcessGroup(work / "logs") as group:
        port = start_server(group, HEModelPlan(), weights, certs, work / "server", max_batch=len(ds.x_test))
        yield model, ds, certs, f"localhost:{port}", group.procs["he-server"].pid, work / "server"


def client(served, party=CLIENT, **kw) -> HEClient:
    _, _, certs, target, _, _ = served
    return HEClient(target, tls=TlsFiles.for_party(certs, party), party_id=party, **kw)


@pytest.fixture(scope="module")
def batched_run(served):
    """One batched session over the whole test set, plus five single queries."""
    _, ds, *_ = served
    with client(served) as c:
        session = c.open_session(batch_size=len(ds.x_test))
        batched = c.infer_batch(ds.x_test)
        single = np.stack([c.infer(x) for x in ds.x_test[:5]])
        per_query = sum(v for d in ("sent", "received") for k, v in c.meter.snapshot()["by_method"][d].items()
                        if k.endswith("/Infer")) / 5
        secret = c.context.secret_key()  # keep the key object alive for the memory scan
        needle = _secret_key_needle(c.context)
    return session, batched, single, per_query, needle, secret


def test_whole_test_set_decrypts_to_the_plaintext_logits(served, batched_run):
    model, ds, *_ = served
    _, batched, single, per_query, *_ = batched_run
    plain = predict_logits(model, ds.x_test)
    whole = agreement(batched, plain)
    assert whole["n"] == len(ds.x_test) == 450
    assert whole["argmax_agreement"] == 1.0
    assert whole["max_abs_logit_error"] <= LOGIT_TOL
    few = agreement(single, plain[:5])
    assert few["argmax_agreement"] == 1.0 and few["max_abs_logit_error"] <= LOGIT_TOL
    assert per_query <= 300_000  # up + down for one query, keys excluded (the result packed: he/packing.py)


def test_transcripts_hold_what_each_side_received(served, batched_run, tmp_path):
    model, ds, certs, target, _, out = served
    # the client's view: exactly the decrypted logits it returned
    t = tmp_path / "client.jsonl"
    with client(served, transcript=TranscriptRecorder(t, party=CLIENT, role="client")) as c:
        c.open_session()
        got = c.infer(ds.x_test[7])
        ctx = c.context
        recorded = load_transcript(t).of_kind("logits")
        np.testing.assert_array_equal(recorded[0].tensors["logits"], got)
        # the server's view: a context without a secret key, and the very ciphertext sent
        server = load_transcript(out / "transcripts" / "he-server.jsonl")
        contexts = server.of_kind("context")
        assert contexts and all(not ts.context_from(_ts_part(r.blobs["public_context"])).has_secret_key()
                                for r in contexts)
        query = server.of_kind("query")[-1]
        kit = kit_of(ctx)
        sent = kit.decrypt(kit.ciphertext_from_bytes(query.blobs["ciphertext"]))
        expected = c.description.input_encoding.slots(ds.x_test[7], kit.slot_count)[0]
        np.testing.assert_allclose(sent, expected, atol=1e-3)


def _ts_part(blob: bytes) -> bytes:
    return split_public(blob)[0]


def test_server_refuses_a_context_that_carries_a_secret_key(served):
    with client(served) as c:
        ctx = make_context(c.description.depth)
        private = ctx.serialize(save_secret_key=True, save_galois_keys=False)
        blob = _MAGIC + len(private).to_bytes(8, "big") + private
        parts = [pb.SessionPart(options=pb.SessionOptions())] + [pb.SessionPart(context=ch)
                                                                  for ch in iter_chunks(blob)]
        with pytest.raises(grpc.RpcError) as e:
            c.stub.OpenSession(iter(parts), timeout=120)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "secret key" in e.value.details()
        assert c.stub.Describe(pb.DescribeRequest(), timeout=10).model == "convnet"  # still serving


def _secret_key_needle(ctx) -> bytes:
    """64 raw little-endian words of the secret key as SEAL holds it in memory (NTT form)."""
    plain = kit_of(ctx).secret_key.data()
    return np.array([plain.data(i) for i in range(4096, 4104)], dtype="<u8").tobytes()


def _memory_contains(pid: int, needle: bytes) -> bool:
    """Whether any readable mapping of process ``pid`` holds ``needle`` (same user, no ptrace limits)."""
    overlap = len(needle) - 1
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            start, end = (int(v, 16) for v in fields[0].split("-"))
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            tail, pos = b"", start
            while pos < end:
                try:
                    mem.seek(pos)
                    block = mem.read(min(64 << 20, end - pos))
                except OSError:
                    break
                if not block:
                    break
                if needle in tail + block:
                    return True
                tail, pos = block[-overlap:], pos + len(block)
    return False


def test_server_process_never_holds_the_secret_key(served, batched_run, tmp_path):
    *_, pid, _ = served
    *_, needle, _ = batched_run
    assert not _memory_contains(pid, needle)
    # Positive control: a process that did load a private context is caught by the same scan.
    ctx_file = tmp_path / "private.ctx"
    ctx = make_context(5)
    ctx_file.write_bytes(ctx.serialize(save_secret_key=True))
    other_needle = _secret_key_needle(ctx)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time, tenseal as ts
        ctx = ts.context_from(open({str(ctx_file)!r}, "rb").read())
        print("loaded", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "loaded"
        assert _memory_contains(holder.pid, other_needle)
        assert not _memory_contains(pid, other_needle)
    finally:
        holder.kill()
        holder.wait()


def _status(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def test_bad_requests_get_clear_statuses_and_the_server_keeps_serving(served):
    _, ds, *_ = served
    with client(served) as c, client(served, party=PLAIN_CLIENT) as other:
        c.open_session()
        good = c.context
        ct = kit_of(good).encrypt_bytes(c.description.input_encoding.slots(ds.x_test[0], kit_of(good).slot_count)[0])
        req = lambda **kw: pb.InferRequest(**{"session_id": c.session_id, "query_id": 10**6, "ciphertext": ct, **kw})
        assert _status(lambda: c.stub.Infer(req(session_id="nope"))) == grpc.StatusCode.NOT_FOUND
        assert _status(lambda: other.stub.Infer(req())) == grpc.StatusCode.PERMISSION_DENIED
        assert _status(lambda: c.stub.Infer(req(ciphertext=b"garbage"))) == grpc.StatusCode.INVALID_ARGUMENT
        assert _status(lambda: c.stub.Infer(req(ciphertext=ct[:len(ct) // 2]))) == grpc.StatusCode.INVALID_ARGUMENT
        assert _status(lambda: c.stub.Infer(req(result_format=7))) == grpc.StatusCode.INVALID_ARGUMENT
        # this model's input is one ciphertext: a second one is refused, not ignored
        assert _status(lambda: c.stub.Infer(req(more_ciphertexts=[ct]))) == grpc.StatusCode.INVALID_ARGUMENT
        first = c.stub.Infer(req())
        assert _status(lambda: c.stub.Infer(req())) == grpc.StatusCode.ALREADY_EXISTS  # replay
        # an evaluated (lower-level) ciphertext is not a fresh input
        assert _status(lambda: c.stub.Infer(req(query_id=10**6 + 1, ciphertext=first.ciphertext))) \
            == grpc.StatusCode.INVALID_ARGUMENT
        batch = pb.BatchPart(session_id=c.session_id, query_id=5, num_inputs=1, index=0, count=1, ciphertext=ct)
        assert _status(lambda: c.stub.InferBatch(iter([batch]))) == grpc.StatusCode.FAILED_PRECONDITION
        # sessions: options first; truncated context; a context without the model's rotation keys
        assert _status(lambda: c.stub.OpenSession(iter([]))) == grpc.StatusCode.INVALID_ARGUMENT
        from securecollab.he import public_bytes
        blob = public_bytes(make_context(c.description.depth), [1])
        chunks = list(iter_chunks(blob))
        opts = pb.SessionPart(options=pb.SessionOptions())
        assert _status(lambda: c.stub.OpenSession(iter([opts, *[pb.SessionPart(context=x) for x in chunks[:-1]]]))) \
            == grpc.StatusCode.INVALID_ARGUMENT
        assert _status(lambda: c.stub.OpenSession(iter([opts, *[pb.SessionPart(context=x) for x in chunks]]))) \
            == grpc.StatusCode.INVALID_ARGUMENT
        too_big = pb.SessionPart(options=pb.SessionOptions(batch_size=10**6))
        with pytest.raises(grpc.RpcError) as e:
            c.stub.OpenSession(iter([too_big, *[pb.SessionPart(context=x) for x in chunks]]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "batch size" in e.value.details()
        # the plain API: wrong shape, NaN, wrong dtype
        for bad in (np.zeros((2, 3), np.float32), np.full((1, 1, 8, 8), np.nan, np.float32),
                    np.zeros((1, 1, 8, 8), np.float64)):
            request = pb.PlainRequest(inputs=encode_tensor(bad))
            assert _status(lambda r=request: c.stub.PredictPlain(r)) == grpc.StatusCode.INVALID_ARGUMENT
        # nothing above broke the session
        logits = c.infer(ds.x_test[0])
        assert logits.argmax() == predict_logits(served[0], ds.x_test[:1])[0].argmax()
        c.stub.CloseSession(pb.CloseRequest(session_id=c.session_id))
        assert _status(lambda: c.stub.Infer(req(query_id=7))) == grpc.StatusCode.NOT_FOUND
        c.session_id = None


def test_context_parser_refuses_a_flood_of_fields_quickly():
    import time

    from securecollab.he.context import carries_secret_key
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="too many fields"):
        carries_secret_key(b"\x08\x00" * 8_000_000)
    assert time.perf_counter() - t0 < 1.0


def test_one_party_cannot_evict_another_partys_session():
    from securecollab.errors import ProtocolError
    from securecollab.he import public_bytes
    from securecollab.protocols.he import HEModelHost
    ds_plan = HEModelPlan(model="mlp", epochs=1)
    model, ds = ds_plan.train()
    host = HEModelHost(model, ds.input_shape, ds.num_classes, name="mlp", max_sessions=1)
    ctx = make_context(host.net.depth)
    blob = public_bytes(ctx, host.net.galois_steps)
    alice = host.open_session("alice", blob, 0)
    with pytest.raises(ProtocolError) as e:
        host.open_session("bob", blob, 0)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    assert host.session(alice.session_id, "alice") is alice  # still there
    again = host.open_session("alice", blob, 0)  # her own oldest session makes room
    assert host.open_sessions == 1 and host.session(again.session_id, "alice") is again


def test_contexts_arriving_at_once_hold_at_most_their_budget_and_the_rest_wait_then_are_refused():
    """Many clients opening sessions at once: each context is counted by its declared size from its first byte;
    one that would go over waits for room, and is refused (RESOURCE_EXHAUSTED) if none comes."""
    import threading
    import time

    from securecollab.errors import ProtocolError
    from securecollab.protocols.he import ByteBudget
    budget = ByteBudget(300, wait_s=0.3)
    with budget.hold(200), budget.hold(100):
        assert budget.held == 300
        with pytest.raises(ProtocolError, match="too many HE contexts") as e:
            with budget.hold(1, "HE contexts"):
                pass
        assert e.value.code == "RESOURCE_EXHAUSTED"
    assert budget.held == 0
    budget = ByteBudget(300, wait_s=30)  # the waiter below must not give up on a loaded machine
    admitted = []

    def wait_for_room():
        with budget.hold(50):
            admitted.append(budget.held)

    with budget.hold(10 ** 9):  # a declared size above the limit counts as the limit (and is refused later)
        waiter = threading.Thread(target=wait_for_room)
        waiter.start()
        time.sleep(0.1)
        assert admitted == []  # waits for room ...
    waiter.join(1)
    assert admitted == [50] and budget.held == 0  # ... and gets it when the first is done


def test_an_owner_sends_one_context_at_a_time_and_none_above_the_limit():
    """A few stalled uploads of one client cannot hold the whole budget of arriving contexts."""
    from securecollab.errors import ProtocolError
    from securecollab.protocols.he import HEModelHost
    model, ds = HEModelPlan(model="mlp", epochs=1).train()
    host = HEModelHost(model, ds.input_shape, ds.num_classes, name="mlp", max_context_bytes=1000)
    with host.arriving_context("alice", 1000):
        with pytest.raises(ProtocolError, match="already sending") as e:
            with host.arriving_context("alice", 10):
                pass
        assert e.value.code == "RESOURCE_EXHAUSTED"
        with host.arriving_context("bob", 1000):
            assert host.arriving.held == 2000
    with pytest.raises(ProtocolError, match="exceeds the limit") as e:
        with host.arriving_context("bob", 1001):
            pass
    assert e.value.code == "INVALID_ARGUMENT"
    with host.arriving_context("alice", 10):  # alice's first context is done: she may send another
        assert host.arriving.held == 10


def test_a_client_written_from_the_proto_alone_gets_the_plaintext_models_answers(served, tmp_path):
    """The wire contract is complete: he.proto and tensor.proto compiled fresh into a temporary directory, and a
    client (tests/he_outsider_client.py) that imports only those stubs, grpc, TenSEAL and numpy, in an isolated
    interpreter beside the installed project; the stubs' package is not securecollab's."""
    model, ds, *_ = served
    _outsider_agrees(served, model, ds.x_test[:12], tmp_path, max_bytes=500_000)


def _outsider_agrees(served, model, images, tmp_path, *, max_bytes: int) -> None:
    from pathlib import Path

    _, _, certs, target, _, _ = served
    root = Path(__file__).resolve().parents[1]
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    protos = [str(root / "protos" / "securecollab_wire" / "v1" / f"{name}.proto") for name in ("tensor", "he")]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(root / "protos"),
                    f"--python_out={stubs}", f"--grpc_python_out={stubs}", *protos], check=True, timeout=120)
    np.save(tmp_path / "images.npy", images)
    tls = TlsFiles.for_party(certs, CLIENT)
    out = tmp_path / "out.json"
    run = subprocess.run([sys.executable, "-I", str(root / "tests" / "he_outsider_client.py"), str(stubs), target,
                          str(tls.ca), str(tls.cert), str(tls.key), str(tmp_path / "images.npy"), str(out)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    got = __import__("json").loads(out.read_text())
    assert got["securecollab_modules"] == [] and Path(got["stubs_from"]) == stubs
    he, plain = np.array(got["he_logits"]), np.array(got["plain_logits"])
    reference = predict_logits(model, images)
    assert np.abs(plain - reference).max() < 1e-4            # the plain API, decoded from the Tensor message
    assert (he.argmax(1) == reference.argmax(1)).all()
    assert np.abs(he - reference).max() <= LOGIT_TOL
    assert got["bytes_per_query"] < max_bytes


@pytest.fixture(scope="module")
def served_28(tmp_path_factory):
    """A convnet served on MedMNIST's RGB 28x28 shape (`make-npz --channels 3`), whose input takes 10 ciphertexts
    (147 kernel elements in groups of 16)."""
    from securecollab.data import write_medmnist_shaped
    work = tmp_path_factory.mktemp("he28")
    archive = write_medmnist_shaped(work / "digits28.npz", channels=3)
    plan = HEModelPlan(dataset="npz", dataset_path=str(archive), epochs=3)
    model, ds, weights, certs = prepare(plan, work)
    with ProcessGroup(work / "logs") as group:
        port = start_server(group, plan, weights, certs, work / "server", max_batch=0)
        yield model, ds, certs, f"localhost:{port}", group.procs["he-server"].pid, work / "server"


def test_a_28x28_rgb_input_goes_in_ten_ciphertexts_end_to_end(served_28, tmp_path):
    """Single queries on 3x28x28 images: the described layout takes 10 ciphertexts (im2col in groups of kernel
    elements), the answers equal the plaintext model's, the server's transcript holds all 10, a query with the
    wrong number of ciphertexts is refused and the server keeps serving; a client from the proto alone agrees."""
    model, ds, *_, out = served_28
    assert ds.input_shape == (3, 28, 28)
    images = ds.x_test[:3]
    with client(served_28) as c:
        assert c.description.input_encoding.ciphertexts == 10
        c.open_session()
        cts = encrypt_input_bytes(c.context, images[0], c.description.input_encoding)
        req = pb.InferRequest(session_id=c.session_id, query_id=10**6, ciphertext=cts[0], more_ciphertexts=cts[1:3])
        assert _status(lambda: c.stub.Infer(req)) == grpc.StatusCode.INVALID_ARGUMENT
        got = np.stack([c.infer(x) for x in images])
    reference = predict_logits(model, images)
    assert (got.argmax(1) == reference.argmax(1)).all() and np.abs(got - reference).max() <= LOGIT_TOL
    query = load_transcript(out / "transcripts" / "he-server.jsonl").of_kind("query")[-1]
    assert sorted(query.blobs) == sorted(["ciphertext", *(f"ciphertext_{i}" for i in range(1, 10))])
    _outsider_agrees(served_28, model, images[:2], tmp_path, max_bytes=2_600_000)

"""Bad input against the HE inference server: each refusal has its status and message, and the sessions
already open still decrypt to the right logits afterwards. Plus fuzzing of every method.

The server is a real process (as in test_he_service.py: SEAL is native code, and a crash must show
as a dead server, not a dead test run) serving a small x^2 MLP trained for one epoch; clients are
in this process. Covered already in test_he_service.py (not repeated here): a context carrying a
secret key, an unknown session, another client's certificate on Infer, garbage and truncated
ciphertexts, a replayed query, an evaluated (lower-level) ciphertext, a batch on a session without
a batched layout, an empty or truncated context stream, a context without the model's rotation
keys, a too-large batch size, and the plain API's wrong shape, NaN and wrong dtype.
"""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from hypothesis import strategies as st

from securecollab.generated.v1 import he_pb2 as pb
from securecollab.generated.v1 import he_pb2_grpc as pb_grpc
from securecollab.generated.v1 import tensor_pb2
from securecollab.he import encrypt_batch_bytes, make_context, public_bytes
from securecollab.he.batched import decrypt_batch
from securecollab.he.net import decrypt_logits, kit_of
from securecollab.launch import ProcessGroup, ensure_certs, securecollab_cmd
from securecollab.net.certs import TlsFiles
from securecollab.net.transport import check_health, make_channel
from securecollab.net.wire import decode_tensor, encode_tensor, iter_chunks
from securecollab.plans import HEModelPlan
from securecollab.runs.inference import prepare
from securecollab.training import predict_logits
from services.he_client import HEClient
from services.he_server import MAX_CIPHERTEXT_BYTES
from tests.service_fuzz import fuzz_raw, fuzz_service, lax_channel, refusal, same_ca_certs

SC = grpc.StatusCode
SERVICE = pb.DESCRIPTOR.services_by_name["HEInference"]
MAX_BATCH = 128  # the server's limit, and the owner's batch size: 2 input ciphertexts per batch for this MLP
TOL = 0.01  # max |HE logit - plaintext logit| for this MLP (measured ~1e-4)


@pytest.fixture(scope="module")
def he(tmp_path_factory):
    """The server process, and two clients each with an open session: client-0 (batched) and client-1."""
    work = tmp_path_factory.mktemp("he-bad")
    plan = HEModelPlan(model="mlp", epochs=1)
    model, ds, weights, certs = prepare(plan, work)
    ensure_certs(certs, ["aggregator"])
    party = same_ca_certs(certs, work / "party-certs", ["client-0:party"])
    with ProcessGroup(work / "logs") as group:
        port = group.start_service("he-server", securecollab_cmd(
            "serve", "he", "--plan-json", plan.to_json(), "--weights", str(weights), "--certs", str(certs),
            "--host", "127.0.0.1", "--max-batch", str(MAX_BATCH), "--max-sessions", "6"), timeout=120)
        target = f"localhost:{port}"
        tls = lambda party_id, d=certs: TlsFiles.for_party(d, party_id)  # noqa: E731
        owner = HEClient(target, tls=tls("client-0"), party_id="client-0")
        owner.open_session(batch_size=MAX_BATCH)
        other = HEClient(target, tls=tls("client-1"), party_id="client-1")
        other.open_session()
        x = ds.x_test[:8]
        ns = SimpleNamespace(model=model, ds=ds, x=x, plain=predict_logits(model, x), target=target, tls=tls,
                             party=party, owner=owner, other=other, proc=group.procs["he-server"])
        yield ns
        owner.channel.close()
        other.channel.close()


def _assert_still_correct(he, client=None, i=0):
    """The server is alive and ``client``'s session still decrypts to the plaintext logits."""
    assert he.proc.poll() is None, "the HE server died"
    client = client or he.owner
    logits = client.infer(he.x[i])
    assert np.abs(logits - he.plain[i]).max() < TOL and logits.argmax() == he.plain[i].argmax()


def _ciphertext(client, x) -> bytes:
    kit = kit_of(client.context)
    return kit.encrypt_bytes(client.description.input_encoding.slots(x, kit.slot_count)[0])


@pytest.fixture(scope="module")
def small_context():
    """A real public context without rotation keys (~4 MB: cheap to send), in 512 KiB chunks."""
    blob = public_bytes(make_context(5), [])
    return blob, list(iter_chunks(blob, transfer_id="ctx", chunk_bytes=512 << 10))


def _part(chunk=None, **fields):
    return pb.SessionPart(context=chunk) if chunk is not None else pb.SessionPart(options=pb.SessionOptions(**fields))


def _edited(chunk, **fields):
    out = tensor_pb2.Chunk()
    out.CopyFrom(chunk)
    for k, v in fields.items():
        setattr(out, k, v(getattr(out, k)) if callable(v) else v)
    return out


def _flip(data: bytes, i: int = 10) -> bytes:
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


DAMAGED = {
    # name: (parts from the good chunks, message fragment)
    "duplicated-chunk": (lambda c: [_part(), *map(_part, [c[0], c[1], c[1], *c[2:]])], "(duplicated)"),
    "out-of-order": (lambda c: [_part(), *map(_part, [c[0], c[2], c[1], *c[3:]])], "(missing or out of order)"),
    "missing-middle-chunk": (lambda c: [_part(), *map(_part, [c[0], *c[2:]])], "(missing or out of order)"),
    "bad-checksum": (lambda c: [_part(), *map(_part, c[:-1]), _part(_edited(c[-1], sha256=_flip))],
                     "checksum mismatch"),
    "no-checksum": (lambda c: [_part(), *map(_part, c[:-1]), _part(_edited(c[-1], sha256=b""))],
                    "checksum mismatch"),
    "tampered-data": (lambda c: [_part(), _part(c[0]), _part(_edited(c[1], data=_flip)), *map(_part, c[2:])],
                      "checksum mismatch"),
    "declared-size-over-the-limit": (lambda c: [_part(), *(_part(_edited(x, total_bytes=2**40)) for x in c)],
                                     "exceeds the limit"),
    "declared-size-below-the-data": (lambda c: [_part(), *(_part(_edited(x, total_bytes=lambda n: n - 1))
                                                           for x in c)], "exceed the declared"),
    "declared-size-above-the-data": (lambda c: [_part(), *(_part(_edited(x, total_bytes=lambda n: n + 1))
                                                           for x in c)], "(truncated)"),
    "chunk-after-the-last": (lambda c: [_part(), *map(_part, c), _part(_edited(c[-1], seq=len(c)))],
                             "more than the"),
    "fewer-chunks-declared": (lambda c: [_part(), *(_part(_edited(x, total=len(c) - 1)) for x in c)],
                              "(truncated)"),
    "zero-chunks-declared": (lambda c: [_part(), *(_part(_edited(x, total=0)) for x in c)], "zero chunks"),
    "chunk-of-another-transfer": (lambda c: [_part(), _part(c[0]), _part(_edited(c[1], transfer_id="other")),
                                             *map(_part, c[2:])], "does not belong to transfer"),
    "no-transfer-id": (lambda c: [_part(), *(_part(_edited(x, transfer_id="")) for x in c)], "without transfer_id"),
    "options-twice": (lambda c: [_part(), _part(batch_size=1), *map(_part, c)], "options may be sent only once"),
    "options-after-the-context": (lambda c: [_part(), *map(_part, c), _part()], "options may be sent only once"),
    "no-options": (lambda c: list(map(_part, c)), "starts with its options"),
}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_bad_input_he_damaged_context_streams_are_refused_and_sessions_survive(he, small_context, damage):
    _, chunks = small_context
    assert len(chunks) >= 4
    make, fragment = DAMAGED[damage]
    code, details = refusal(he.owner.stub.OpenSession, iter(make(chunks)), timeout=60)
    assert code == SC.INVALID_ARGUMENT and fragment in details, (code, details)
    _assert_still_correct(he)


def test_bad_input_he_context_stream_messages_over_the_transport_limit_are_refused(he, small_context):
    blob, _ = small_context
    big = blob + bytes((17 << 20) - len(blob))  # one 17 MiB chunk: over the 16 MiB message limit
    with lax_channel(he.target, he.tls("client-0")) as ch:
        stub = pb_grpc.HEInferenceStub(ch)
        parts = [_part(), _part(next(iter_chunks(big, chunk_bytes=len(big))))]
        code, details = refusal(stub.OpenSession, iter(parts), timeout=60)
        assert code == SC.RESOURCE_EXHAUSTED and "larger than max" in details, (code, details)
        request = pb.InferRequest(session_id=he.owner.session_id, query_id=10**9, ciphertext=big)
        code, details = refusal(stub.Infer, request, timeout=60)
        assert code == SC.RESOURCE_EXHAUSTED and "larger than max" in details, (code, details)
        assert check_health(ch) == "SERVING"
    _assert_still_correct(he)


def test_bad_input_he_ciphertexts_of_other_parameters_are_refused(he):
    """Ciphertexts the session's parameters cannot have produced are refused before evaluation: another
    ring degree, another modulus chain, another scale, an oversized blob.

    Not detectable, and so not refused: a ciphertext made under the *same* parameters with another
    secret key. It is a well-formed ciphertext of these parameters; only the secret key could tell
    (it decrypts to noise), and the server never has it. The last part below shows it is answered
    and leaves the session intact."""
    owner = he.owner
    depth = owner.description.depth
    x = he.x[1]
    foreign = {
        "another ring degree (16384)": make_context(depth, poly_modulus_degree=16384),
        "another modulus chain": make_context(depth + 1),
    }
    query = 10**9 + 100
    for what, ctx in foreign.items():
        code, details = refusal(owner.stub.Infer, pb.InferRequest(
            session_id=owner.session_id, query_id=query, ciphertext=_ciphertext(_Like(owner, ctx), x)), timeout=60)
        assert code == SC.INVALID_ARGUMENT and "not a ciphertext for this session's parameters" in details, \
            (what, details)
    rescaled = make_context(depth)
    rescaled.global_scale = 2.0 ** 30
    code, details = refusal(owner.stub.Infer, pb.InferRequest(
        session_id=owner.session_id, query_id=query, ciphertext=_ciphertext(_Like(owner, rescaled), x)), timeout=60)
    assert code == SC.INVALID_ARGUMENT and "ciphertext scale 2^30.0 != the session's 2^28.0" in details, details
    code, details = refusal(owner.stub.Infer, pb.InferRequest(
        session_id=owner.session_id, query_id=query, ciphertext=bytes(MAX_CIPHERTEXT_BYTES + 1)), timeout=60)
    assert code == SC.INVALID_ARGUMENT and "ciphertext too large" in details
    # A refused query does not use up its id: the same id with a good ciphertext is answered correctly.
    reply = owner.stub.Infer(pb.InferRequest(session_id=owner.session_id, query_id=query,
                                             ciphertext=_ciphertext(owner, x)), timeout=60)
    kit = kit_of(owner.context)
    logits = decrypt_logits(owner.context, kit.ciphertext_from_bytes(reply.ciphertext), he.plain.shape[1])
    assert np.abs(logits - he.plain[1]).max() < TOL
    # Same parameters, another key: answered (undetectable), and nothing of the session changes.
    stranger = make_context(depth)
    reply = owner.stub.Infer(pb.InferRequest(session_id=owner.session_id, query_id=query + 1,
                                             ciphertext=_ciphertext(_Like(owner, stranger), x)), timeout=60)
    assert reply.ciphertext
    _assert_still_correct(he, i=2)


class _Like:
    """``client`` with another context: to encrypt with the input layout the model expects."""

    def __init__(self, client, context):
        self.context, self.description = context, client.description


def test_bad_input_he_bad_batches_are_refused_and_the_session_still_answers(he):
    owner = he.owner
    cts = encrypt_batch_bytes(owner.context, he.x, MAX_BATCH)
    assert len(cts) == 2  # so that parts can disagree with each other
    qid = 10**9 + 200

    def parts(over=None):
        """The good batch, with the fields in ``over[i]`` changed in part i."""
        base = dict(session_id=owner.session_id, query_id=qid, num_inputs=len(he.x), count=len(cts))
        return [pb.BatchPart(**{**base, "index": i, "ciphertext": c, **(over or {}).get(i, {})})
                for i, c in enumerate(cts)]

    wrong_params = _ciphertext(_Like(owner, make_context(owner.description.depth + 1)), he.x[0])
    cases = [
        ([], "empty batch", SC.INVALID_ARGUMENT),
        (parts()[:1], "batch parts must be numbered 0..1 in order, got 1 parts", SC.INVALID_ARGUMENT),
        (parts()[::-1], "batch parts must be numbered", SC.INVALID_ARGUMENT),
        ([parts()[0], parts()[0]], "batch parts must be numbered", SC.INVALID_ARGUMENT),
        (parts() + [pb.BatchPart(session_id=owner.session_id, query_id=qid, num_inputs=len(he.x), count=3, index=2,
                                 ciphertext=cts[0])], "a batch takes 2 ciphertexts in this session", SC.INVALID_ARGUMENT),
        (parts({1: {"query_id": qid + 1}}), "disagree on session, query, inputs or count", SC.INVALID_ARGUMENT),
        (parts({1: {"num_inputs": 3}}), "disagree on session, query, inputs or count", SC.INVALID_ARGUMENT),
        (parts({1: {"session_id": he.other.session_id}}), "disagree", SC.INVALID_ARGUMENT),
        (parts({0: {"num_inputs": 0}, 1: {"num_inputs": 0}}), "a batch holds 1..128 inputs", SC.INVALID_ARGUMENT),
        (parts({0: {"num_inputs": 129}, 1: {"num_inputs": 129}}), "a batch holds 1..128 inputs",
         SC.INVALID_ARGUMENT),
        (parts({1: {"ciphertext": b"\x00" * 64}}), "cannot evaluate these ciphertexts", SC.INVALID_ARGUMENT),
        (parts({1: {"ciphertext": wrong_params}}), "not a ciphertext for this session's parameters",
         SC.INVALID_ARGUMENT),
        (parts({1: {"ciphertext": bytes(MAX_CIPHERTEXT_BYTES + 1)}}), "ciphertext too large", SC.INVALID_ARGUMENT),
        (parts({0: {"session_id": "no-such-session"}}), "no open session", SC.NOT_FOUND),
    ]
    for request, fragment, status in cases:
        code, details = refusal(owner.stub.InferBatch, iter(request), timeout=60)
        assert code == status and fragment in details, (fragment, code, details)
    with lax_channel(he.target, he.tls("client-0")) as ch:
        code, details = refusal(pb_grpc.HEInferenceStub(ch).InferBatch,
                                iter(parts({1: {"ciphertext": bytes(17 << 20)}})), timeout=60)
    assert code == SC.RESOURCE_EXHAUSTED and "larger than max" in details
    # the refusals used up nothing: the same query id is answered, and decrypts right
    reply = owner.stub.InferBatch(iter(parts()), timeout=120)
    kit = kit_of(owner.context)
    logits = decrypt_batch(owner.context, [kit.ciphertext_from_bytes(c) for c in reply.ciphertexts], len(he.x),
                           he.plain.shape[1], MAX_BATCH)
    assert np.abs(logits - he.plain).max() < TOL
    code, details = refusal(owner.stub.InferBatch, iter(parts()), timeout=60)  # replayed
    assert code == SC.ALREADY_EXISTS and f"query {qid} was already answered" in details
    _assert_still_correct(he)


def test_bad_input_he_foreign_certificates_are_refused(he):
    owner = he.owner
    ct = _ciphertext(owner, he.x[3])
    # another client, on client-0's session
    code, details = refusal(he.other.stub.CloseSession, pb.CloseRequest(session_id=owner.session_id), timeout=10)
    assert code == SC.PERMISSION_DENIED and "belongs to another party" in details
    batch = encrypt_batch_bytes(owner.context, he.x[:1], MAX_BATCH)
    code, details = refusal(he.other.stub.InferBatch, iter([
        pb.BatchPart(session_id=owner.session_id, query_id=1, num_inputs=1, index=i, count=len(batch), ciphertext=c)
        for i, c in enumerate(batch)]), timeout=60)
    assert code == SC.PERMISSION_DENIED and "belongs to another party" in details
    # certificates of other roles: the aggregator's, and one with client-0's very id but a party's role
    small = public_bytes(make_context(owner.description.depth), [])
    calls = {
        "Describe": lambda s: s.Describe(pb.DescribeRequest(), timeout=10),
        "OpenSession": lambda s: s.OpenSession(iter([_part(), *map(_part, iter_chunks(small))]), timeout=60),
        "Infer": lambda s: s.Infer(pb.InferRequest(session_id=owner.session_id, query_id=10**9 + 300,
                                                   ciphertext=ct), timeout=60),
        "InferBatch": lambda s: s.InferBatch(iter([pb.BatchPart(session_id=owner.session_id, query_id=10**9 + 301,
                                                                num_inputs=1, index=i, count=len(batch), ciphertext=c)
                                                   for i, c in enumerate(batch)]), timeout=60),
        "CloseSession": lambda s: s.CloseSession(pb.CloseRequest(session_id=owner.session_id), timeout=10),
        "PredictPlain": lambda s: s.PredictPlain(pb.PlainRequest(inputs=encode_tensor(he.x[:1])), timeout=10),
    }
    for tls, role in [(he.tls("aggregator"), "aggregator"), (TlsFiles.for_party(he.party, "client-0"), "party")]:
        with make_channel(he.target, tls=tls) as ch:
            stub = pb_grpc.HEInferenceStub(ch)
            for method, call in calls.items():
                code, details = refusal(call, stub)
                assert code == SC.PERMISSION_DENIED and f"certificate of role {role!r} cannot use the model" \
                    in details, (method, role, code, details)
    _assert_still_correct(he, i=3)  # not closed, and its query ids untouched
    _assert_still_correct(he, he.other, i=3)


def test_bad_input_he_plain_inference_refusals(he):
    stub = he.owner.stub
    x = he.x[:2]
    inf = x.copy()
    inf[1, 0, 3, 3] = np.inf
    cases = [
        (encode_tensor(inf), "NaN or Inf"),
        (encode_tensor(x[:0]), "1..128 inputs per request, got 0"),
        (encode_tensor(np.resize(x, (MAX_BATCH + 1, *x.shape[1:]))), "1..128 inputs per request, got 129"),
        (encode_tensor(np.full_like(x, 3e38)), "overflow the model"),
        (encode_tensor(x[0]), "inputs must be shaped (n, 1, 8, 8)"),
        (encode_tensor(x.reshape(2, 64)), "inputs must be shaped (n, 1, 8, 8)"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=list(x.shape), data=x.tobytes()[:-4]), "needs"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, 1, 8, -8], data=x.tobytes()),
         "negative dimension"),
        (tensor_pb2.Tensor(dtype=77, shape=list(x.shape), data=x.tobytes()), "unknown dtype code 77"),
    ]
    for tensor, fragment in cases:
        code, details = refusal(stub.PredictPlain, pb.PlainRequest(inputs=tensor), timeout=30)
        assert code == SC.INVALID_ARGUMENT and fragment in details, (fragment, code, details)
    with lax_channel(he.target, he.tls("client-0")) as ch:
        big = np.zeros((70_000, 1, 8, 8), np.float32)  # 17.9 MB
        code, details = refusal(pb_grpc.HEInferenceStub(ch).PredictPlain, pb.PlainRequest(inputs=encode_tensor(big)))
    assert code == SC.RESOURCE_EXHAUSTED and "larger than max" in details
    logits = decode_tensor(stub.PredictPlain(pb.PlainRequest(inputs=encode_tensor(he.x)), timeout=30).logits)
    np.testing.assert_allclose(logits, he.plain, rtol=0, atol=1e-5)


def test_fuzz_he_service_random_messages_and_raw_bytes(he):
    """Every method, random messages then random bytes, from client-0 with a session of its own (the
    fuzzer may close it): only refusals or real answers; client-1's session still decrypts right."""
    fuzzer = HEClient(he.target, tls=he.tls("client-0"), party_id="client-0")
    try:
        fuzzer.open_session(batch_size=MAX_BATCH)
        seeds = [_ciphertext(fuzzer, he.x[0]), *encrypt_batch_bytes(fuzzer.context, he.x[:3], MAX_BATCH)]
        small = st.sampled_from([0, 1, 2, 3])
        common = dict(valid_after=lambda _: _assert_still_correct(he, he.other, i=4))
        report = fuzz_service(
            fuzzer.channel, SERVICE, max_examples=30, strings=[fuzzer.session_id], byte_seeds=seeds,
            shapes=[(1, 1, 8, 8), (3, 1, 8, 8), (1, 64)],
            # result formats: the known ones, so examples reach SEAL (test_he_service refuses an unknown one)
            overrides={"securecollab.v1.InferRequest.result_format": st.sampled_from([0, 1]),
                       "securecollab.v1.BatchPart.count": small, "securecollab.v1.BatchPart.index": small,
                       "securecollab.v1.BatchPart.num_inputs": st.sampled_from([1, 3, MAX_BATCH, MAX_BATCH + 1, 0])},
            timeout=60, **common)
        raw = fuzz_raw(fuzzer.channel, SERVICE, max_examples=25, timeout=60, **common)
    finally:
        fuzzer.channel.close()
    # the examples got past the session lookup into SEAL, and some were answered
    assert "OK" in report.codes("Infer") and "INVALID_ARGUMENT" in report.codes("Infer"), report.counts
    assert "INVALID_ARGUMENT" in report.codes("OpenSession") and "INVALID_ARGUMENT" in report.codes("InferBatch")
    # raw bytes that do not parse are refused by the transport with a clear message, never INTERNAL
    assert "not a valid securecollab.v1.DescribeRequest" in raw.details[("Describe", "INVALID_ARGUMENT")]
    assert not any("INTERNAL" in r.codes(m.name) for r in (report, raw) for m in SERVICE.methods), raw.counts

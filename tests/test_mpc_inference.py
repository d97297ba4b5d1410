"""Model-private inference over real services: a dealer and three `serve mpc` processes on mutual TLS, the owner's
upload and a client's queries from this process. The oracle is the plaintext model the owner trained."""

from __future__ import annotations

import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from securecollab.generated.v1 import mpc_inference_pb2 as pb
from securecollab.generated.v1 import mpc_inference_pb2_grpc as pb_grpc
from securecollab.models import parameters_to_arrays
from securecollab.net.certs import TlsFiles
from securecollab.net.transport import make_channel
from securecollab.plans import MpcInferencePlan
from securecollab.runs.mpc_inference import CLIENT, client, deployment, infer_all, prepare
from securecollab.secagg.mpc_model import ParamLayout
from securecollab.secagg.sharing import SCALE, encode_fixed, prg_int64, reconstruct
from securecollab.training import predict_logits
from securecollab.transcript import Kind, load_transcript

pytestmark = pytest.mark.slow


class Served:
    """A running deployment, its owner's model and dataset, and what the client got for the whole test set."""

    def __init__(self, plan, out, model, ds, certs, targets, answers):
        self.plan, self.out, self.model, self.ds, self.certs, self.targets = plan, out, model, ds, certs, targets
        self.answers = answers
        self.reference = predict_logits(model, ds.x_test).astype(np.float64)


@pytest.fixture(scope="module", params=[("mlp", "logits"), ("convnet", "label")], ids=lambda p: "-".join(p))
def served(request, tmp_path_factory):
    model_name, output = request.param
    plan = MpcInferencePlan(model=model_name, output=output, epochs=10)
    out = tmp_path_factory.mktemp(f"mpc-{model_name}-{output}")
    model, ds, certs = prepare(plan, out)
    with deployment(plan, out, model, certs) as targets:
        with client(targets, certs, out) as c:
            answers = infer_all(c, ds.x_test, 150)
        yield Served(plan, out, model, ds, certs, targets, answers)


def test_whole_test_set_mpc_prediction_equals_plaintext_argmax(served):
    predicted = served.answers if served.plan.output == "label" else served.answers.argmax(1)
    assert len(predicted) == len(served.ds.x_test) == 450
    agreement = float((predicted == served.reference.argmax(1)).mean())
    assert agreement >= 0.995, agreement
    if served.plan.output == "logits":  # fixed point 2^-16 and truncations: far below any decision gap
        error = np.abs(served.answers - served.reference).max()
        assert error < 1e-2, error
    else:
        assert served.answers.dtype == np.int64 and set(np.unique(served.answers)) <= set(range(10))


def _shares(record) -> np.ndarray:
    if "seed" in record.blobs:
        return prg_int64(record.blobs["seed"], int(record.meta.get("length") or record.meta["num_inputs"] * 64))
    return record.tensors["share"]


def test_no_party_transcript_holds_the_inputs_or_the_weights(served):
    parties = [load_transcript(served.out / "transcripts" / f"party-{i}.jsonl") for i in range(3)]
    weights = encode_fixed(ParamLayout.of(served.model).flatten(dict(parameters_to_arrays(served.model))))
    model_shares = [[r for r in t.of_kind(Kind.SHARE) if r.meta["what"] == "model"] for t in parties]
    assert all(len(m) == 1 for m in model_shares)
    model_words = [_shares(m[0]) for m in model_shares]
    # positive control: all three shares together are exactly the owner's weights
    assert np.array_equal(reconstruct(model_words), weights)
    queries = [{r.step: r for r in t.of_kind(Kind.SHARE) if r.meta["what"] == "query"} for t in parties]
    assert len(queries[0]) == 3 and all(q.keys() == queries[0].keys() for q in queries)
    secret_x = encode_fixed(served.ds.x_test.ravel())
    query_words = [np.concatenate([_shares(q[step]) for step in sorted(q, key=lambda s: q[s].time)]) for q in queries]
    # the client sent its batches in order: their shares together are exactly its inputs
    assert np.array_equal(reconstruct(query_words), secret_x)
    for secret, held in ((weights, model_words), (secret_x, query_words)):
        for i, words in enumerate(held):
            assert not np.array_equal(words, secret)
            assert np.mean(np.abs(words) > 2 ** 40) > 0.99, f"party {i}'s share is not a uniform ring element"
            assert abs(np.corrcoef(words.astype(np.float64) / SCALE, secret / SCALE)[0, 1]) < 0.05
            two = reconstruct([w for j, w in enumerate(held) if j != i])  # any two parties colluding
            assert abs(np.corrcoef(two.astype(np.float64), secret.astype(np.float64))[0, 1]) < 0.05


def test_client_transcript_holds_only_the_output_it_asked_for(served):
    t = load_transcript(served.out / "transcripts" / f"{CLIENT}.jsonl")
    if served.plan.output == "label":
        assert not t.of_kind(Kind.LOGITS)
        records = t.of_kind(Kind.LABELS)
        assert len(records) == 3
        for r in records:
            n = r.meta["num_inputs"]
            assert all(a.dtype == np.int64 and a.shape == (n,) for a in r.tensors.values()), "more than labels"
            total = reconstruct([r.tensors[f"share_{i}"] for i in range(3)]).astype(np.float64) / SCALE
            assert np.array_equal(np.rint(total).astype(np.int64), r.tensors["labels"])
        labels = np.concatenate([r.tensors["labels"] for r in records])
        assert (labels == served.reference.argmax(1)).mean() >= 0.995
    else:  # the positive control: a logits deployment's client does hold the logits
        assert not t.of_kind(Kind.LABELS)
        logits = np.concatenate([r.tensors["logits"] for r in t.of_kind(Kind.LOGITS)])
        assert logits.shape == (450, 10) and np.abs(logits - served.reference).max() < 1e-2


def _stubs(served, party_id):
    tls = TlsFiles.for_party(served.certs, party_id)
    return [pb_grpc.MpcInferenceStub(make_channel(t, tls=tls)) for t in served.targets]


def _query(served, stubs, x, *, query_id=None, parties=(0, 1, 2), num_inputs=None, model_id=None, cut=0):
    """Send party i a dense share of x (three random-looking shares that add up to x), to ``parties`` only."""
    described = stubs[0].Describe(pb.MpcDescribeRequest(), timeout=30)
    secret = encode_fixed(np.asarray(x, np.float32).ravel())
    rng = np.random.default_rng()
    masks = [rng.integers(-2 ** 62, 2 ** 62, secret.size) for _ in range(2)]
    shares = [reconstruct([secret, -masks[0], -masks[1]]), *masks]
    query_id = query_id if query_id is not None else secrets.randbits(63)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(stubs[i].Infer, pb.QueryShare(
            query_id=query_id, party=i, num_inputs=num_inputs or len(x), model_id=model_id or described.model_id,
            dense=shares[i].astype("<i8").tobytes()[cut:]), timeout=60) for i in parties]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result())
            except grpc.RpcError as e:
                outcomes.append(e.code())
    return query_id, outcomes


def test_refusals_leave_the_deployment_serving(served):
    x = served.ds.x_test[:4]
    owner, client_stubs = _stubs(served, "owner"), _stubs(served, CLIENT)
    with pytest.raises(grpc.RpcError) as e:  # a client cannot replace the model
        client_stubs[0].UploadModel(pb.ModelShare(model_id="x", party=0, length=1, dense=b"\0" * 8), timeout=30)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _query(served, owner, x)[1] == [grpc.StatusCode.PERMISSION_DENIED] * 3  # the owner cannot query
    assert _query(served, client_stubs, x, model_id="other")[1] == [grpc.StatusCode.FAILED_PRECONDITION] * 3
    assert _query(served, client_stubs, x, num_inputs=10_000)[1] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert _query(served, client_stubs, x, cut=8)[1] == [grpc.StatusCode.INVALID_ARGUMENT] * 3  # truncated share
    # a query sent to two of the three parties: the queries behind it are answered meanwhile; after ARRIVAL_S
    # both parties abort it, and the MPC world stays in step
    with ThreadPoolExecutor(1) as pool:
        partial = pool.submit(_query, served, client_stubs, x, parties=(0, 1))
        time.sleep(0.5)  # it reaches party 0 first
        query_id, replies = _query(served, client_stubs, x)
        assert not partial.done()
        assert partial.result()[1] == [grpc.StatusCode.ABORTED] * 2
    assert all(isinstance(r, pb.AnswerShare) for r in replies), replies
    answer = reconstruct([np.frombuffer(r.share, "<i8").astype(np.int64) for r in replies]) / SCALE
    if served.plan.output == "logits":
        assert np.abs(answer.reshape(4, 10) - served.reference[:4]).max() < 1e-2
    else:
        assert np.array_equal(np.rint(answer), served.reference[:4].argmax(1))
    assert _query(served, client_stubs, x, query_id=query_id)[1] == [grpc.StatusCode.ALREADY_EXISTS] * 3  # replay


def test_fuzzed_messages_get_clear_refusals_and_the_deployment_keeps_answering(served):
    """Random messages from a client to party 1 (a query that gets through waits for the others; the fuzzer
    gives up on it), and random bytes; after each method, a real query through all parties is still right."""
    from hypothesis import strategies as st

    from tests.service_fuzz import fuzz_raw, fuzz_service
    channel = make_channel(served.targets[1], tls=TlsFiles.for_party(served.certs, CLIENT))
    model_id = _stubs(served, CLIENT)[1].Describe(pb.MpcDescribeRequest(), timeout=30).model_id

    def still_right(_):
        with client(served.targets, served.certs, served.out / "fuzz") as c:
            got = c.infer(served.ds.x_test[:3])
        want = served.reference[:3]
        assert (np.abs(got - want).max() < 1e-2) if served.plan.output == "logits" else \
            np.array_equal(got, want.argmax(1))

    service = pb.DESCRIPTOR.services_by_name["MpcInference"]
    common = dict(valid_after=still_right, timeouts={"Infer": 3.0},
                  extra_allowed={"Infer": {grpc.StatusCode.DEADLINE_EXCEEDED}})
    report = fuzz_service(channel, service, max_examples=15, strings=[model_id],
                          overrides={"securecollab.v1.QueryShare.party": st.sampled_from([1, 0, 2]),
                                     "securecollab.v1.QueryShare.num_inputs": st.sampled_from([1, 2, 0, 10_000])},
                          timeout=30, **common)
    fuzz_raw(channel, service, max_examples=10, timeout=30, valid_after=still_right)
    channel.close()
    assert report.codes("UploadModel") == {"PERMISSION_DENIED"}
    assert "INVALID_ARGUMENT" in report.codes("Infer")

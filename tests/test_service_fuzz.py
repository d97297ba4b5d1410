"""The fuzz harness itself (tests/service_fuzz.py): it must catch what it claims to catch.

Each test serves a small deliberately faulty FedAvgAggregator servicer (not the real aggregator:
the faults are planted) over the project's transport, and checks that the harness fails on it.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from hypothesis import given, settings

from securecollab.generated.v1 import fedavg_pb2 as pb
from securecollab.generated.v1 import fedavg_pb2_grpc as pb_grpc
from securecollab.generated.v1 import he_pb2, split_pb2
from securecollab.net.transport import make_channel, make_server
from tests.service_fuzz import fuzz_raw, fuzz_service, messages

SERVICE = pb.DESCRIPTOR.services_by_name["FedAvgAggregator"]


class Faulty(pb_grpc.FedAvgAggregatorServicer):
    """Join: fine. GetModel: raises on a non-empty client id (-> UNKNOWN). SubmitUpdate: refuses with no
    details when asked to, or takes the server out of service."""

    def __init__(self, server_ref: list, *, quiet_refusal=False, stop_serving=False):
        self.server_ref, self.quiet_refusal, self.stop_serving = server_ref, quiet_refusal, stop_serving

    def Join(self, request, context):
        return pb.JoinReply(num_clients=1)

    def GetModel(self, request, context):
        if request.client_id:
            raise KeyError(request.client_id)  # an unhandled exception: UNKNOWN
        return pb.ModelReply()

    def SubmitUpdate(self, request, context):
        if self.stop_serving:
            self.server_ref[0].set_serving(False)
        if self.quiet_refusal:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "")
        return pb.UpdateAck()


@pytest.fixture
def faulty(tls_for):
    made = []

    def serve(**faults):
        ref: list = []
        server = make_server(tls=tls_for("aggregator"), host="127.0.0.1")
        server.add(pb_grpc.add_FedAvgAggregatorServicer_to_server, Faulty(ref, **faults), SERVICE.full_name)
        ref.append(server.start())
        channel = make_channel(f"localhost:{server.port}", tls=tls_for("client-0"))
        made.append((server, channel))
        return channel

    yield serve
    for server, channel in made:
        channel.close()
        server.stop(grace=None)


def test_fuzz_harness_catches_an_unhandled_exception(faulty):
    channel = faulty()
    with pytest.raises(AssertionError, match="GetModel answered UNKNOWN"):
        fuzz_service(channel, SERVICE, max_examples=20, skip_methods={"SubmitUpdate"})
    with pytest.raises(AssertionError, match="GetModel answered UNKNOWN"):
        fuzz_raw(channel, SERVICE, max_examples=40, skip_methods={"Join", "SubmitUpdate"})
    # the working methods alone pass, and were really called
    report = fuzz_service(channel, SERVICE, max_examples=10, skip_methods={"GetModel"})
    assert report.counts["Join"]["OK"] >= 1 and sum(report.counts["SubmitUpdate"].values()) >= 5


def test_fuzz_harness_catches_a_refusal_without_details(faulty):
    with pytest.raises(AssertionError, match="SubmitUpdate answered INVALID_ARGUMENT with no details"):
        fuzz_service(faulty(quiet_refusal=True), SERVICE, max_examples=5, skip_methods={"GetModel"})


def test_fuzz_harness_catches_a_service_that_stops_serving_or_answers_wrongly(faulty):
    with pytest.raises(AssertionError, match="health of .* is NOT_SERVING"):
        fuzz_service(faulty(stop_serving=True), SERVICE, max_examples=3, skip_methods={"GetModel"})

    def wrong(channel):
        assert pb_grpc.FedAvgAggregatorStub(channel).Join(pb.JoinRequest(), timeout=5).num_clients == 2

    with pytest.raises(AssertionError, match="assert 1 == 2"):
        fuzz_service(faulty(), SERVICE, max_examples=3, skip_methods={"GetModel"}, valid_after=wrong)
    with pytest.raises(ValueError, match="no method"):
        fuzz_service(faulty(), SERVICE, skip_methods={"Nope"})


def test_fuzz_harness_messages_reach_every_kind_of_field():
    """Random messages include both oneof branches, empty and long streams' parts, NaN/Inf/huge and
    consistent tensors, bad lengths, boundary integers, and hint strings."""
    seen: set[str] = set()
    forward = messages(split_pb2.ForwardRequest.DESCRIPTOR, strings=["client-0"], shapes=[(4, 64)])
    part = messages(he_pb2.SessionPart.DESCRIPTOR, byte_seeds=[b"seed" * 20])

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(forward, part)
    def collect(f, p):
        seen.add(f"oneof:{p.WhichOneof('part')}")
        if f.client_id == "client-0":
            seen.add("hint")
        if f.step in (0, 2**32 - 1):
            seen.add(f"step:{f.step}")
        t = f.activations
        if t.dtype == 1 and len(t.data) == 4 * math.prod(t.shape):
            seen.add("consistent")
            values = np.frombuffer(t.data, np.float32)
            if np.isnan(values).any():
                seen.add("nan")
            if np.isinf(values).any():
                seen.add("inf")
            if values.size and np.abs(values[np.isfinite(values)]).max(initial=0) > 1e38:
                seen.add("huge")
            if tuple(t.shape) == (4, 64):
                seen.add("hint-shape")
        elif t.shape and len(t.data) != 4 * math.prod(t.shape):
            seen.add("bad-length")
        if p.WhichOneof("part") == "context" and b"seed" in p.context.data:
            seen.add("seeded-bytes")

    collect()
    assert {"oneof:options", "oneof:context", "oneof:None", "hint", "step:0", "step:4294967295", "consistent",
            "nan", "inf", "huge", "hint-shape", "bad-length", "seeded-bytes"} <= seen, seen

"""Specification of securecollab.transcript: JSON-lines records of what a party received.

Recorded tensors and blobs must load back bit-identical (dtype, shape, values), in
order per recording thread; a disabled recorder writes nothing; anything malformed
is refused with ValueError; and the format is plain JSON, so loading never unpickles.
"""

from __future__ import annotations

import base64
import json
import pickle
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from securecollab.transcript import FORMAT, TranscriptRecorder, load_transcript

THREADS, PER_THREAD = 4, 25


def _tensors(i: int, t: int) -> dict[str, object]:
    """Tensors of many dtypes and shapes, different for each (thread, record)."""
    rng = np.random.default_rng(1000 * t + i)
    base = rng.standard_normal((4, 6))
    return {
        "f32": base.astype(np.float32),
        "f64_0d": np.array(base[0, 0]),
        "f16_empty": np.zeros((0, 4), np.float16),
        "f16": np.array([np.nan, np.inf, -0.0, 65504.0], np.float16),
        "i64": rng.integers(-(2**63), 2**63 - 1, (3,), dtype=np.int64, endpoint=True),
        "i32": np.arange(6, dtype=np.int32).reshape(1, 2, 3) * (i + 1),
        "i8": np.array([-128, 127, i % 100], np.int8),
        "u8": rng.integers(0, 255, (2, 2), dtype=np.uint8),
        "u64": np.array([2**64 - 1, i], np.uint64),
        "bool": rng.integers(0, 2, (5,)).astype(bool),
        "big_endian": base.astype(">f8"),
        "strided": base[::2, ::3],
        "torch": torch.arange(4, dtype=torch.float32) + i,
    }


def _expected(value) -> np.ndarray:
    arr = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return arr.astype(arr.dtype.newbyteorder("="), order="C")


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _blobs(i: int, t: int) -> dict[str, bytes]:
    return {"ctx": np.random.default_rng(t * 7 + i).bytes(i * 13), "empty": b"", "all": bytes(range(256))}


def test_threads_record_and_load_back_identically(tmp_path):
    path = tmp_path / "nested" / "dir" / "aggregator.jsonl"
    rec = TranscriptRecorder(path, party="aggregator", role="aggregator")
    assert rec.enabled and path.exists()
    start = time.time()
    barrier = threading.Barrier(THREADS)

    def work(t: int):
        barrier.wait()
        for i in range(PER_THREAD):
            tensors = _tensors(i, t)
            # Both a dict and a list of (name, tensor) pairs are accepted.
            rec.record("update" if i % 2 else "share", round=i, step=t, sender=f"client-{t}",
                       meta={"i": i, "t": t, "nested": {"x": [1, 2.5, None, "s"]}},
                       tensors=tensors if i % 3 else list(tensors.items()), blobs=_blobs(i, t))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()

    tr = load_transcript(path)
    assert (tr.party, tr.role) == ("aggregator", "aggregator")
    assert len(tr.records) == THREADS * PER_THREAD
    for t in range(THREADS):
        mine = [r for r in tr.records if r.sender == f"client-{t}"]
        assert [r.round for r in mine] == list(range(PER_THREAD))  # in order per thread
        for i, r in enumerate(mine):
            assert r.kind == ("update" if i % 2 else "share")
            assert (r.round, r.step) == (i, t)
            assert r.meta == {"i": i, "t": t, "nested": {"x": [1, 2.5, None, "s"]}}
            assert start - 1 <= r.time <= time.time() + 1
            expected = _tensors(i, t)
            assert list(r.tensors) == list(expected)  # names, in recording order
            for name, value in expected.items():
                got = r.tensors[name]
                assert _same(got, _expected(value)), name
                assert got.dtype.isnative and got.flags.writeable
            assert r.blobs == _blobs(i, t)
    assert len(tr.of_kind("update")) == THREADS * (PER_THREAD // 2)
    assert all(r.kind == "share" for r in tr.of_kind("share"))


def test_record_without_tensors_or_blobs(tmp_path):
    path = tmp_path / "t.jsonl"
    rec = TranscriptRecorder(path, party="client-0", role="client")
    rec.record("join", round=0, sender="aggregator")
    rec.record("done", round=np.int64(3), step=np.int32(2), sender="aggregator", meta={"ok": True})
    records = load_transcript(path).records
    assert [(r.kind, r.round, r.step, r.meta, r.tensors, r.blobs) for r in records] == [
        ("join", 0, 0, {}, {}, {}), ("done", 3, 2, {"ok": True}, {}, {})]
    assert type(records[1].round) is int


@pytest.mark.parametrize("path", [None, ""])
def test_disabled_recorder_writes_nothing(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    rec = TranscriptRecorder(path, party="client-0", role="client")
    assert not rec.enabled
    rec.record("update", round=1, sender="x", tensors={"w": np.ones(3)}, blobs={"b": b"123"})
    assert list(tmp_path.rglob("*")) == []


def test_recording_an_object_array_fails_and_leaves_the_file_valid(tmp_path):
    path = tmp_path / "t.jsonl"
    rec = TranscriptRecorder(path, party="p", role="party")
    with pytest.raises(TypeError, match="object arrays cannot be recorded"):
        rec.record("x", round=0, sender="s", tensors={"o": np.array([object()], dtype=object)})
    assert len(path.read_text().splitlines()) == 1
    assert load_transcript(path).records == []


def test_file_is_plain_json_and_loading_never_unpickles(tmp_path, monkeypatch):
    path = tmp_path / "t.jsonl"
    rec = TranscriptRecorder(path, party="p", role="party")
    rec.record("x", round=0, sender="s", tensors={"w": np.arange(5, dtype=np.float64)}, blobs={"b": b"\x80\x04."})
    lines = path.read_bytes().decode("ascii").splitlines()
    header, line = (json.loads(x) for x in lines)
    assert header == {"format": FORMAT, "party": "p", "role": "party"}
    assert line["tensors"]["w"] == {"dtype": "<f8", "shape": [5],
                                    "b64": base64.b64encode(np.arange(5, dtype="<f8").tobytes()).decode()}
    assert line["blobs"] == {"b": base64.b64encode(b"\x80\x04.").decode()}

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(np, "load", forbidden)
    r = load_transcript(path).records[0]
    assert _same(r.tensors["w"], np.arange(5, dtype=np.float64))
    assert r.blobs == {"b": b"\x80\x04."}


# --------------------------------------------------------------------------- malformed files

def _valid_lines(tmp_path: Path) -> list[str]:
    path = tmp_path / "valid.jsonl"
    rec = TranscriptRecorder(path, party="p", role="party")
    rec.record("x", round=1, sender="s", tensors={"w": np.arange(6, dtype=np.int32).reshape(2, 3)},
               blobs={"b": b"hello"})
    return path.read_text().splitlines()


def _with_record(lines: list[str], **changes) -> list[str]:
    d = json.loads(lines[1])
    for key, value in changes.items():
        target, *rest = key.split("__")
        if rest:  # nested: tensors__w__dtype="|O"
            node = d[target]
            for k in rest[:-1]:
                node = node[k]
            node[rest[-1]] = value
        else:
            d[target] = value
    return [lines[0], json.dumps(d)]


MALFORMED = {
    "empty-file": lambda lines: [],
    "header-not-json": lambda lines: ["not json", *lines[1:]],
    "header-wrong-format": lambda lines: [json.dumps({"format": "other.v9", "party": "p", "role": "r"}), *lines[1:]],
    "header-no-format": lambda lines: [json.dumps({"party": "p", "role": "r"}), *lines[1:]],
    "header-not-an-object": lambda lines: ["[1, 2]", *lines[1:]],
    "header-without-party": lambda lines: [json.dumps({"format": FORMAT, "role": "r"}), *lines[1:]],
    "truncated-line": lambda lines: [lines[0], lines[1][: len(lines[1]) // 2]],
    "record-not-an-object": lambda lines: [lines[0], "5"],
    "record-missing-key": lambda lines: [
        lines[0], json.dumps({k: v for k, v in json.loads(lines[1]).items() if k != "sender"})],
    "bad-base64-blob": lambda lines: _with_record(lines, blobs__b="aGVs*bG8="),
    "bad-base64-tensor": lambda lines: _with_record(lines, tensors__w__b64="@@@@"),
    "object-dtype": lambda lines: _with_record(lines, tensors__w__dtype="|O"),
    "object-in-struct-dtype": lambda lines: _with_record(lines, tensors__w__dtype=[["a", "<i8"], ["b", "|O"]]),
    "unknown-dtype": lambda lines: _with_record(lines, tensors__w__dtype="nonsense"),
    "bytes-shape-mismatch": lambda lines: _with_record(lines, tensors__w__shape=[4, 3]),
    "partial-element": lambda lines: _with_record(lines, tensors__w__b64=base64.b64encode(b"abc").decode()),
    "tensors-not-an-object": lambda lines: _with_record(lines, tensors=[]),
}


@pytest.mark.parametrize("mutate", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_transcripts_raise_value_error(tmp_path, mutate):
    lines = _valid_lines(tmp_path)
    assert len(load_transcript(tmp_path / "valid.jsonl").records) == 1  # the unmutated file is fine
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(line + "\n" for line in mutate(lines)))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_transcript(path)


def test_a_resumed_transcript_keeps_what_the_party_recorded_before(tmp_path):
    path = tmp_path / "party-0.jsonl"
    TranscriptRecorder(path, party="party-0", role="party").record("share", round=0, sender="client-0")
    # a restarted party continues its own transcript ...
    TranscriptRecorder(path, party="party-0", role="party", resume=True).record("share", round=2, sender="client-0")
    assert [r.round for r in load_transcript(path).of_kind("share")] == [0, 2]
    with path.open("a") as f:  # killed mid-write: a torn last line ...
        f.write('{"kind": "share", "round": 3, "ste')
    TranscriptRecorder(path, party="party-0", role="party", resume=True).record("share", round=4, sender="client-0")
    assert [r.round for r in load_transcript(path).of_kind("share")] == [0, 2, 4]  # ... dropped on resume
    # ... but never another party's, and without resume a run starts afresh
    TranscriptRecorder(path, party="party-1", role="party", resume=True).record("share", round=5, sender="client-0")
    assert [r.round for r in load_transcript(path).of_kind("share")] == [5]
    TranscriptRecorder(path, party="party-1", role="party")
    assert load_transcript(path).of_kind("share") == []

"""Packed steps (`training.packed`, `RunConfig.packed_steps`): only real-token positions of h and grad_h travel.

The framing (splitwave.protos.steps: pack/unpack, which steps pack, the frames), the server's checks of a
packed step (hostile shapes and values are INVALID_ARGUMENT, an oversized rebuild RESOURCE_EXHAUSTED), and
that packing is lossless: the same final edge and top adapters as padded steps, for classification (tiny
BERT, on the engine and over gRPC with the real EdgeClient) and causal LM (tiny GPT-2 on the engine), with
fewer bytes metered up and down, and the metered bytes being the serialized frames.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from net_helpers import ROOT, assert_same_factors, run_with_attack, tiny_cfg

from splitwave.common.config import parse_config
from splitwave.common.tokens import IGNORE_INDEX
from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos import steps
from splitwave.protos.codec import decode, encode
from splitwave.protos.steps import ROW_LENGTHS, build_step, pack_rows, packable_lengths, prefix_lengths, unpack_rows
from splitwave.server.errors import ServiceError
from splitwave.server.validation import check_batch
from splitwave.sim.server import InProcessServer
from tests.test_sim_engine import _cfg, _max_diff, _run

EDGE_CACHE = ROOT / ".cache" / "edge-tests"


def _mask(lengths, seq=None) -> np.ndarray:
    n = np.asarray(lengths)
    return (np.arange(seq or n.max())[None, :] < n[:, None]).astype(np.int64)


# ----------------------------------------------------------------------------------------------- framing
def test_which_masks_pack():
    assert prefix_lengths(_mask([3, 1, 2])).tolist() == [3, 1, 2]
    assert prefix_lengths(np.ones((2, 4), np.int32)).tolist() == [4, 4]
    assert prefix_lengths(_mask([3, 1, 2]).astype(bool)).tolist() == [3, 1, 2]
    for bad in (
        [[0, 1, 1], [1, 1, 1]],  # left padding
        [[1, 0, 1], [1, 1, 1]],  # a hole
        [[1, 1, 0], [1, 0, 0]],  # an all-padding column: not trimmed to the longest row
        [[1, 1, 1], [0, 0, 0]],  # a row without tokens
        [[1, 2, 1], [1, 1, 1]],  # not 0/1
    ):
        assert prefix_lengths(np.array(bad)) is None, bad
    assert prefix_lengths(np.ones((0, 3))) is None and prefix_lengths(np.ones(3)) is None
    assert IGNORE_INDEX == steps.IGNORE_INDEX  # protos cannot import common: the constant is kept equal here

    mask = _mask([3, 1])
    ok = np.where(mask == 1, 7, IGNORE_INDEX)
    assert packable_lengths(mask, np.array([0, 1])).tolist() == [3, 1]  # class labels: mask alone decides
    assert packable_lengths(mask, ok).tolist() == [3, 1]
    counted = ok.copy()
    counted[1, 2] = 5  # a loss taken at a padded position would see the zeros packing puts there
    assert packable_lengths(mask, counted) is None


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_pack_then_unpack_is_identity_on_real_positions(data):
    b = data.draw(st.integers(1, 6), label="batch")
    seq = data.draw(st.integers(1, 12), label="seq")
    hidden = data.draw(st.integers(1, 5), label="hidden")
    lengths = np.array(data.draw(st.lists(st.integers(0, seq), min_size=b, max_size=b), label="lengths"))
    x = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).standard_normal((b, seq, hidden))
    packed = pack_rows(x, lengths)
    assert packed.shape == (lengths.sum(), hidden)
    real = _mask(lengths, seq).astype(bool)
    assert np.array_equal(packed, x[real])  # row-major: row 0's positions, then row 1's, ...
    back = unpack_rows(packed, lengths, seq)
    assert back.shape == x.shape and back.dtype == x.dtype
    assert np.array_equal(back[real], x[real]) and not back[~real].any()
    assert np.array_equal(pack_rows(back, lengths), packed)
    if lengths.max() > 0:
        assert unpack_rows(packed, lengths).shape == (b, lengths.max(), hidden)
    with pytest.raises(ValueError):
        unpack_rows(np.zeros((lengths.sum() + 1, hidden)), lengths, seq)
    with pytest.raises(ValueError):
        pack_rows(x, np.append(lengths, 1))


def test_a_step_is_framed_packed_or_padded_and_its_grad_read_back():
    rng = np.random.default_rng(0)
    lengths = np.array([5, 2, 4])
    mask = _mask(lengths)
    h = rng.standard_normal((3, 5, 4)).astype(np.float32)
    labels = np.array([1, 0, 1])

    padded = build_step(h, mask, labels)
    got = decode(padded.frames)
    assert not padded.packed and set(got) == {"h", "attention_mask", "labels"}
    assert np.array_equal(got["h"], h) and np.array_equal(got["attention_mask"], mask)

    sent = build_step(h, mask, labels, "fp16", packed=True)
    got = decode(sent.frames)
    assert sent.packed and set(got) == {"h", ROW_LENGTHS, "labels"}
    assert got["h"].shape == (11, 4) and got["h"].dtype == np.float32 and sent.frames[0].codec == "fp16"
    assert got[ROW_LENGTHS].dtype == np.int32 and got[ROW_LENGTHS].tolist() == [5, 2, 4]
    np.testing.assert_allclose(got["h"], h[mask == 1], rtol=1e-3)
    assert sum(len(f.payload) for f in sent.frames if f.name == "h") == 11 * 4 * 2  # 11 real tokens of 15, fp16

    msgs = sent.messages(pb.EvalRequest, pb.Header(step=3), {"edge_fwd_s": 0.5})
    assert [m.WhichOneof("body") for m in msgs] == ["frame"] * len(sent.frames) + ["end_step"]
    assert msgs[-1].end_step.batch_size == 3 and msgs[-1].end_step.metrics["edge_fwd_s"] == 0.5

    # the server packs grad_h like h; the edge gets the padded layout back, zeros at padding
    grad = rng.standard_normal((3, 5, 4)).astype(np.float32) * mask[..., None]
    reply = decode(steps.grad_frames(grad, got[ROW_LENGTHS]))
    assert reply["grad_h"].shape == (11, 4)
    assert np.array_equal(sent.grad_h(reply), grad)
    assert np.array_equal(padded.grad_h(decode(steps.grad_frames(grad, None))), grad)

    # a mask that is not right-padded goes padded even when asked to pack
    left = mask[:, ::-1].copy()
    assert not build_step(h, left, labels, packed=True).packed
    # `encode` encodes h (an error-feedback encoder can stand in); integer tensors always go raw
    seen = []

    def spy(name, a, codec):
        seen.append((name, a.shape, codec))
        return encode(name, a, codec)

    build_step(h, mask, labels, "bf16", packed=True, encode=spy)
    assert seen == [("h", (11, 4), "bf16")]


# ----------------------------------------------------------------------------------------------- server checks
HID, MAXSEQ = 4, 8
LIMITS = dict(hidden=HID, max_seq_len=MAXSEQ, num_labels=2, vocab=50, max_abs=1e4, max_bytes=1 << 16)


def _packed(lengths=(3, 1, 2), task="seq-cls", **over):
    lengths = np.asarray(lengths, np.int32)
    rng = np.random.default_rng(1)
    t = {
        "h": rng.standard_normal((int(lengths.sum()), HID)).astype(np.float32),
        ROW_LENGTHS: lengths,
        "labels": np.array([0, 1, 1][: len(lengths)]) if task == "seq-cls" else np.full((3, 3), IGNORE_INDEX),
    }
    t.update(over)
    return t


@pytest.mark.parametrize("task", ["seq-cls", "causal-lm"])
def test_a_packed_step_is_rebuilt_as_the_padded_step(task):
    t = _packed(task=task)
    h, mask, labels = check_batch(t, task=task, **LIMITS)
    assert np.array_equal(mask, _mask([3, 1, 2])) and mask.dtype == np.int64
    assert h.shape == (3, 3, HID) and np.array_equal(h[mask == 1], t["h"]) and not h[mask == 0].any()
    padded = {"h": h, "attention_mask": mask, "labels": t["labels"]}
    for a, b in zip(check_batch(padded, task=task, **LIMITS), (h, mask, labels)):
        assert np.array_equal(a, b)
    # other integer dtypes are accepted for row_lengths
    assert np.array_equal(check_batch({**t, ROW_LENGTHS: t[ROW_LENGTHS].astype(np.uint8)}, task=task, **LIMITS)[0], h)


HOSTILE = [
    ({ROW_LENGTHS: np.array([3.0, 1.0, 2.0])}, "INVALID_ARGUMENT", "row_lengths must be integers"),
    ({ROW_LENGTHS: np.array([[3, 1, 2]])}, "INVALID_ARGUMENT", "row_lengths must be integers"),
    ({ROW_LENGTHS: np.zeros(0, np.int32)}, "INVALID_ARGUMENT", "row_lengths must be integers"),
    ({ROW_LENGTHS: np.array([3, 0, 3])}, "INVALID_ARGUMENT", "row_lengths must be in [1, max_seq_len 8]"),
    ({ROW_LENGTHS: np.array([3, -1, 4])}, "INVALID_ARGUMENT", "row_lengths must be in"),
    ({ROW_LENGTHS: np.array([3, 1, 2**40])}, "INVALID_ARGUMENT", "row_lengths must be in"),
    ({ROW_LENGTHS: np.array([4, 1, 2])}, "INVALID_ARGUMENT", "packed h must be float [sum(row_lengths) = 7, 4]"),
    ({ROW_LENGTHS: np.array([1, 1, 1])}, "INVALID_ARGUMENT", "sum(row_lengths) = 3"),
    ({"h": np.zeros((6, HID + 1), np.float32)}, "INVALID_ARGUMENT", "packed h must be float"),
    ({"h": np.zeros((3, 2, HID), np.float32)}, "INVALID_ARGUMENT", "packed h must be float"),
    ({"h": np.zeros((6, HID), np.int64)}, "INVALID_ARGUMENT", "packed h must be float"),
    ({"h": np.full((6, HID), np.nan, np.float32)}, "INVALID_ARGUMENT", "NaN or Inf"),
    ({"h": np.full((6, HID), 1e30)}, "INVALID_ARGUMENT", "max_abs_value"),
    ({"labels": np.array([0, 1])}, "INVALID_ARGUMENT", "labels must be integers of shape [3]"),
    ({"labels": np.array([0, 1, 5])}, "INVALID_ARGUMENT", "labels must be in"),
    ({"attention_mask": np.ones((3, 3), np.int64)}, "INVALID_ARGUMENT", "unexpected tensors ['attention_mask']"),
    ({"evil": np.ones(3)}, "INVALID_ARGUMENT", "unexpected tensors ['evil']"),
    # many one-token rows and one long one: a small message that would rebuild to a large padded h
    (
        {ROW_LENGTHS: np.array([8] + [1] * 599, np.int32), "h": np.zeros((607, HID), np.float16)},
        "RESOURCE_EXHAUSTED",
        "rebuilds to h [600, 8, 4]",
    ),
]


@pytest.mark.parametrize("over,code,text", HOSTILE, ids=[f"{i}-{c[2][:24]}" for i, c in enumerate(HOSTILE)])
def test_hostile_packed_steps_are_refused(over, code, text):
    t = _packed(**over)
    if "RESOURCE" in code:
        t["labels"] = np.zeros(600, np.int64)
    with pytest.raises(ServiceError) as e:
        check_batch(t, task="seq-cls", **LIMITS)
    assert e.value.code == code and text in str(e.value), str(e.value)


def test_causal_lm_labels_of_a_packed_step_are_batch_by_longest_row():
    bad = _packed(task="causal-lm", labels=np.full((3, 4), IGNORE_INDEX))  # seq must be max(row_lengths) = 3
    with pytest.raises(ServiceError, match=r"labels must be integers of shape \[3, 3\]"):
        check_batch(bad, task="causal-lm", **LIMITS)
    with pytest.raises(ServiceError, match="token ids"):
        check_batch(_packed(task="causal-lm", labels=np.full((3, 3), 50)), task="causal-lm", **LIMITS)


# ----------------------------------------------------------------------------------------------- lossless
def _bytes(recs) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in recs:
        for k, v in r["bytes_by_method"].items():
            out[k] = out.get(k, 0) + v
    return out


def _recording(monkeypatch) -> list:
    """Every Train call the engine makes through the in-process server: (request messages, replies)."""
    calls: list = []
    real = InProcessServer.train

    def train(self, msgs):
        replies, down = real(self, msgs)
        calls.append((list(msgs), list(replies)))
        return replies, down

    monkeypatch.setattr(InProcessServer, "train", train)
    return calls


def _engine_pair(tmp_path, monkeypatch, make_cfg):
    """(padded, packed) engine runs of make_cfg(packed): (records, edge, top, train calls) each."""
    out = []
    for packed in (False, True):
        calls = _recording(monkeypatch)
        recs, edge, top, _ = _run(tmp_path / str(packed), make_cfg(packed))
        out.append((recs, edge, top, calls))
        monkeypatch.undo()
    return out


def _check_lossless_and_metered(pair, hidden: int) -> None:
    (recs0, edge0, top0, calls0), (recs1, edge1, top1, calls1) = pair
    assert _max_diff(edge0, edge1) < 1e-6 and _max_diff(top0, top1) < 1e-6
    assert [r["eval_loss"] for r in recs0] == [r["eval_loss"] for r in recs1]
    assert recs0[0]["eval_loss"] != recs0[-1]["eval_loss"]  # it trained: the comparison is not vacuous
    b0, b1 = _bytes(recs0), _bytes(recs1)
    assert b1["Train|up"] < b0["Train|up"] and b1["Train|down"] < b0["Train|down"]
    for calls, by in ((calls0, b0), (calls1, b1)):  # the meter counts exactly the serialized messages
        assert by["Train|up"] == sum(m.ByteSize() for msgs, _ in calls for m in msgs)
        assert by["Train|down"] == sum(m.ByteSize() for _, replies in calls for m in replies)
    padding = 0
    for msgs, replies in calls1:  # packed: h and grad_h carry the real tokens only, raw float32
        sent = decode(m.frame for m in msgs if m.WhichOneof("body") == "frame")
        tokens = int(sent[ROW_LENGTHS].sum())
        padding += len(sent[ROW_LENGTHS]) * int(sent[ROW_LENGTHS].max()) - tokens
        assert "attention_mask" not in sent and sent["h"].shape == (tokens, hidden)
        assert sum(len(m.frame.payload) for m in msgs if m.frame.name == "h") == tokens * hidden * 4
        back = decode(r.frame for r in replies if r.WhichOneof("body") == "frame")
        assert back["grad_h"].shape == (tokens, hidden)
    assert padding > 0  # the batches were padded: packing left something out


def test_packed_classification_on_the_engine_is_lossless_and_smaller(tmp_path, monkeypatch):
    """Tiny BERT, 3 clients, sfl-v1 (a client's result does not depend on how its steps interleave with
    others', which the smaller messages change): the same final adapters, fewer bytes up and down."""
    pair = _engine_pair(tmp_path, monkeypatch, lambda packed: _cfg(training__mode="sfl-v1", training__packed=packed))
    _check_lossless_and_metered(pair, 32)


@pytest.mark.slow  # exports its own tiny GPT-2 bundle (synthetic vocabulary): about 2 min on 2 cores
def test_packed_causal_lm_on_the_engine_is_lossless_and_smaller(tmp_path, monkeypatch):
    """Tiny GPT-2 causal LM (configs/e2e-gpt2-tiny.yaml's model: its cached bundle) on synthetic text, whose
    per-token labels stay [batch, longest row]."""
    raw = yaml.safe_load((ROOT / "configs" / "e2e-gpt2-tiny.yaml").read_text())

    def make(packed):
        return parse_config(
            {
                **raw,
                "data": {"dataset": "synthetic", "num_train": 32, "num_eval": 8, "max_seq_len": 16},
                "training": {**raw["training"], "mode": "sfl-v1", "batch_size": 4, "local_steps": 2, "packed": packed},
                "rounds": {"num_rounds": 2, "deadline_s": 120},
            }
        )

    pair = _engine_pair(tmp_path, monkeypatch, make)
    _check_lossless_and_metered(pair, 32)
    for msgs, _ in pair[1][3]:
        sent = decode(m.frame for m in msgs if m.WhichOneof("body") == "frame")
        assert sent["labels"].shape == (len(sent[ROW_LENGTHS]), sent[ROW_LENGTHS].max())


def test_packed_edge_client_over_grpc_equals_padded_and_evaluates_packed(tmp_path):
    """The real EdgeClient asked for packed steps (RunConfig.packed_steps) over loopback gRPC: the same final
    adapters as padded steps, fewer bytes; an Evaluate stream takes a packed batch and scores it like the
    padded one."""
    rng = np.random.default_rng(2)
    lengths = np.array([16, 3, 9, 1, 12, 16, 5, 7], np.int32)
    mask = _mask(lengths)
    h = rng.standard_normal((8, 16, 32)).astype(np.float32) * mask[..., None]
    labels = rng.integers(0, 2, 8).astype(np.int64)

    def evaluate(stub, joined, app):
        assert joined.config.packed_steps
        out = []
        for packed in (False, True):
            sent = build_step(h, mask, labels, packed=packed)
            hdr = pb.Header(session_token=joined.session_token, run_id=joined.run_id)
            (reply,) = list(stub.Evaluate(iter(sent.messages(pb.EvalRequest, hdr)), timeout=10))
            out.append((reply.end_step.loss, reply.end_step.correct, reply.end_step.count))
        return out, app.meter.total(direction="up")

    padded, _, srv0 = run_with_attack(tmp_path / "padded", tiny_cfg(), EDGE_CACHE)
    packed, (scores, _), srv1 = run_with_attack(
        tmp_path / "packed", tiny_cfg(training={"packed": True}), EDGE_CACHE, evaluate
    )
    assert_same_factors(packed, padded, atol=1e-6)
    assert scores[0] == pytest.approx(scores[1], rel=1e-6, abs=1e-7) and scores[0][2] == 8
    up0 = srv0.app.meter.total(client="honest", direction="up", method="Train")
    up1 = srv1.app.meter.total(client="honest", direction="up", method="Train")
    down0 = srv0.app.meter.total(client="honest", direction="down", method="Train")
    down1 = srv1.app.meter.total(client="honest", direction="down", method="Train")
    assert 0 < up1 < up0 and 0 < down1 < down0, (up0, up1, down0, down1)

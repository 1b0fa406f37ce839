"""sfl-v2 `server_batch`: steps of several clients fused into one server step.

Checked against plain torch: each client gets exactly dL_c/dh_c, loss and accuracy of its own step at the
shared top weights; the adapter takes one AdamW step on the mean of the clients' gradients; one client alone
(or `server_batch` 1) is today's unfused step bit for bit. Then the batcher's rules (never two steps of one
client, at most K, a failure reaches every participant and the server serves on), the config checks, and
clients training over real gRPC with fused steps.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from net_helpers import ROOT, run_clients, serving, tiny_cfg

from splitwave.common.config import ConfigError, parse_config
from splitwave.server import compute
from splitwave.server.batching import StepBatcher
from splitwave.server.errors import ServiceError
from splitwave.server.trainer import StepInput, TopTrainer, _accuracy
from tests.conftest import make_split

LR, WD = 0.01, 0.01
CASES = [("bert", "seq-cls"), ("gpt2", "seq-cls"), ("gpt2", "causal-lm")]


def _trainer(family: str, task: str, server_batch: int = 1, wait_s: float = 0.0) -> TopTrainer:
    split = make_split(family, task, cut=2)
    return TopTrainer(split, task, lr=LR, weight_decay=WD, server_batch=server_batch, server_batch_wait_s=wait_s)


def _steps(trainer: TopTrainer, shapes: list[tuple[int, int]], seed: int = 0) -> list[StepInput]:
    """Random steps of clients c0, c1, ...: (batch, seq) each, one row right-padded by the client itself."""
    cfg = trainer.split.peft_model.config
    rng = np.random.default_rng(seed)
    out = []
    for i, (b, s) in enumerate(shapes):
        h = rng.standard_normal((b, s, cfg.hidden_size)).astype(np.float32)
        mask = np.ones((b, s), np.int64)
        mask[-1, max(1, s - 2) :] = 0
        if trainer.task == "seq-cls":
            labels = rng.integers(0, 2, b).astype(np.int64)
        else:
            labels = np.where(mask == 1, rng.integers(0, cfg.vocab_size, (b, s)), -100).astype(np.int64)
        out.append(StepInput(f"c{i}", h, mask, labels))
    return out


def _plain_step(trainer: TopTrainer, step: StepInput):
    """One client's forward/backward at the current top weights, in plain torch:
    (grad_h, loss, (correct, count), adapter grads)."""
    for p in trainer.params.values():
        p.grad = None
    h = torch.from_numpy(step.h.copy()).requires_grad_(True)
    labels = torch.from_numpy(step.labels)
    logits = trainer.module(h, torch.from_numpy(step.attention_mask))
    loss = trainer.split.loss(logits, labels)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in trainer.params.items()}
    for p in trainer.params.values():
        p.grad = None
    return h.grad.numpy(), float(loss), _accuracy(logits, labels, trainer.task), grads


def _concurrently(trainer: TopTrainer, steps: list[StepInput]) -> list:
    """Submit every step from its own thread (as gRPC handlers do); results in the steps' order."""
    out: list = [None] * len(steps)

    def go(i):
        try:
            out[i] = trainer.train_step(steps[i].client_id, steps[i].h, steps[i].attention_mask, steps[i].labels)
        except Exception as e:  # noqa: BLE001 - checked by the test
            out[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(steps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


# -- exactness ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,task", CASES)
def test_fused_step_equals_separate_steps_and_mean_gradient_adamw(family, task):
    trainer = _trainer(family, task, server_batch=3, wait_s=10.0)  # waits for all three: the group is full
    steps = _steps(trainer, [(3, 7), (2, 12), (4, 5)])
    before = {k: p.detach().clone() for k, p in trainer.params.items()}
    ref = [compute.run(_plain_step, trainer, s) for s in steps]
    # what the fused step must do to the adapter: AdamW on the mean of the clients' gradients
    twins = {k: torch.nn.Parameter(v.clone()) for k, v in before.items()}
    for k, p in twins.items():
        p.grad = sum(r[3][k] for r in ref) / len(ref)
    torch.optim.AdamW(list(twins.values()), lr=LR, weight_decay=WD).step()

    results = _concurrently(trainer, steps)

    for s, res, (grad_h, loss, accuracy, _) in zip(steps, results, ref):
        assert not isinstance(res, Exception), res
        assert res.server_batch == 3
        assert res.grad_h.shape == s.h.shape and res.grad_h.flags.c_contiguous  # the padding is cut off
        np.testing.assert_allclose(res.grad_h, grad_h, rtol=0, atol=1e-5)
        assert abs(res.loss - loss) < 1e-5
        assert (res.correct, res.count) == accuracy
    moved = max(float((trainer.params[k].detach() - before[k]).abs().max()) for k in before)
    assert moved > 1e-3
    for k, p in trainer.params.items():
        np.testing.assert_allclose(p.detach().numpy(), twins[k].detach().numpy(), rtol=0, atol=1e-6, err_msg=k)


def _todays_step(trainer: TopTrainer, opt: torch.optim.Optimizer, step: StepInput):
    """The unfused step as it was before server batching existed (server/trainer.py at 9d08ca2)."""
    opt.zero_grad(set_to_none=True)
    h = torch.from_numpy(np.ascontiguousarray(step.h, dtype=np.float32)).requires_grad_(True)
    logits = trainer.module(h, torch.from_numpy(step.attention_mask))
    loss = trainer.split.loss(logits, torch.from_numpy(step.labels))
    loss.backward()
    opt.step()
    return h.grad.numpy(), float(loss.detach())


@pytest.mark.parametrize("family,task", CASES)
def test_server_batch_1_and_a_lone_client_are_todays_step_bit_for_bit(family, task):
    today = _trainer(family, task)
    opt = torch.optim.AdamW(list(today.params.values()), lr=LR, weight_decay=WD)
    unbatched = _trainer(family, task, server_batch=1)
    alone = _trainer(family, task, server_batch=4, wait_s=0.0)  # nobody else comes: a group of one
    assert unbatched.batcher is None
    for i, s in enumerate(_steps(today, [(3, 7), (2, 12), (4, 5)], seed=1)):
        grad_ref, loss_ref = compute.run(_todays_step, today, opt, s)
        for tr in (unbatched, alone):
            res = tr.train_step("c0", s.h, s.attention_mask, s.labels)
            assert res.server_batch == 1
            assert np.array_equal(res.grad_h, grad_ref), (i, tr.batcher)
            assert res.loss == loss_ref
    for tr in (unbatched, alone):
        for k, p in tr.params.items():
            assert torch.equal(p.detach(), today.params[k].detach()), k


# -- the batcher's rules -----------------------------------------------------------------------------------


class _Recorder:
    def __init__(self, fail_when=None):
        self.groups: list[list[str]] = []
        self.fail_when = fail_when

    def __call__(self, items):
        self.groups.append([cid for cid, _ in items])
        if self.fail_when and self.fail_when(items):
            raise RuntimeError("boom")
        return [f"{cid}:{x}" for cid, x in items]


def _submit_in_order(batcher: StepBatcher, items: list[tuple[str, int]]) -> dict:
    """Each item from its own thread, started only once the previous one is queued: a known arrival order."""
    out, threads, n0 = {}, [], batcher.submitted

    def go(cid, x):
        try:
            out[(cid, x)] = batcher.submit(cid, (cid, x))
        except Exception as e:  # noqa: BLE001 - checked by the test
            out[(cid, x)] = e

    for n, (cid, x) in enumerate(items, 1):
        threads.append(threading.Thread(target=go, args=(cid, x)))
        threads[-1].start()
        deadline = time.monotonic() + 5
        while batcher.submitted < n0 + n and time.monotonic() < deadline:
            time.sleep(0.001)
    for t in threads:
        t.join(10)
    return out


def test_never_two_steps_of_one_client_and_at_most_k():
    rec = _Recorder()
    batcher = StepBatcher(rec, max_steps=3, wait_s=0.5)
    out = _submit_in_order(batcher, [("a", 1), ("a", 2), ("b", 1), ("c", 1), ("d", 1)])
    assert rec.groups == [["a", "b", "c"], ["a", "d"]]
    assert out == {(c, x): f"{c}:{x}" for c, x in [("a", 1), ("a", 2), ("b", 1), ("c", 1), ("d", 1)]}
    assert batcher.stats() == {"client_steps": 5, "server_steps": 2, "sizes": {2: 1, 3: 1}}


def test_a_failed_fused_step_fails_every_participant_and_the_server_serves_on():
    rec = _Recorder(fail_when=lambda items: ("b", 1) in items)
    batcher = StepBatcher(rec, max_steps=2, wait_s=0.5)
    out = _submit_in_order(batcher, [("a", 1), ("b", 1)])
    for key in [("a", 1), ("b", 1)]:
        assert isinstance(out[key], ServiceError) and out[key].code == "INTERNAL"
        assert "fused with 2 client step(s)" in str(out[key]) and "boom" in str(out[key])
    assert _submit_in_order(batcher, [("a", 2), ("c", 1)]) == {("a", 2): "a:2", ("c", 1): "c:1"}


def test_a_broken_step_inside_a_real_fused_step_reaches_all_and_training_goes_on():
    trainer = _trainer("bert", "seq-cls", server_batch=2, wait_s=10.0)
    good, bad = _steps(trainer, [(2, 6), (2, 6)])
    bad.labels[:] = 7  # out of range for 2 labels: the app refuses this before fusing; here it gets through
    before = {k: p.detach().clone() for k, p in trainer.params.items()}
    for res in _concurrently(trainer, [good, bad]):
        assert isinstance(res, ServiceError) and res.code == "INTERNAL", res
    assert all(torch.equal(p.detach(), before[k]) for k, p in trainer.params.items())  # no half step
    results = _concurrently(trainer, _steps(trainer, [(2, 6), (3, 4)], seed=2))
    assert [r.server_batch for r in results] == [2, 2]


# -- config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["training.mode=sfl-v1", "training.server_batch=2"], "training.server_batch"),
        (["training.mode=sl", "training.server_batch=4"], "training.server_batch"),
        (["training.server_batch=0"], "training.server_batch"),
        (["training.server_batch_wait_ms=-1"], "training.server_batch_wait_ms"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        parse_config({}, overrides)
    assert field in str(e.value)


def test_config_defaults_and_per_client_top_refused_by_the_trainer():
    tr = parse_config({}).training
    assert (tr.server_batch, tr.server_batch_wait_ms) == (1, 2.0)
    assert parse_config({}, ["training.mode=sfl-v2", "training.server_batch=8"]).training.server_batch == 8
    split = make_split("bert", "seq-cls", cut=2)
    with pytest.raises(ValueError, match="sfl-v2"):
        TopTrainer(split, "seq-cls", lr=LR, personal=True, server_batch=2)


# -- end to end over gRPC ----------------------------------------------------------------------------------


def test_concurrent_edges_over_grpc_train_with_fused_steps(tmp_path, monkeypatch, caplog):
    from test_bad_input import _step, _train

    import splitwave.edge.client as edge_client

    replies, hostile = [], {}
    step = edge_client._StepStream.step

    def recording_step(self, messages):  # what each Train reply said about its server step
        tensors, res = step(self, messages)
        replies.append(dict(res.metrics))
        return tensors, res

    monkeypatch.setattr(edge_client._StepStream, "step", recording_step)

    class Hostile(edge_client.EdgeClient):
        """An honest client whose token also carries one bad step, fired between its steps 1 and 2."""

        def _record(self, rec):
            super()._record(rec)
            if rec.get("kind") == "step" and (rec["round"], rec["step"]) == (0, 1):
                with grpc.insecure_channel(self.target) as ch:
                    from splitwave.protos import splitwave_pb2_grpc as pb_grpc

                    hostile["reply"] = _train(
                        pb_grpc.SplitWaveStub(ch), _step(self.joined, labels=np.full(8, 9, np.int64))
                    )

    n = 4
    cfg = tiny_cfg(num_clients=n, training={"mode": "sfl-v2", "server_batch": n, "server_batch_wait_ms": 50})
    caplog.set_level(logging.DEBUG, logger="splitwave.server.batching")
    with serving(cfg, tmp_path / "run") as srv:
        out = run_clients(
            srv.address,
            [f"e{i}" for i in range(n - 1)] + ["hostile"],
            ROOT / ".cache" / "edge-tests",
            classes={"hostile": Hostile},
        )
        stats = srv.app.trainer.batcher.stats()
        final = srv.app.final_top_factors()

    assert all(isinstance(v, dict) and v["rounds"] == 2 for v in out.values()), out
    code, details = hostile["reply"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "labels" in details
    steps = n * 2 * cfg.training.local_steps
    assert len(replies) == steps == stats["client_steps"]
    assert max(stats["sizes"]) > 1 and stats["server_steps"] < steps  # fusing really happened
    fused = [int(m["server_batch"]) for m in replies]
    assert max(fused) > 1 and sorted(fused) == sorted(k for k, v in stats["sizes"].items() for _ in range(k * v))
    assert any("server step fused" in r.getMessage() and "client step(s)" in r.getMessage() for r in caplog.records)
    assert all(np.isfinite(v).all() for v in final.values())

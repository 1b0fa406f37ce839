"""The strategy contract (aggregation.md §0): a Flower-Strategy-like object that, per round, tells
each client what to do (`configure_round`) and turns client LoRA factors into global / per-client
factors and base-weight deltas (`aggregate`), one module at a time (`aggregate_module`).

Nothing is module-global: the edge adapters and sfl-v1's per-client top adapters are simply two
instances (use `scope` to label them in logs). Internal math is float64; state and outputs are cast
to `dtype` (float32 by default) so what the server stores is bit-identical to what clients load.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from splitwave.common import lora

from . import lora_math as lm
from .robust import Combiner
from .server_opt import ServerOptimizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientUpdate:
    """What one client uploads after local training. Rank is read from the shapes (A: [r, d_in])."""

    client_id: str
    factors: Mapping[str, np.ndarray]
    num_samples: float
    lora_alpha: float | None = None  # None: the strategy's lora_alpha


@dataclass
class ClientDirective:
    """What the server asks a client to do this round."""

    client_id: str
    round_idx: int
    rank: int  # LoRA rank the client must use (per-module ranks are min(rank, global))
    lora_alpha: float
    trainable: tuple[str, ...]  # subset of ("A", "B"); the rest is frozen
    upload_keys: tuple[str, ...]  # exact peft keys to upload
    load_factors: dict | None  # factors to load before training; None = re-init / keep own
    reinit_lora: bool = False  # FLoRA: fresh LoRA (A random, B = 0) after merging base deltas
    base_version: int = 0  # number of base-weight deltas the client must have applied
    extra: dict = field(default_factory=dict)  # strategy specific (phase, self-pruning, ...)


@dataclass
class AggregateResult:
    round_idx: int
    global_factors: dict[str, np.ndarray] | None  # broadcast to everybody (None: no global adapter)
    client_factors: dict[str, dict[str, np.ndarray]]  # per participant (hetero ranks, FedSA's B)
    base_deltas: dict[str, np.ndarray]  # module -> dense delta to ADD to its base weight
    base_delta_factors: dict[
        str, tuple[np.ndarray, np.ndarray]
    ]  # module -> (Bf, Af); delta = Bf @ Af, nn.Linear layout
    transposed: frozenset[str]  # modules whose base_deltas entry is Conv1D layout [d_in, d_out]
    base_version: int
    metrics: dict[str, float]


@dataclass
class ModuleEntry:
    client_id: str
    A: np.ndarray  # [r_k, d_in] float64 (frozen factors are filled from the round's start)
    B: np.ndarray  # [d_out, r_k]
    scaling: float  # s_k
    weight: float  # p_k


@dataclass
class ModuleResult:
    A: np.ndarray | None = None  # new global A (None: unchanged / strategy has none)
    B: np.ndarray | None = None
    base_delta: np.ndarray | None = None  # dense, nn.Linear layout, scaling included
    base_delta_factors: tuple[np.ndarray, np.ndarray] | None = None
    client: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # cid -> {"A"/"B": array}


class Strategy:
    """Base class. Subclasses set the class flags and implement `aggregate_module`."""

    name: ClassVar[str] = "base"
    TRAINABLE: ClassVar[tuple[str, ...]] = ("A", "B")
    UPLOAD: ClassVar[tuple[str, ...]] = ("A", "B")
    HETEROGENEOUS: ClassVar[bool] = False  # ranks may differ across clients
    FOLD_SCALING: ClassVar[bool] = False  # global B stored as s*B (unit scaling) so mixed s_k combine
    REPORTS_AGG_ERROR: ClassVar[bool] = True  # effective update = base_delta + s * B_glob A_glob
    SUPPORTS_DP: ClassVar[bool] = False  # output linear in the uploads -> Gaussian mechanism is valid
    SUPPORTS_ROBUST_METHOD: ClassVar[bool] = True
    SUPPORTS_SERVER_OPT: ClassVar[bool] = True
    REINIT: ClassVar[bool] = False
    MERGES_INTO_BASE: ClassVar[bool] = False  # sends base-weight deltas (an int8 edge bundle cannot fold them)

    def __init__(
        self,
        *,
        lora_alpha: float = 16.0,
        use_rslora: bool = False,
        client_ranks: Mapping[str, int] | None = None,
        fan_in_fan_out: bool | Iterable[str] = (),
        robust: Mapping | None = None,
        dp: Mapping | None = None,
        server_opt: Mapping | None = None,
        error_metrics: bool = True,
        dtype: str = "float32",
        scope: str = "default",
        max_abs_value: float | None = None,
    ):
        if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = bool(use_rslora)
        self.client_ranks = {
            str(k): self._check_rank(f"client_ranks[{k!r}]", v) for k, v in (client_ranks or {}).items()
        }
        if client_ranks and not self.HETEROGENEOUS:
            raise ValueError(f"client_ranks: strategy {self.name!r} needs equal ranks; use hetlora/rbla/flora/flexlora")
        self.fan_in_fan_out = fan_in_fan_out if isinstance(fan_in_fan_out, bool) else tuple(fan_in_fan_out)
        if dp and not self.SUPPORTS_DP:
            raise ValueError(
                f"dp: strategy {self.name!r} is not linear in client uploads; use fedit, ffa-lora, rolora or fedsa-lora"
            )
        self.combiner = Combiner(robust, dp)
        if self.combiner.method != "mean" and not self.SUPPORTS_ROBUST_METHOD:
            raise ValueError(f"robust.method: strategy {self.name!r} only supports clipping (method='mean')")
        if server_opt and not self.SUPPORTS_SERVER_OPT:
            raise ValueError(f"server_opt: strategy {self.name!r} would lose exactness; not supported")
        self.server_opt = ServerOptimizer(server_opt) if server_opt else None
        self.error_metrics = bool(error_metrics)
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.dtype = np.dtype(dtype)
        self.scope = str(scope)
        if max_abs_value is not None and not (isinstance(max_abs_value, (int, float)) and max_abs_value > 0):
            raise ValueError(f"max_abs_value must be a positive number or None, got {max_abs_value!r}")
        self.max_abs_value = max_abs_value  # bound on every value an aggregate may commit (None: finite only)
        self.shapes: dict[str, tuple[int, int, int]] = {}  # module -> (d_out, d_in, global rank)
        self.global_A: dict[str, np.ndarray] = {}
        self.global_B: dict[str, np.ndarray] = {}
        self.extras: dict[str, np.ndarray] = {}
        self.client_state: dict[str, dict[str, np.ndarray]] = {}
        self.known_ranks: dict[str, int] = {}
        self.rounds_done = 0
        self.base_version = 0

    # ---------------------------------------------------------------- setup
    @staticmethod
    def _check_rank(name, value) -> int:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return int(value)

    def initialize(self, factors: Mapping[str, np.ndarray]) -> None:
        """Set the round-0 global adapter (e.g. peft init: A random, B = 0). Hetero-rank strategies
        take it at the largest rank any client will use; clients get the first r_k components."""
        modules, extras = lora.split_factors(factors)
        if not modules:
            raise ValueError("initialize: no '*.lora_A.weight' / '*.lora_B.weight' keys found")
        for m, ab in modules.items():
            if set(ab) != {"A", "B"}:
                raise ValueError(f"initialize: module {m!r} needs both lora_A and lora_B")
            A, B = np.asarray(ab["A"]), np.asarray(ab["B"])
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise ValueError(
                    f"initialize: module {m!r} has A{A.shape} / B{B.shape}, expected [r, d_in] / [d_out, r]"
                )
            self.shapes[m] = (B.shape[0], A.shape[1], A.shape[0])
            self.global_A[m] = self._cast(A)
            self.global_B[m] = self._cast(B * self._scaling(self.lora_alpha, A.shape[0]) if self.FOLD_SCALING else B)
        self.extras = {k: self._cast(v) for k, v in extras.items()}

    # ---------------------------------------------------------------- helpers
    def _cast(self, a) -> np.ndarray:
        return np.array(a, dtype=self.dtype)

    def _scaling(self, alpha: float, rank: int) -> float:
        return lora.scaling(alpha, rank, self.use_rslora)

    def is_fan_in_fan_out(self, module: str) -> bool:
        if isinstance(self.fan_in_fan_out, bool):
            return self.fan_in_fan_out
        return any(module == p or fnmatch.fnmatchcase(module, p) for p in self.fan_in_fan_out)

    def rank_for(self, client_id: str) -> int:
        """The rank a client trains with: configured, else last seen, else the global rank."""
        default = max(r for _, _, r in self.shapes.values())
        return self.client_ranks.get(client_id, self.known_ranks.get(client_id, default))

    def module_rank(self, module: str, client_rank: int) -> int:
        return min(client_rank, self.shapes[module][2]) if self.HETEROGENEOUS else self.shapes[module][2]

    def trainable(self) -> tuple[str, ...]:
        return self.TRAINABLE

    def upload_kinds(self) -> tuple[str, ...]:
        return self.UPLOAD

    def upload_extras(self) -> bool:
        return True

    def upload_keys(self) -> tuple[str, ...]:
        kinds = self.upload_kinds()
        keys = [lora.factor_key(m, k) for m in self.shapes for k in ("A", "B") if k in kinds]
        return tuple(keys + (sorted(self.extras) if self.upload_extras() else []))

    def average_extras(self) -> bool:
        return self.upload_extras()

    def client_view(self, client_id: str, rank: int) -> dict[str, np.ndarray] | None:
        """The factors client `client_id` starts the round from (what it is told to load)."""
        out = dict(self.extras)
        for m in self.shapes:
            r = self.module_rank(m, rank)
            A, B = lm.truncate_rank(self.global_A[m], self.global_B[m], r)
            if self.FOLD_SCALING:
                B = B / self._scaling(self.lora_alpha, r)
            out[lora.a_key(m)], out[lora.b_key(m)] = self._cast(A), self._cast(B)
        return out

    def directive_extra(self, client_id: str) -> dict:
        return {}

    # ---------------------------------------------------------------- protocol
    def configure_round(self, round_idx: int, client_ids: Sequence[str]) -> dict[str, ClientDirective]:
        self._require_init()
        out = {}
        for cid in map(str, client_ids):
            rank = self.rank_for(cid)
            out[cid] = ClientDirective(
                client_id=cid,
                round_idx=round_idx,
                rank=rank,
                lora_alpha=self.lora_alpha,
                trainable=self.trainable(),
                upload_keys=self.upload_keys(),
                load_factors=self.client_view(cid, rank),
                reinit_lora=self.REINIT,
                base_version=self.base_version,
                extra=self.directive_extra(cid),
            )
        return out

    def aggregate_module(self, module: str, entries: list[ModuleEntry]) -> ModuleResult:
        raise NotImplementedError

    def aggregate(self, round_idx: int, results: Sequence[ClientUpdate]) -> AggregateResult:
        """Aggregate one round. On any error the strategy's state is left exactly as before."""
        self._require_init()
        snapshot = self.state_dict()
        try:
            return self._aggregate(round_idx, list(results))
        except Exception:
            self.load_state_dict(snapshot)
            raise

    # ---------------------------------------------------------------- internals
    def _require_init(self):
        if not self.shapes:
            raise RuntimeError(f"strategy {self.name!r} ({self.scope}): call initialize(factors) first")

    shapes_bound_rank: ClassVar[bool] = True  # hetero ranks must not exceed the server's rank

    def _upload_rank(self, cid: str, modules: Mapping[str, Mapping[str, np.ndarray]]) -> int | None:
        """Check every uploaded module's shapes; return the client's (largest) rank."""
        ranks = {}
        for m, ab in modules.items():
            d_out, d_in, r_glob = self.shapes[m]
            A, B = ab.get("A"), ab.get("B")
            ok = all(x is None or x.ndim == 2 for x in (A, B))
            ok = ok and (A is None or A.shape[1] == d_in) and (B is None or B.shape[0] == d_out)
            ok = ok and (A is None or B is None or A.shape[0] == B.shape[1])
            if not ok:
                raise ValueError(
                    f"client {cid!r}: module {m!r} has A{None if A is None else A.shape} "
                    f"B{None if B is None else B.shape}; expected [r, {d_in}] / [{d_out}, r]"
                )
            r = A.shape[0] if A is not None else B.shape[1]
            if (
                (not self.HETEROGENEOUS and r != r_glob)
                or r > min(d_out, d_in)
                or (self.HETEROGENEOUS and self.shapes_bound_rank and r > r_glob)
            ):
                raise ValueError(
                    f"client {cid!r}: module {m!r} has rank {r}, strategy {self.name!r} expects "
                    f"{'<= ' if self.HETEROGENEOUS else ''}{r_glob}"
                )
            ranks[m] = r
        rank = max(ranks.values(), default=None)
        for m, r in ranks.items():
            if self.HETEROGENEOUS and r != self.module_rank(m, rank):
                raise ValueError(
                    f"client {cid!r}: module {m!r} has rank {r} but its largest rank is {rank}; "
                    f"expected min(client rank, module rank) = {self.module_rank(m, rank)}"
                )
        return rank

    def _validate(self, u: ClientUpdate):
        """Check one upload against this round's contract; return (cid, rank, start, uploaded64, alpha),
        where start is what the client began the round from (client_view) and uploaded64 the expected keys."""
        cid = str(u.client_id)
        if not isinstance(u.num_samples, (int, float, np.integer, np.floating)) or not u.num_samples > 0:
            raise ValueError(f"client {cid!r}: num_samples must be > 0, got {u.num_samples!r}")
        alpha = self.lora_alpha if u.lora_alpha is None else float(u.lora_alpha)
        if not alpha > 0:
            raise ValueError(f"client {cid!r}: lora_alpha must be > 0, got {u.lora_alpha!r}")
        expected, got = set(self.upload_keys()), set(u.factors)
        frozen_sfx = tuple(lora.FACTOR_SUFFIXES[k] for k in ("A", "B") if k not in self.trainable())
        frozen = {k for k in got - expected if k.endswith(frozen_sfx) and lora.module_of(k) in self.shapes}
        missing, unexpected = sorted(expected - got), sorted(got - expected - frozen)
        if missing or unexpected:
            raise ValueError(f"client {cid!r}: key mismatch; missing {missing[:5]} unexpected {unexpected[:5]}")
        for k in got:
            if not np.issubdtype(np.asarray(u.factors[k]).dtype, np.number) or not np.all(np.isfinite(u.factors[k])):
                raise ValueError(f"client {cid!r}: {k!r} is not a finite numeric array")
        for k in got & set(self.extras):
            if np.shape(u.factors[k]) != self.extras[k].shape:
                raise ValueError(
                    f"client {cid!r}: {k!r} has shape {np.shape(u.factors[k])}, expected {self.extras[k].shape}"
                )
        rank = self._upload_rank(cid, lora.split_factors({k: np.asarray(v) for k, v in u.factors.items()})[0])
        start = self.client_view(cid, rank) if rank is not None else None
        for k in frozen:
            if start is None or k not in start or not np.array_equal(np.asarray(u.factors[k], self.dtype), start[k]):
                raise ValueError(
                    f"client {cid!r}: frozen factor {k!r} differs from the server's copy "
                    "(frozen factors must be bit-identical across clients)"
                )
        return cid, rank, start, {k: np.asarray(u.factors[k], np.float64) for k in expected}, alpha

    def _prepare(self, results: list[ClientUpdate]):
        """Validate all uploads (before touching any state), weight and clip them."""
        if not results:
            raise ValueError("aggregate: no client results")
        ids = [str(u.client_id) for u in results]
        if len(set(ids)) != len(ids):
            raise ValueError(f"aggregate: duplicate client ids {sorted({i for i in ids if ids.count(i) > 1})}")
        checked = [self._validate(u) for u in results]
        p = lm.sample_weights([u.num_samples for u in results])
        if self.combiner.dp:  # sample weights would change the mechanism's sensitivity
            p = np.full(len(results), 1.0 / len(results))
        clients, norms = [], []
        for cid, _rank, start, uploaded, alpha in checked:
            full = {k: np.asarray(v, np.float64) for k, v in (start or {}).items()}
            clipped, norm = self.combiner.clip(uploaded, full)
            clients.append((cid, alpha, {**full, **clipped}))
            norms.append(norm)
        metrics = {
            "num_clients": float(len(results)),
            "update_norm_mean": float(np.mean(norms)),
            "update_norm_max": float(np.max(norms)),
            "uplink_bytes": float(sum(np.asarray(v).nbytes for u in results for v in u.factors.values())),
        }
        if self.combiner.clip_norm is not None:
            metrics["clipped_clients"] = float(sum(n > self.combiner.clip_norm for n in norms))
        return checked, clients, p, metrics

    def _rule_error(self, module: str, entries: list[ModuleEntry], out: ModuleResult) -> tuple[float, float]:
        """(||sum p_k s_k B_k A_k - effective||^2, ||target||^2): the rule's own error vs FedAvg in ΔW space."""
        target = lm.product_sum([e.A for e in entries], [e.B for e in entries], [e.weight * e.scaling for e in entries])
        eff = np.zeros_like(target) if out.base_delta is None else np.asarray(out.base_delta, np.float64)
        if out.A is not None or out.B is not None:
            A = np.asarray(self.global_A[module] if out.A is None else out.A, np.float64)
            B = np.asarray(self.global_B[module] if out.B is None else out.B, np.float64)
            eff = eff + entries[0].scaling * (B @ A)
        return float(np.sum((target - eff) ** 2)), float(np.sum(target**2))

    def _commit_module(self, m: str, out: ModuleResult, result: AggregateResult) -> int:
        """Store a module's outcome (server optimizer applied here); return the downlink bytes it adds."""
        down = 0
        for _kind, arr, store, key in (
            ("A", out.A, self.global_A, lora.a_key(m)),
            ("B", out.B, self.global_B, lora.b_key(m)),
        ):
            if arr is None:
                continue
            if self.server_opt is not None:
                arr = self.server_opt.step(key, np.asarray(store[m], np.float64), arr)
            store[m] = self._cast(arr)
            down += store[m].nbytes
        self.shapes[m] = self.shapes[m][:2] + (self.global_A[m].shape[0],)
        for cid, ab in out.client.items():
            self.client_state.setdefault(cid, {}).update({lora.factor_key(m, k): self._cast(v) for k, v in ab.items()})
        if out.base_delta is not None:
            fifo = self.is_fan_in_fan_out(m)
            result.base_deltas[m] = self._cast(out.base_delta.T if fifo else out.base_delta)
            if fifo:
                result.transposed = result.transposed | {m}
            if out.base_delta_factors is not None:
                result.base_delta_factors[m] = tuple(self._cast(x) for x in out.base_delta_factors)
                down += sum(x.nbytes for x in result.base_delta_factors[m])
            else:
                down += result.base_deltas[m].nbytes
        return down

    def _aggregate(self, round_idx: int, results: list[ClientUpdate]) -> AggregateResult:
        checked, clients, p, metrics = self._prepare(results)
        self.combiner.begin_round(len(results))
        result = AggregateResult(round_idx, None, {}, {}, {}, frozenset(), self.base_version, metrics)
        err_sq = tgt_sq = 0.0
        down = 0
        for m in self.shapes:
            entries = [
                ModuleEntry(
                    cid, f[lora.a_key(m)], f[lora.b_key(m)], self._scaling(alpha, f[lora.a_key(m)].shape[0]), float(w)
                )
                for (cid, alpha, f), w in zip(clients, p)
            ]
            if not self.HETEROGENEOUS and len({e.scaling for e in entries}) > 1:
                raise ValueError(
                    f"module {m!r}: clients report different scalings "
                    f"{sorted({e.scaling for e in entries})}; {self.name!r} needs one lora_alpha"
                )
            out = self.aggregate_module(m, entries)
            if self.error_metrics and self.REPORTS_AGG_ERROR:
                e, t = self._rule_error(m, entries, out)
                err_sq, tgt_sq = err_sq + e, tgt_sq + t
            down += self._commit_module(m, out, result)
        if self.extras and self.average_extras():
            for k in self.extras:
                new = self.combiner.combine([f[k] for _, _, f in clients], p)
                if self.server_opt is not None:
                    new = self.server_opt.step(k, np.asarray(self.extras[k], np.float64), new)
                self.extras[k] = self._cast(new)
                down += self.extras[k].nbytes
        if self.HETEROGENEOUS:
            self.known_ranks.update({cid: rank for cid, rank, *_ in checked if rank is not None})
        self.base_version += bool(result.base_deltas)
        self.rounds_done += 1
        self._after_round(checked)
        result.base_version = self.base_version
        result.global_factors = self.global_output()
        per_client = {cid: self.client_output(cid, rank) for cid, rank, *_ in checked}
        result.client_factors = {k: v for k, v in per_client.items() if v}
        down += sum(a.nbytes for f in result.client_factors.values() for a in f.values())
        metrics["downlink_bytes"] = float(down)
        if result.base_deltas:
            metrics["downlink_bytes_dense_base"] = float(sum(d.nbytes for d in result.base_deltas.values()))
        if self.error_metrics and self.REPORTS_AGG_ERROR:
            metrics["agg_error_fro"] = math.sqrt(err_sq)
            metrics["agg_error_rel"] = math.sqrt(err_sq / tgt_sq) if tgt_sq > 0 else 0.0
        metrics.update(self.combiner.end_round())
        metrics["aggregate_max_abs"] = self._check_output(result)
        log.debug("%s[%s] round %d: %s", self.name, self.scope, round_idx, metrics)
        return result

    def _check_output(self, result: AggregateResult) -> float:
        """Refuse (ValueError, so `aggregate` rolls the state back) an aggregate with a non-finite value or one
        beyond `max_abs_value`, before anybody loads it; return its largest absolute value."""
        arrays = [("global", k, v) for k, v in (result.global_factors or {}).items()]
        arrays += [(f"client {c}", k, v) for c, f in result.client_factors.items() for k, v in f.items()]
        arrays += [("base delta", k, v) for k, v in result.base_deltas.items()]
        arrays += [("base delta factor", k, x) for k, xs in result.base_delta_factors.items() for x in xs]
        top = 0.0
        for where, k, v in arrays:
            m = float(np.max(np.abs(v), initial=0.0))
            if not math.isfinite(m) or (self.max_abs_value is not None and m > self.max_abs_value):
                raise ValueError(
                    f"{self.name}[{self.scope}]: aggregate {where} {k!r} has "
                    f"{'NaN/Inf values' if not math.isfinite(m) else f'|value| {m:.3g}'} "
                    f"(bound {self.max_abs_value}); not committed"
                )
            top = max(top, m)
        return top

    def _after_round(self, checked) -> None:
        """Hook for per-round state changes (RoLoRA's phase flip)."""

    def global_output(self) -> dict[str, np.ndarray] | None:
        """What to broadcast after aggregation; hetero strategies send per-client views instead."""
        if self.HETEROGENEOUS:
            return None
        out = dict(self.extras)
        for m in self.shapes:
            out[lora.a_key(m)], out[lora.b_key(m)] = self.global_A[m].copy(), self.global_B[m].copy()
        return out

    def client_output(self, client_id: str, rank: int | None) -> dict[str, np.ndarray] | None:
        if self.HETEROGENEOUS and not self.REINIT:
            return self.client_view(client_id, rank if rank is not None else self.rank_for(client_id))
        return None

    # ---------------------------------------------------------------- state
    def _meta(self) -> dict:
        return {}

    def _load_meta(self, meta: Mapping) -> None:
        pass

    def state_dict(self) -> dict:
        """Nested dict of numpy arrays and json-able values (see save_state/load_state for files)."""
        return {
            "meta": {
                "name": self.name,
                "scope": self.scope,
                "rounds_done": self.rounds_done,
                "base_version": self.base_version,
                "known_ranks": dict(self.known_ranks),
                "shapes": {m: list(s) for m, s in self.shapes.items()},
                "combiner": copy.deepcopy(self.combiner.state_dict()),
                **self._meta(),
            },
            "global_A": {m: a.copy() for m, a in self.global_A.items()},
            "global_B": {m: a.copy() for m, a in self.global_B.items()},
            "extras": {k: a.copy() for k, a in self.extras.items()},
            "clients": {c: {k: a.copy() for k, a in d.items()} for c, d in self.client_state.items()},
            "server_opt": self.server_opt.state_dict() if self.server_opt else {},
        }

    def load_state_dict(self, state: Mapping) -> None:
        meta = state["meta"]
        if meta["name"] != self.name:
            raise ValueError(f"state is for strategy {meta['name']!r}, not {self.name!r}")
        self.rounds_done, self.base_version = int(meta["rounds_done"]), int(meta["base_version"])
        self.known_ranks = {str(k): int(v) for k, v in meta["known_ranks"].items()}
        self.shapes = {m: tuple(int(x) for x in s) for m, s in meta["shapes"].items()}
        self.combiner.load_state_dict(copy.deepcopy(meta["combiner"]))
        self._load_meta(meta)
        self.global_A = {m: self._cast(a) for m, a in state["global_A"].items()}
        self.global_B = {m: self._cast(a) for m, a in state["global_B"].items()}
        self.extras = {k: self._cast(a) for k, a in state["extras"].items()}
        self.client_state = {c: {k: self._cast(a) for k, a in d.items()} for c, d in state["clients"].items()}
        if self.server_opt is not None and state.get("server_opt"):
            self.server_opt.load_state_dict(state["server_opt"])

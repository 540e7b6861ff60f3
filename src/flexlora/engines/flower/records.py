"""Conversion between our types and Flower records, and the checks a node's reply must pass.

A train message (server -> node) carries one client's :class:`~flexlora.contracts.TrainJob`::

    "init"         ArrayRecord   {"<module>.A": (r, k), "<module>.B": (d, r)}   the factors to start from
    "init-lora"    ConfigRecord  {"modules": [...], "alphas": [...], "rslora": [...]}
    "frozen"       ArrayRecord   FLoRA-style methods only: the update merged into the base model
    "frozen-lora"  ConfigRecord
    "config"       ConfigRecord  {"server-round", "client-id", "seed", "freeze-A"}

A train reply (node -> server)::

    "update"       ArrayRecord   {"<module>.A", "<module>.B"} at the ranks that were sent
    "metrics"      MetricRecord  {"num-examples": int, "train_loss", "steps", "seconds", ...}
    "config"       ConfigRecord  {"client-id"}

Tensors travel as ``.npy`` bytes (``allow_pickle=False``; nothing here ever unpickles). A reply is never
trusted: :func:`update_from_reply` decodes it against the job that was sent and refuses it with a
:class:`ReplyError` naming the node and the field. Byte counts are tensor bytes (``numel * itemsize``), the
same measure as the in-process engine, without the few hundred bytes of headers per message.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.lib.format as npy
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import SType

from flexlora.contracts import TrainJob, TrainResult
from flexlora.core.aggregators import GlobalState
from flexlora.core.lora import LoraFactors, LoraUpdate, alpha_problem
from flexlora.core.ranks import RankType, parse_rank_type

__all__ = [
    "MAX_EXAMPLES",
    "NodeDeclaration",
    "ReplyError",
    "decode_array",
    "SETTINGS_RECORD",
    "factors_from_records",
    "factors_nbytes",
    "factors_to_records",
    "finite_metrics",
    "job_from_content",
    "job_to_content",
    "node_declaration",
    "reply_content",
    "state_from_arrays",
    "state_to_arrays",
    "update_from_reply",
]

log = logging.getLogger(__name__)

#: A reply claiming more training examples than this is refused: it would dominate the weighted average.
MAX_EXAMPLES = 10_000_000
#: Scalar metrics kept from one reply (ours send five).
MAX_METRICS = 32
#: ConfigRecord carrying the client-side settings (model, data, train) as JSON, so that virtual nodes
#: without a run config of their own train exactly as the in-process engine would.
SETTINGS_RECORD = "settings"
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
_MAX_NPY_HEADER = 10_000  # numpy's own default limit for a header it parses


class ReplyError(ValueError):
    """A node's reply cannot be used; the message names the node and the field and ends with the
    consequence (the update is left out of the round, nothing else changes).

    Args:
        node: Flower node id (or another label) of the sender.
        field: the record key or ``record[key]`` that is wrong.
        problem: what is wrong with it.
    """

    def __init__(self, node: int | str, field: str, problem: str):
        self.node, self.field, self.problem = node, field, problem
        super().__init__(f"node {node}: {field}: {problem}; left out of this round")


# ---------------------------------------------------------------------------------------------- tensors
def _to_array(t: torch.Tensor) -> Array:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: widen, exactly
        t = t.float()
    return Array(t.contiguous().numpy())


def _tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * (4 if t.dtype == torch.bfloat16 else t.element_size())


def factors_nbytes(factors: Mapping[str, LoraFactors] | None) -> int:
    """Tensor bytes that :func:`factors_to_records` puts on the wire for ``factors``."""
    return sum(_tensor_nbytes(f.A) + _tensor_nbytes(f.B) for f in (factors or {}).values())


def factors_to_records(factors: Mapping[str, LoraFactors]) -> tuple[ArrayRecord, ConfigRecord]:
    """``{module: LoraFactors}`` -> (``{"<module>.A", "<module>.B"}`` arrays, per-module alphas and rsLoRA).

    Returns:
        The arrays (``A (r, k)`` and ``B (d, r)`` per module) and a ConfigRecord with ``modules`` (sorted),
        ``alphas`` and ``rslora`` lists in the same order.
    """
    names = sorted(factors)
    arrays = ArrayRecord()
    for name in names:
        arrays[f"{name}.A"] = _to_array(factors[name].A)
        arrays[f"{name}.B"] = _to_array(factors[name].B)
    lora = ConfigRecord(
        {
            "modules": names,
            "alphas": [float(factors[n].alpha) for n in names],
            "rslora": [bool(factors[n].use_rslora) for n in names],
        }
    )
    return arrays, lora


def decode_array(
    node: int | str, field: str, array: object, expected: tuple[int, int] | None = None, why: str = ""
) -> torch.Tensor:
    """The one way an array from the wire becomes a tensor: a finite float matrix, checked before allocating.

    The bytes must be a plain ``.npy`` file, format 1.0 or 2.0 (header at most 10,000 bytes, parsed by
    numpy's literal reader, never unpickled); the dtype float16/32/64, little-endian or native (no object,
    structured or big-endian dtype); the shape two non-negative integers, equal to ``expected`` when given;
    and the data exactly ``prod(shape) * itemsize`` bytes. The array's own ``dtype`` / ``shape`` metadata
    are ignored: everything is read from the bytes. Only then is the data copied (never more than was
    received), and checked for NaN/Inf.

    Args:
        why: appended to a shape mismatch (``" (rank 3 was sent)"``).

    Raises:
        ReplyError: naming ``node`` and ``field``, for any of the above.
    """
    if not isinstance(array, Array):
        raise ReplyError(node, field, f"expected an Array, got {type(array).__name__}")
    if array.stype != SType.NUMPY:
        raise ReplyError(node, field, f"serialization {str(array.stype)[:40]!r} is not a .npy array")
    data = array.data
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ReplyError(node, field, f"data is {type(data).__name__}, not bytes")
    fp = io.BytesIO(data)
    try:
        version = npy.read_magic(fp)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"npy format {version[0]}.{version[1]}, only 1.0 and 2.0 are read")
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read_header(fp, max_header_size=_MAX_NPY_HEADER)
    except Exception as exc:  # numpy's header parser raises many kinds (tokenize.TokenError too); all refuse
        raise ReplyError(
            node, field, f"cannot be decoded as a plain .npy array ({' '.join(str(exc).split())[:120]})"
        ) from None
    if dtype.hasobject or dtype.type not in _FLOAT_DTYPES:
        raise ReplyError(node, field, f"has non-float dtype {str(dtype)[:40]} (float16/32/64 only)")
    if dtype.byteorder == ">":
        raise ReplyError(node, field, f"has big-endian dtype {dtype.str}; only little-endian is read")
    if len(shape) != 2 or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ReplyError(node, field, f"must be a matrix, got shape {str(shape)[:80]}")
    if expected is not None and tuple(shape) != tuple(expected):
        raise ReplyError(node, field, f"has shape {tuple(shape)}, expected {tuple(expected)}{why}")
    needed, held = math.prod(shape) * dtype.itemsize, len(data) - fp.tell()
    if needed != held:
        raise ReplyError(node, field, f"shape {tuple(shape)} needs {needed} bytes, the array holds {held}")
    values = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=fp.tell())
    values = values.reshape(shape, order="F" if fortran else "C").astype(dtype.newbyteorder("="))
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    if not torch.isfinite(tensor).all():
        raise ReplyError(node, field, "has NaN or Inf values")
    return tensor


def factors_from_records(
    arrays: ArrayRecord, lora: ConfigRecord, node: int | str = "?", record: str = "init"
) -> dict[str, LoraFactors]:
    """Inverse of :func:`factors_to_records`; checks that every module has a matching ``A`` and ``B``.

    Raises:
        ReplyError: a module is missing or extra, a tensor is not a finite float matrix, or ``B`` and ``A``
            disagree on the rank.
    """
    names = list(lora.get("modules", []))
    alphas, rslora = list(lora.get("alphas", [])), list(lora.get("rslora", []))
    if len(alphas) != len(names) or len(rslora) != len(names):
        raise ReplyError(node, f"{record}-lora", "modules, alphas and rslora differ in length")
    expected = {f"{n}.{ab}" for n in names for ab in "AB"}
    _check_keys(node, record, set(arrays), expected)
    out = {}
    for name, alpha, rs in zip(names, alphas, rslora, strict=True):
        if problem := alpha_problem(alpha):
            raise ReplyError(node, f"{record}-lora[alphas][{name}]", problem)
        A = decode_array(node, f"{record}[{name}.A]", arrays[f"{name}.A"])
        B = decode_array(node, f"{record}[{name}.B]", arrays[f"{name}.B"])
        if B.shape[1] != A.shape[0]:
            raise ReplyError(node, f"{record}[{name}]", f"B {tuple(B.shape)} and A {tuple(A.shape)} disagree")
        out[name] = LoraFactors(A, B, float(alpha), bool(rs))
    return out


def _check_keys(node: int | str, record: str, got: set[str], expected: set[str]) -> None:
    if missing := sorted(expected - got):
        raise ReplyError(node, record, f"missing {len(missing)} array(s), e.g. {missing[0]!r}")
    if extra := sorted(got - expected):
        raise ReplyError(node, record, f"{len(extra)} unexpected array(s), e.g. {extra[0]!r}")


# ------------------------------------------------------------------------------------------ global state
def state_to_arrays(state: GlobalState) -> ArrayRecord:
    """The global update ``dW = B @ A`` per module as ``{"<module>.B": (d, q), "<module>.A": (q, k)}``."""
    return ArrayRecord({k: _to_array(v) for k, v in state.to_tensors().items()})


def state_from_arrays(arrays: ArrayRecord, method: str) -> GlobalState:
    """Inverse of :func:`state_to_arrays` (the server's own record: shapes are checked, values trusted)."""
    return GlobalState.from_tensors(
        {k: decode_array("server", f"arrays[{k}]", v) for k, v in arrays.items()}, method
    )


# ------------------------------------------------------------------------------------------------- jobs
def job_to_content(job: TrainJob) -> RecordDict:
    """One train message's content: the job's factors, ids and client recipe (``freeze-A``, ``optimizer``:
    empty for the node's own ``train.optimizer``; ``server-round`` is the job's round)."""
    init, init_lora = factors_to_records(job.init)
    content = RecordDict({"init": init, "init-lora": init_lora})
    if job.frozen is not None:
        content["frozen"], content["frozen-lora"] = factors_to_records(job.frozen)
    content["config"] = ConfigRecord(
        {
            "server-round": int(job.round),
            "client-id": job.client_id,
            "seed": int(job.seed),
            "freeze-A": job.freeze_A,
            "optimizer": job.optimizer or "",
        }
    )
    return content


def job_from_content(content: RecordDict, node: int | str = "server") -> TrainJob:
    """Rebuild the :class:`TrainJob` on the node (inverse of :func:`job_to_content`).

    Raises:
        ReplyError: the message is malformed (``node`` names the sender).
    """
    for key in ("init", "init-lora", "config"):
        if key not in content:
            raise ReplyError(node, key, "missing from the train message")
    cfg = content["config"]
    init = factors_from_records(content["init"], content["init-lora"], node, "init")
    frozen = None
    if "frozen" in content:
        frozen = factors_from_records(content["frozen"], content["frozen-lora"], node, "frozen")
    return TrainJob(
        client_id=str(cfg["client-id"]),
        round=int(cfg["server-round"]),
        seed=int(cfg["seed"]),
        init=init,
        frozen=frozen,
        freeze_A=bool(cfg.get("freeze-A", False)),
        optimizer=str(cfg.get("optimizer", "")) or None,
    )


def reply_content(result: TrainResult) -> RecordDict:
    """A node's train reply: the trained factors, ``num-examples`` and the numeric training metrics."""
    arrays, _ = factors_to_records(result.update.modules)
    metrics = MetricRecord({"num-examples": int(result.update.num_examples)})
    for key, value in result.metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            metrics[key] = value
    return RecordDict(
        {"update": arrays, "metrics": metrics, "config": ConfigRecord({"client-id": result.update.client_id})}
    )


def update_from_reply(
    content: RecordDict,
    sent: Mapping[str, LoraFactors],
    client_id: str,
    node: int | str,
    max_examples: int = MAX_EXAMPLES,
) -> tuple[LoraUpdate, dict[str, float], int]:
    """Decode and check a train reply against the factors that were sent to that node.

    The update must have exactly the sent modules, ``A (r, k)`` and ``B (d, r)`` at the sent rank ``r`` and
    shape, float dtype, finite values; ``num-examples`` must be an integer in ``[1, max_examples]``. Alphas
    and rsLoRA are the sent ones (a node cannot change the scale its update is read with).

    Args:
        content: the reply's records.
        sent: the factors the node was sent (``TrainJob.init``).
        client_id: the client the job was for; ``""`` when the node trains on its own partition (then the
            reply's ``client-id`` is taken).
        node: the sender, for messages.
        max_examples: the largest credible ``num-examples``.

    Returns:
        The update (``client_id`` set), the other metrics, and the tensor bytes received.

    Raises:
        ReplyError: naming the node and the field; the caller leaves the update out of the round.
    """
    arrays, metrics, claimed = _reply_records(content, client_id, node)
    n = _num_examples(metrics, node, max_examples)
    modules, nbytes = _decode_factors(arrays, sent, node)
    others = finite_metrics(node, metrics)
    return LoraUpdate(modules, n, client_id or str(claimed or "")), others, nbytes


def _reply_records(
    content: RecordDict, client_id: str, node: int | str
) -> tuple[ArrayRecord, MetricRecord, object]:
    """The reply's ``update`` and ``metrics`` records (present, of their types) and the ``client-id`` it
    claims (``None`` if none), which must be ``client_id`` when one was sent."""
    if "update" not in content:
        raise ReplyError(node, "update", "no ArrayRecord 'update' in the reply")
    if "metrics" not in content:
        raise ReplyError(node, "metrics", "no MetricRecord 'metrics' in the reply")
    arrays, metrics = content["update"], content["metrics"]
    if not isinstance(arrays, ArrayRecord):
        raise ReplyError(node, "update", f"expected an ArrayRecord, got {type(arrays).__name__}")
    if not isinstance(metrics, MetricRecord):
        raise ReplyError(node, "metrics", f"expected a MetricRecord, got {type(metrics).__name__}")
    claimed = content["config"].get("client-id") if isinstance(content.get("config"), ConfigRecord) else None
    if client_id and claimed is not None and claimed != client_id:
        raise ReplyError(
            node, "config[client-id]", f"reply is for client {claimed!r}, {client_id!r} was sent"
        )
    return arrays, metrics, claimed


def _num_examples(metrics: MetricRecord, node: int | str, max_examples: int) -> int:
    """``metrics[num-examples]``: an integer (an integral float is read as one) in ``[1, max_examples]``."""
    n = metrics.get("num-examples")
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_examples:
        raise ReplyError(
            node, "metrics[num-examples]", f"must be an integer in [1, {max_examples}], got {n!r}"
        )
    return n


def _decode_factors(
    arrays: ArrayRecord, sent: Mapping[str, LoraFactors], node: int | str
) -> tuple[dict[str, LoraFactors], int]:
    """The update's factors: exactly the sent modules' ``A`` and ``B`` at the sent shapes, read with the
    sent alpha and rsLoRA flag; and their tensor bytes."""
    _check_keys(node, "update", set(arrays), {f"{m}.{ab}" for m in sent for ab in "AB"})
    modules, nbytes = {}, 0
    for name, ref in sent.items():
        why = f" (rank {ref.rank} was sent)"
        A = decode_array(node, f"update[{name}.A]", arrays[f"{name}.A"], tuple(ref.A.shape), why)
        B = decode_array(node, f"update[{name}.B]", arrays[f"{name}.B"], tuple(ref.B.shape), why)
        nbytes += _tensor_nbytes(A) + _tensor_nbytes(B)
        modules[name] = LoraFactors(A, B, ref.alpha, ref.use_rslora)
    return modules, nbytes


def finite_metrics(node: int | str, metrics: MetricRecord) -> dict[str, float]:
    """The reply's scalar metrics other than ``num-examples``; NaN/Inf values (``train_loss = inf``) and
    metrics beyond the first :data:`MAX_METRICS` are dropped with a logged reason, never averaged."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "num-examples" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        try:
            x = float(value)
        except OverflowError:
            x = math.inf
        if not math.isfinite(x):
            log.warning("node %s: metrics[%s] = %r is not finite; dropped", node, str(key)[:60], value)
        elif len(out) >= MAX_METRICS:
            log.warning(
                "node %s: more than %d metrics; metrics[%s] dropped", node, MAX_METRICS, str(key)[:60]
            )
        else:
            out[key] = x
    return out


# ------------------------------------------------------------------------------------------------ nodes
@dataclass(frozen=True)
class NodeDeclaration:
    """What a node says about itself (from its ``--node-config``), answered to the server's query.

    Args:
        rank_type: its LoRA resources (``lora-rank=8`` or ``lora-rank-type=attn30-mlp200``); ``None``: the
            server assigns one from the run's distribution.
        client_id: the data partition it trains on (``client-id=...``); ``None``: any (simulation).
        partition_id: Flower's ``partition-id`` (simulation sets it), used to place the distribution.
    """

    rank_type: RankType | None = None
    client_id: str | None = None
    partition_id: int | None = None

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "lora-rank-type": self.rank_type.name if self.rank_type else "",
                "lora-rank-attn": self.rank_type.attn if self.rank_type else 0,
                "lora-rank-mlp": self.rank_type.mlp if self.rank_type else 0,
                "client-id": self.client_id or "",
                "partition-id": -1 if self.partition_id is None else self.partition_id,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord, node: int | str = "?") -> NodeDeclaration:
        """Read a node's answer to the query; the rank type must be one :func:`parse_rank_type` knows (its
        ``attn`` / ``mlp`` fields, if set, must agree), the client id a short printable string.

        Raises:
            ReplyError: naming the field, for anything else.
        """
        rank_type = None
        name = record.get("lora-rank-type", "")
        if not isinstance(name, str) or len(name) > 64:
            raise ReplyError(node, "node[lora-rank-type]", f"must be a short string, got {str(name)[:64]!r}")
        if name:
            try:
                rank_type = parse_rank_type(name)
            except ValueError as exc:
                raise ReplyError(node, "node[lora-rank-type]", str(exc)) from None
            for key, want in (("lora-rank-attn", rank_type.attn), ("lora-rank-mlp", rank_type.mlp)):
                if record.get(key, 0) not in (0, want):
                    raise ReplyError(node, f"node[{key}]", f"{record.get(key)!r} disagrees with {name!r}")
        client_id = record.get("client-id", "")
        if not isinstance(client_id, str) or len(client_id) > 256 or not client_id.isprintable():
            raise ReplyError(
                node, "node[client-id]", f"must be a printable string, got {str(client_id)[:64]!r}"
            )
        pid = record.get("partition-id", -1)
        if not isinstance(pid, int) or isinstance(pid, bool) or not -1 <= pid < 2**31:
            raise ReplyError(node, "node[partition-id]", f"must be an integer >= -1, got {pid!r}")
        return cls(rank_type, client_id or None, pid if pid >= 0 else None)


def node_declaration(node_config: Mapping[str, object]) -> NodeDeclaration:
    """Read a node's declaration from its node config: ``lora-rank`` (``8``, ``r30``) or ``lora-rank-type``
    (``attn30-mlp200``), ``client-id``, and Flower's ``partition-id``.

    Raises:
        ValueError: naming the key, for a malformed rank or both rank keys given.
    """
    rank, rank_type = node_config.get("lora-rank"), node_config.get("lora-rank-type")
    if rank is not None and rank_type is not None:
        raise ValueError("node config: give lora-rank or lora-rank-type, not both")
    spec = rank if rank is not None else rank_type
    try:
        parsed = None if spec is None else parse_rank_type(spec if isinstance(spec, int) else str(spec))
    except ValueError as exc:
        key = "lora-rank" if rank is not None else "lora-rank-type"
        raise ValueError(f"node config {key}={spec!r}: {exc}") from None
    client_id = node_config.get("client-id")
    pid = node_config.get("partition-id")
    return NodeDeclaration(
        parsed, None if client_id is None else str(client_id), None if pid is None else int(pid)
    )

"""Every collective of a training step, with its group and its size: a ``CommDebugMode`` that keeps
the arguments as well as the counts.

torch's ``CommDebugMode`` (``torch.distributed.tensor.debug``) sees each collective as it is
dispatched, the c10d ops FSDP2 issues itself (``_allgather_base_``, ``_reduce_scatter_base_``,
``allreduce_``) and the functional ones DTensor issues (the gradient norm's ``all_reduce``), but it
only counts them. :class:`CommRecorder` also reads, for each one, the process group it runs in
(named after the device-mesh dimension it spans: ``shard``, inside a node; ``replicate``, across
nodes; ``world``, every rank) and the size of its full tensor: the gathered output of an
all-gather, the input of a reduce-scatter, the tensor of an all-reduce. Under a fake process group
the collectives move nothing, but their shapes are those of the real run, so the list is the same.

:func:`wire_bytes` turns a collective into the bytes each rank sends over its link with NCCL's ring
algorithms: (n - 1) / n of the full tensor for an all-gather or a reduce-scatter, 2 (n - 1) / n for
an all-reduce.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.debug._comm_mode import (
    NATIVE_TO_PY_MAPPING,
    _CommModeModuleTracker,
    c10d_collective_ops,
)

INTRA, INTER = "intra-node", "inter-node"


@dataclass(frozen=True)
class Collective:
    kind: str        # all_gather, reduce_scatter, all_reduce, broadcast, ...
    group: str       # the mesh dimension it spans (shard, replicate) or world
    ranks: int       # ranks in that group
    link: str        # intra-node or inter-node
    bytes: int       # the full tensor: gathered output, scattered input, reduced tensor
    dtype: str
    phase: str       # the step's phase it ran in (CommRecorder.phase)
    micro_batch: int = 0   # which micro-batch of the step (1-based); 0: outside them

    def to_dict(self) -> dict:
        return asdict(self)


# c10d and functional op names -> one kind each
_KINDS = {"_allgather_base_": "all_gather", "allgather_": "all_gather", "allgather_coalesced_": "all_gather",
          "allgather_into_tensor_coalesced_": "all_gather", "all_gather_into_tensor": "all_gather",
          "all_gather_into_tensor_coalesced": "all_gather", "_reduce_scatter_base_": "reduce_scatter",
          "reduce_scatter_": "reduce_scatter", "reduce_scatter_tensor_coalesced_": "reduce_scatter",
          "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_tensor_coalesced": "reduce_scatter",
          "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "all_reduce": "all_reduce",
          "all_reduce_coalesced": "all_reduce", "broadcast_": "broadcast", "broadcast": "broadcast",
          "alltoall_": "all_to_all", "alltoall_base_": "all_to_all", "all_to_all_single": "all_to_all"}
# c10d ops (names ending in "_") take (output, input, ...): the full tensor is an all-gather's output,
# a reduce-scatter's input; functional ops take the input first and return the output.
_C10D_FULL_ARG = {"all_gather": 0, "reduce_scatter": 1}


class _ModuleTracker(_CommModeModuleTracker):
    """CommDebugMode's module tracker, for several forwards in one context (gradient accumulation):
    torch's registers one more forward hook per module at every forward and then pops its parent
    stack once per hook, past the bottom on the second forward."""

    def _fw_pre_hook(self, mod, input):
        if not self.is_bw:
            stale = self.register_forward_hook_handles.pop(self._get_mod_name(mod), None)
            if stale is not None:
                stale.remove()
        super()._fw_pre_hook(mod, input)


class CommRecorder(CommDebugMode):
    """``CommDebugMode`` that records a :class:`Collective` per collective in :attr:`collectives`.

    ``groups``: process-group name -> (label, ranks, link), from :func:`mesh_groups`. Set
    :attr:`phase` and :attr:`micro_batch` to label what runs next.
    """

    def __init__(self, groups: dict[str, tuple[str, int, str]]):
        super().__init__()
        self.advanced_module_tracker = _ModuleTracker()
        self.groups = groups
        self.collectives: list[Collective] = []
        self.phase = "step"
        self.micro_batch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if out is NotImplemented or isinstance(func, torch._ops.HigherOrderOperator):
            return out
        packet = func._overloadpacket
        if packet in c10d_collective_ops or packet in self.comm_registry:
            packet = NATIVE_TO_PY_MAPPING.get(packet, packet)
            self.collectives.append(self._describe(packet.__name__.split(".")[-1], args, kwargs or {}))
        return out

    def _describe(self, name: str, args, kwargs) -> Collective:
        kind = _KINDS.get(name, name)
        group, ranks, link = self.groups.get(_group_name(args, kwargs), ("other", 0, INTER))
        functional = not name.endswith("_")
        tensors = _tensors(args[0 if functional else _C10D_FULL_ARG.get(kind, 0)])
        size = sum(t.numel() * t.element_size() for t in tensors)
        if functional and kind == "all_gather":
            size *= ranks
        return Collective(kind=kind, group=group, ranks=ranks, link=link, bytes=size,
                          dtype=str(tensors[0].dtype).removeprefix("torch.") if tensors else "", phase=self.phase,
                          micro_batch=self.micro_batch)


def _tensors(arg) -> list[torch.Tensor]:
    if isinstance(arg, torch.Tensor):
        return [arg]
    out = []
    for a in arg if isinstance(arg, (list, tuple)) else ():
        out += _tensors(a)
    return out


def _group_name(args, kwargs) -> str | None:
    """The process group's name: a c10d op carries the group itself, a functional op its name."""
    for a in [*args, *kwargs.values()]:
        if isinstance(a, torch.ScriptObject) and "ProcessGroup" in str(a._type()):
            return dist.ProcessGroup.unbox(a).group_name
    for a in [*args, *kwargs.values()]:   # functional collectives: (tensor, [reduce op,] group name)
        if isinstance(a, str) and a not in ("sum", "avg", "max", "min", "product"):
            return a
    return None


def mesh_groups(mesh, nodes: int) -> dict[str, tuple[str, int, str]]:
    """Process-group name -> (label, ranks, link) for the groups of ``mesh`` and the world group.

    On one node every group is intra-node; across nodes the ``shard`` dimension stays inside a node
    (train/parallel.py's ``build_mesh``) and ``replicate`` and ``world`` cross nodes.
    """
    world = dist.group.WORLD
    out = {world.group_name: ("world", world.size(), INTER if nodes > 1 else INTRA)}
    if mesh is not None:
        for dim in mesh.mesh_dim_names:
            pg = mesh.get_group(dim)
            out[pg.group_name] = (dim, pg.size(), INTRA if dim == "shard" or nodes == 1 else INTER)
    return out


def wire_bytes(c: Collective) -> float:
    """Bytes one rank sends over its link for ``c`` with ring algorithms (NCCL's for these sizes)."""
    n = c.ranks
    if n <= 1:
        return 0.0
    if c.kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return c.bytes * (n - 1) / n
    if c.kind == "all_reduce":
        return 2 * c.bytes * (n - 1) / n
    return float(c.bytes)


def repeats(c: Collective, accumulation: int, simulated: int) -> int:
    """How often ``c`` runs in a step of ``accumulation`` micro-batches when ``simulated`` of them
    were run: every micro-batch before the last is the first simulated one again (no gradient sync)."""
    if simulated < accumulation and c.micro_batch == 1:
        return accumulation - simulated + 1
    return 1


def summary(collectives: list[Collective], accumulation: int = 1, simulated: int = 1) -> list[dict]:
    """Collectives grouped by (phase, kind, group, dtype), counted over a whole step of
    ``accumulation`` micro-batches: count, full bytes and bytes on the wire per rank."""
    rows: dict[tuple, dict] = {}
    for c in collectives:
        n = repeats(c, accumulation, simulated)
        key = (c.phase, c.kind, c.group, c.link, c.dtype)
        row = rows.setdefault(key, {"phase": c.phase, "kind": c.kind, "group": c.group, "link": c.link,
                                    "dtype": c.dtype, "count": 0, "bytes": 0, "wire_bytes": 0.0})
        row["count"] += n
        row["bytes"] += n * c.bytes
        row["wire_bytes"] += n * wire_bytes(c)
    return list(rows.values())


def by_link(collectives: list[Collective], accumulation: int = 1, simulated: int = 1) -> dict[str, float]:
    """Bytes each rank sends in a step of ``accumulation`` micro-batches, inside a node and across nodes."""
    out = {INTRA: 0.0, INTER: 0.0}
    for c in collectives:
        out[c.link] += repeats(c, accumulation, simulated) * wire_bytes(c)
    return out

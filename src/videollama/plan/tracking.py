"""Making torch's memory trackers see a fake training step as they would see the real one.

``FSDPMemTracker`` and ``MemTracker`` (``torch.distributed._tools``) follow every tensor's storage
through a ``TorchDispatchMode``; run under ``FakeTensorMode`` with a fake process group they need:

- DTensor's sharding propagation kept in a fake mode of its own (:func:`sharding_propagation_apart`);
- the gradients FSDP2 holds between micro-batches filed as gradients (:func:`refile_held_gradients`);
- frozen parameters left without gradient hooks, and a quick ``_fix_weakref`` lookup on FSDP
  modules (:func:`memory_tracker`).
"""

from __future__ import annotations

import contextlib

# FSDPMemTracker's categories (_FSDPRefType values) -> this report's, in report order
CATEGORIES = {"Sharded Param": "parameters", "Unsharded Param": "gathered_parameters",
              "All Gather": "all_gather_buffers", "Sharded Grad": "gradients",
              "Unsharded Grad": "unsharded_gradients", "Reduce Scatter": "reduce_scatter_buffers",
              "OptState": "optimizer_state", "Inputs": "inputs", "Buffer": "buffers",
              "Activation": "activations", "Temp": "temporaries"}
# MemTracker's categories (one rank without FSDP) beside FSDPMemTracker's
_NAMES = {**CATEGORIES, "Parameter": "parameters", "Gradient": "gradients", "Optstate": "optimizer_state",
          "Other": "inputs"}


@contextlib.contextmanager
def sharding_propagation_apart():
    """DTensor works out an op's output shape by running it on fake tensors of the global shapes, in
    the active fake mode if there is one: under the simulation's, FSDPMemTracker would count those
    as memory (a whole unsharded fp32 model's worth in gradient clipping). Their own fake mode, as
    in a real run, lets the tracker tell them apart (it skips ops under another fake mode)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.tensor import _sharding_prop

    apart = FakeTensorMode()
    before = _sharding_prop.detect_fake_mode
    _sharding_prop.detect_fake_mode = lambda *args, **kwargs: apart
    try:
        yield
    finally:
        _sharding_prop.detect_fake_mode = before


def memory_tracker(model, optimizer, *, fsdp: bool):
    """FSDPMemTracker for an FSDP model; MemTracker for one without (QLoRA's one process)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    if fsdp:
        _quick_weakref_lookups(model)
        return _global_peak_only(FSDPMemTracker(model, optimizer))
    _quick_weakref_lookups(model)
    tracker = _global_peak_only(MemTracker())
    # MemTracker hooks every parameter's gradient, which torch refuses on a frozen one: mark those
    # as hooked already (their gradient never exists)
    for p in model.parameters():
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    tracker.track_external(model, optimizer)
    return tracker


def peak_by_category(tracker) -> dict[str, int]:
    """The tracker's snapshot at the peak, in CATEGORIES' names (bytes; they sum to the peak)."""
    at_peak = dict.fromkeys(CATEGORIES.values(), 0)
    for key, value in next(iter(tracker.get_tracker_snapshot("peak").values()), {}).items():
        name = getattr(key, "value", key)
        if name != "Total":
            at_peak[_NAMES[name]] += value
    return at_peak


def refile_held_gradients(model, tracker) -> None:
    """File the gradients FSDP2 holds between micro-batches under gradients: FSDPMemTracker files
    them as backward temporaries (FSDP2 makes them in its post-backward hook, after the tracker
    has filed the unsharded gradient): the fp32 copy of an unsharded gradient kept without gradient
    sync, and across nodes the reduce-scattered shard that waits for its all-reduce."""
    from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
        if group is None:
            continue
        for p in group.fsdp_params:
            if p.unsharded_accumulated_grad is not None:
                tracker._update_and_maybe_create_winfos(p.unsharded_accumulated_grad, _FSDPRefType.UNSHARDED_GRAD)
        if group._partial_reduce_output is not None:
            tracker._update_and_maybe_create_winfos(group._partial_reduce_output, _FSDPRefType.SHARDED_GRAD)


def _global_peak_only(tracker):
    """The tracker with its peak kept for the whole rank only: at every op MemTracker also updates
    the peak of each module it has seen that is running (a loop over every module: most of a
    one-rank 13B simulation's time, where every module is tracked); the report reads only the
    rank's peak snapshot (:func:`peak_by_category`), which this keeps exactly as torch does."""
    from copy import deepcopy

    from torch.distributed._tools.mem_tracker import _TOTAL_KEY

    def update_peak(peak_state) -> None:
        for device, snapshot in tracker._curr_mem_snap.items():
            if tracker._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                tracker._peak_mem[device] = snapshot[_TOTAL_KEY]
                tracker._peak_mem_snap[device] = deepcopy(snapshot)

    tracker._update_peak_stats = update_peak
    return tracker


def _quick_weakref_lookups(model) -> None:
    """At every op FSDPMemTracker dereferences a weak reference to each FSDP module (MemTracker, to
    every module it has seen), and torch.utils.weak.WeakIdRef then asks the module for
    ``_fix_weakref`` (a tensor method). On a module the miss walks nn.Module's and the checkpoint
    wrapper's ``__getattr__``: a third of a 13B simulation's time with FSDP, most of it without
    (QLoRA's one process tracks every module). A no-op attribute of that name answers at once (the
    model is the simulation's own; every module gets it, whichever the tracker follows)."""
    for module in model.modules():
        module.__dict__["_fix_weakref"] = _no_op


def _no_op() -> None:
    pass


class _NoHook:
    def remove(self) -> None:
        pass

"""Measured memory, to check ``videollama plan`` against: the CPU allocator's peak, and the
tensors autograd saves.

:class:`AllocatorTrace` reads torch.profiler's memory events (``profile_memory=True``): every
allocation and free that goes through torch's CPU allocator inside the ``with`` block, in order,
with its size. The running sum's maximum is the peak of what tensors held, exact to the byte and
the same on every run (it does not see memory that libraries allocate behind torch's back, such as
a BLAS library's packing buffers, nor the allocator's own overhead; the process's RSS does).
Frees of memory allocated before the block are not counted, so start it before building anything
that should count. ``phase(name)`` marks a region, and :attr:`AllocatorTrace.peak_phase` says in
which one the peak fell.

:func:`saved_tensor_bytes` sums, per block kind, the storage of every tensor autograd saves for
backward during a forward (``torch.autograd.graph.saved_tensors_hooks``), each storage once,
parameters excluded; a tensor is attributed to the block that first saves it.
"""

from __future__ import annotations

import gc

import torch


class AllocatorTrace:
    def __init__(self) -> None:
        self.peak = 0            # the largest running sum of allocations - frees, bytes
        self.end = 0             # the running sum when the block ended
        self.peak_phase = None   # the phase(...) region holding the peak, if any
        self._prof = None
        self._gc_was_enabled = True

    def __enter__(self) -> AllocatorTrace:
        from torch.profiler import ProfilerActivity, profile

        # Garbage from before the block (reference cycles that still hold tensors) must not be
        # freed inside it: once a profiler has run in the process, such a free is reported with
        # its size, and would lower the running sum by memory the block never allocated. Collect
        # it now and keep the cyclic collector off until the block ends.
        gc.collect()
        self._gc_was_enabled = gc.isenabled()
        gc.disable()

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        if self._gc_was_enabled:
            gc.enable()
        events = self._prof.profiler.kineto_results.events()
        cpu = torch._C._autograd.DeviceType.CPU
        allocations = sorted(((e.start_ns(), e.nbytes()) for e in events
                              if e.name() == "[memory]" and e.device_type() == cpu), key=lambda a: a[0])
        phases = [(e.start_ns(), e.end_ns(), e.name()[len("phase:"):]) for e in events
                  if e.name().startswith("phase:")]
        running, peak_at = 0, None
        for t, nbytes in allocations:
            running += nbytes
            if running > self.peak:
                self.peak, peak_at = running, t
        self.end = running
        if peak_at is not None:
            inside = [name for start, end, name in phases if start <= peak_at <= end]
            self.peak_phase = inside[-1] if inside else None

    @staticmethod
    def phase(name: str):
        """A named region (a profiler annotation) for :attr:`peak_phase`."""
        from torch.profiler import record_function

        return record_function(f"phase:{name}")


def saved_tensor_bytes(model: torch.nn.Module, forward) -> dict[str, int]:
    """Run ``forward()`` and return the bytes autograd saved for backward, by block kind
    (model.parts.BLOCK_TYPES, and "root" for the rest), parameters excluded."""
    from videollama.model.parts import BLOCK_TYPES, blocks

    where = ["root"]
    handles = []

    def enter(kind: str):
        def hook(module, args) -> None:   # a hook returning a value would replace the block's input
            where.append(kind)
        return hook

    def leave(module, args, output) -> None:
        where.pop()

    for kind in BLOCK_TYPES:
        for _, _, block in blocks(model, kind):
            handles.append(block.register_forward_pre_hook(enter(kind)))
            handles.append(block.register_forward_hook(leave))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen:
            seen[key] = (where[-1], storage.nbytes())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        for h in handles:
            h.remove()
    out: dict[str, int] = {}
    for kind, nbytes in seen.values():
        out[kind] = out.get(kind, 0) + nbytes
    return out


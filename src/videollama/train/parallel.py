"""Parallelism applied to a finished, single-device VideoLlama, in torchtitan's order:

1. activation checkpointing, per block type (recompute a block's activations in backward);
2. optionally ``torch.compile`` per block (in place, so parameter names do not change);
3. FSDP2 ``fully_shard`` on every ViT block, temporal block, the resampler, every decoder
   block and every cross-attention block, then on the root (embeddings, norms, lm_head).

The model code itself knows nothing of any of this. One mesh dimension shards parameters
over all ranks (FSDP); with several nodes, a 2-D mesh ``("replicate", "shard")`` shards
inside a node and replicates across nodes (HSDP), so the all-gathers of every layer stay on
the fast intra-node links and only the gradient all-reduce crosses nodes.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn

from videollama.model.parts import BLOCK_TYPES, blocks


def apply_activation_checkpointing(model: nn.Module, block_types: list[str]) -> int:
    """Wrap every block of the given types in a non-reentrant checkpoint wrapper; returns the count."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    n = 0
    for block_type in block_types:
        for container, i, block in list(blocks(model, block_type)):
            # preserve_rng_state=False: the blocks have no dropout, and saving the RNG per
            # block costs time for nothing.
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
            if container is None:
                model.resampler = wrapped
            else:
                container[i] = wrapped
            n += 1
    return n


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (``Module.compile`` keeps parameter names unchanged)."""
    for block_type in BLOCK_TYPES:
        for _, _, block in blocks(model, block_type):
            block.compile()


def build_mesh(device_type: str, world_size: int, local_world_size: int | None = None):
    """A 1-D ``("shard",)`` mesh on one node, or 2-D ``("replicate", "shard")`` across nodes.

    ``local_world_size`` (torchrun's LOCAL_WORLD_SIZE) is the number of ranks per node.
    """
    from torch.distributed.device_mesh import init_device_mesh

    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if world_size % local:
        raise ValueError(f"world size {world_size} is not a multiple of ranks per node {local}")
    nodes = world_size // local
    if nodes > 1:
        return init_device_mesh(device_type, (nodes, local), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))


def apply_fsdp(model: nn.Module, mesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = None, reshard_after_forward: bool = True,
               encoder_outside_forward: bool = False) -> nn.Module:
    """``fully_shard`` each block, then the root. A 2-D mesh gives hybrid sharding (HSDP).

    ``param_dtype`` bf16 computes in bf16 while the sharded master weights and optimizer
    state stay fp32; ``reduce_dtype`` fp32 keeps the gradient reduction exact enough.

    ``encoder_outside_forward``: the training step calls ``model.window_latents`` (no gradient)
    and ``model.stamp`` itself, outside ``model.forward`` (a frozen encoder's latent cache,
    train/latents.py). FSDP then must know ``window_latents`` as a forward method (it gathers the
    root's parameters, the ViT's embeddings among them), and the time code is sharded on its own:
    in the root's group its gradient, which backward computes after the decoder's, would come
    after the root had already reduced its gradients, and with every window cached it would be
    called while the root's parameters are still sharded.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block_type in BLOCK_TYPES:
        for _, _, block in blocks(model, block_type):
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if encoder_outside_forward:
        # MediaTime returns a view of its input; nothing modifies it in place (FSDP warns of that case).
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPMediaTime\) returned a view")
        fully_shard(model.decoder.media_time, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root keeps its parameters gathered after forward: backward needs them at once.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    if encoder_outside_forward:
        register_fsdp_forward_method(model, "window_latents")
    return model


def parallelize(model: nn.Module, mesh, *, activation_checkpointing: list[str], compile: bool,
                bf16: bool, reshard_after_forward: bool = True, encoder_outside_forward: bool = False) -> nn.Module:
    """Apply checkpointing, compile and FSDP2 to ``model`` (in place), in that order.

    ``mesh`` None: no FSDP (a single rank), checkpointing and compile only. ``encoder_outside_forward``:
    see :func:`apply_fsdp`.
    """
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        apply_compile(model)
    if mesh is None:
        if bf16:
            raise ValueError("bf16 compute comes from FSDP's mixed-precision policy: it needs a mesh")
        return model
    return apply_fsdp(model, mesh, param_dtype=torch.bfloat16 if bf16 else None,
                      reduce_dtype=torch.float32 if bf16 else None,
                      reshard_after_forward=reshard_after_forward, encoder_outside_forward=encoder_outside_forward)

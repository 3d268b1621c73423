"""Reading torch.distributed.checkpoint (DCP) folders without running code from them.

DCP's own ``FileSystemReader`` unpickles the ``.metadata`` file with plain ``pickle.load``, and
its load planner reads every non-tensor ("bytes") item with ``torch.load(weights_only=False)``:
either runs whatever a tampered file asks for. A checkpoint is a file a user may be handed, so:

- :class:`SafeReader` unpickles ``.metadata`` with :class:`MetadataUnpickler`, which admits only
  the classes DCP's metadata is made of (its dataclasses, ``torch.Size``, dtypes, layouts,
  memory formats, paths); anything else is an error that names the file and the class;
- it refuses every bytes item: our checkpoints hold tensors only (the optimizer's
  hyper-parameters and all other state travel as JSON beside them), so a bytes item is either
  tampering or another program's checkpoint;
- every storage entry must name a ``.distcp`` file directly inside the checkpoint folder.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType

# (module, name) pairs the metadata pickle may reference.
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
}


# A 13B model's metadata is a few MB; a file far larger is not metadata.
MAX_METADATA_BYTES = 1 << 30


class UnsafeCheckpoint(ValueError):
    """A checkpoint file asks for something a safe reader must not do."""


class MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else: no function of any module is reachable."""

    def __init__(self, file, *, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise UnsafeCheckpoint(f"{self.source}: refers to {module}.{name}, which DCP metadata never holds; "
                               "refusing to load it (a tampered or foreign checkpoint)")


def read_metadata(path: str | Path) -> Metadata:
    """The ``.metadata`` of a DCP folder, unpickled safely and checked."""
    from videollama.data.safe_io import read_bounded

    path = Path(path) / ".metadata"
    data = read_bounded(path, MAX_METADATA_BYTES, "checkpoint metadata")  # a regular file, of a sane size
    try:
        metadata = MetadataUnpickler(io.BytesIO(data), source=str(path)).load()
    except UnsafeCheckpoint:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged pickle raises many kinds of error
        raise ValueError(f"{path}: not readable checkpoint metadata ({type(e).__name__}: {e})") from e
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata")
    for index, info in (metadata.storage_data or {}).items():
        rel = str(getattr(info, "relative_path", ""))
        if not rel.endswith(".distcp") or "/" in rel or "\\" in rel or rel.startswith("."):
            raise UnsafeCheckpoint(f"{path}: tensor {index.fqn!r} points to {rel!r}, outside the checkpoint folder")
    return metadata


class SafeReader(FileSystemReader):
    """``FileSystemReader`` that reads metadata without arbitrary unpickling and refuses bytes items."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:
            raise ValueError("per-rank metadata files are not supported")
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise UnsafeCheckpoint(
                    f"{self.path}: {item.storage_index.fqn!r} is stored as pickled bytes; this reader loads "
                    "tensors only (a tampered or foreign checkpoint)")
        return super().read_data(plan, planner)


def load(state: dict, path: str | Path, *, no_dist: bool = False) -> None:
    """``dcp.load`` of the tensors in ``state`` (nested dicts of tensors) from ``path``, safely.

    The metadata is read and checked here first, so a tampered checkpoint is a plain
    ``UnsafeCheckpoint`` naming the file rather than an error wrapped by DCP's collectives.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = read_metadata(path)
    stored = metadata.state_dict_metadata
    for key in _flat_keys(state):
        if isinstance(stored.get(key), BytesStorageMetadata):
            raise UnsafeCheckpoint(f"{path}: {key!r} is stored as pickled bytes; this reader loads tensors only "
                                   "(a tampered or foreign checkpoint)")
    dcp.load(state, storage_reader=SafeReader(str(path)), no_dist=no_dist)


def _flat_keys(state: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in state.items():
        name = f"{prefix}{k}"
        keys += _flat_keys(v, name + ".") if isinstance(v, dict) else [name]
    return keys


def check_shapes(path: str | Path, expected: dict[str, tuple[int, ...]], *, needed_by: str) -> None:
    """Raise unless every ``expected`` key is a tensor of that shape in the checkpoint (before any
    memory is allocated for it): a bytes item is UnsafeCheckpoint, a missing or misshapen one a
    ValueError naming the tensor and ``needed_by`` (the config that asks for it)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    stored = read_metadata(path).state_dict_metadata
    for key, shape in expected.items():
        md = stored.get(key)
        if isinstance(md, BytesStorageMetadata):
            raise UnsafeCheckpoint(f"{path}: {key!r} is stored as pickled bytes; this reader loads tensors only "
                                   "(a tampered or foreign checkpoint)")
        found = tuple(md.size) if md is not None else None
        if found != tuple(shape):
            raise ValueError(f"{path}: tensor {key!r} is {found or 'missing'} in the checkpoint, "
                             f"{needed_by} needs {tuple(shape)}")

"""Reading a learner checkpoint of the earlier format (DCP's default: `.metadata` + `.distcp`) without unpickling freely.

DCP's own reader runs `pickle.load` on `.metadata` and `torch.load(weights_only=False)`
on every non-tensor value, so a crafted checkpoint could run code in the process
that resumes it. Here the metadata is read by an unpickler that builds only the
DCP record types, dtypes and sizes listed in `RECORDS` (anything else fails the
load with `pickle.UnpicklingError`), and the non-tensor values (plain numbers,
strings, lists: the optimizer's hyperparameters) by `torch.load(weights_only=True)`,
as DCP already reads the tensors. New checkpoints are written in
safetensors and JSON (`rlhub.parallel.checkpoint`) and never come here.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

RECORDS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                              "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by its name ("torch.strided")
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}
"""The only globals a `.metadata` file may name: DCP's own records, torch's dtypes, sizes and layouts."""


class RestrictedUnpickler(pickle.Unpickler):
    """The standard library's way to unpickle data of known types: every global the stream names must be
    listed in `RECORDS` (or be a torch dtype); anything else stops the load."""

    def find_class(self, module: str, name: str) -> Any:
        if name in RECORDS.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a checkpoint's metadata may not name {module}.{name}")


class SafeLegacyReader(FileSystemReader):
    """DCP's file reader whose metadata is read by `RestrictedUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = RestrictedUnpickler(io.BytesIO(f.read())).load()
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path}: not a checkpoint's metadata ({type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, whose non-tensor values load with `weights_only=True`."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._nested_dict import set_element

        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded

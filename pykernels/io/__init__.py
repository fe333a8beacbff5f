"""Streaming safetensors I/O for `pykernels merge` (DESIGN.md section 7).

Reading (`Checkpoint`): a directory holding `model.safetensors`, or `model.safetensors.index.json` plus its
shards (or one `.safetensors` file). Headers are parsed and checked up front (missing shards, truncated files,
tensors the index names but a shard lacks), tensors are loaded lazily with safetensors' `safe_open` (zero-copy
views of the memory-mapped file), and `release(tensor)` hands the pages of a tensor back to the kernel once it
is used, so the resident set holds only the tensors being worked on, not every page read so far.

Writing (`plan_shards`, `ShardedWriter`): the shard layout and every header are fixed before any tensor
exists (names, dtypes and shapes are known from the inputs), so each tensor is written straight to its offset
as soon as it is computed: memory holds one output tensor, not a shard, and several processes can write
their own tensors into the same shard files.
"""
from .reader import Checkpoint, CheckpointError, TensorInfo
from .writer import ShardedWriter, ShardPlan, parse_size, plan_shards, tensor_bytes

__all__ = ["Checkpoint", "CheckpointError", "TensorInfo", "ShardPlan", "ShardedWriter", "plan_shards", "parse_size",
           "tensor_bytes"]

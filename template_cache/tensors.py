"""Torch-side helpers of the format: dtype codes, raw bytes of a tensor, views of bytes.

Invariants:
- `tensor_bytes` never changes the tensor; it returns its bytes in row-major order.
- `view_tensor` makes no copy: the returned tensor aliases the buffer it was given
  (torch keeps the buffer object alive for as long as the tensor lives).
"""

from __future__ import annotations

from typing import Any

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):  # unsigned wide types arrived in torch 2.3
        TORCH_DTYPES[_code] = getattr(torch, _name)
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


def dtype_code(dtype: torch.dtype) -> str:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no template code") from None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes (copied to the host only if it lives on a device)."""
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.numel() == 0:
        return memoryview(b"")
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array).cast("B")


def view_tensor(buffer: Any, offset: int, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A zero-copy tensor over `buffer[offset:]` (buffer: writable, e.g. an mmap)."""
    torch_dtype = TORCH_DTYPES[dtype]
    count = 1
    for dim in shape:
        count *= dim
    if count == 0:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(buffer, dtype=torch_dtype, count=count, offset=offset).view(shape)

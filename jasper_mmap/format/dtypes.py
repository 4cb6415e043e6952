"""Dtype names shared by the store backends, and float16/bfloat16 <-> float32 conversion.

numpy has no bfloat16, so bfloat16 data is carried as its raw ``uint16`` bit pattern and widened
to float32 by a shift (exact). Narrowing float32 to bfloat16 rounds to nearest, ties to even,
like ``torch.Tensor.to(torch.bfloat16)``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "STORED_DTYPES",
    "entry_nbytes",
    "numpy_dtype",
    "safetensors_code",
    "to_stored",
    "to_float32",
]

#: logical dtype name -> (numpy dtype of the raw bytes, safetensors dtype code)
STORED_DTYPES: dict[str, tuple[np.dtype, str]] = {
    "float32": (np.dtype("<f4"), "F32"),
    "float16": (np.dtype("<f2"), "F16"),
    "bfloat16": (np.dtype("<u2"), "BF16"),
    "int64": (np.dtype("<i8"), "I64"),
}


def entry_nbytes(entry: dict) -> int:
    """Bytes of a manifest (or generation) entry's array: its shape times its stored dtype."""
    return (
        int(np.prod(entry["shape"], dtype=np.int64)) * numpy_dtype(entry["stored_dtype"]).itemsize
    )


def numpy_dtype(name: str) -> np.dtype:
    """Return the numpy dtype holding the raw bytes of logical dtype ``name``."""
    return STORED_DTYPES[name][0]


def safetensors_code(name: str) -> str:
    """Return the safetensors header code (``F32``, ``BF16``, ...) of logical dtype ``name``."""
    return STORED_DTYPES[name][1]


def _float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def to_stored(x: np.ndarray, name: str) -> np.ndarray:
    """Convert a float32/int64 block to the raw representation of stored dtype ``name``."""
    if name == "bfloat16":
        return _float32_to_bfloat16_bits(x)
    return np.ascontiguousarray(x, dtype=numpy_dtype(name))


def to_float32(raw: np.ndarray, name: str) -> np.ndarray:
    """Widen raw stored floats (``float16``/``bfloat16`` bits/``float32``) to float32."""
    if name == "bfloat16":
        return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if name == "float16":
        return raw.astype(np.float32)
    return raw

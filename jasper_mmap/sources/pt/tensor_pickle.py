"""Restricted unpickling of the ``data.pkl`` record of a one-tensor torch archive.

``torch.save(tensor)`` pickles a call of a rebuild function on a persistent storage id:
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[,
metadata])`` for the classic dtypes (typed storage ``torch.<Name>Storage``),
``_rebuild_tensor_v3(..., dtype[, metadata])`` over an ``UntypedStorage`` for the newer ones
(uint16/32/64, float8...), wrapped in ``_rebuild_parameter`` for an ``nn.Parameter`` and in
``torch._tensor._rebuild_from_type_v2`` for a tensor carrying Python attributes. This module
admits exactly the globals ``torch.load(weights_only=True)`` admits for those, each replaced by
a harmless stand-in that only records its arguments (nothing is imported or called, and torch
itself is not imported), then checks every recorded field's type and range and returns a
:class:`TensorMeta`. Anything else raises :class:`Malformed` saying what was found.

The storage's location string (``"cpu"``, ``"cuda:0"``...) is not used: the bytes are the same
wherever the tensor lived, as ``torch.load(..., map_location="cpu")`` reads them.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from dataclasses import dataclass

__all__ = ["TensorMeta", "Malformed", "Unsafe", "read_tensor_meta", "DTYPE_ITEMSIZE"]

#: typed storage class -> dtype (``torch.save`` writes GLOBAL ``torch <Name>Storage``)
_STORAGES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}
#: dtypes whose elements the reader can return (bytes per element in the file)
DTYPE_ITEMSIZE = {
    **dict.fromkeys(["float64", "int64", "uint64", "complex64"], 8),
    **dict.fromkeys(["float32", "int32", "uint32"], 4),
    **dict.fromkeys(["float16", "bfloat16", "int16", "uint16"], 2),
    **dict.fromkeys(["int8", "uint8", "bool", "float8_e4m3fn", "float8_e5m2"], 1),
    **dict.fromkeys(["float8_e4m3fnuz", "float8_e5m2fnuz"], 1),
    "complex128": 16,
}
#: other dtypes a pickle may name (refused with their name: no numpy equivalent here)
_OTHER_DTYPES = {
    *("complex32", "float8_e8m0fnu", "float4_e2m1fn_x2", "bits1x8", "bits2x4", "bits4x2"),
    *("bits8", "bits16", "qint8", "quint8", "qint32", "quint4x2", "quint2x4"),
    *(f"uint{k}" for k in range(1, 8)),
    *(f"int{k}" for k in range(1, 8)),
}
#: rebuild functions torch.load(weights_only=True) admits that cannot yield rows to read
_NO_ROWS = {
    "_rebuild_meta_tensor_no_storage": "a meta tensor (it has no data)",
    "_rebuild_sparse_tensor": "a sparse tensor (save t.to_dense())",
    "_rebuild_qtensor": "a quantized tensor (save t.dequantize())",
    "_rebuild_nested_tensor": "a nested tensor (save a padded dense tensor)",
    "_rebuild_wrapper_subclass": "a tensor subclass without storage",
    "_rebuild_device_tensor_from_numpy": "a tensor rebuilt from numpy",
}
#: other torch objects weights_only admits (sizes, devices, layouts, quantization schemes)
_TORCH_OBJECTS = {"Size", "device", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr"}
_TORCH_OBJECTS |= {"sparse_bsc", "per_tensor_affine", "per_tensor_symmetric", "per_channel_affine"}
_TORCH_OBJECTS |= {"per_channel_symmetric", "per_channel_affine_float_qparams"}
_TENSOR_FNS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3")
_WRAPPERS = ("_rebuild_parameter", "_rebuild_parameter_with_state", "_rebuild_from_type_v2")
_MAX_PICKLE = 1 << 20
_INT64 = 1 << 63


class Malformed(Exception):
    """The record is a valid pickle but not one plain tensor; the message says what it holds."""


class Unsafe(Exception):
    """The record asks for a global or a persistent id a tensor never needs (not executed)."""


@dataclass(frozen=True)
class TensorMeta:
    """What ``data.pkl`` says about its tensor (dtype names without the ``torch.`` prefix)."""

    dtype: str
    storage_dtype: str
    key: str
    numel: int  # storage elements of storage_dtype
    offset: int  # storage offset, in elements of dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    neg: bool
    conj: bool


class _Frozen:
    """Stand-ins refuse BUILD (which would otherwise set their fields from the pickle)."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise Unsafe(f"its pickle modifies a {type(self).__name__.strip('_')} with BUILD")


class _Call(_Frozen):
    """What a stand-in rebuild function was called with."""

    __slots__ = ("fn", "args")

    def __init__(self, fn: str, args: tuple) -> None:
        self.fn, self.args = fn, args

    def __repr__(self) -> str:
        return f"{self.fn}(...)"


class _StandIn(_Frozen):
    """Replaces a rebuild function: calling it records the call, nothing else."""

    __slots__ = ("fn",)

    def __init__(self, fn: str) -> None:
        self.fn = fn

    def __repr__(self) -> str:
        return self.fn

    def __call__(self, *args: object) -> _Call:
        return _Call(self.fn, args)


class _Named(_Frozen):
    """A storage type, a dtype or a tensor class named by the pickle."""

    __slots__ = ("kind", "name")

    def __init__(self, kind: str, name: str) -> None:
        self.kind, self.name = kind, name

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Storage(_Frozen):
    __slots__ = ("dtype", "key", "numel")

    def __init__(self, dtype: str, key: str, numel: int) -> None:
        self.dtype, self.key, self.numel = dtype, key, numel

    def __repr__(self) -> str:
        return f"storage {self.key!r}"


def _latin1(text: object, encoding: object = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` as pickle protocol 2 uses it for bytes objects."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise Malformed("its pickle encodes bytes in an unexpected way")
    return text.encode("latin1")


def _find(module: str, name: str) -> object:
    """The stand-in for an admitted global, or None."""
    if module == "torch._utils" and (name in _TENSOR_FNS or name in _WRAPPERS or name in _NO_ROWS):
        return _StandIn(name)
    if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
        return _StandIn(name)
    if (module, name) == ("torch.serialization", "_get_layout") or (
        module == "torch" and name in _TORCH_OBJECTS
    ):
        return _StandIn(name)  # (only sparse or quantized tensors use them: refused later)
    if (module, name) == ("collections", "OrderedDict"):
        return dict
    if (module, name) == ("_codecs", "encode"):  # protocol 2's way to write bytes
        return _latin1
    if module == "torch" and name in _STORAGES:
        return _Named("storage", _STORAGES[name])
    if (module, name) == ("torch.storage", "UntypedStorage"):
        return _Named("storage", "uint8")  # torch reads an untyped storage as uint8 elements
    if module == "torch" and (name in DTYPE_ITEMSIZE or name in _OTHER_DTYPES):
        return _Named("dtype", name)
    if (module, name) in (("torch", "Tensor"), ("torch.nn.parameter", "Parameter")):
        return _Named("class", name)
    return None


class _Unpickler(pickle.Unpickler):
    """``find_class`` and ``persistent_load`` restricted to what one tensor needs."""

    def find_class(self, module: str, name: str) -> object:
        found = _find(module, name)
        if found is None:
            raise Unsafe(f"global {module}.{name} is not allowed")
        return found

    def persistent_load(self, pid: object) -> _Storage:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise Unsafe(f"persistent id {str(pid)[:80]} is not a tensor storage")
        _, stype, key, location, numel = pid
        if not (
            type(stype) is _Named
            and stype.kind == "storage"
            and type(key) in (str, int)
            and type(location) in (str, bytes)
            and type(numel) is int
            and numel >= 0
        ):
            raise Malformed(f"its storage id {str(pid)[:120]} is malformed")
        return _Storage(stype.name, str(key), numel)


def _check_memo(raw: bytes) -> None:
    """Refuse memo keys far beyond the record's length (the C unpickler would allocate them)."""
    for op, arg, _ in pickletools.genops(raw):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= arg <= len(raw):
            raise Malformed(f"it uses the memo key {arg} (corrupt record)")


def read_tensor_meta(raw: bytes) -> TensorMeta:
    """Unpickle ``raw`` (a ``data.pkl`` record) with stand-ins and describe its one tensor.

    Raises:
        Unsafe: a global or persistent id a tensor does not need (nothing was executed).
        Malformed: not one plain tensor, or fields of the wrong type or range.
        Exception: whatever else a corrupt pickle raises (the caller reports it as corrupt).
    """
    if len(raw) > _MAX_PICKLE:
        raise Malformed(f"its pickle record is {len(raw)} bytes (a tensor's takes under 1 KiB)")
    _check_memo(raw)
    return _tensor(_Unpickler(io.BytesIO(raw)).load(), wrapped=False)


def _describe(obj: object) -> str:
    if type(obj) is _Named:
        return f"a reference to torch {obj.kind} {obj.name}"
    if type(obj) in (_StandIn, _Call):
        return f"a reference to {obj.fn}" if type(obj) is _StandIn else f"a call of {obj.fn}"
    if type(obj) is _Storage:
        return "a bare storage"
    name = type(obj).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _arity(fn: str, args: tuple, lo: int, hi: int) -> None:
    if not lo <= len(args) <= hi:
        raise Malformed(f"its {fn} record has {len(args)} arguments, not {lo}-{hi} (corrupt)")


def _tensor(obj: object, wrapped: bool) -> TensorMeta:
    """The tensor ``obj`` rebuilds: a plain one, or one wrapped once (Parameter, subclass)."""
    if type(obj) is not _Call:
        raise Malformed(f"holds {_describe(obj)}")
    fn, args = obj.fn, obj.args
    if fn in _NO_ROWS:
        raise Malformed(f"holds {_NO_ROWS[fn]}")
    if fn in _TENSOR_FNS:
        return _plain(fn, args)
    if wrapped or fn not in _WRAPPERS:
        raise Malformed(f"holds a call of {fn} where a tensor belongs")
    if fn == "_rebuild_from_type_v2":
        _arity(fn, args, 4, 4)
        func, cls, inner = args[:3]
        if not (type(func) is _StandIn and type(cls) is _Named and type(inner) is tuple):
            raise Malformed(f"its {fn} record is malformed")
        if cls.kind != "class":
            raise Malformed(f"its {fn} record names {_describe(cls)}, not a tensor class")
        return _tensor(_Call(func.fn, inner), wrapped=True)
    _arity(fn, args, 3, 3 if fn == "_rebuild_parameter" else 4)
    if type(args[1]) is not bool or type(args[2]) is not dict:
        raise Malformed(f"its {fn} record is malformed")
    meta = _tensor(args[0], wrapped=True)
    if args[1] and not _differentiable(meta.dtype):
        raise Malformed(f"its {meta.dtype} Parameter requires grad, which torch refuses")
    return meta


def _differentiable(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat", "complex"))


def _plain(fn: str, args: tuple) -> TensorMeta:
    """Check the arguments of ``_rebuild_tensor`` / ``_v2`` / ``_v3``."""
    lo, hi = {"_rebuild_tensor": (4, 4), "_rebuild_tensor_v2": (6, 7)}.get(fn, (7, 8))
    _arity(fn, args, lo, hi)
    storage, offset, size, stride = args[:4]
    if type(storage) is not _Storage:
        raise Malformed(f"its tensor's storage is {_describe(storage)}")
    if storage.dtype not in DTYPE_ITEMSIZE:
        raise Malformed(f"holds a tensor over a torch.{storage.dtype} storage (quantized)")
    dtype, grad, flags = storage.dtype, False, None
    if fn != "_rebuild_tensor":
        grad, flags = args[4], args[lo] if len(args) == hi else None
        if type(grad) is not bool or type(args[5]) is not dict:
            raise Malformed(f"its {fn} record is malformed (requires_grad, hooks)")
    if fn == "_rebuild_tensor_v3":
        if type(args[6]) is not _Named or args[6].kind != "dtype":
            raise Malformed(f"its dtype is {_describe(args[6])}")
        dtype = args[6].name
    if dtype not in DTYPE_ITEMSIZE:
        raise Malformed(f"holds a tensor of dtype torch.{dtype}, which the converter cannot read")
    if grad and not _differentiable(dtype):
        raise Malformed(f"its {dtype} tensor requires grad, which torch refuses")
    shape, strides = _ints(size), _ints(stride)
    if shape is None or strides is None or len(shape) != len(strides):
        raise Malformed(
            f"its tensor metadata is malformed (size={size!r:.80}, stride={stride!r:.80})"
        )
    if type(offset) is not int or not 0 <= offset < _INT64:
        raise Malformed(f"its storage offset is {offset!r:.40}, not an int64 >= 0")
    neg, conj = _flags(flags, dtype)
    return TensorMeta(
        dtype, storage.dtype, storage.key, storage.numel, offset, shape, strides, neg, conj
    )


def _ints(x: object) -> tuple[int, ...] | None:
    """``x`` as a tuple of non-negative int64 values, or None."""
    if type(x) not in (tuple, list) or not all(type(v) is int and 0 <= v < _INT64 for v in x):
        return None
    return tuple(x)


def _flags(meta: object, dtype: str) -> tuple[bool, bool]:
    """(neg, conj) bits from a tensor's metadata dict (``torch._utils.get_tensor_metadata``)."""
    if meta is None or meta == {}:
        return False, False
    if type(meta) is not dict or not set(meta) <= {"neg", "conj"}:
        raise Malformed(f"its tensor metadata {meta!r:.80} is not understood")
    neg, conj = meta.get("neg", False), meta.get("conj", False)
    if type(neg) is not bool or type(conj) is not bool or (conj and "complex" not in dtype):
        raise Malformed(f"its tensor metadata {meta!r:.80} is malformed")
    if neg and not (_differentiable(dtype) or dtype.startswith("int")):
        raise Malformed(f"its {dtype} tensor has the negative bit set, which torch refuses")
    return neg, conj

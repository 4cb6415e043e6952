"""The `.pt` inputs of the tests under tests/sources/test_pt_*.py: helpers, the valid forms
and the malformed ones (tensors, hand-made tensor records, tensor files, keyword lists and
keyword files) and the metadata fuzzers. Data and helpers only: no tests here."""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from jasper_mmap.errors import ArtifactError, ArtifactMissingError
from jasper_mmap.sources.pt.keywords import decode_keyword_rows
from jasper_mmap.sources.pt.reader import open_tensor

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
F8 = ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"]


# -- helpers ---------------------------------------------------------------------------------


def torch_load(path: Path):
    """torch's own reading, or None where torch.load(weights_only=True) refuses the file.

    Mapped to the CPU, as the converter reads: a tensor saved from a GPU (any storage location
    string) is valid input.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except Exception:  # noqa: BLE001 - any refusal counts as one
            return None


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as read_rows returns it: bfloat16 as uint16 bits, float8 as float32."""
    t = t.detach().resolve_neg().resolve_conj()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    if "float8" in str(t.dtype):
        return t.float().numpy()
    return t.numpy()


def assert_same_tensor(path: Path, want: torch.Tensor) -> None:
    """open_tensor(path) describes ``want`` and reads it bit-exactly, whole and in blocks."""
    art = open_tensor(path)
    assert art.shape == tuple(want.shape) and art.dtype == str(want.dtype)
    if want.dim() == 0:
        return
    n = min(art.shape[0], 64)
    ref = np.ascontiguousarray(as_numpy(want[:n]))
    got = art.read_rows(0, n)
    assert got.dtype == ref.dtype == art.np_dtype and got.shape == ref.shape
    assert got.tobytes() == ref.tobytes()
    if n > 3:
        assert art.read_rows(1, 3).tobytes() == np.ascontiguousarray(ref[1:3]).tobytes()


def expect_refused(path: Path, call, problem: str) -> str:
    """``call()`` raises an ArtifactError (or ArtifactMissingError) naming ``path``, then
    matching the regex ``problem``."""
    with pytest.raises((ArtifactError, ArtifactMissingError)) as info:
        call()
    msg = str(info.value)
    assert str(path) in msg, msg
    assert re.search(problem, msg, re.S), msg
    return msg


def decode(path: Path, block: int = 1 << 17) -> list[list[int]]:
    """The rows decode_keyword_rows yields for ``path``, as Python lists."""
    lens, vals = [], []
    decode_keyword_rows(path, lambda a, b: (lens.append(a), vals.append(b)), block=block)
    if not lens:
        return []
    ends = np.cumsum(np.concatenate(lens))
    flat = np.concatenate(vals).tolist()
    return [flat[a:b] for a, b in zip([0, *ends[:-1].tolist()], ends.tolist(), strict=True)]


SAVERS = [("pickle", p) for p in range(6)] + [("torch", p) for p in range(6)]


def save_kw(path: Path, obj: object, saver: tuple[str, int]) -> Path:
    kind, protocol = saver
    if kind == "torch":
        torch.save(obj, path, pickle_protocol=protocol)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


class _Refusing(pickle.Unpickler):
    """Reference reading of a keyword pickle: no globals, no persistent ids (safe)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"global {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent id")


class _RefusingPython(pickle._Unpickler):  # the pure-Python one: a dict memo, any keys
    find_class, persistent_load = _Refusing.find_class, _Refusing.persistent_load


# -- tensors: every form weights_only loading accepts is read bit-exactly --------------------


def _f8(name: str) -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8).view(getattr(torch, name)).reshape(64, 4)


def _with_attr() -> torch.Tensor:
    t = torch.randn(5, 3)
    t.note = "python state: saved through _rebuild_from_type_v2"
    return t


def _neg_bit() -> torch.Tensor:
    t = torch.randn(6, 3, dtype=torch.complex64).conj().imag
    assert t.is_neg()
    return t


_G = torch.Generator().manual_seed(0)
VALID_TENSORS = {
    **{
        dt: (lambda dt=dt: (torch.randn(9, 4, generator=_G) * 100).to(getattr(torch, dt)))
        for dt in ["float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64"]
    },
    **{
        dt: (lambda dt=dt: torch.randint(0, 250, (9, 4), generator=_G).to(getattr(torch, dt)))
        for dt in ["uint8", "uint16", "uint32", "uint64", "bool"]
    },
    "uint16_max": lambda: torch.tensor([[0, 65535], [40000, 1]], dtype=torch.int32).to(
        torch.uint16
    ),
    "uint64_max": lambda: torch.tensor([[2**63 - 1, 0]], dtype=torch.int64).to(torch.uint64),
    "complex64": lambda: torch.randn(5, 2, dtype=torch.complex64, generator=_G),
    "complex128_conj_bit": lambda: torch.randn(5, 2, dtype=torch.complex128, generator=_G).conj(),
    "neg_bit": _neg_bit,
    **{name: (lambda name=name: _f8(name)) for name in F8},
    **{name + "_strided_view": (lambda name=name: _f8(name)[5:40:3, 1:]) for name in F8},
    "parameter": lambda: torch.nn.Parameter(torch.randn(7, 3, generator=_G)),
    "parameter_no_grad": lambda: torch.nn.Parameter(torch.randn(7, 3), requires_grad=False),
    "parameter_bfloat16": lambda: torch.nn.Parameter(torch.randn(7, 3).bfloat16()),
    "parameter_float8": lambda: torch.nn.Parameter(_f8("float8_e5m2"), requires_grad=False),
    "parameter_uint16": lambda: torch.nn.Parameter(
        torch.arange(12).reshape(4, 3).to(torch.uint16), requires_grad=False
    ),
    "embedding_weight": lambda: torch.nn.Embedding(11, 4).weight,
    "requires_grad": lambda: torch.randn(4, 3).requires_grad_(),
    "tensor_with_python_attribute": _with_attr,
    "offset_slice": lambda: torch.randn(40, 6, generator=_G)[17:29],
    "offset_slice_uint32": lambda: torch.arange(120).reshape(20, 6).to(torch.uint32)[7:9],
    "strided_rows_and_columns": lambda: torch.randn(40, 6, generator=_G)[3:30:4, ::2],
    "transposed": lambda: torch.randn(7, 12, generator=_G).t(),
    "transposed_bfloat16": lambda: torch.randn(7, 12, generator=_G).bfloat16().t(),
    "expanded_zero_stride": lambda: torch.randn(1, 5, generator=_G).expand(30, 5),
    "permuted_3d": lambda: torch.randn(3, 4, 5, generator=_G).permute(2, 0, 1),
    "column_vector_view": lambda: torch.randn(10, 3, generator=_G)[:, 1],
    "one_row": lambda: torch.randn(1, 8, generator=_G),
    "empty_rows": lambda: torch.randn(0, 4),
    "empty_slice_at_end": lambda: torch.randn(20, 4)[20:],
    "zero_width": lambda: torch.randn(6, 0),
    "scalar": lambda: torch.tensor(2.5),
    "1d": lambda: torch.arange(50, dtype=torch.int64),
    "4d": lambda: torch.randn(2, 3, 4, 5, generator=_G),
}


# -- tensors: hand-made records (any field value, written the way torch.save writes it) -------


class _Storage:
    def __init__(self, pid):
        self.pid = pid


class _Call:
    """Pickles as ``fn(*args)``: GLOBAL fn + args + REDUCE, as torch.save writes a tensor."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


class _MetaPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Storage) else None


V2, V3 = torch._utils._rebuild_tensor_v2, torch._utils._rebuild_tensor_v3
DATA = np.arange(12, dtype="<f4").tobytes()


def write_archive(path: Path, data_pkl: bytes, storages: dict, byteorder=b"little", **zip_kw):
    with zipfile.ZipFile(path, "w", **zip_kw) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", byteorder)
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


def tensor_pickle(
    fn=V2, offset=0, size=(4, 3), stride=(3, 1), key="0", numel=12, stype=None, dtype=None,
    grad=False, hooks="od", extra=(), pid=None, wrap=None, protocol=2,
):  # fmt: skip
    """data.pkl of a [4, 3] float32 tensor over a 12-element storage, with fields replaced."""
    stype = torch.FloatStorage if stype is None and fn is not V3 else stype
    stype = torch.UntypedStorage if stype is None else stype
    pid = ("storage", stype, key, "cpu", numel) if pid is None else pid
    hooks = collections.OrderedDict() if hooks == "od" else hooks
    args = (_Storage(pid), offset, size, stride)
    if fn is not torch._utils._rebuild_tensor:
        args += (grad, hooks) + ((dtype,) if fn is V3 else ())
    obj = _Call(fn, *args, *extra)
    obj = wrap(obj) if wrap else obj
    buf = io.BytesIO()
    _MetaPickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def tensor_file(path: Path, data=DATA, byteorder=b"little", **fields) -> Path:
    return write_archive(path, tensor_pickle(**fields), {"0": data}, byteorder)


_PARAM = torch._utils._rebuild_parameter
VALID_RECORDS = {
    "baseline": {},
    "storage_key_as_int": {"key": 0},
    "old_rebuild_tensor": {"fn": torch._utils._rebuild_tensor},
    "v2_with_empty_metadata": {"extra": ({},)},
    "v3_over_untyped_bytes": {"fn": V3, "numel": 48, "dtype": torch.float32},
    "v3_reinterprets_a_typed_storage": {
        "fn": V3,
        "stype": torch.FloatStorage,
        "dtype": torch.int32,
    },
    "v3_uint16_view_of_float_bytes": {
        "fn": V3,
        "numel": 48,
        "dtype": torch.uint16,
        "size": (4, 6),
        "stride": (6, 1),
    },  # fmt: skip
    "gpu_location": {"pid": ("storage", torch.FloatStorage, "0", "cuda:0", 12)},
    "bytes_storage_tag": {"pid": (b"storage", torch.FloatStorage, "0", "cpu", 12)},
    "size_as_list": {"size": [4, 3], "stride": [3, 1]},
    "offset_and_short_rows": {"offset": 3, "size": (3, 3)},
    "empty_tensor_far_offset": {"offset": 10**6, "size": (0, 3)},
    "parameter": {"wrap": lambda t: _Call(_PARAM, t, True, collections.OrderedDict())},
    "protocol_4": {"protocol": 4},
}


_PAST = "does not fit its storage"
_MALFORMED = "should hold one tensor, but its tensor metadata is malformed"
_RECORD = "storage record holds 48 bytes but its pickle says"
_OFFSET = "should hold one tensor, but its storage offset is"
BAD_RECORDS = {
    "offset_-1": ({"offset": -1}, _OFFSET + " -1,"),
    "offset_-5": ({"offset": -5}, _OFFSET + " -5,"),
    "offset_-2**40": ({"offset": -(2**40)}, _OFFSET),
    "offset_-2**63": ({"offset": -(2**63)}, _OFFSET),
    "offset_1_past_end": ({"offset": 1}, _PAST),
    "offset_2**40": ({"offset": 2**40}, _PAST),
    "offset_2**63": ({"offset": 2**63}, _OFFSET + " 9223372036854775808, not an int64"),
    "offset_2**70": ({"offset": 2**70}, _OFFSET),
    "offset_str": ({"offset": "0"}, _OFFSET + " '0'"),
    "offset_float": ({"offset": 1.0}, _OFFSET + " 1.0"),
    "offset_bool": ({"offset": True}, _OFFSET + " True"),
    "offset_none": ({"offset": None}, _OFFSET + " None"),
    "size_rows_past_end": ({"size": (5, 3)}, _PAST),
    "size_cols_past_end": ({"size": (4, 4)}, _PAST),
    "size_negative": ({"size": (-1, 3)}, _MALFORMED),
    "size_negative_col": ({"size": (4, -3)}, _MALFORMED),
    "size_2**62": ({"size": (2**62, 3)}, _PAST),
    "size_2**63_empty": ({"size": (0, 2**63)}, _MALFORMED),
    "size_2**62_wide_empty": ({"size": (0, 2**62)}, _PAST),
    "size_huge_zero_stride": ({"size": (2**40, 2**30), "stride": (0, 0)}, _PAST),
    "size_shorter_than_stride": ({"size": (4,)}, _MALFORMED),
    "size_str": ({"size": "43"}, _MALFORMED),
    "size_float": ({"size": (4.0, 3)}, _MALFORMED),
    "size_none": ({"size": None}, _MALFORMED),
    "size_nested": ({"size": ((4,), 3)}, _MALFORMED),
    "stride_negative": ({"stride": (3, -1)}, _MALFORMED),
    "stride_past_end": ({"stride": (4, 1)}, _PAST),
    "stride_2**40": ({"stride": (2**40, 1)}, _PAST),
    "stride_shorter_than_size": ({"stride": (3,)}, _MALFORMED),
    "stride_str": ({"stride": ("3", 1)}, _MALFORMED),
    "stride_bool": ({"stride": (3, True)}, _MALFORMED),
    "key_missing_record": ({"key": "1"}, "lacks the record archive/data/1"),
    "key_path_traversal": ({"key": "../byteorder"}, "lacks the record"),
    "key_empty": ({"key": ""}, "lacks the record"),
    "key_float": ({"key": 1.5}, "storage id .* is malformed"),
    "key_none": ({"key": None}, "storage id .* is malformed"),
    "numel_short": ({"numel": 11}, _RECORD + " the storage has 44"),
    "numel_long": ({"numel": 13}, _RECORD + " the storage has 52"),
    "numel_2**40": ({"numel": 2**40}, _RECORD),
    "numel_negative": ({"numel": -1}, "storage id .* is malformed"),
    "numel_str": ({"numel": "12"}, "storage id .* is malformed"),
    "storage_not_a_storage": ({"stype": collections.OrderedDict}, "storage id .* is malformed"),
    "storage_quantized": ({"stype": torch.QInt8Storage, "numel": 48}, "quantized"),
    "pid_four_fields": ({"pid": ("storage", torch.FloatStorage, "0", 12)}, "refused to load"),
    "pid_not_storage": ({"pid": ("module", torch.FloatStorage, "0", "cpu", 12)}, "refused to"),
    "pid_location_int": ({"pid": ("storage", torch.FloatStorage, "0", 0, 12)}, "malformed"),
    "v3_without_dtype": ({"fn": V3, "numel": 48, "extra": ()}, "its dtype is a"),
    "v3_dtype_bits8": ({"fn": V3, "numel": 48, "dtype": torch.bits8}, "torch.bits8, which"),
    "v3_dtype_complex32": ({"fn": V3, "numel": 48, "dtype": torch.complex32}, "complex32"),
    "v3_dtype_a_storage": ({"fn": V3, "numel": 48, "dtype": torch.FloatStorage}, "its dtype is"),
    "v3_dtype_int": ({"fn": V3, "numel": 48, "dtype": 7}, "its dtype is an int"),
    "v3_float64_past_end": ({"fn": V3, "numel": 48, "dtype": torch.float64}, _PAST),
    "requires_grad_str": ({"grad": "yes"}, "requires_grad, hooks"),
    "requires_grad_on_ints": ({"stype": torch.IntStorage, "grad": True}, "requires grad"),
    "hooks_none": ({"hooks": None}, "requires_grad, hooks"),
    "metadata_unknown_key": ({"extra": ({"foo": True},)}, "metadata .* is not understood"),
    "metadata_conj_on_float": ({"extra": ({"conj": True},)}, "metadata .* is malformed"),
    "metadata_neg_not_bool": ({"extra": ({"neg": 1},)}, "metadata .* is malformed"),
    "too_many_arguments": ({"extra": ({}, 5)}, "has 8 arguments, not 6-7"),
    "protocol_0_text_persistent_id": ({"protocol": 0}, "refused to load"),
    "parameter_of_parameter": (
        {"wrap": lambda t: _Call(_PARAM, _Call(_PARAM, t, False, {}), False, {})},
        "call of _rebuild_parameter where a tensor belongs",
    ),
    "parameter_grad_str": ({"wrap": lambda t: _Call(_PARAM, t, "no", {})}, "malformed"),
    "subclass_of_a_storage": (
        {
            "wrap": lambda t: _Call(
                torch._tensor._rebuild_from_type_v2, V2, torch.FloatStorage, t.args, {}
            )
        },  # fmt: skip
        "not a tensor class",
    ),
}


def _sparse(path):
    torch.save(torch.eye(3).to_sparse(), path)


def _quantized(path):
    warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
    torch.save(torch.quantize_per_tensor(torch.randn(4, 3), 0.1, 0, torch.qint8), path)


def _meta(path):
    torch.save(torch.empty(4, 3, device="meta"), path)


def _numpy_array(path):
    torch.save(np.zeros((4, 3), np.float32), path)


def _patch_pickle(path, fn):
    """Rewrite the data.pkl of a torch.save'd [4, 3] tensor through ``fn``."""
    torch.save(torch.arange(12.0).reshape(4, 3), path)
    with zipfile.ZipFile(path) as z:
        records = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in records if n.endswith("data.pkl"))
    records[pkl] = fn(records[pkl])
    with zipfile.ZipFile(path, "w") as z:
        for name, data in records.items():
            z.writestr(name, data)


def _cut_pickle(at):
    return lambda path: _patch_pickle(path, lambda raw: raw[: int(len(raw) * at)])


def _build_on_stand_in(path):
    # after the tensor's REDUCE: EMPTY_DICT, BUILD (torch.save never writes BUILD for a tensor)
    _patch_pickle(path, lambda raw: raw[:-1] + b"}b.")


def _huge_memo_key(path):
    _patch_pickle(path, lambda raw: raw[:2] + b"]r\xf0\xff\xff\xff0" + raw[2:])


def _oversized_pickle(path):
    _patch_pickle(path, lambda raw: raw[:2] + b"X" + (2 << 20).to_bytes(4, "little")
                  + b"a" * (2 << 20) + b"0" + raw[2:])  # fmt: skip


def _byteorder(path):
    write_archive(path, tensor_pickle(), {"0": DATA}, byteorder=b"middle")


def _compressed_storage(path):
    write_archive(path, tensor_pickle(), {"0": DATA}, compression=zipfile.ZIP_DEFLATED)


def _local_header_name(path):
    tensor_file(path)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"archive/data/0")  # the local header's copy of the name comes first
    raw[at : at + 14] = b"archive/data/9"
    path.write_bytes(bytes(raw))


def _file_cut_in_storage(path):
    tensor_file(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.index(DATA) + 20])


BAD_FILES = {
    "dict_of_tensors": (lambda p: torch.save({"w": torch.ones(2)}, p), "but holds a dict"),
    "list_of_tensors": (lambda p: torch.save([torch.ones(2)], p), "but holds a list"),
    "tuple": (lambda p: torch.save((1, 2), p), "but holds a tuple"),
    "int": (lambda p: torch.save(3, p), "but holds an int"),
    "string": (lambda p: torch.save("x", p), "but holds a str"),
    "sparse_tensor": (_sparse, r"holds a sparse tensor \(save t.to_dense\(\)\)"),
    "quantized_tensor": (_quantized, r"holds a quantized tensor \(save t.dequantize\(\)\)"),
    "meta_tensor": (_meta, "meta tensor"),
    "numpy_array": (_numpy_array, "refused to load.*numpy.*not executed"),
    "torch_module": (lambda p: torch.save(torch.nn.Linear(2, 2), p), "refused to load"),
    "pickle_cut_at_10%": (_cut_pickle(0.1), "corrupt or truncated"),
    "pickle_cut_at_50%": (_cut_pickle(0.5), "corrupt or truncated"),
    "pickle_cut_at_90%": (_cut_pickle(0.9), "corrupt or truncated"),
    "pickle_cut_before_stop": (_cut_pickle(0.999), "corrupt or truncated"),
    "build_on_a_stand_in": (_build_on_stand_in, "refused to load.*BUILD"),
    "memo_key_4_billion": (_huge_memo_key, "memo key 4294967280"),
    "pickle_record_over_1_MiB": (_oversized_pickle, "pickle record is .* bytes"),
    "byteorder_unknown": (_byteorder, "byteorder record says b'middle'"),
    "storage_record_compressed": (_compressed_storage, "is compressed"),
    "local_header_name_differs": (_local_header_name, "local header of archive/data/0"),
    "file_cut_inside_storage": (_file_cut_in_storage, "truncated|corrupt"),
}


# -- tensors: fuzzing the metadata -----------------------------------------------------------


def check_against_torch(path: Path) -> str:
    """Our reading of ``path`` is an ArtifactError naming it, or torch.load's tensor, exactly."""
    try:
        art = open_tensor(path)
    except (ArtifactError, ArtifactMissingError) as e:
        assert str(path) in str(e)
        return "refused"
    want = torch_load(path)
    assert isinstance(want, torch.Tensor), "we read a file torch.load(weights_only=True) refuses"
    assert_same_tensor(path, want)
    if want.dim() and want.shape[0] > 64 and want.numel():
        last = art.read_rows(art.shape[0] - 1, art.shape[0])
        assert last.tobytes() == np.ascontiguousarray(as_numpy(want[-1:])).tobytes()
    return "read"


_INTS = st.one_of(
    st.integers(-3, 14),
    st.sampled_from([-(2**63), -(2**31), 2**31 - 1, 2**32, 2**40, 2**62, 2**63, 2**64]),
    st.integers(),
)
_SHAPES = st.lists(_INTS, max_size=3).map(tuple)


#: valid records over 48 bytes of storage; the fuzzer starts from one and replaces fields
_TEMPLATES = [
    {"fn": V2, "size": (4, 3), "stride": (3, 1), "numel": 12, "stype": torch.FloatStorage},
    {"fn": V2, "size": (2, 3), "stride": (1, 4), "numel": 12, "offset": 1},
    {
        "fn": torch._utils._rebuild_tensor,
        "size": (6,),
        "stride": (2,),
        "numel": 24,
        "stype": torch.HalfStorage,
    },  # fmt: skip
    {"fn": V3, "size": (4, 6), "stride": (6, 1), "numel": 48, "dtype": torch.uint16},
    {"fn": V3, "size": (6, 8), "stride": (8, 1), "numel": 48, "dtype": torch.float8_e4m3fn},
    {
        "fn": V3,
        "size": (3, 2),
        "stride": (2, 1),
        "numel": 48,
        "dtype": torch.uint64,
        "offset": 0,
    },  # fmt: skip
    {"fn": V3, "size": (5, 4), "stride": (0, 1), "numel": 48, "dtype": torch.bfloat16},
]
_FIELDS = {
    "offset": _INTS,
    "size": st.one_of(_SHAPES, st.sampled_from([(4, 3), (3, 3), (12,), (2, 2, 3), (0, 3)])),
    "stride": st.one_of(_SHAPES, st.sampled_from([(3, 1), (1, 4), (0, 1), (1,), (6, 3, 1)])),
    "numel": st.one_of(st.sampled_from([12, 48, 24, 6, 0]), _INTS),
    "key": st.sampled_from(["1", "", 0, "../0", "0\x00"]),
    "stype": st.sampled_from(
        [
            torch.FloatStorage,
            torch.UntypedStorage,
            torch.ByteStorage,
            torch.LongStorage,
            torch.BoolStorage,
        ]
    ),  # fmt: skip
    "dtype": st.sampled_from(
        [torch.float32, torch.float8_e5m2fnuz, torch.float64, torch.bool, torch.int8, torch.uint32]
    ),  # fmt: skip
}


def _mutable_ops(raw: bytes) -> list[tuple[str, int, int, object]]:
    """(kind, start, end, arg) of the int and string opcodes of a pickle."""
    ops, found = list(pickletools.genops(raw)), []
    for k, (op, arg, pos) in enumerate(ops):
        end = ops[k + 1][2] if k + 1 < len(ops) else len(raw)
        if op.name in ("BININT1", "BININT2", "BININT", "LONG1", "BINPUT", "BINGET"):
            found.append(("int" if "PUT" not in op.name and "GET" not in op.name else "memo",
                          pos, end, arg))  # fmt: skip
        elif op.name in ("BINUNICODE", "SHORT_BINUNICODE"):
            found.append(("str", pos, end, arg))
    return found


def _int_op(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if -(2**31) <= v < 2**31:
        return b"J" + v.to_bytes(4, "little", signed=True)
    body = pickle.encode_long(v)
    return b"\x8a" + bytes([len(body)]) + body


_BASES = {
    "float32": lambda: torch.arange(12.0).reshape(4, 3),
    "offset_view": lambda: torch.arange(40.0).reshape(10, 4)[3:7, 1:],
    "uint16_v3": lambda: torch.arange(12).reshape(4, 3).to(torch.uint16),
    "float8_parameter": lambda: torch.nn.Parameter(_f8("float8_e5m2")[:6], requires_grad=False),
    "bfloat16_transposed": lambda: torch.arange(12.0).reshape(3, 4).bfloat16().t(),
}


def _mutate(raw: bytes, data) -> bytes:
    """One structure-aware mutation of a pickle (``data``: hypothesis draws)."""
    if not raw:
        return raw
    try:
        targets = _mutable_ops(raw)
    except Exception:  # noqa: BLE001 - already broken by an earlier mutation
        targets = []
    how = data.draw(st.sampled_from(["int", "str", "memo", "cut", "flip"]))
    chosen = [t for t in targets if t[0] == how]
    if how == "cut":
        return raw[: data.draw(st.integers(0, len(raw) - 1))]
    if not chosen:  # a byte flip
        at = data.draw(st.integers(0, len(raw) - 1))
        return raw[:at] + bytes([data.draw(st.integers(0, 255))]) + raw[at + 1 :]
    kind, a, b, arg = data.draw(st.sampled_from(chosen))
    if kind == "int":
        new = _int_op(data.draw(_INTS))
    elif kind == "memo":
        new = raw[a : a + 1] + bytes([data.draw(st.integers(0, 255))])
    else:
        text = data.draw(st.sampled_from(["1", "", "0/..", "x" * 300, "cpu", "storage", "0"]))
        new = b"X" + len(text).to_bytes(4, "little") + text.encode()
    return raw[:a] + new + raw[b:]


# -- keyword ids: every list of lists of ints a pickle can build -----------------------------


def _shared_rows(n: int) -> list[list[int]]:
    kw = [4, 5, 6]
    return [kw] * n


def _far_repeats() -> list[list[int]]:
    """Distinct rows, then the first ones again long after they were written out."""
    rows = [[i, i + 1] for i in range(3000)]
    return rows + rows[:5] + [rows[0]] * 3 + rows[1500:1503]


VALID_KEYWORDS = {
    "plain": [[0, 1, 2], [], [3], [4, 5]],
    "upstream_fixture": ([[0, 1, 2], [1, 3], [2, 4, 5]] * 34)[:100],
    "same_row_object_everywhere": [[0, 1, 2]] * 2500,
    "kw_times_n": _shared_rows(1200),
    "repeats_far_apart": _far_repeats(),
    "same_empty_row": [[]] * 50,
    "all_empty": [[] for _ in range(40)],
    "empty_outer_list": [],
    "empty_outer_tuple": (),
    "one_row": [[7]],
    "inner_tuples": [(0, 1), (2,), (), (3, 4, 5), (6, 7, 8, 9)],
    "inner_tuple_repeated": [(1, 2, 3)] * 300,
    "outer_tuple_of_lists": tuple([i, i + 1] for i in range(2000)),
    "outer_tuple_short": ([1], [2]),
    "outer_tuple_of_three": ([1], [], [3]),
    "outer_tuple_of_tuples": ((1, 2), (3,), ()),
    "mixed_lists_and_tuples": [[1], (2, 3), [], (), [4, 5, 6, 7]],
    "ints_every_width": [
        [0, 1, 255, 256, 65535, 65536, 2**31 - 1, 2**31, -1, -(2**31), -(2**31) - 1],
        [2**40, -(2**40), 2**62, 2**63 - 1, -(2**63)],
    ],
    "long_row": [list(range(5000)), [1]],
    "bools_as_0_1": [[True, False], [False], [True, 3]],
}


def _decode_peak(path: Path) -> tuple[int, int]:
    """(rows decoded, peak bytes allocated by Python while decoding) with 4096-value blocks."""
    import tracemalloc

    rows = [0]
    tracemalloc.start()
    try:
        decode_keyword_rows(path, lambda lengths, _: rows.__setitem__(0, rows[0] + lengths.size),
                            block=4096)  # fmt: skip
        return rows[0], tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class Evil:
    """Unpickling this would run ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _recursive_outer():
    a = []
    a.append(a)
    return a


def _recursive_row():
    r = [1]
    r.append(r)
    return [r]


_NESTED = "nested deeper than a list of lists"
BAD_KEYWORD_OBJECTS = {
    "dict": ({"a": [1]}, "its pickle holds a dict"),
    "dict_row": ([{1: 2}], "its pickle holds a dict"),
    "string": ("abc", "its pickle holds a string"),
    "string_in_row": ([[1, "x"]], "its pickle holds a string .*opcode"),
    "float_in_row": ([[1.0]], "its pickle holds a float .*opcode"),
    "none_in_row": ([[None]], "its pickle holds None"),
    "none_row": ([[1], None], "its pickle holds None"),
    "int_beside_rows": ([[1], 2], "the outer list holds an int"),
    "list_of_ints": ([1, 2, 3], "a list of ints, not a list of lists"),
    "int": (5, r"it holds an int\."),
    "nested_list": ([[[1]]], _NESTED),
    "nested_tuple_in_row": ([[(1,)]], _NESTED),
    "nested_tuple_in_tuple": (((1,), ((2,),)), _NESTED),
    "set_row": ([{1, 2}], r"its pickle holds (a set|a Python global (__builtin__|builtins)\.set)"),
    "complex_value": ([[1j]], "its pickle holds a Python global"),
    "recursive_outer": (_recursive_outer(), "(holds|contains) itself"),
    "recursive_row": (_recursive_row(), _NESTED),
    "int_2**63": ([[2**63]], r"integer too large for int64 \(9223372036854775808\)"),
    "int_-2**63-1": ([[-(2**63) - 1]], "integer too large for int64"),
    "int_2**300": ([[2**300]], "integer too large for int64 .*-bit number"),
}


def _kw_bytes(data: bytes):
    return lambda path: path.write_bytes(data)


def _kw_cut(protocol: int):
    def make(path):
        data = pickle.dumps([[i, i + 1] for i in range(50)], protocol=protocol)
        path.write_bytes(data[: len(data) // 2])

    return make


def _kw_legacy(path):
    torch.save([[1]], path, _use_new_zipfile_serialization=False)


def _kw_tensors(path):
    torch.save([torch.zeros(3, dtype=torch.int64)], path)


def _kw_zip_without_pickle(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes/readme.txt", "hello")


BAD_KEYWORD_FILES = {
    "changed_after_commit": (_kw_bytes(b"\x80\x02]q\x00(]q\x01h\x01K\x05ae."), "appended to after"),
    "leftover_stack": (_kw_bytes(b"\x80\x02]K\x01."), "leaves 2 objects on its stack"),
    "appends_without_mark": (_kw_bytes(b"\x80\x02]K\x01e."), "APPENDS opcode has no MARK"),
    "tuple2_underflow": (_kw_bytes(b"\x80\x02K\x01\x86."), "TUPLE2 opcode lacks its 2 items"),
    "get_never_stored": (_kw_bytes(b"\x80\x02]h\x05a."), "memo entry 5, which was never stored"),
    "negative_put": (_kw_bytes(b"(lp-1\n."), "negative memo key -1"),
    "protocol_6": (_kw_bytes(b"\x80\x06]."), "pickle protocol 6"),
    "long4_2GB": (_kw_bytes(b"\x80\x02](\x8b\xff\xff\xff\x7f"), "encoded in 2147483647 bytes"),
    "pop": (_kw_bytes(b"\x80\x02]K\x010."), "POP/DUP"),
    "dup": (_kw_bytes(b"\x80\x02]2."), "POP/DUP"),
    "frame_past_end": (
        _kw_bytes(b"\x80\x04\x95" + (10**6).to_bytes(8, "little") + b"]."),
        "truncated",
    ),  # fmt: skip
    "text_int_garbage": (_kw_bytes(b"(lp0\n(lp1\nIabc\naa."), "text integer reads b'abc'"),
    "text_line_too_long": (_kw_bytes(b"(l(lI" + b"1" * 5000 + b"\naa."), "over 4400 bytes"),
    "not_an_opcode": (_kw_bytes(b"\x80\x02]\xff."), r"the byte b'\\xff' at byte 3, not an opcode"),
    "persistent_id": (_kw_bytes(b"\x80\x02]K\x01Q."), "a tensor storage reference"),
    "reduce": (_kw_bytes(b"\x80\x02]K\x01K\x02R."), "an object construction"),
    "append_to_tuple": (_kw_bytes(b"\x80\x02])K\x01aa."), "appends to a tuple"),
    "memoized_mark": (_kw_bytes(b"\x80\x02(q\x00."), "memoizes a MARK"),
    "stop_missing": (_kw_bytes(b"\x80\x02](]K\x01ae"), "truncated"),
    "empty_file": (_kw_bytes(b""), r"is empty \(0 bytes\)"),
    "junk": (_kw_bytes(b"\x00JUNK" * 10), "neither a torch archive nor a pickled list"),
    "text_file": (_kw_bytes(b"hello, world\n"), "neither a torch archive nor a pickled list"),
    "legacy_torch_file": (_kw_legacy, r"legacy format.*torch\.save"),
    "list_of_tensors": (_kw_tensors, "holds tensor data"),
    "zip_without_data_pkl": (_kw_zip_without_pickle, "zip file but not a torch archive"),
    **{f"cut_protocol_{p}": (_kw_cut(p), "truncated") for p in range(6)},
}

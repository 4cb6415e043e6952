"""`.pt` tensors: fuzzing the metadata."""

from __future__ import annotations

import zipfile

import numpy as np
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from pt_cases import (
    _BASES,
    _FIELDS,
    _TEMPLATES,
    FUZZ,
    V3,
    _mutate,
    check_against_torch,
    tensor_file,
)


@FUZZ
@given(
    template=st.sampled_from(_TEMPLATES),
    fields=st.fixed_dictionaries({}, optional=_FIELDS),
)
def test_fuzz_generated_tensor_metadata(tmp_path, template, fields):
    """Records torch.save could write, with random values in some fields: each is either read
    exactly as torch.load reads it, or refused with an ArtifactError naming the file."""
    fields = {**template, **fields}
    if fields["fn"] is not V3:
        fields.pop("dtype", None)
    if fields["fn"] is V3 and "stype" not in fields:
        fields["stype"] = torch.UntypedStorage
    path = tensor_file(tmp_path / "t.pt", data=np.random.default_rng(0).bytes(48), **fields)
    event(check_against_torch(path))


@FUZZ
@given(base=st.sampled_from(list(_BASES)), data=st.data())
def test_fuzz_mutated_torch_save_metadata(tmp_path, base, data):
    """Mutate the data.pkl of a real torch.save'd tensor: ints in sizes/strides/offsets and
    numel, memo keys, storage keys and strings, truncation and byte flips."""
    path = tmp_path / "t.pt"
    torch.save(_BASES[base](), path)
    with zipfile.ZipFile(path) as z:
        records = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in records if n.endswith("data.pkl"))
    for _ in range(data.draw(st.integers(1, 3))):
        records[name] = _mutate(records[name], data)
    with zipfile.ZipFile(path, "w") as z:
        for n, content in records.items():
            z.writestr(n, content)
    event(check_against_torch(path))

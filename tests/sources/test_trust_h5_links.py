"""``dataset.h5`` whose data live in other files (issue 24, item 9): an external link, a dataset
with external storage, a virtual dataset, or a soft link leading into another file. Only
``dataset.h5`` is fingerprinted, so changes to those files would never make the store stale
(and the keyword pass would read an external link's offsets from ``dataset.h5``). Each is
refused before anything is written, naming the link and the fix (NOTE [data outside
dataset.h5] in converters/h5_source.py); links inside the file still work."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from jasper_mmap import JASPERSteeringDataset
from jasper_mmap.converters import convert_pt
from jasper_mmap.errors import ArtifactError
from jasper_mmap.sources.hdf5.writer import convert_pt_to_hdf5
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset


@pytest.fixture(scope="module")
def h5_dir(tmp_path_factory) -> Path:
    """A `.pt` dataset with its dataset.h5 (the `.pt` tables removed: hdf5 is the source)."""
    d = make_pt_dataset(tmp_path_factory.mktemp("links") / "ds", SyntheticSpec())
    convert_pt_to_hdf5(d)
    return d


def _move_out(ds_dir: Path, name: str, other: Path) -> np.ndarray:
    """Move dataset ``name`` of dataset.h5 into file ``other``; return its values."""
    with h5py.File(ds_dir / "dataset.h5", "a") as f:
        data = f[name][()]
        del f[name]
    with h5py.File(other, "a") as o:
        o.create_dataset(name, data=data)
    return data


def _copy(h5_dir: Path, tmp_path: Path) -> Path:
    d = shutil.copytree(h5_dir, tmp_path / "ds")
    return d


def test_a_table_behind_an_external_link_is_refused_not_silently_stale(h5_dir, tmp_path):
    d = _copy(h5_dir, tmp_path)
    other = tmp_path / "other.h5"
    _move_out(d, "embeddings/questions", other)
    with h5py.File(d / "dataset.h5", "a") as f:
        f["embeddings/questions"] = h5py.ExternalLink(str(other), "/embeddings/questions")
    with pytest.raises(ArtifactError) as info:
        JASPERSteeringDataset(d, storage_format="hdf5", cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "dataset.h5:embeddings/questions: is an HDF5 external link to" in msg, msg
    assert str(other) in msg and "Copy the data into dataset.h5" in msg
    assert not any((tmp_path / "cache").rglob("manifest.json"))  # nothing converted


def test_a_group_behind_an_external_link_is_refused(h5_dir, tmp_path):
    d = _copy(h5_dir, tmp_path)
    other = tmp_path / "other.h5"
    with h5py.File(d / "dataset.h5", "a") as f, h5py.File(other, "w") as o:
        f.copy(f["steering"], o, "steering")
        del f["steering"]
        f["steering"] = h5py.ExternalLink(str(other), "/steering")
    with pytest.raises(ArtifactError, match=r"dataset\.h5:steering: is an HDF5 external link"):
        convert_pt(d, tmp_path / "out", source="hdf5", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_soft_link_into_an_external_link_is_refused(h5_dir, tmp_path):
    d = _copy(h5_dir, tmp_path)
    other = tmp_path / "other.h5"
    _move_out(d, "pair_data/relevance", other)
    with h5py.File(d / "dataset.h5", "a") as f:
        f["elsewhere"] = h5py.ExternalLink(str(other), "/pair_data")
        f["pair_data/relevance"] = h5py.SoftLink("/elsewhere/relevance")
    with pytest.raises(ArtifactError, match=r"pair_data/relevance: is a link into another file"):
        convert_pt(d, tmp_path / "out", source="hdf5", progress=False)


def test_external_storage_and_virtual_datasets_are_refused(h5_dir, tmp_path):
    d = _copy(h5_dir, tmp_path)
    raw = tmp_path / "raw.bin"
    with h5py.File(d / "dataset.h5", "a") as f:
        data = f["pair_data/cluster_id"][()]
        del f["pair_data/cluster_id"]
        raw.write_bytes(data.astype("<i8").tobytes())
        f.create_dataset(
            "pair_data/cluster_id",
            shape=data.shape,
            dtype="<i8",
            external=[(str(raw), 0, data.nbytes)],
        )
    with pytest.raises(
        ArtifactError, match=r"cluster_id: is a dataset whose data is stored in external file"
    ):
        convert_pt(d, tmp_path / "out", source="hdf5", progress=False)
    d2 = shutil.copytree(h5_dir, tmp_path / "ds2")
    with h5py.File(d2 / "dataset.h5", "a") as f:
        data = f["steering/distances"][()]
        f["moved_distances"] = data
        del f["steering/distances"]
        layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
        layout[:] = h5py.VirtualSource(f["moved_distances"])
        f.create_virtual_dataset("steering/distances", layout)
    with pytest.raises(ArtifactError, match=r"steering/distances: is a virtual dataset"):
        convert_pt(d2, tmp_path / "out2", source="hdf5", progress=False)


def test_keyword_ids_behind_an_external_link_are_refused_not_read_at_wrong_offsets(
    h5_dir, tmp_path
):
    d = _copy(h5_dir, tmp_path)
    other = tmp_path / "other.h5"
    with h5py.File(d / "dataset.h5", "a") as f, h5py.File(other, "w") as o:
        o.create_dataset("kw3", data=np.arange(100, 107, dtype=np.int32))
        del f["pair_data/keyword_ids/3"]
        f["pair_data/keyword_ids/3"] = h5py.ExternalLink(str(other), "/kw3")
    with pytest.raises(
        ArtifactError, match=r"keyword_ids/3: the keyword ids of pair 3 are an HDF5 external link"
    ):
        convert_pt(d, tmp_path / "out", source="hdf5", progress=False)
    assert not (tmp_path / "out").exists()


def test_keyword_ids_in_external_storage_are_refused(h5_dir, tmp_path):
    d = _copy(h5_dir, tmp_path)
    raw = tmp_path / "kw.bin"
    raw.write_bytes(np.arange(5, dtype="<i4").tobytes())
    with h5py.File(d / "dataset.h5", "a") as f:
        del f["pair_data/keyword_ids/2"]
        f.create_dataset(
            "pair_data/keyword_ids/2", shape=(5,), dtype="<i4", external=[(str(raw), 0, 20)]
        )
    with pytest.raises(
        ArtifactError,
        match=r"keyword_ids/2: the keyword ids of pair 2 are in a dataset whose data is stored in external",
    ):
        convert_pt(d, tmp_path / "out", source="hdf5", progress=False)


def test_links_inside_dataset_h5_still_convert(h5_dir, tmp_path):
    d = _copy(h5_dir, tmp_path)
    with h5py.File(d / "dataset.h5", "a") as f:
        f["elsewhere"] = f["embeddings/keywords"][()]
        del f["embeddings/keywords"]
        f["embeddings/keywords"] = h5py.SoftLink("/elsewhere")
        f["kw0"] = f["pair_data/keyword_ids/0"][()]
        del f["pair_data/keyword_ids/0"]
        f["pair_data/keyword_ids/0"] = h5py.SoftLink("/kw0")
    out = convert_pt(d, tmp_path / "out", source="hdf5", progress=False)
    assert (out / "manifest.json").is_file()

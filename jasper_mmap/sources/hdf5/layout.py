"""The HDF5 layout upstream's ``convert_pt_to_hdf5`` writes (names, dtypes), and the h5py
import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "H5_FILE",
    "H5_PATHS",
    "KEYWORDS_PATH",
    "KINDS",
    "TORCH_DTYPES",
    "fix_text",
    "require_h5py",
]

H5_FILE = "dataset.h5"


KEYWORDS_PATH = "pair_data/keyword_ids"


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


#: store array name -> (HDF5 path in upstream's layout, element kind, ndim)
H5_PATHS: dict[str, tuple[str, str, int]] = {
    "question_embs": ("embeddings/questions", "float", 2),
    "source_embs": ("embeddings/sources", "float", 2),
    "keyword_embs": ("embeddings/keywords", "float", 2),
    "centroid_embs": ("embeddings/centroids", "float", 2),
    "pair_index": ("pair_data/index", "int", 2),
    "pair_cluster_id": ("pair_data/cluster_id", "int", 1),
    "pair_relevance": ("pair_data/relevance", "float", 1),
    "hard_negatives": ("negatives/hardnegatives", "int", 2),
    "negative_tiers": ("negatives/tiers", "int", 2),
    "steering_centroid": ("steering/centroid", "float", 2),
    "steering_keyword_weighted": ("steering/keyword_weighted", "float", 2),
    "steering_residual": ("steering/residual", "float", 2),
    "centroid_distances": ("steering/distances", "float", 1),
    "train_idx": ("splits/train", "int", 1),
    "val_idx": ("splits/val", "int", 1),
    "test_idx": ("splits/test", "int", 1),
}


#: numpy (kind, itemsize) -> torch dtype name: float16..64, int8..64, uint8..64, bool
TORCH_DTYPES = {
    (k, n): f"torch.{name}{8 * n}"
    for k, name in (("f", "float"), ("i", "int"), ("u", "uint"))
    for n in (1, 2, 4, 8)
    if (k, n) != ("f", 1)
} | {("b", 1): "torch.bool"}


KINDS = {"float": ("f",), "int": ("i", "u")}


def require_h5py() -> Any:
    """Import and return h5py, or raise ImportError telling how to install it."""
    try:
        import h5py
    except ImportError:
        raise ImportError(
            "h5py is required to read or write dataset.h5 (HDF5), but it is not installed. "
            "Install it with: pip install 'jasper_mmap[hdf5]' (or pip install h5py)."
        ) from None
    return h5py


def fix_text(h5_path: Path) -> str:
    """The fix for a broken ``dataset.h5``: how to write it again."""
    return (
        f"Re-create it from the .pt files with convert_pt_to_hdf5('{h5_path.parent}') "
        f"(or re-run the builder that wrote it)."
    )


def brief(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def data_outside(dsid: Any) -> str | None:
    """How a dataset keeps its data outside its file (external storage, virtual), or None."""
    h5py = require_h5py()
    plist = dsid.get_create_plist()
    if plist.get_external_count():
        return f"a dataset whose data is stored in external file {plist.get_external(0)[0]!r}"
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        return "a virtual dataset (its data are mapped from other datasets)"
    return None

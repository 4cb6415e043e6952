"""Synthetic data: ``small`` (tests, in RAM) and ``large`` (streamed stores and ``.pt``
directories)."""

from jasper_mmap.synthetic.small import SyntheticSpec, make_pt_dataset, synthetic_config

__all__ = ["SyntheticSpec", "make_pt_dataset", "synthetic_config"]

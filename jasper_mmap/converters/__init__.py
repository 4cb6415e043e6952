"""jasper_mmap.converters (the top-level converters/ folder): turn a directory of ``.pt`` artifacts into a jasper_mmap store (``convert-pt``)."""

from jasper_mmap.converters.convert import DTYPES, FORMATS, convert_pt

__all__ = ["convert_pt", "FORMATS", "DTYPES"]

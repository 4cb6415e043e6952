"""Dataset sources: ``.pt`` directories and ``dataset.h5`` (read and write)."""

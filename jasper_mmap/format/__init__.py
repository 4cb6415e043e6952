"""The store format: spec, dtypes, manifest, schema, integrity checks, header and zarr metadata
parsing. No backend classes.
"""

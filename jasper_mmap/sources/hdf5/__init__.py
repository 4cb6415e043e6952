"""Upstream's ``dataset.h5``: layout, reader, keyword pass, writer."""

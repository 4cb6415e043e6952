"""``.pt`` files: the zip archive, the restricted pickle, readers, writers."""

"""Stores on object storage: upload (NOTE [remote publish]), the catalog of what a node
fetches whole or by unit (NOTE [remote catalog]) and the node-local cache it is read
through (NOTE [node cache])."""

from jasper_mmap.remote.cache import RemoteMirror, default_cache_dir
from jasper_mmap.remote.objects import ObjectStore, is_remote
from jasper_mmap.remote.upload import prune_generations, publish_remote, upload_store

__all__ = [
    "ObjectStore",
    "RemoteMirror",
    "default_cache_dir",
    "is_remote",
    "prune_generations",
    "publish_remote",
    "upload_store",
]

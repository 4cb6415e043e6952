"""The one reader of ``config.json`` (dataset directories and stores)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jasper_mmap._fs.files import read_json
from jasper_mmap.errors import (
    ArtifactMissingError,
    ConfigError,
    JasperError,
    StoreFormatError,
)
from jasper_mmap.format.schema import (
    Problem,
    type_name,
)
from jasper_mmap.format.spec import (
    CONFIG,
)
from jasper_mmap.format.values import CONFIG_COUNTS


def config_problems(store_dir: Path, fix: str) -> list[Problem]:
    path = Path(store_dir) / CONFIG
    try:
        config = read_json(
            path,
            what="config.json",
            fix=f"Copy the dataset's config.json there (the store keeps it), or: {fix}",
        )
    except JasperError as e:
        return [Problem(type(e), str(e))]
    if not isinstance(config, dict):
        return [
            Problem(
                StoreFormatError,
                f"{path}: config.json should be a JSON object, but got {type_name(config)}. {fix}",
            )
        ]
    return []


def read_config(src: Path) -> dict[str, Any]:
    """Read ``config.json`` of a dataset directory and check the types of the keys we use."""
    path = src / "config.json"
    if not path.exists():
        raise ArtifactMissingError(
            f"{path}: config.json is missing. Every dataset directory needs one "
            f"(embedding_dim, n_neg, steering_probabilities, ...); see docs/dataset_format.md."
        )
    # a regular file of bounded nesting (NOTE [regular files only] in jasper_mmap/_fs/files.py)
    config = read_json(
        path,
        what="config.json",
        fix="Fix the file.",
        error=ConfigError,
        missing=ArtifactMissingError,
    )
    if not isinstance(config, dict):
        raise ConfigError(
            f"{path}: should be a JSON object, but got {type(config).__name__}. Fix the file."
        )
    for key in ("embedding_dim", "n_neg", "random_seed", *CONFIG_COUNTS):
        value = config.get(key)
        if value is not None and (type(value) is not int or value < 0):
            raise ConfigError(
                f"{path}: {key} should be a non-negative integer, but got {key}={value!r}. "
                f"Fix the file."
            )
    for key in ("steering_probabilities", "curriculum"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise ConfigError(
                f"{path}: {key} should be a JSON object, but got "
                f"{type(config[key]).__name__}. Fix the file."
            )
    return config


def read_store_config(store_path: Path) -> dict[str, Any]:
    path = store_path / CONFIG
    try:  # a regular file, bounded nesting: NOTE [regular files only] in jasper_mmap/_fs/files.py
        config = read_json(
            path, what="config.json", fix="Fix the file.", error=ConfigError, missing=None
        )
    except FileNotFoundError:
        raise ArtifactMissingError(f"Config file not found: {path}. Re-create the store.") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: should be a JSON object. Fix the file.")
    return config

"""Hub data sets, `hf:NAME:CONFIG[:SPLIT]`: which files a configuration's split has, and their rows.

Each data file is read on its own, JSON lines as text: `datasets` would cast every file of a configuration
to one inferred schema, and the official set has fields that are a string in some rows and a list in
others, which that cast refuses. The records module then brings each row to the stage's schema, as for JSONL.
"""

from __future__ import annotations

import os
import re

import datasets
import huggingface_hub

from clara.data.spec import HubSource
from clara.errors import DataError

JSON_LINES_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
TABLE_MODULES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
HUB_FILE = re.compile(r"hf://datasets/(?:[^/@]+/)?[^/@]+@([^/]+)/(.+)")


def _config_files(source: HubSource, path: str) -> tuple[str, list[str]]:
    """The split and the data files of source's configuration, read from the README of `path`."""
    try:
        builder = datasets.load_dataset_builder(path, source.config)
    except (ValueError, FileNotFoundError, ConnectionError) as error:  # unknown configuration or data set, no network
        raise DataError(f"{source}: {error}") from None
    splits = builder.config.data_files or {}
    split = source.split
    if split is None:
        if len(splits) != 1:
            raise DataError(
                f"{source}: configuration {source.config!r} has the splits {', '.join(splits)}; "
                f"name one: {source}:SPLIT"
            )
        split = next(iter(splits))
    elif split not in splits:
        raise DataError(f"{source}: no split {split!r}; configuration {source.config!r} has {', '.join(splits)}")
    return split, list(splits[split])


def _snapshot(source: HubSource, offline: bool) -> str:
    """A local copy (the huggingface_hub cache under HF_HOME) of the README and this configuration's files."""
    try:
        if offline:
            return huggingface_hub.snapshot_download(source.name, repo_type="dataset", local_files_only=True)
        _, remote = _config_files(source, source.name)
        located = [HUB_FILE.fullmatch(url) for url in remote]
        revision = located[0].group(1) if located and located[0] else None
        return huggingface_hub.snapshot_download(
            source.name,
            repo_type="dataset",
            revision=revision,
            allow_patterns=["README.md", *(match.group(2) for match in located if match)],
        )
    except huggingface_hub.errors.LocalEntryNotFoundError:
        raise DataError(
            f"{source}: not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) and "
            "offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE): load it once online, "
            "or give a local directory in the Hub layout"
        ) from None


def hub_files(source: HubSource, streaming: bool) -> tuple[str, list[str]]:
    """(hf:NAME:CONFIG:SPLIT, the data files in order): local files, or remote ones to stream when `streaming`.

    A Hub data set is first downloaded into the Hugging Face cache (only this configuration's files), except
    when streaming online; offline it must be in the cache already.
    """
    offline = datasets.config.HF_HUB_OFFLINE
    local = os.path.isdir(source.name) or (streaming and not offline)
    split, files = _config_files(source, source.name if local else _snapshot(source, offline))
    return str(HubSource(source.name, source.config, split)), files

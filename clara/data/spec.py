"""A data setting (DATASET, EVAL_DATASET, --dataset) read into the sources it names: JSON-lines files joined by
commas, or one configuration of a Hugging Face Hub data set written hf:NAME:CONFIG[:SPLIT].

The hf: prefix is recognised here and nowhere else. Standard library only, so that the launchers check a data
setting before anything heavy loads (README: "Data").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from clara.errors import ConfigError

# A data setting that starts with this names a Hub data set instead of JSONL files: hf:NAME:CONFIG[:SPLIT].
HUB_PREFIX = "hf:"


@dataclass(frozen=True)
class JsonlFiles:
    """JSON-lines files, read in this order."""

    paths: tuple[str, ...]

    def __str__(self) -> str:
        return ",".join(self.paths)


@dataclass(frozen=True)
class HubSource:
    """A configuration of a Hugging Face Hub data set, or of a local directory in the Hub layout."""

    name: str
    config: str
    split: str | None = None

    def __str__(self) -> str:
        return HUB_PREFIX + ":".join(part for part in (self.name, self.config, self.split) if part)


DataSource = JsonlFiles | HubSource


def is_hub(text: str) -> bool:
    """Whether a data setting, or the label of a source's rows, names a Hub data set."""
    return text.strip().startswith(HUB_PREFIX)


def parse_source(text: str | None, setting: str = "dataset") -> DataSource:
    """The sources a data setting names; ConfigError for the setting `setting` when it is not written as one."""
    entries = (text or "").split(",")
    if any(is_hub(entry) for entry in entries):
        if len(entries) > 1:
            raise ConfigError(setting, text, "one hf: data set on its own, or JSONL files joined by commas")
        parts = entries[0].strip()[len(HUB_PREFIX) :].split(":")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise ConfigError(
                setting,
                text,
                "hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT (e.g. hf:apple/CLaRa_multi_stage:instruction_tuning)",
            )
        return HubSource(*parts)
    if not text or any(not entry.strip() for entry in entries):
        raise ConfigError(setting, text, "one or more JSONL files joined by commas (an empty entry was given)")
    return JsonlFiles(tuple(entry.strip() for entry in entries))


def checked_source(text: str | None, setting: str = "dataset") -> DataSource:
    """parse_source, and every JSONL file readable (a Hub configuration is resolved when it is read)."""
    source = parse_source(text, setting)
    for path in source.paths if isinstance(source, JsonlFiles) else ():
        if os.path.isdir(path):
            raise ConfigError(setting, text, f"JSONL files joined by commas; '{path}' is a directory")
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise ConfigError(
                setting, text, f"readable JSONL files joined by commas; '{path}' does not exist or is not readable"
            )
    return source


def check_data_settings(dataset: str | None, eval_dataset: str | None) -> None:
    """The training and held-out data settings as the entry points check them (ConfigError naming the setting)."""
    checked_source(dataset, "dataset")
    if eval_dataset:
        checked_source(eval_dataset, "eval_dataset")

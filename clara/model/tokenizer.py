"""The one way a tokenizer is loaded: from a model directory, a checkpoint or a Hub id (the built-in tiny model's
name reads the shipped build)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from clara.config import TINY_MODEL_NAME
from clara.model.tiny_base import tiny_model_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved at `source` (a directory or a Hub id; TINY_MODEL_NAME: the shipped tiny model's)."""
    from transformers import AutoTokenizer  # deferred: the processes that only wait for the data never load it

    return AutoTokenizer.from_pretrained(tiny_model_dir() if source == TINY_MODEL_NAME else source)

"""Where a checkpoint is: a local directory, or a Hugging Face Hub id whose one subfolder is downloaded into the
Hub cache (the official release: `apple/CLaRa-7B-{Base,Instruct,E2E}`, one subfolder per compression rate); and
a failed Hub look-up turned into one line that says what to do."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

from clara.config import hub_id_parts
from clara.errors import CheckpointError


@contextlib.contextmanager
def hub_errors(what: str, repo_id: str) -> Iterator[None]:
    """Turn a failed Hub look-up (raised by huggingface_hub, or by transformers around it) into one line
    that says what to do. Other errors pass unchanged."""
    try:
        yield
    except Exception as error:
        message = _hub_advice(error, what, repo_id)
        if message is None:
            raise
        raise CheckpointError(message) from error


def _hub_advice(error: BaseException, what: str, repo_id: str) -> str | None:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, GatedRepoError):
            return (
                f"{what}: {repo_id} is gated on the Hugging Face Hub; accept its licence at "
                f"https://huggingface.co/{repo_id} while logged in, then set HF_TOKEN to a token of that "
                "account (or run `hf auth login`)"
            )
        if isinstance(error, RepositoryNotFoundError):
            return (
                f"{what}: the Hugging Face Hub has no repository {repo_id} that you can read "
                "(check the name; a private repository needs HF_TOKEN)"
            )
        if isinstance(error, LocalEntryNotFoundError):
            if constants.HF_HUB_OFFLINE:
                return (
                    f"{what}: {repo_id} is not in the Hub cache {constants.HF_HUB_CACHE} and HF_HUB_OFFLINE=1 "
                    "forbids downloading it; download it once with network access (same HF_HOME), "
                    "then HF_HUB_OFFLINE=1 works"
                )
            return (
                f"{what}: cannot reach the Hugging Face Hub ({constants.ENDPOINT}) and {repo_id} is not in "
                f"the Hub cache {constants.HF_HUB_CACHE}; connect to the network, or fill that cache on a "
                "machine that can (same HF_HOME) and set HF_HUB_OFFLINE=1 here"
            )
        error = error.__cause__ or error.__context__
    return None


def resolve_checkpoint(path_or_id: str, subfolder: str | None = None) -> str:
    """The local directory of a checkpoint given as a directory or as a Hugging Face Hub id.

    A Hub id is `owner/name` with subfolder=..., or the path form `owner/name/subfolder`. Only that
    subfolder is downloaded, into the Hub cache; HF_HOME, HF_TOKEN and HF_HUB_OFFLINE apply as
    everywhere in huggingface_hub.
    """
    local = os.path.join(path_or_id, subfolder) if subfolder else path_or_id
    if os.path.isdir(local):
        return local
    parts = hub_id_parts(path_or_id)
    if parts is None:
        raise CheckpointError(f"{local}: no such checkpoint directory (nor a Hugging Face Hub id owner/name)")
    repo_id, in_id = parts
    folder = "/".join(p.strip("/") for p in (in_id, subfolder) if p) or None
    # A mistyped local path also reads as a Hub id: the message starts with what the user gave.
    what = (
        f"checkpoint {path_or_id}"
        + (f" subfolder {subfolder}" if subfolder else "")
        + " (no such local directory, so read as a Hugging Face Hub id)"
    )
    # fnmatch's "*" also matches "/": "*/*" leaves out every subfolder, so the root alone is fetched.
    patterns = {"allow_patterns": [f"{folder}/*"]} if folder else {"ignore_patterns": ["*/*"]}
    with hub_errors(what, repo_id):
        snapshot = snapshot_download(repo_id, **patterns)
    directory = os.path.join(snapshot, folder) if folder else snapshot
    if not os.path.isfile(os.path.join(directory, "config.json")):
        found = hub_checkpoint_folders(repo_id, snapshot)
        where = "in the Hub cache" if constants.HF_HUB_OFFLINE else "on the Hub"
        raise CheckpointError(
            f"{what}: no checkpoint there (no config.json); {repo_id} has "
            + (
                f"these {where}: {', '.join(found)} (pass one as subfolder=, or append it to the id: "
                f"{repo_id}/{found[0]})"
                if found
                else f"no checkpoint subfolder {where}"
            )
        )
    return directory


def hub_checkpoint_folders(repo_id: str, snapshot: str) -> list[str]:
    """Subfolders holding a config.json: listed by the Hub, or found in the cached snapshot when offline."""
    if constants.HF_HUB_OFFLINE:
        files = [
            os.path.relpath(os.path.join(root, name), snapshot)
            for root, _, names in os.walk(snapshot)
            for name in names
        ]
    else:
        with hub_errors(f"checkpoint {repo_id}", repo_id):
            files = HfApi().list_repo_files(repo_id)
    return sorted(os.path.dirname(f) for f in files if f.endswith("/config.json"))

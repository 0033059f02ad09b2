"""Reaching the Hugging Face hub: HF_HUB_OFFLINE honoured, an unreachable hub found out within seconds, the
hub clients' retries and warnings kept quiet, and one line that says how to proceed."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import ssl
import threading
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

PROBE_TIMEOUT_S = 3.0
HUB_LOGGERS = ("huggingface_hub", "datasets", "fsspec", "filelock", "httpx", "httpx2", "httpcore", "urllib3")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name
CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


class HubUnavailable(ConnectionError):
    """The hub cannot be used now (offline mode, or unreachable) and nothing cached stands in for it."""


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    """HF_HUB_OFFLINE (as huggingface_hub read it at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub's endpoint answers within `timeout_s` (any HTTP status, or a TLS handshake, counts; the
    environment's proxies are used). Name resolution, which no socket timeout covers, is cut off too."""
    answered: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint(), method="HEAD"), timeout=timeout_s).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)
        except urllib.error.URLError as e:
            answered.append(isinstance(e.reason, ssl.SSLError))
        except (OSError, ValueError):
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(answered and answered[0])


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The hub clients' loggers at ERROR and Python warnings off for the duration (progress bars stay)."""
    loggers = [logging.getLogger(name) for name in HUB_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def download_command(repo_id: str) -> str:
    """The command that downloads a model into the hub cache, as this machine's huggingface_hub spells it."""
    cli = "hf" if shutil.which("hf") or not shutil.which("huggingface-cli") else "huggingface-cli"
    return f"{cli} download {repo_id}"


def snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The checkpoint files of a hub repo in the local hub cache, downloaded first when the hub is reachable.
    Offline (HF_HUB_OFFLINE) or with the hub unreachable, a cached copy is used; without one, HubUnavailable
    says how to proceed. A repo the hub does not have is a FileNotFoundError."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    failure = ""
    with quiet():
        online = not offline() and reachable()
        if online:
            try:
                return Path(snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_FILES))
            except RevisionNotFoundError:
                raise FileNotFoundError(f"the hub has no revision {revision!r} of {repo_id}") from None
            except RepositoryNotFoundError:  # also a gated or private repo without a token
                raise FileNotFoundError(
                    f"no checkpoint directory {repo_id} here, and no model {repo_id!r} on the hub (or a gated or "
                    "private one: log in with a token)"
                ) from None
            except Exception as e:  # the download failed part-way: a complete cached copy still serves
                failure = " ".join(f"{type(e).__name__}: {e}".split())
        with contextlib.suppress(Exception):  # not in the cache (each hub version raises its own error)
            return Path(
                snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_FILES, local_files_only=True)
            )
    fetch = download_command(repo_id)
    if online:
        raise HubUnavailable(f"downloading {repo_id} from the hub failed ({failure[:200]}); retry, or `{fetch}`")
    if offline():
        raise HubUnavailable(
            f"{repo_id} is not in the local hub cache and HF_HUB_OFFLINE is set: download it first with "
            f"`{fetch}` (where the hub is reachable), or pass a local checkpoint directory"
        )
    raise HubUnavailable(
        f"the hub ({endpoint()}) is unreachable and {repo_id} is not in the local hub cache: pass a local checkpoint "
        f"directory, or download it where the hub is reachable with `{fetch}` and set HF_HUB_OFFLINE=1"
    )

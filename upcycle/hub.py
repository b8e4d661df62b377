"""A model named by Hub id (``owner/name``) instead of a path: a local snapshot from huggingface_hub's cache.

The cache is the one transformers shares (``HF_HOME``/``HF_HUB_CACHE``), the token comes from the environment, and
``HF_HUB_OFFLINE=1`` is respected: an id already cached resolves without a network. Only the files a conversion, a
check or an evaluation reads are fetched: config, weights, tokenizer, generation settings and the model card.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from upcycle.errors import OptionError, SourceError

log = logging.getLogger(__name__)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
MODEL_FILES = (
    "*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "README.md", "LICENSE*", "NOTICE*",
)  # fmt: skip


@dataclass(frozen=True)
class ModelSource:
    """Where a named model lives on disk, and, for a Hub id, which repository and commit that folder holds."""

    folder: Path
    repo_id: str | None = None
    revision: str | None = None  # the commit the snapshot is of

    def provenance(self) -> dict[str, str]:
        """What a record keeps of a Hub source (nothing for a local path)."""
        return {"repo_id": self.repo_id, "revision": self.revision} if self.repo_id else {}


def is_hub_id(name: str | Path) -> bool:
    """``owner/name`` that is not an existing path: a local folder of the same shape always wins."""
    text = str(name)
    return bool(HUB_ID.fullmatch(text)) and not Path(text).exists()


def resolve_model(name: str | Path, revision: str | None = None) -> ModelSource:
    """A local path as it is, or a Hub id's snapshot (downloaded once into the shared cache, or found there)."""
    if not is_hub_id(name):
        if revision is not None:
            raise OptionError(f"--revision applies to Hub ids, and {name} is a local path.", "leave out --revision.")
        return ModelSource(Path(name))
    repo_id = str(name)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from tqdm.auto import tqdm

    log.info("%s: from the Hugging Face cache, or downloaded into it once", repo_id)
    try:
        # top-level files only: some repositories also keep original or consolidated weights in subfolders. The
        # file count shows as a bar whatever HF_HUB_DISABLE_PROGRESS_BARS says (it silences transformers' bars).
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(MODEL_FILES),
                ignore_patterns=["*/*"],
                tqdm_class=tqdm,
            )
        )
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise SourceError(
            f"{repo_id} is neither a local path nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), and {why}.",
            f"download it once where the Hub is reachable (`hf download {repo_id}`, or any upcycle command), "
            "or pass a local folder.",
        ) from None
    except GatedRepoError:
        raise SourceError(
            f"{repo_id} is gated on the Hub: access must be granted and a token given.",
            "accept its terms on the Hub, then set HF_TOKEN (or run `hf auth login`).",
        ) from None
    except RevisionNotFoundError:
        raise SourceError(f"{repo_id} has no revision {revision!r}.", "pass a branch, tag or commit it has.") from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"no model {repo_id} on the Hub (or it is private and no token was given).",
            "check the id; for a private model set HF_TOKEN. A local folder of that name would be used first.",
        ) from None
    except HfHubHTTPError as error:
        raise SourceError(
            f"the Hub refused {repo_id}: {str(error).splitlines()[0]}", "retry, or pass a local folder."
        ) from None
    if not (folder / "config.json").is_file():
        raise SourceError(f"{repo_id} has no config.json: it is not a transformers model.", "pass a model repository.")
    return ModelSource(folder, repo_id, folder.name)


_CACHED_DATASET = re.compile(r"datasets--(?:([A-Za-z0-9][\w.-]*?)--)?([A-Za-z0-9][\w.-]*)")  # owner optional


def hub_dataset_id(path: str | Path) -> str | None:
    """The Hub dataset a file came from, when it lies in huggingface_hub's cache (``datasets--OWNER--NAME/...``,
    the layout `hf download --repo-type dataset` writes); None for any other file. Only what the path proves."""
    for part in Path(path).parts:
        if found := _CACHED_DATASET.fullmatch(part):
            return "/".join(name for name in found.groups() if name)
    return None

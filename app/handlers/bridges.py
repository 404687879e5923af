"""Bridges: which ones can be used, saving, archiving, loading (refused with the reason when a
bridge does not fit the loaded models), and pushing to the Hugging Face hub."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from app.handlers.chat import NEW_BRIDGE, describe_loaded, require_loaded
from app.handlers.runs import list_runs
from app.session import Session
from composer import progress
from composer.config import ConfigError, first_line

logger = logging.getLogger(__name__)


def shipped_bridge(session: Session) -> str | None:
    """The trained bridge shipped with the current preset (its folder), or None."""
    preset = session.preset(session.preset_id) if session.preset_id else None
    folder = preset.shipped_bridge if preset is not None else None
    return str(folder) if folder is not None else None


def preferred_bridge(session: Session) -> str:
    """The bridge the Chat tab selects: the loaded one, else the preset's shipped one (so a
    first open composes without training), else a new bridge."""
    if session.loaded is not None:
        return session.loaded.bridge
    return shipped_bridge(session) or NEW_BRIDGE


def bridge_choices(session: Session) -> list[tuple[str, str]]:
    """(label, folder) for the chat's bridge dropdown: new, the preset's shipped bridge,
    finished runs, exported bridges."""
    choices = [("new (untrained) bridge", NEW_BRIDGE)]
    shipped = shipped_bridge(session)
    if shipped is not None:
        choices.append((f"shipped {session.preset_id} (trained)", shipped))
    for name in list_runs(session):
        folder = session.runs_dir / name / progress.BRIDGE
        if (folder / "bridge_config.json").is_file():
            choices.append((f"run {name}", str(folder)))
    if session.exports_dir.is_dir():
        for folder in sorted(session.exports_dir.iterdir()):
            if (folder / "bridge_config.json").is_file():
                choices.append((f"saved {folder.name}", str(folder)))
    if session.loaded and session.loaded.bridge not in {value for _, value in choices}:
        choices.append((f"loaded {Path(session.loaded.bridge).name}", session.loaded.bridge))
    return choices


def allowed_roots(session: Session) -> list[Path]:
    """Folders the app may read bridges from and write them to: its runs and models folders,
    the user's home and the temporary folder (never the server's working folder as such)."""
    return [
        session.runs_dir,
        session.models_dir,
        Path.home().resolve(),
        Path(tempfile.gettempdir()).resolve(),
    ]


def folder_argument(session: Session, folder: object, what: str = "folder") -> Path | None:
    """A folder named by a client: text or nothing; relative paths are under the exports folder
    (never the server's working folder); absolute ones must lie inside :func:`allowed_roots`."""
    if folder is None:
        return None
    if not isinstance(folder, str):
        raise ConfigError(
            f"the {what} is {folder!r} ({type(folder).__name__}); expected a folder path as text, "
            "or nothing for the default"
        )
    text = folder.strip()
    if not text:
        return None
    if "\x00" in text:
        raise ConfigError(f"the {what} {text!r} holds a NUL character; expected a folder path")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = session.exports_dir / path
    path = path.resolve()
    roots = allowed_roots(session)
    if not any(path.is_relative_to(root) for root in roots) or path in roots:
        raise ConfigError(
            f"the {what} {str(path)!r} is outside the folders this app may use; choose a folder "
            "inside " + ", ".join(str(r) for r in roots[:2]) + " or your home folder"
        )
    return path


def save_bridge(session: Session, folder: str | None = None) -> str:
    """Save the loaded composition's bridge folder; returns its path."""
    target = folder_argument(session, folder, "bridge folder") or _default_export(session)
    with session.model_lock:
        composition = require_loaded(session)
        composition.save_bridge(str(target))
    return str(target)


def _default_export(session: Session) -> Path:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", session.preset_id or "bridge").strip("-") or "bridge"
    return session.exports_dir / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def archive_bridge(session: Session, folder: str | None = None) -> str:
    """A .zip of a bridge folder (the loaded bridge is saved first when no folder is given)."""
    from composer.export import read_bridge_config

    source = folder_argument(session, folder, "bridge folder")
    if source is None or not source.exists():
        source = Path(save_bridge(session, folder))
    read_bridge_config(source)  # a folder that is not a bridge is refused with the reason
    out_dir = Path(tempfile.mkdtemp(prefix="calm-bridge-"))
    archive = shutil.make_archive(str(out_dir / source.name), "zip", root_dir=source)
    return archive


def _bridge_folder_in(root: Path) -> Path:
    if (root / "bridge_config.json").is_file():
        return root
    found = sorted(p.parent for p in root.rglob("bridge_config.json"))
    if not found:
        raise ConfigError(
            f"no bridge_config.json in {root}; expected a bridge folder or an archive of one "
            "(made by Save or Download here, or by calm-composer train)"
        )
    return found[0]


# The largest bridge archive unpacked (uncompressed): full-width 7B bridges are ~1.5 GB; a zip
# bomb stops here instead of filling the disk.
MAX_UNPACKED_BYTES = 8 * 1024**3


def _unpacked_size(source: Path) -> int:
    """Uncompressed size of an archive's members, read from its index (nothing extracted)."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as bundle:
            return sum(info.file_size for info in bundle.infolist())
    with tarfile.open(source) as bundle:
        return sum(member.size for member in bundle.getmembers())


def unpack_bridge(session: Session, archive: str) -> Path:
    """Extract an uploaded .zip/.tar(.gz) into the runs folder; returns the bridge folder in it."""
    source = Path(archive)
    if not source.is_file():
        raise ConfigError(f"the archive {source.name!r} is gone or is not a file; upload it again")
    try:
        size = (
            _unpacked_size(source)
            if (zipfile.is_zipfile(source) or tarfile.is_tarfile(source))
            else 0
        )
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        raise ConfigError(f"could not read the archive {source.name}: {exc}") from None
    if size > MAX_UNPACKED_BYTES:
        raise ConfigError(
            f"{source.name} unpacks to {size / 1024**3:.1f} GiB, more than any bridge "
            f"({MAX_UNPACKED_BYTES / 1024**3:.0f} GiB at most); refusing to unpack it"
        )
    target = Path(tempfile.mkdtemp(prefix="bridge-", dir=_ensure(session.uploads_dir)))
    try:
        if zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as bundle:
                for member in bundle.namelist():
                    _check_member(member, source)
                bundle.extractall(target)
        elif tarfile.is_tarfile(source):
            with tarfile.open(source) as bundle:
                bundle.extractall(target, filter="data")
        else:
            raise ConfigError(
                f"{source.name} is neither a .zip nor a .tar archive; upload the archive that "
                "Download made, or give the bridge folder"
            )
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise ConfigError(f"could not unpack {source.name}: {exc}") from None
    return _bridge_folder_in(target)


def _check_member(member: str, source: Path) -> None:
    path = Path(member)
    if path.is_absolute() or ".." in path.parts:
        raise ConfigError(f"{source.name} holds an unsafe path {member!r}; refusing to unpack it")


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_bridge(session: Session, *, folder: str | None = None, archive: str | None = None) -> str:
    """Put a saved bridge (a folder, or an uploaded archive) on the loaded models.

    Refused with the reason (ConfigError from composer.loading.load_bridge) when the bridge was
    made for other models; the models stay loaded either way.
    """
    from composer.loading import load_bridge as compose_with_bridge

    if archive is not None and not isinstance(archive, str):
        raise ConfigError(f"the archive is {archive!r}; expected the path of an uploaded file")
    source = folder_argument(session, folder, "bridge folder")
    if archive:
        path = unpack_bridge(session, archive)
    elif source is not None:
        path = _bridge_folder_in(source)
    else:
        raise ConfigError("give a bridge folder or upload an archive of one")
    with session.model_lock:
        current = require_loaded(session)
        composition = compose_with_bridge(
            path,
            current.anchor,
            current.specialist,
            tokenizer=current.tokenizer,
            recipe=current.recipe,
            sources=current.sources,
        )
        session.loaded = dataclasses.replace(
            session.loaded, composition=composition, bridge=str(path.resolve())
        )
    return describe_loaded(session)


def hub_token() -> str | None:
    """The Hugging Face token configured on this machine (HF_TOKEN or `hf auth login`)."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        return os.environ.get("HF_TOKEN")
    return get_token()


def push_to_hub(session: Session, *, folder: str | None, repo_id: str, private: bool = True) -> str:
    """Upload a bridge folder (the loaded bridge, saved first, when none is given) to the hub."""
    from composer.export import read_bridge_config

    if repo_id is not None and not isinstance(repo_id, str):
        raise ConfigError(f"hub repository {repo_id!r} is not text; expected 'owner/name'")
    repo_id = (repo_id or "").strip()
    if not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", repo_id):
        raise ConfigError(f"hub repository {repo_id!r} is not of the form 'owner/name'")
    token = hub_token()
    if not token:
        raise ConfigError(
            "no Hugging Face token is configured; run `hf auth login` or set HF_TOKEN, then "
            "push again (the bridge can still be saved and downloaded here)"
        )
    source = folder_argument(session, folder, "bridge folder")
    if source is None or not source.exists():
        source = Path(save_bridge(session, folder))
    read_bridge_config(source)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(source), commit_message="Upload CALM bridge"
        )
    except Exception as exc:  # network, permissions, rate limits: a message, not a traceback
        first = first_line(exc)
        raise ConfigError(
            f"could not push to {repo_id} ({type(exc).__name__}: {first}); check the network "
            "and that the token may write to that repository"
        ) from None
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")

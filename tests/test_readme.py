"""The README as written: every file it links or names exists in the repository (and is not
git-ignored, so a fresh clone has it), every recipe is listed, every model name it shows is registered."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import timm

import timm_stream  # noqa: F401 - registers stream_<arch>

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _ignored(path: str) -> bool:
    try:
        result = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git not available")
    if result.returncode == 128:
        pytest.skip("not a git checkout")
    return result.returncode == 0


def _local_targets() -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", README)  # [text](target) and ![alt](target)
    named = re.findall(r"\b((?:recipes|scripts|docs|tests|model_cards|timm_stream)/[\w./-]+\.\w+)", README)
    return sorted({t for t in links + named if "://" not in t and not t.startswith("#")})


@pytest.mark.parametrize("target", _local_targets())
def test_every_linked_or_named_file_is_in_a_fresh_clone(target):
    assert (ROOT / target).is_file(), f"README names {target}, which does not exist"
    assert not _ignored(target), f"README names {target}, which .gitignore keeps out of the repository"


def test_every_recipe_is_listed():
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        assert f"recipes/{recipe.name}" in README


def test_model_names_shown_are_registered():
    names = set(re.findall(r"\b(stream_[a-z0-9_]+(?:\.[a-z0-9_]+)?)\b", README)) - {"stream_stages"}
    assert "stream_test_resnet" in names
    for name in names:
        if name.endswith("_") or name in ("stream_model", "stream_plan"):
            continue
        base = name.split(".")[0]
        assert timm.is_model(base), f"README shows {name}, which is not a registered model"

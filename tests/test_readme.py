"""README claims about set-up and running offline, checked against the scripts and the running code.

(The quick start's compression itself runs in tests/test_smollm2.py, the slow test with the real model.)
"""

import os
import re
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version

import pytest

from offline_assets import DEMO_PACKAGES, ROOT, require_demo_assets


def _read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def _commands(script: str) -> list[list[str]]:
    """The commands of a shell script (comments dropped, continuation lines joined), split like the shell."""
    text = re.sub(r"\\\n", " ", _read(script))
    lines = [line.split(" #")[0].strip() for line in text.splitlines()]
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def test_nothing_is_downloaded_at_run_time(tmp_path):
    """The suite runs with the Hub client offline (conftest), so any download attempt fails loudly here
    instead of quietly fetching in CI. Each entry point that could download is refused."""
    from huggingface_hub import constants, hf_hub_download
    from transformers import AutoConfig

    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    with pytest.raises(OSError):
        hf_hub_download("HuggingFaceTB/SmolLM2-135M-Instruct", "config.json", cache_dir=str(tmp_path))
    with pytest.raises(OSError):
        AutoConfig.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=str(tmp_path))
    from optimum_a3.calibration.text import load_rows

    with pytest.raises(OSError, match="OfflineModeIsEnabled"):  # datasets' ConnectionError
        load_rows("hub:wikitext:wikitext-2-raw-v1:test")


def test_demo_assets_are_read_from_disk_and_never_imported():
    """README: the two demo packages are installed --no-deps, read from disk and never imported."""
    require_demo_assets()
    from optimum_a3.calibration.text import wikipedia_offline_rows
    from optimum_a3.checkpoint.loading import smollm2_offline_gguf

    assert os.path.isfile(smollm2_offline_gguf()) and smollm2_offline_gguf().endswith(".gguf")
    assert len(wikipedia_offline_rows("all")) == 10_033 and len(wikipedia_offline_rows("heldout")) == 1_000
    assert not set(DEMO_PACKAGES) & set(sys.modules)


def test_quick_start_scripts_do_what_the_readme_says():
    readme = _read("README.md")
    setup = _commands("examples/setup.sh")
    pips = [c for c in setup if c[:4] == ["python", "-m", "pip", "install"]]
    assert ["python", "-m", "pip", "install", "--quiet", "torch==2.13.0"] in pips  # "the CPU build of torch 2.13.0"
    assert any(c[-2:] == ["-e", ".[demo,bench,test]"] for c in pips)  # this package with its extras
    demo = next(c for c in pips if "--no-deps" in c)  # the two demo assets, --no-deps
    assert sorted(a for a in demo if "==" in a) == sorted(DEMO_PACKAGES.values())
    for pinned in DEMO_PACKAGES.values():
        assert f"`{pinned.split('==')[0]}`" in readme
    # Both entry points call setup.sh; CI then runs exactly the README's test command.
    for script in ("examples/quickstart.sh", ".ci/run"):
        assert ["bash", "examples/setup.sh"] in _commands(script), script
    assert _commands(".ci/run")[-1] == ["python", "-m", "pytest", "-q", "tests"]
    assert "```bash\npython -m pytest -q tests\n```" in readme
    quick = _commands("examples/quickstart.sh")[-1]
    assert quick[:5] == ["optimum-a3", "compress", "smollm2-offline", "--ratio", "0.2"]  # "by 20%"
    assert "--eval" in quick  # "prints ppl before/after"


def test_installed_demo_assets_are_the_pinned_versions():
    require_demo_assets()
    for pinned in DEMO_PACKAGES.values():
        name, wanted = pinned.split("==")
        try:
            assert version(name) == wanted, name
        except PackageNotFoundError:  # found as a module but not as a distribution: a source checkout
            pytest.skip(f"{name} is not an installed distribution")

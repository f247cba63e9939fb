"""The documentation site: built with warnings as errors, every public name in the API reference, and
every ``>>>`` example of its pages run.

The docstrings' examples run as doctests of the package (``--doctest-modules``, ``testpaths`` in
``pyproject.toml``); the examples of the Markdown pages under ``docs/`` run here, one doctest per page
(its blocks in order, sharing names, as a reader runs them). Notebooks are rendered with their committed
outputs (``nb_execution_mode = "off"``): ``tests/test_notebooks.py`` executes them.
"""

from __future__ import annotations

import doctest
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# modules whose ``__all__`` is the public API (the others are internal mechanics)
PUBLIC_MODULES = [
    "lightning_transfer",
    "lightning_transfer.callbacks",
    "lightning_transfer.functional",
    "lightning_transfer.functional.linear_probe",
    "lightning_transfer.functional.interpolation",
    "lightning_transfer.functional.sharding",
    "lightning_transfer.anatomy",
    "lightning_transfer.probe",
    "lightning_transfer.batchnorm",
    "lightning_transfer.optim",
    "lightning_transfer.data",
    "lightning_transfer.model",
    "lightning_transfer.backbones",
    "lightning_transfer.rank",
    "lightning_transfer.scan",
    "lightning_transfer.soup",
    "lightning_transfer.cli",
    "lightning_transfer.assets",
]

# one page per callback and per tool
METHOD_PAGES = {
    "MaxEntropyHeadInit": "methods/mei.md",
    "L2SP": "methods/l2sp.md",
    "FeatureMapRegularization": "methods/delta.md",
    "DTNH": "methods/dtnh.md",
    "FreezeSchedule": "methods/freeze.md",
    "RIFLE": "methods/rifle.md",
    "RepresentationSimilarity": "methods/similarity.md",
    "WiSEFT": "methods/wise-ft.md",
    "LiNeS": "methods/lines.md",
    "StochNorm": "methods/stochnorm.md",
    "CoTuning": "methods/co-tuning.md",
    "SPD": "methods/spd.md",
    "BSS": "methods/bss.md",
}
TOOL_PAGES = ["anatomy", "layer-decay", "linear-probe", "ranking", "depth-scan", "soups"]
PAGES_WITH_EXAMPLES = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")
                             if "notebooks" not in p.parts and ">>> " in p.read_text())


def build_site(out: Path) -> Path:
    """The HTML site, built from scratch with ``-W`` (any warning, e.g. a broken reference, fails)."""
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d", str(out / ".doctrees"),
         str(DOCS), str(out / "html")],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, f"sphinx-build -W failed:\n{result.stderr[-6000:]}"
    return out / "html"


def documented_ids(site: Path) -> set[str]:
    """The full names of the API entries of the built site (the anchors autodoc writes)."""
    ids: set[str] = set()
    for page in (site / "api").glob("*.html"):
        ids.update(re.findall(r'<dt class="sig sig-object py[^"]*" id="([^"]+)"', page.read_text()))
    return ids


def undocumented_public_names(ids: set[str]) -> list[str]:
    documented = set()
    for name in ids:  # the objects behind the entries: a re-exported name counts where it is documented
        module, _, attr = name.rpartition(".")
        try:
            documented.add(id(getattr(importlib.import_module(module), attr)))
        except (ImportError, AttributeError):
            continue
    missing = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if f"{module_name}.{name}" in ids or (callable(obj) and id(obj) in documented):
                continue
            missing.append(f"{module_name}.{name}")
    return missing


def test_site_builds_with_warnings_as_errors_and_documents_every_public_name(tmp_path):
    # one test, one build: under ``-n 2`` a second test on the site would build it again in the other worker
    site = build_site(tmp_path)
    pages = ["index", "getting-started", "choose", "support", "faq", "transformers", "api/index",
             "benchmarks/index", "benchmarks/tuned", "notebooks/01_quickstart", *(p[:-3] for p in METHOD_PAGES.values()),
             *(f"tools/{t}" for t in TOOL_PAGES)]
    assert not [p for p in pages if not (site / f"{p}.html").is_file()]
    missing = undocumented_public_names(documented_ids(site))
    assert not missing, f"public names without an API entry (add them to docs/api/*.rst): {missing}"


def test_every_callback_and_tool_has_a_page():
    import lightning_transfer.callbacks as callbacks

    public = {n for n in callbacks.__all__ if n != "GradientRegularizer"}
    assert public == set(METHOD_PAGES), "a callback without a method page (or a page of a removed one)"
    for page in [*METHOD_PAGES.values(), *(f"tools/{t}.md" for t in TOOL_PAGES)]:
        text = (DOCS / page).read_text()
        for section in ("## Paper", "## The rule", "## Defaults", "## Lightning hook", "## Support", "## Example",
                        ">>> "):
            assert section in text, f"{page} lacks {section!r}"
    for page in METHOD_PAGES.values():
        text = (DOCS / page).read_text()
        for section in ("```bibtex", "## Benchmark verdict"):
            assert section in text, f"{page} lacks {section!r}"


def python_examples(text: str) -> str:
    """The ``>>>`` examples of a Markdown page: its fenced python blocks that start with a prompt, in order."""
    blocks = re.findall(r"^```(?:python|pycon)\n(.*?)^```", text, flags=re.S | re.M)
    return "\n".join(b for b in blocks if b.lstrip().startswith(">>> "))


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here, reading configs/ as in a checkout
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    source = python_examples((DOCS / page).read_text())
    test = doctest.DocTestParser().get_doctest(source, {"__name__": "__docs__"}, page, str(DOCS / page), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    runner.run(test, out=out.append)
    assert runner.failures == 0, "".join(out)
    assert runner.tries > 0


def test_readme_links_into_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert len(links) >= 5, "the README should link into the documentation pages"
    broken = [link for link in links if not (ROOT / link).exists()]
    assert not broken, f"README links to missing docs pages: {broken}"


def test_package_reports_its_version():
    from importlib.metadata import version

    import lightning_transfer

    assert version("lightning-transfer") == lightning_transfer.__version__
    assert (ROOT / "lightning_transfer" / "py.typed").is_file()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert f"version: {lightning_transfer.__version__}" in (ROOT / "CITATION.cff").read_text()


"""Sphinx configuration of the lightning-transfer documentation (built by ``tests/test_docs.py`` with ``-W``)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning_transfer  # noqa: E402

project = "lightning-transfer"
author = "The lightning-transfer developers"
copyright = "the lightning-transfer developers"  # noqa: A001 - Sphinx's name
release = lightning_transfer.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "conftest.py"]
root_doc = "index"

# Google-style docstrings; type hints shown in the descriptions, not the signatures
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_inherit_docstrings = False

# notebooks: rendered with the outputs they were committed with (the test suite executes them)
nb_execution_mode = "off"
nb_output_stderr = "remove"
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"lightning-transfer {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {"navigation_with_keys": True}


def _skip_top_level_exports(app, what, name, obj, skip, options):
    """In a submodule's listing, skip what ``lightning_transfer`` itself exports: those names have their
    entry at the top-level path users import them from (``lightning_transfer.L2SP``)."""
    if what == "module" and name in lightning_transfer.__all__ and getattr(lightning_transfer, name) is obj:
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_top_level_exports)

"""Sphinx configuration for cnorm's documentation.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
    python -m sphinx -b doctest docs docs/_build/doctest

The second command runs every example of the pages and of the docstrings
they include; ``tests/test_docs.py`` runs both as part of the test suite.
"""

import doctest
import os
import sys

# autodoc imports the cnorm of this checkout (its compiled kernels included),
# not another installed copy.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import cnorm  # noqa: E402

project = "cnorm"
author = "the cnorm developers"
copyright = "the cnorm developers"  # noqa: A001 - Sphinx's name for it
version = release = cnorm.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "generated", "Thumbs.db", ".DS_Store"]
templates_path = []

# -- API pages: hand-written directives, no generated stub files ------------------
autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_default_options = {"undoc-members": False}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- Markdown (docs/architecture.md, docs/design_notes.md, the README's results) -
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# -- doctest: every example runs (sphinx -b doctest) ------------------------------
doctest_test_doctest_blocks = "default"
# Exception messages are compared too (with ``...`` where they go on).
doctest_default_flags = doctest.ELLIPSIS | doctest.DONT_ACCEPT_TRUE_FOR_1
# Each page starts from the defaults: no backend or thread count chosen by an
# earlier page's examples.
doctest_global_setup = """
import importlib.util
import cnorm
cnorm.set_backend("auto")
# for ``:skipif:`` on the examples that need an optional component
HAS_CUPY = "cupy" in cnorm.available_backends()
HAS_MPI = importlib.util.find_spec("mpi4py") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None
"""
doctest_global_cleanup = """
import cnorm
cnorm.set_backend("auto")
"""

# -- HTML ---------------------------------------------------------------------------
html_theme = "furo"
html_title = f"cnorm {release}"
html_static_path = []
pygments_style = "sphinx"

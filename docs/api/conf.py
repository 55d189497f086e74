"""Sphinx configuration of the API reference (``python -m sphinx -W -b html docs/api
OUT``; built by the test suite, tests/test_docs.py, with warnings as errors)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

project = "trajopt + nnbridge"
author = "the trajopt developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax",
              "sphinx.ext.viewcode"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
# "Attributes" sections as fields (autodoc documents the dataclass fields once)
napoleon_use_ivar = True
napoleon_custom_sections = [("Returns", "params_style")]
autodoc_default_options = {"members": True, "undoc-members": False,
                           "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_member_order = "bysource"
html_theme = "alabaster"
exclude_patterns = ["_build"]
nitpicky = False
# the shapes in the type fields, "(B, n)", are not cross-references
suppress_warnings = ["ref.python"]

"""Sphinx configuration (`make docs`). Pages are Markdown (MyST)."""
project = "tango-dectris-live"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
master_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"

"""``dmdd benchmark``: a YAML suite -> cells (one process and one JSON each) -> summary CSV and markdown tables, and
the generated blocks of the results page. See docs/benchmark.md."""

from dmdd.benchmark.runner import run_suite
from dmdd.benchmark.suite import Cell, Suite, load_suite
from dmdd.benchmark.tables import render_page

__all__ = ["Cell", "Suite", "load_suite", "render_page", "run_suite"]

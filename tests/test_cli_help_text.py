"""Every `--help` is written for the user: no reStructuredText markup from the module docstrings (double
backticks, :class:/:func: roles), which the top-level, `bench` and `perf` help used to print as their
descriptions, along with a line about how the CLI's modules register their commands."""
from __future__ import annotations

import argparse
import re

from vlmguard.cli import build_parser

MARKUP = re.compile(r"``|:(?:class|func|mod|meth|attr):")


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("vlmguard",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_no_help_shows_docstring_markup():
    seen = list(_parsers(build_parser()))
    assert len(seen) > 30  # every command and subcommand was walked
    bad = {" ".join(path): [ln for ln in p.format_help().splitlines() if MARKUP.search(ln)] for path, p in seen}
    assert not {k: v for k, v in bad.items() if v}


def test_top_level_and_bench_descriptions_speak_to_the_user():
    top = build_parser().format_help()
    assert "register" not in top and "`vlmguard COMMAND --help`" in top and "VLMGUARD_DEBUG=1" in top
    bench = dict(_parsers(build_parser()))[("vlmguard", "bench")].format_help()
    assert "Run a benchmark into the results database" in bench and "`--coco-images DIR`" in bench

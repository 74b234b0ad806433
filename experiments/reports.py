"""The common end of the research tools that report on an ``experiments.compare`` output folder."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from scripts.data.io import write_text
from scripts.data.rules import check_case_id


def run_parser(doc: str, layout: str) -> argparse.ArgumentParser:
    """The command line every such tool starts from: the run folder (laid out as ``layout``) and ``--method``;
    the description is the first paragraph of the tool's ``doc``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("run", type=Path, help=f"an experiments.compare output folder ({layout})")
    parser.add_argument("--method", default="patchgan_ranking")
    return parser


def write_run_report(run: Path, tool: str, method: str, table: Callable[[], str]) -> int:
    """Check ``method`` as a folder name (``rules.check_case_id``: the report is written inside ``run`` only), build
    the markdown ``table``, write it to ``run/<tool>_<method>.md`` and print it; the exit code: 0, or 2 with the
    error in words (a bad name, a missing or unreadable folder)."""
    try:
        check_case_id(method, "--method", "method folder")
        text = table()
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    path = run / f"{tool}_{method}.md"
    write_text(path, text)
    print(text + f"\nwritten to {path}")
    return 0

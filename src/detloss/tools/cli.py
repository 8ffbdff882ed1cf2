"""The ``detloss`` command.

Subcommands (each implemented in its own module, imported only when used):

- ``detloss explain LOSS ...``  a loss worked step by step with real numbers  (:mod:`detloss.tools.explain`)
- ``detloss assign SCHEME ...`` pictures and tables of target assignment       (:mod:`detloss.tools.viz`)
- ``detloss train ...``         train a small detector end to end (the demo)   (:mod:`detloss.tools.demo.train`)

Each module exposes ``add_arguments(parser)`` and ``run(args) -> int``; ``run`` reports bad
arguments as one line ``detloss COMMAND: error: ARGUMENT: ...`` and returns 2. A subcommand
whose optional dependencies are missing says which extra installs them (:mod:`detloss.tools.extras`).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from .extras import DEMO, MissingExtraError, require

SUBCOMMANDS = {
    "explain": ("detloss.tools.explain", "explain a loss step by step with real numbers"),
    "assign": ("detloss.tools.viz", "draw and tabulate which anchors/points a target is assigned to"),
    "train": ("detloss.tools.demo.train", "train a small detector end to end and evaluate it (COCO mAP)"),
}
# The optional modules a subcommand needs before it can start (``assign`` needs pillow only to
# draw, and checks that itself).
REQUIRES = {"train": DEMO}


def _wanted(argv: Optional[List[str]]) -> Optional[str]:
    return next((a for a in argv if not a.startswith("-")), None) if argv else None


def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detloss", description="Object-detection losses, explained and measured.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = _wanted(argv)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported (the demo pulls in plotting libraries).
        if wanted == name:
            importlib.import_module(module).add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wanted = _wanted(argv)
    try:
        require(REQUIRES.get(wanted, ()), f"detloss {wanted}")
    except MissingExtraError as exc:
        print(f"detloss {wanted}: error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

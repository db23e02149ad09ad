"""The ``calciscope`` command: parse, call the library, print. Everything here is callable from Python too.

One module per group of commands; each imports the library inside its commands, so ``calciscope --help`` starts
without torch.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from rich.markup import escape

from calciscope._version import __version__
from calciscope.cli import data_commands, demo_commands, evaluation_commands, scoring_commands, training_commands
from calciscope.cli.app import app, console, out
from calciscope.errors import CalciscopeError

__all__ = ["app", "main", "data_commands", "demo_commands", "evaluation_commands", "scoring_commands",
           "training_commands"]


@app.command()
def version():
    """Print the calciscope version."""
    out.print(__version__)


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: one clear line per error, a traceback only with --debug."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("CALCISCOPE_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name="calciscope", standalone_mode=True)
    except CalciscopeError as exc:
        if debug:
            raise
        console.print(f"[red]calciscope: error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("calciscope: interrupted")
        sys.exit(130)

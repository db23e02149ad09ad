"""What every command shares: the typer app, the two consoles (tables to stdout, messages to stderr), the progress
bar, and the option set of ``predict`` and ``score`` built from ``PredictConfig``."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from calciscope.inference.config import PredictConfig, cli_fields

app = typer.Typer(
    name="calciscope",
    help="Score H&E whole-slide images for the calciphylaxis pattern. Decision support, not a diagnosis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 120)  # tables stay whole in logs and pipes


@contextmanager
def progress_bar(description: str, per_minute: bool = False):
    """A rich progress bar with rate and ETA; yields ``update(done, total)``, which also takes ``predict``'s
    ``SlideProgress`` alone (``update(progress)``): the bar then follows the share of the slide's work done (windows,
    vessels and tiles weighted by their networks' cost) and the counts show beside it."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[count]}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=None, rate="", count="")

        def update(done, total: int | None = None) -> None:
            if total is None:  # a SlideProgress: the share of the work, and what is done
                bar.update(task, completed=1000 * done.fraction, total=1000, count=done.describe(), rate="")
                return
            elapsed = bar.tasks[task].elapsed or 0.0
            if elapsed <= 0:
                rate = ""
            else:
                rate = f"{60 * done / elapsed:.1f}/min" if per_minute else f"{done / elapsed:.0f}/s"
            bar.update(task, completed=done, total=total, rate=rate, count=f"{done}/{total}")

        yield update


def predict_options(exclude: tuple[str, ...] = ()):
    """Give a command one option per ``PredictConfig`` field (flag, help and default are written once, in the
    dataclass) plus ``--config predict.yaml``; the command receives the resolved ``config``: the YAML's settings,
    then the options given on the command line."""

    def decorate(command):
        shared = cli_fields(exclude)
        hints = typing.get_type_hints(PredictConfig)
        params = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "config"]
        for f in shared:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            if _without_none(hints[f.name]) is bool:
                flag = f"{flag}/--no-{flag[2:]}"
            option = typer.Option(None, flag, help=f.metadata["help"],
                                  show_default=str(default) if default is not None else False)
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                            annotation=Optional[_without_none(hints[f.name])], default=option))
        params.append(inspect.Parameter("predict_config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                        default=typer.Option(None, "--config", help="Settings file (YAML) with "
                                                             "PredictConfig keys; options given here win.")))

        @functools.wraps(command)
        def wrapper(**kwargs):
            given = {f.name: kwargs.pop(f.name) for f in shared}
            given = {k: v for k, v in given.items() if v is not None}
            path = kwargs.pop("predict_config")
            config = PredictConfig.from_yaml(path, given) if path is not None else PredictConfig(**given)
            return command(config=config, **kwargs)

        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {}
        return wrapper

    return decorate


def _without_none(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint



"""Errors a user can act on: each message names the file (or setting) and the reason in one line."""

from __future__ import annotations

from pathlib import Path


class CalciscopeError(Exception):
    """An error the CLI prints as one line (no traceback unless --debug)."""


class SlideError(CalciscopeError):
    """A slide cannot be used: the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class AnnotationError(CalciscopeError):
    """An annotation file cannot be used: the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class CheckpointError(CalciscopeError):
    """A model checkpoint cannot be used: the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

"""The one wrapper every command-line entry point uses: quiet model loading, user mistakes as one line."""

from __future__ import annotations

import re
import sys
from typing import Callable

from .errors import InstaFlowError


def description(doc: str | None) -> str:
    """A command's ``--help`` description: the first paragraph of its module docstring, on one line, without its
    reStructuredText markup (``:mod:`x``` and ````x```` read as ``x``)."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")


def run_cli(job: Callable[[], object], user_errors: tuple[type[BaseException], ...] = (InstaFlowError,)) -> int:
    """Run ``job``; an error the user caused prints ``error: <one line>`` to stderr and gives exit status 2."""
    from .models import quiet_loading

    quiet_loading()
    try:
        job()
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0

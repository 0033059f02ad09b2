"""The click that typer runs on: typer >= 0.2x carries its own copy, older ones use the click package."""

from __future__ import annotations

try:
    from typer._click import ClickException, echo
    from typer._click import exceptions as click_errors
    from typer._click.globals import get_current_context
    from typer._click.utils import make_default_short_help
except ImportError:
    from click import ClickException, echo, get_current_context
    from click import exceptions as click_errors
    from click.utils import make_default_short_help

__all__ = ["ClickException", "click_errors", "echo", "get_current_context", "make_default_short_help"]

"""The server-side subcommands (serve, worker, keys); kept apart so `generate` never imports the web stack."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_server_commands(sub: argparse._SubParsersAction, model_flags: Callable, settings_of: Callable) -> None:
    """Registered by the server issue; nothing yet."""

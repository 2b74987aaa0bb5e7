"""``spectranet train`` and ``spectranet evaluate``: registered on the main command by ``streamer.cli``."""

from __future__ import annotations

import argparse

__all__ = ["add_subcommands"]


def add_subcommands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the training subcommands to the ``spectranet`` parser (imports stay lazy: the daemon never loads them)."""

"""Tandem's version, as the installed package's metadata says (stdlib only: `tandem --version` stays fast)."""

from __future__ import annotations

import importlib.metadata

UNKNOWN_VERSION = "0+unknown"


def tandem_version() -> str:
    """The installed ``tandem`` distribution's version; ``UNKNOWN_VERSION`` when the tree runs uninstalled."""
    try:
        return importlib.metadata.version("tandem")
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN_VERSION

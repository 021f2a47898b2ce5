"""The pdserve version, read from the installed package metadata when there is one."""

from __future__ import annotations

from importlib import metadata

try:
    VERSION = metadata.version("pdserve")
except metadata.PackageNotFoundError:  # running from a plain checkout
    VERSION = "0.0.0+local"

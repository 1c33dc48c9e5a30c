"""Shared by the packaging tests: pip arguments for building a wheel offline."""

from __future__ import annotations

from importlib import metadata

from packaging.version import Version


def build_args() -> list[str]:
    """Build offline from this venv's setuptools when it can make wheels by itself (>= 70.1
    ships ``bdist_wheel``); an older bundled setuptools cannot, so then pip builds in an
    isolated environment from the configured package index."""
    try:
        version = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        return []
    offline = Version(version) >= Version("70.1")
    return ["--no-build-isolation", "--no-index"] if offline else []

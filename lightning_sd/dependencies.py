"""The versions this package is tested with, and errors that name a version problem as one.

``requirements/lock.txt`` pins every package; the few below are the ones whose combination
has broken before (transformers 5.24 refuses peft < 0.22 in its PEFT integration, and no such
peft was published), so an error that smells of versions names them. ``tests/test_dependencies``
keeps this table equal to the lock.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["TESTED_VERSIONS", "installed_versions", "versions_hint"]

TESTED_VERSIONS: dict[str, str] = {
    "torch": "2.14.1",
    "lightning": "2.6.6",
    "diffusers": "0.42.1",
    "transformers": "5.23.0",
    "peft": "0.21.2",
}


def installed_versions(packages=TESTED_VERSIONS) -> dict[str, str]:
    """The installed version of each package (``"not installed"`` when missing)."""
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def versions_hint() -> str:
    """One sentence: installed vs tested versions, and how to install the tested set."""
    installed = installed_versions()
    pairs = ", ".join(
        f"{name} {have}"
        + ("" if have == TESTED_VERSIONS[name] else f" (tested: {TESTED_VERSIONS[name]})")
        for name, have in installed.items()
    )
    return (
        f"installed: {pairs}. Install the tested versions with `make install` or "
        "`pip install -c requirements/lock.txt -e .`"
    )

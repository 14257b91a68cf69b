"""After `make test-latest` fails: which installed packages differ from the lock.

Prints one line per package whose installed version is not the locked one, the packages
setup.cfg names directly first (the usual suspects), so an upstream break is named the day it
lands. Usage: python tools/lock_drift.py requirements/lock.txt
"""

from __future__ import annotations

import configparser
import re
import sys
from importlib import metadata
from pathlib import Path


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if match:
            pins[canonical(match[1])] = match[2]
    return pins


def direct_requirements(setup_cfg: Path) -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    lines = cfg["options"]["install_requires"].splitlines()
    lines += [x for v in cfg["options.extras_require"].values() for x in v.splitlines()]
    names = (re.match(r"^\s*([A-Za-z0-9_.\-]+)", x) for x in lines if x.strip())
    return {canonical(m[1]) for m in names if m and not m[1].startswith("#")}


def main(lock: str = "requirements/lock.txt") -> int:
    pins = locked_versions(Path(lock))
    direct = direct_requirements(Path(lock).parent.parent / "setup.cfg")
    drift = []
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if name in pins and pins[name] != dist.version:
            drift.append((name not in direct, name, pins[name], dist.version))
    if not drift:
        print("every installed package has its locked version: the failure is not upstream drift")
        return 0
    print("installed versions that differ from the lock (direct dependencies first):")
    for indirect, name, locked, installed in sorted(drift):
        print(f"  {name:32s} lock {locked:14s} now {installed}{'' if indirect else '   <- direct'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

"""Print the TRL releases this package supports, oldest first, one per line: every final release the package
registry serves that the ``trl`` requirement of pyproject.toml allows (asked with ``pip index versions trl``), or,
when the registry cannot be asked, the releases known when this list was last written. scripts/test.sh tests each."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

KNOWN = ["1.12.0", "1.13.0", "1.14.0", "1.14.1", "1.14.2", "1.16.0"]


def release(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def allowed(version: str, requirement: str) -> bool:
    """``version`` satisfies the comma-separated ``>=``, ``<`` and ``!=`` clauses of ``requirement``."""
    for clause in requirement.split(","):
        operator, bound = re.fullmatch(r"\s*(>=|<|!=)\s*([\d.]+)\s*", clause).groups()
        if not {">=": release(version) >= release(bound), "<": release(version) < release(bound), "!=": version != bound}[operator]:
            return False
    return True


def main() -> None:
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    requirement = re.search(r'"trl([<>=!][^"]*)"', pyproject).group(1)  # the dependency, not the project's name
    try:
        answer = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "trl", "--disable-pip-version-check"],
                                capture_output=True, text=True, timeout=120, check=True).stdout
        served = re.search(r"Available versions: (.*)", answer).group(1).split(", ")
    except (subprocess.SubprocessError, AttributeError, OSError):
        served = KNOWN
    finals = [version for version in served if re.fullmatch(r"\d+\.\d+\.\d+", version)]
    print("\n".join(sorted((v for v in finals if allowed(v, requirement)), key=release)))


if __name__ == "__main__":
    main()

"""The wheels one device call must carry for ``gpu_check.py``, and the check of them where they land.

    .venv/bin/python benchmarks/gpu_wheels.py           # here: download into .whl/ exactly what the device lacks
    python3 benchmarks/gpu_wheels.py --verify           # there (gpu_check.py runs it): installed versions vs requirements

Download: starting from ``ROOTS`` (TRL 1.16.0 and the datasets release CI uses), every requirement of every wheel
(markers evaluated for CPython 3.12 on x86-64 Linux, extras dropped) is looked up in ``device_packages.txt``, the
device image's package list. A package the device lacks, or has at a version outside the requirement, is
downloaded (``pip download --no-deps`` for Python 3.12 and the manylinux tags the device takes) and its own
requirements followed; one the device lists without a version is taken as present and reported as unverified.
``.whl/`` is left holding exactly those wheels, one version of each (older downloads removed), and the working tree
that travels (tracked and untracked-not-ignored files) plus the wheels must stay within the 64 MiB a call carries.
The last line printed is the ``carry`` list of the device call, as JSON.

Verify: each carried wheel must be the installed version, and for its requirements and the package's own
(``pyproject.toml``) the installed version of the running interpreter must satisfy the specifier; prints each package
and version, exits 1 on any mismatch. ``--dest`` names the wheels that were installed (an empty or missing folder
checks the package's requirements only).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL_DIR = ".whl"
ROOTS = ("trl==1.16.0", "datasets==5.2.0")
"""TRL as the issue names it; datasets as CI's ``.venv`` runs it (5.2.0 also ran on the device image before)."""
DEVICE_PACKAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "device_packages.txt")
CARRY_LIMIT_BYTES = 64 * 2**20
TARGET = {  # the device's interpreter, for requirement markers
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "os_name": "posix", "extra": "",
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def read_device_packages(path: str = DEVICE_PACKAGES) -> dict[str, Version | None]:
    """``{canonical name: version or None}`` from lines ``NAME==VERSION`` or ``NAME`` (``#`` comments)."""
    packages = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                packages[canonicalize_name(name)] = Version(version) if version else None
    return packages


def wheel_requirements(path: str, environment: dict | None = None) -> list[Requirement]:
    """The ``Requires-Dist`` of a wheel whose marker holds in ``environment`` (None: the running interpreter's),
    extras excluded."""
    with zipfile.ZipFile(path) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = wheel.read(name).decode()
    lines = [line.split(":", 1)[1].strip() for line in text.split("\n\n", 1)[0].splitlines() if line.startswith("Requires-Dist:")]
    return [r for r in map(Requirement, lines) if applies(r, environment)]


def applies(requirement: Requirement, environment: dict | None) -> bool:
    return requirement.marker is None or Marker(str(requirement.marker)).evaluate(environment)


def wheel_version(path: str) -> tuple[str, Version]:
    name, version, _, _ = parse_wheel_filename(os.path.basename(path))
    return canonicalize_name(name), version


def resolve(roots, device: dict[str, Version | None], fetch) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Wheels the device lacks, following requirements from ``roots``: returns ({name: wheel path}, {name present
    on the device at an unknown version: the specifiers asked of it}). ``fetch(requirement)`` returns the path of a
    wheel that satisfies it. ValueError when two requirements of one carried package cannot both hold."""
    queue = [Requirement(r) for r in roots]
    pinned = {canonicalize_name(r.name) for r in queue}  # carried whatever the device holds
    chosen: dict[str, str] = {}
    unverified: dict[str, list[str]] = {}
    while queue:
        requirement = queue.pop(0)
        if not applies(requirement, TARGET):
            continue
        name = canonicalize_name(requirement.name)
        if name in chosen:
            version = wheel_version(chosen[name])[1]
            if not requirement.specifier.contains(version, prereleases=True):
                raise ValueError(f"{name} {version} (carried) does not satisfy {requirement}: two versions would be needed")
            continue
        if name in device and name not in pinned:
            known = device[name]
            if known is None:
                unverified.setdefault(name, []).append(str(requirement.specifier) or "any")
                continue
            if requirement.specifier.contains(known, prereleases=True):
                continue
        path = fetch(requirement)
        fetched_name, version = wheel_version(path)
        if fetched_name != name or not requirement.specifier.contains(version, prereleases=True):
            raise ValueError(f"fetched {os.path.basename(path)} for {requirement}")
        chosen[name] = path
        queue.extend(wheel_requirements(path, TARGET))
    return chosen, unverified


def pip_fetch(dest: str):
    """``fetch`` for ``resolve``: ``pip download --no-deps`` of one requirement for the device's interpreter."""

    def fetch(requirement: Requirement) -> str:
        spec = f"{requirement.name}{requirement.specifier}"
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
                        TARGET["python_version"], "--implementation", "cp", *platforms, "-d", dest, spec], check=True)
        name = canonicalize_name(requirement.name)
        candidates = [p for p in glob.glob(os.path.join(dest, "*.whl")) if wheel_version(p)[0] == name
                      and requirement.specifier.contains(wheel_version(p)[1], prereleases=True)]
        return max(candidates, key=lambda p: wheel_version(p)[1])

    return fetch


def tree_bytes(repo: str = REPO) -> int:
    """Bytes of what a device call sends besides ``carry``: tracked and untracked-not-ignored files."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo, check=True,
                             capture_output=True).stdout.decode()
    return sum(os.path.getsize(os.path.join(repo, p)) for p in listing.split("\0") if p and os.path.isfile(os.path.join(repo, p)))


def check_size(tree: int, wheels: list[str], limit: int = CARRY_LIMIT_BYTES) -> int:
    """Total bytes of the tree and the wheels; ValueError above ``limit``."""
    total = tree + sum(os.path.getsize(p) for p in wheels)
    if total > limit:
        raise ValueError(f"working tree {tree / 2**20:.1f} MiB + wheels {(total - tree) / 2**20:.1f} MiB = {total / 2**20:.1f} MiB "
                         f"exceeds the {limit / 2**20:.0f} MiB one device call carries")
    return total


def download(dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    chosen, unverified = resolve(ROOTS, read_device_packages(), pip_fetch(dest))
    for path in glob.glob(os.path.join(dest, "*")):
        if path not in chosen.values():  # an older download or a wheel the device does not need
            os.remove(path)
    wheels = sorted(chosen.values())
    names = [wheel_version(p)[0] for p in wheels]
    if len(set(names)) != len(names):
        raise ValueError(f"two versions of one package in {dest}: {wheels}")
    tree = tree_bytes()
    total = check_size(tree, wheels)
    for path in wheels:
        print(f"carry {os.path.basename(path):56s} {os.path.getsize(path) / 2**20:6.2f} MiB")
    for name, specifiers in sorted(unverified.items()):
        print(f"on the device, version not listed (checked there by --verify): {name} {', '.join(sorted(set(specifiers)))}")
    print(f"working tree {tree / 2**20:.2f} MiB + {len(wheels)} wheels = {total / 2**20:.2f} MiB of {CARRY_LIMIT_BYTES / 2**20:.0f} MiB")
    print(json.dumps([os.path.relpath(dest, REPO)]))


def project_requirements() -> list[Requirement]:
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]


def verify(dest: str) -> int:
    """Print each requirement of the carried wheels and of the package with the installed version; 1 on a mismatch."""
    wheels = sorted(glob.glob(os.path.join(dest, "*.whl")))
    wanted = [(os.path.basename(p), Requirement("{}=={}".format(*wheel_version(p)))) for p in wheels]  # the carried one is the one imported
    wanted += [(os.path.basename(p), r) for p in wheels for r in wheel_requirements(p)]
    wanted += [("pyproject.toml", r) for r in project_requirements() if applies(r, None)]
    failures = 0
    for source, requirement in wanted:
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            installed = None
        ok = installed is not None and requirement.specifier.contains(Version(installed), prereleases=True)
        failures += not ok
        print(f"{'ok' if ok else 'MISMATCH':8s} {str(requirement):40s} installed {installed or 'nothing':14s} (from {source})")
    print(f"verify: {len(wanted)} requirements, {failures} not met, Python {sys.version.split()[0]}")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--verify", action="store_true", help="check the installed versions against the carried wheels")
    parser.add_argument("--dest", default=os.path.join(REPO, WHEEL_DIR))
    args = parser.parse_args()
    if args.verify:
        sys.exit(verify(args.dest))
    download(args.dest)


if __name__ == "__main__":
    main()

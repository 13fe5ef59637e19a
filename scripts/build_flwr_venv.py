#!/usr/bin/env python3
"""Build (once) a virtual environment with another flwr release for fedmeta, e.g. flwr 1.39 (gRPC).

    .venv/bin/python scripts/build_flwr_venv.py                 # build/flwr139 with flwr==1.39.0
    .venv/bin/python scripts/build_flwr_venv.py --flwr 1.40.0 --dest build/flwr140

Run it with the project's main interpreter (``.venv/bin/python``, which has torch). The new venv
gets flwr and *its own* dependencies (grpcio, protobuf, ...), fedmeta installed editable with
``--no-deps``, and a ``.pth`` file that appends the main venv's site-packages *after* its own: torch,
torchvision, numpy and matplotlib come from the main venv (no 6 GB copy), while the pinned flwr and
its dependencies win because they come first on ``sys.path``.

Idempotent and cached: a stamp file records what was built (flwr version, interpreter, main
site-packages, this script's version); a matching stamp means nothing to do (well under a second).
A missing or different stamp (also after a change of fedmeta's package layout in pyproject.toml,
which the editable install depends on) rebuilds from scratch. A file lock makes concurrent callers wait
instead of building twice. Prints the venv's directory on stdout.

:func:`build_peer` builds the same kind of venv for another project's package without fedmeta (the
pfl-research venv of ``bench/bench_peers.py``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BUILDER_VERSION = 1
"""Bump to force a rebuild of every cached venv after changing how it is built."""
STAMP = ".fedmeta-stamp.json"
PTH = "zz-fedmeta-main-venv.pth"


def default_dest(flwr: str) -> Path:
    major, minor = flwr.split(".")[:2]
    return ROOT / "build" / f"flwr{major}{minor}"


def main_site_packages() -> list[str]:
    """The running (main) interpreter's site-packages directories, purelib first."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def project_layout() -> dict:
    """What fedmeta's editable install depends on: name, version and the package mapping."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta.get("project", {})
    return {"name": project.get("name"), "version": project.get("version"), "setuptools": meta.get("tool", {}).get("setuptools")}


def stamp_key(flwr: str) -> dict:
    return {
        "builder": BUILDER_VERSION,
        "flwr": flwr,
        "python": sys.version.split()[0],
        "base_executable": getattr(sys, "_base_executable", sys.executable),
        "main_site_packages": main_site_packages(),
        "project": str(ROOT),
        "layout": project_layout(),
    }


# Inherited from a caller (a test process, an activated venv), these would make pip and the new
# interpreter see the main venv's packages -- flwr 1.41 among them -- ahead of the venv's own.
_ISOLATING_VARS = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PIP_TARGET", "PIP_PREFIX", "PIP_USER")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _ISOLATING_VARS}


def _run(cmd: list[str], log) -> None:
    print("+", " ".join(cmd), file=log, flush=True)
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=_clean_env())


def _venv_site_packages(dest: Path) -> Path:
    out = subprocess.run(
        [str(dest / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, env=_clean_env(),
    )
    return Path(out.stdout.strip())


def _build(dest: Path, key: dict, install: Callable[[list[str], Path], None], verify_code: str, *, force: bool,
           log) -> Path:
    """Build the venv at ``dest`` (``install(pip, dest)`` fills it) unless its stamp matches ``key``; return ``dest``."""
    if Path(sys.prefix).resolve() == dest.resolve():
        raise SystemExit(f"run this with the main venv's python, not {sys.executable}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stamp = dest / STAMP
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and stamp.is_file():
            try:
                if json.loads(stamp.read_text()) == key:
                    print(f"{dest}: cached", file=log)
                    return dest
            except ValueError:
                pass
        t0 = time.perf_counter()
        print(f"{dest}: building", file=log, flush=True)
        shutil.rmtree(dest, ignore_errors=True)
        # --without-pip: the main venv's pip installs into it (`pip --python`), which saves ensurepip.
        _run([sys.executable, "-m", "venv", "--without-pip", str(dest)], log)
        pip = [sys.executable, "-m", "pip", "--python", str(dest / "bin" / "python"), "install", "-q",
               "--disable-pip-version-check"]
        install(pip, dest)
        subprocess.run([str(dest / "bin" / "python"), "-c", verify_code], check=True, cwd="/", env=_clean_env())
        stamp.write_text(json.dumps(key, indent=1))
        print(f"{dest}: built in {time.perf_counter() - t0:.1f} s", file=log)
    return dest


def _share_main_venv(dest: Path, key: dict) -> None:
    # Lines of a .pth are appended to sys.path after the venv's own site-packages.
    (_venv_site_packages(dest) / PTH).write_text("".join(p + "\n" for p in key["main_site_packages"]))


def build(flwr: str, dest: Path, *, force: bool = False, log=sys.stderr) -> Path:
    """Build the flwr venv at ``dest`` unless its stamp matches; return ``dest``."""
    key = stamp_key(flwr)

    def install(pip: list[str], venv: Path) -> None:
        _run([*pip, f"flwr=={flwr}"], log)
        _run([*pip, "--no-deps", "-e", str(ROOT)], log)
        _share_main_venv(venv, key)  # after the install: flwr's own dependencies go into the venv

    code = (
        "import flwr, torch, numpy, fedmeta, importlib.metadata as md\n"
        "from fedmeta.simulations.apps import server_app, client_app\n"
        f"assert flwr.__version__ == {flwr!r}, flwr.__version__\n"
        f"assert md.version('flwr') == {flwr!r}, md.version('flwr')\n"
        "import grpc, google.protobuf\n"
        "print(flwr.__version__, torch.__version__, grpc.__file__)\n"
    )
    return _build(dest, key, install, code, force=force, log=log)


def build_peer(requirement: str, dest: Path, *, verify: str, force: bool = False, log=sys.stderr) -> Path:
    """A venv for another project's package (``requirement``, e.g. ``pfl[pytorch]==0.6.0``) without fedmeta.

    The main venv's site-packages are shared *before* the install, so that pip finds torch (and
    whatever else the main venv has that satisfies the requirement) there instead of downloading a
    second copy; packages whose versions the requirement excludes are installed into the venv, which
    comes first on ``sys.path``. ``verify`` is Python code run by the new interpreter."""
    key = {**stamp_key("none"), "flwr": None, "requirement": requirement}

    def install(pip: list[str], venv: Path) -> None:
        _share_main_venv(venv, key)
        _run([*pip, requirement], log)

    return _build(dest, key, install, verify, force=force, log=log)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flwr", default="1.39.0", help="flwr release to install (default 1.39.0)")
    ap.add_argument("--dest", type=Path, help="venv directory (default build/flwr<major><minor>)")
    ap.add_argument("--force", action="store_true", help="rebuild even when the stamp matches")
    args = ap.parse_args(argv)
    dest = (args.dest or default_dest(args.flwr)).absolute()
    print(build(args.flwr, dest, force=args.force))


if __name__ == "__main__":
    main()

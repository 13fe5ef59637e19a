"""Make the default data set (Fashion-MNIST) available: the set-up step of `make run` and `make test`.

In order, stopping at the first that works:

1. the data is already there (``FEDMETA_DATA``, the cache ``~/.cache/fedmeta``, or the system
   package's ``/usr/share/datasets/fashion-mnist``): nothing to do;
2. ``apt-get`` is present and we are root (or ``sudo -n`` works): install the Debian package
   ``dataset-fashion-mnist`` (running ``apt-get update`` first if the package is not found);
3. torchvision's download into the cache (needs internet; 30 s network timeout);
4. otherwise: one message saying exactly what to run, exit status 2 (``--optional``: 0, so that
   ``make test`` still runs the suite; the tests that need Fashion-MNIST then fail, the data-loading
   ones skip outside ``CI=true``).

Pass the experiment's flags (``make run ARGS=...``): with ``--dataset`` other than fashion-mnist
nothing is provisioned, and ``--data-dir`` / ``--download`` are honoured as ``fedmeta-sim`` would.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile

from fedmeta import data as D

PROG = "provision-data"


def _found(root: str | None) -> str | None:
    try:
        return str(D.locate_dataset("fashion-mnist", root))
    except FileNotFoundError:
        return None


def _apt_prefix() -> list[str] | None:
    """How to run apt-get here (as root, or through password-less sudo), or ``None``."""
    if shutil.which("apt-get") is None:
        return None
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def _apt_install(prefix: list[str]) -> tuple[bool, str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, "apt-get", "install", "-y", "-q", D.FASHION_MNIST_PACKAGE]
    with tempfile.TemporaryFile("w+") as out:
        ok = subprocess.run(install, stdout=out, stderr=subprocess.STDOUT, env=env).returncode == 0
        if not ok:  # an empty or stale package list: refresh it once
            subprocess.run([*prefix, "apt-get", "update", "-q"], stdout=out, stderr=subprocess.STDOUT, env=env)
            ok = subprocess.run(install, stdout=out, stderr=subprocess.STDOUT, env=env).returncode == 0
        out.seek(0)
        return ok, out.read()[-2000:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optional", action="store_true", help="exit 0 when the data cannot be provided (make test)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default="")
    p.add_argument("--download", default="false")
    args, _ = p.parse_known_args(argv)  # the rest are fedmeta-sim's flags
    if args.dataset != "fashion-mnist":
        return 0
    root = args.data_dir or None
    if where := _found(root):
        print(f"{PROG}: Fashion-MNIST found ({where})")
        return 0
    tried = []
    prefix = _apt_prefix()
    if prefix is not None:
        print(f"{PROG}: Fashion-MNIST not found; installing the Debian package {D.FASHION_MNIST_PACKAGE} "
              f"({' '.join([*prefix, 'apt-get'])}) ...", flush=True)
        ok, output = _apt_install(prefix)
        if ok and (where := _found(root)):
            print(f"{PROG}: Fashion-MNIST installed ({D.system_fashion_mnist_dir()}, used from {where})")
            return 0
        tried.append(f"apt-get install {D.FASHION_MNIST_PACKAGE} failed ({' '.join(output.split()[-12:])})")
    else:
        tried.append("apt-get is not available to this user")
    print(f"{PROG}: trying torchvision's download (needs internet) ...", flush=True)
    socket.setdefaulttimeout(30)
    try:
        where = str(D.locate_dataset("fashion-mnist", root, download=True))
        print(f"{PROG}: Fashion-MNIST downloaded ({where})")
        return 0
    except Exception as err:  # no internet, a proxy, a mirror down: all end here
        tried.append(f"the download failed ({' '.join(str(err).split())[:160]})")
    print(f"{PROG}: error: Fashion-MNIST is not available and could not be provided: {'; '.join(tried)}. "
          f"Run `sudo apt-get install {D.FASHION_MNIST_PACKAGE}` (Debian/Ubuntu), or put the four IDX files "
          f"(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) "
          f"in a directory and `export FEDMETA_DATA=<that directory>`, then run the command again.", file=sys.stderr)
    return 0 if args.optional else 2


if __name__ == "__main__":
    sys.exit(main())

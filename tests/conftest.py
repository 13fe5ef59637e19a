import os
import subprocess
import sys
from pathlib import Path

import pytest

# Quieter Ray in the simulation tests; set before Ray is imported.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def flwr139_bin() -> Path:
    """``bin/`` of the flwr 1.39 (gRPC) venv, built by scripts/build_flwr_venv.py when missing.

    Cached in build/flwr139 (a stamp file; about 20 s from scratch, instant when cached). A failed
    build is an error, never a skip.
    """
    proc = subprocess.run(
        [sys.executable, str(_ROOT / "scripts" / "build_flwr_venv.py"), "--flwr", "1.39.0",
         "--dest", str(_ROOT / "build" / "flwr139")],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"building build/flwr139 failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return Path(proc.stdout.strip().splitlines()[-1]) / "bin"

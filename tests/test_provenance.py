"""Issue 22: every results file says which code, libraries, machine, settings and command produced it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch

from fakes import check_provenance
from fedmeta import provenance as P

ROOT = Path(__file__).resolve().parents[1]


def test_the_block_has_every_key_and_the_times_of_the_run():
    started = time.time() - 5
    block = P.provenance({"seed": 3, "path": Path("/x")}, started=started, argv=["fedmeta-sim", "--seed", "3"])
    check_provenance(block, {"seed": 3, "path": "/x"})
    assert block["command"] == "fedmeta-sim --seed 3" and 5 <= block["wall_seconds"] < 60
    assert block["torch_threads"] == torch.get_num_threads()


def test_a_copy_without_git_records_why(tmp_path):
    assert P.git_state(tmp_path) == {"commit": None, "dirty": None, "why": f"{tmp_path} is not a git checkout"}


@pytest.mark.subprocess  # runs git
def test_the_commit_and_dirtiness_are_the_checkouts():
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                            check=True).stdout
    assert P.git_state() == {"commit": head, "dirty": bool(status.strip())}


@pytest.mark.subprocess  # runs git
def test_the_block_names_the_commit_the_process_started_with_not_a_later_one(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args], capture_output=True,
                              text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "f").write_text("1")
    git("add", "f")
    git("commit", "-qm", "one")
    first = git("rev-parse", "HEAD")
    assert P.provenance({}, started=time.time(), root=tmp_path)["git"] == {"commit": first, "dirty": False}
    (tmp_path / "f").write_text("2")  # the checkout moves on while the run goes (a git pull, an edit)
    git("commit", "-qam", "two")
    assert P.git_state(tmp_path)["commit"] != first
    assert P.provenance({}, started=time.time(), root=tmp_path)["git"] == {"commit": first, "dirty": False}


def test_describe_names_the_commit_tree_state_date_versions_and_machine():
    block = {"git": {"commit": "417da75c0ffee", "dirty": False}, "versions": {"fedmeta": "0.1.0", "torch": "2.14.1", "flwr": "1.42.0",
             "ray": "2.55.1", "numpy": "2.3.0"}, "python": "3.11.7", "cpu": {"model": "AMD EPYC", "cores": 2}, "gpus": [],
             "started": "2026-12-04T19:55:00+00:00"}
    assert P.describe(block) == ("commit 417da75 (clean tree), 2026-12-04; fedmeta 0.1.0, torch 2.14.1, flwr 1.42.0, ray 2.55.1; "
                                 "Python 3.11.7; AMD EPYC, 2 cores, no GPU")
    dirty = {**block, "git": {"commit": "abcdef0123", "dirty": True}, "gpus": ["NVIDIA A100"]}
    assert P.describe(dirty).startswith("commit abcdef0 (uncommitted changes), ") and P.describe(dirty).endswith("2 cores, GPU NVIDIA A100")
    unknown = P.describe({**block, "git": {"commit": None, "dirty": None, "why": "/x is not a git checkout"}})
    assert unknown.startswith("commit unknown (/x is not a git checkout), 2026-12-04; ")

"""`make demo` as commands (make -n, nothing runs): which models it trains, reconstructs and evaluates, with and
without committed weights at pretrained/demo_drpose and pretrained/demo_ceiling."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def demo_commands(folder: Path, *variables: str) -> list[str]:
    """The commands `make demo` would run in `folder` (a copy of the Makefile beside a pretrained/ folder)."""
    proc = subprocess.run(["make", "-n", "--no-print-directory", "demo", "PYTHON=python", "RUN=runs/x", *variables],
                          cwd=folder, capture_output=True, text=True, check=True)
    return [line for line in proc.stdout.replace("\\\n", " ").splitlines() if ".py" in line]


def one(commands: list[str], pattern: str) -> str:
    found = [c for c in commands if re.search(pattern, c)]
    assert len(found) == 1, (pattern, found)
    return found[0]


@pytest.fixture
def checkout(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copytree(ROOT / "pretrained" / "demo_base", tmp_path / "pretrained" / "demo_base")
    return tmp_path


def commit(checkout: Path, name: str) -> None:
    """A committed model folder: a copy of the base, as a GPU-trained one would be laid out."""
    shutil.copytree(checkout / "pretrained" / "demo_base", checkout / "pretrained" / name)


def test_without_committed_weights_the_live_models_fill_every_row(checkout):
    commands = demo_commands(checkout)
    assert one(commands, r"finetune\.py").endswith("--steps 20 --eval-every 10 --log-every 2")
    assert "--steps 20 --batch-size 4" in one(commands, r"pretrain\.py .*--out runs/x/ceiling")  # the same budget
    assert one(commands, r"reconstruct\.py .*--tag ceiling").split("--model ")[1].startswith("runs/x/ceiling ")
    assert one(commands, r"evaluate\.py").endswith("--models base drpose ceiling")
    assert not any("committed" in c for c in commands)
    assert commands[-1] == one(commands, r"evaluate\.py")  # the evaluation runs last


def test_a_committed_drpose_is_reconstructed_and_evaluated_beside_the_live_run(checkout):
    commit(checkout, "demo_drpose")
    commands = demo_commands(checkout)
    assert "--model pretrained/demo_drpose --tag committed_drpose" in one(commands, r"reconstruct\.py .*committed")
    assert one(commands, r"evaluate\.py").endswith("--models base drpose ceiling committed_drpose")
    one(commands, r"finetune\.py")  # the live run still shows the loop running
    one(commands, r"pretrain\.py .*--out runs/x/ceiling")  # no committed ceiling: the live one is the yardstick


def test_a_committed_ceiling_is_the_yardstick_and_none_is_trained(checkout):
    commit(checkout, "demo_ceiling")
    commands = demo_commands(checkout)
    assert "--model pretrained/demo_ceiling --tag ceiling" in one(commands, r"reconstruct\.py .*--tag ceiling")
    assert not any("--out runs/x/ceiling" in c for c in commands)
    assert one(commands, r"evaluate\.py").endswith("--models base drpose ceiling")


def test_from_scratch_ignores_committed_weights_and_full_recon_fits_every_subject(checkout):
    commit(checkout, "demo_drpose")
    commit(checkout, "demo_ceiling")
    commands = demo_commands(checkout, "FROM_SCRATCH=1")
    assert not any("committed" in c or "pretrained/" in c for c in commands)
    recon = [c for c in demo_commands(checkout, "FULL_RECON=1") if "reconstruct.py" in c]
    assert len(recon) == 4 and all(" --fit-every 1 " in c for c in recon)  # base, drpose and both committed
    assert not any("--fit-every" in c for c in commands)

"""What a wheel holds (`pip install .`, or from an index: not the editable checkout the
README installs): every module and every file the runtime reads, the presets too."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("offload", "retrieval", "storage", "cli")


def test_a_wheel_holds_every_module_and_the_presets(tmp_path):
    """Before, the presets lay outside the package: `-c rtx4090-llama3.1-8b` after a
    `pip install .` was "config file not found"."""
    src = tmp_path / "src"  # (a copy: a build writes build/ and egg-info where it runs)
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("offload-*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    files = {p.relative_to(src).as_posix() for name in PACKAGES for p in (src / name).rglob("*.*")}
    assert {"offload/configs/cpu-smollm2.toml", "offload/configs/rtx4090-llama3.1-8b.toml"} <= files
    assert sorted(files - held) == []

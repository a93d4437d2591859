"""The wheel ships kernels/ and launch/ inside the distcomp namespace, never as top-level packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and imports it in fresh interpreters

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_kernels_and_launch_under_distcomp(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True,
        timeout=240,
    )
    (wheel,) = tmp_path.glob("distcomp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "distcomp/kernels/__init__.py" in names
    assert "distcomp/kernels/sign.py" in names
    assert "distcomp/launch/__init__.py" in names
    assert "distcomp/compressors/powersgd.py" in names
    assert "distcomp/bench/worker.py" in names and "distcomp/bench/reference.json" in names
    assert not [n for n in names if n.startswith(("kernels/", "launch/"))], "generic top-level names must not ship"


def test_installed_package_imports_outside_the_repository(tmp_path: Path) -> None:
    code = "import distcomp, distcomp.kernels, distcomp.launch; print(distcomp.kernels.pack_signs.__module__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "distcomp.kernels.sign"


def test_import_distcomp_gives_its_subpackages_as_import_torch_does() -> None:
    code = "import distcomp; print(distcomp.optim.OneBitAdam.__name__, distcomp.fsdp.register.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["OneBitAdam", "register"]

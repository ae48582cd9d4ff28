"""The SDK installs alone: `pip install ./sdk/python` into a fresh virtualenv (no server
packages) gives an importable, typed `aorkestra` whose stubs need nothing from generated/."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SDK = ROOT / "sdk" / "python"
INSTALL_TIMEOUT_S = 300  # bounded: pip's cache makes it seconds when warm

CHECK = """
import importlib.util, sys
import aorkestra
from aorkestra import AsyncClient, Client, events, errors
from aorkestra._proto.orchestrator.v1 import chat_pb2
for server_package in ("server", "handlers", "domain", "registry", "orchestrator", "redis"):
    assert importlib.util.find_spec(server_package) is None, server_package
assert chat_pb2.ChatEvent.__module__.startswith("aorkestra."), chat_pb2.ChatEvent.__module__
files = importlib.resources.files("aorkestra")
assert (files / "py.typed").is_file()
print("ok", aorkestra.__version__)
"""


def test_the_sdk_installs_into_a_fresh_venv_and_imports_without_the_server(
    tmp_path: Path,
) -> None:
    # A copy, so the in-tree build leaves nothing in the repository.
    source = tmp_path / "sdk"
    shutil.copytree(
        SDK, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    checked = subprocess.run(
        [str(python), "-I", "-c", "import importlib.resources\n" + CHECK],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert checked.stdout.startswith("ok")
    assert sys.prefix != str(env_dir)

"""The contract as a product: the installed stubs are typed, the dependency floors match what the
generated code checks at import, the API reference follows the protos, and `buf breaking` runs
against the main branch's history (or says why it cannot)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from scripts import check_breaking, gen_api_docs

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "generated"
PACKAGES = sorted(p.name for p in GENERATED.iterdir() if p.is_dir() and p.name != "__pycache__")


def floor(name: str) -> Version:
    """The lowest version pyproject.toml allows for dependency ``name``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        if requirement.name == name:
            lows = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
            assert lows, f"{name} has no >= floor in pyproject.toml"
            return max(lows)
    raise AssertionError(f"{name} is not a dependency")


def test_the_protobuf_floor_is_the_runtime_the_generated_code_checks_for() -> None:
    checked = set()
    pattern = re.compile(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),")
    for module in GENERATED.rglob("*_pb2.py"):
        found = pattern.search(module.read_text())
        assert found, f"{module} checks no protobuf runtime version"
        checked.add(Version(".".join(found.groups())))
    assert checked
    assert floor("protobuf") == max(checked)


def test_the_grpcio_floor_is_the_version_the_generated_stubs_check_for() -> None:
    checked = {
        Version(m.group(1))
        for module in GENERATED.rglob("*_pb2_grpc.py")
        if (m := re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", module.read_text()))
    }
    assert checked
    assert floor("grpcio") >= max(checked)


def test_every_generated_package_is_marked_typed() -> None:
    assert PACKAGES
    for package in PACKAGES:
        assert (GENERATED / package / "py.typed").is_file(), package


def test_the_wheel_ships_the_stubs_with_py_typed_inside_each_package(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGES:
        assert f"{package}/py.typed" in names, package
    assert "orchestrator/v1/chat_pb2.pyi" in names
    assert "orchestrator/v1/chat_pb2_grpc.pyi" in names


def test_the_api_reference_in_docs_is_what_the_protos_say() -> None:
    assert gen_api_docs.main(["--check"]) == 0


def test_the_api_reference_carries_the_proto_comments() -> None:
    pages = gen_api_docs.render(gen_api_docs.descriptor_set())
    chat = pages["orchestrator.v1.md"]
    # A method's comment, a field's comment, and an enum value's comment.
    assert "| `CancelJob` | [`CancelJobRequest`](#orchestratorv1canceljobrequest) |" in chat
    assert "Cancels a job in flight" in chat
    assert "| `after_sequence` | 2 | `int64` | Resume cursor:" in chat
    assert "| `BUSY_POLICY_REJECT` | 2 | Fail the call with FAILED_PRECONDITION. |" in chat
    assert "[`orchestrator.v1`](orchestrator.v1.md)" in pages["README.md"]


def test_the_drift_check_names_a_stale_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gen_api_docs.main(["--out", str(tmp_path)]) == 0
    page = tmp_path / "orchestrator.v1.md"
    page.write_text(page.read_text().replace("Cancels a job in flight", "Cancels a job"))
    assert gen_api_docs.main(["--check", "--out", str(tmp_path)]) == 1
    assert "orchestrator.v1.md" in capsys.readouterr().err


# --- buf breaking, in a scratch repository -------------------------------------------------------

BUF = check_breaking.DEFAULT_BUF
needs_buf = pytest.mark.skipif(not BUF.exists(), reason="buf is installed by `make tools`")
PROTO = """syntax = "proto3";

// A test package.
package demo.v1;

// A message.
message Thing {
  // A field.
  {type} count = 1;
}
"""


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def scratch_repo(tmp_path: Path, branch: str = "main") -> Path:
    repo = tmp_path / "repo"
    (repo / "protos" / "demo" / "v1").mkdir(parents=True)
    shutil.copy(ROOT / "buf.yaml", repo / "buf.yaml")
    (repo / "protos" / "demo" / "v1" / "demo.proto").write_text(PROTO.replace("{type}", "int64"))
    git(repo, "init", "-q", "-b", branch)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "first")
    return repo


@needs_buf
def test_breaking_fails_when_a_branch_changes_a_field_type_of_main(tmp_path: Path) -> None:
    repo = scratch_repo(tmp_path)
    git(repo, "checkout", "-q", "-b", "feature")
    (repo / "protos" / "demo" / "v1" / "demo.proto").write_text(PROTO.replace("{type}", "int32"))
    git(repo, "commit", "-qam", "narrow")
    assert check_breaking.main(["--root", str(repo), "--buf", str(BUF)]) == 1


@needs_buf
def test_breaking_passes_an_added_field(tmp_path: Path) -> None:
    repo = scratch_repo(tmp_path)
    git(repo, "checkout", "-q", "-b", "feature")
    proto = repo / "protos" / "demo" / "v1" / "demo.proto"
    proto.write_text(proto.read_text().replace("= 1;\n", "= 1;\n  // New.\n  string name = 2;\n"))
    assert check_breaking.main(["--root", str(repo), "--buf", str(BUF)]) == 0


def test_breaking_skips_with_a_message_when_there_is_no_main_branch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = scratch_repo(tmp_path, branch="feature")
    assert check_breaking.main(["--root", str(repo), "--buf", "/nonexistent/buf"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_breaking_skips_with_a_message_outside_a_git_checkout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check_breaking.main(["--root", str(tmp_path), "--buf", "/nonexistent/buf"]) == 0
    assert "not a git checkout" in capsys.readouterr().out

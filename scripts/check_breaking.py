"""`buf breaking`: fail when protos/ breaks the contract of the main branch.

The protos are compared with those of the commit this branch started from: the merge base of
HEAD and the first of ``main``, ``origin/main`` that exists (``--against REF`` or
BUF_BREAKING_AGAINST chooses another ref). That commit's buf.yaml and protos/ are extracted with
``git archive``, so it works in a worktree and in a CI clone that fetched the main branch. With
no git history to compare with (no repository, a shallow clone without the main branch, or
HEAD on main with nothing to compare) it prints why and succeeds.

Usage: python scripts/check_breaking.py [--buf PATH] [--against REF]
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"
CANDIDATES = ("main", "origin/main")


def _git(root: Path, *args: str) -> str | None:
    """The output of a git command, or None when it fails."""
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def base_commit(root: Path, refs: tuple[str, ...]) -> tuple[str | None, str]:
    """(the commit to compare with, why) or (None, why there is none)."""
    if _git(root, "rev-parse", "--is-inside-work-tree") != "true":
        return None, "not a git checkout"
    head = _git(root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}")
    if head is None:
        return None, "no commit yet"
    for ref in refs:
        target = _git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
        if target is None:
            continue
        base = _git(root, "merge-base", head, target)
        if base is None:
            return None, f"{ref} shares no history with HEAD here (shallow clone?)"
        if base == head:
            # HEAD is on the ref (or behind it): compare with the commit before HEAD.
            parent = _git(root, "rev-parse", "--verify", "--quiet", f"{head}~1^{{commit}}")
            if parent is None:
                return None, f"HEAD is {ref} and has no parent commit in this clone"
            return parent, f"HEAD~1 (HEAD is on {ref})"
        return base, f"the merge base with {ref} ({base[:12]})"
    return None, f"none of {', '.join(refs)} exists in this clone"


def extract(root: Path, commit: str, into: Path) -> bool:
    """buf.yaml and protos/ of ``commit`` into ``into``; False when that commit has no protos."""
    done = subprocess.run(
        ["git", "archive", "--format=tar", commit, "--", "buf.yaml", "protos"],
        cwd=root,
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        return False
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        archive.extractall(into, filter="data")
    return (into / "buf.yaml").is_file()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buf", type=Path, default=DEFAULT_BUF, help="the buf binary")
    parser.add_argument(
        "--against",
        default=os.environ.get("BUF_BREAKING_AGAINST", ""),
        help="compare with the merge base of this ref (default: main, then origin/main)",
    )
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    refs = (args.against,) if args.against else CANDIDATES
    commit, why = base_commit(args.root, refs)
    if commit is None:
        print(f"buf breaking: skipped, nothing to compare with ({why})")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if not extract(args.root, commit, Path(tmp)):
            print(f"buf breaking: skipped, {why} has no buf.yaml and protos/")
            return 0
        done = subprocess.run(
            [str(args.buf), "breaking", "--against", tmp], cwd=args.root, check=False
        )
    if done.returncode != 0:
        print(
            f"buf breaking: protos/ breaks the contract of {why}; keep field numbers, names "
            "and types, or add a new version of the package",
            file=sys.stderr,
        )
        return 1
    print(f"buf breaking: no breaking change against {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

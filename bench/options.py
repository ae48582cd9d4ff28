"""The command line the chat benchmarks share: the module's docstring as its help, and the load
options (rounds, measured chats, concurrency), whose defaults each benchmark sets."""

from __future__ import annotations

import argparse


def chat_load_parser(
    prog: str | None, doc: str | None, *, chats_per: str
) -> argparse.ArgumentParser:
    """A parser with ``--rounds``, ``--chats`` (measured chats per ``chats_per``) and
    ``--concurrency``; the caller sets their defaults (``set_defaults``) and adds its own."""
    p = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int)
    p.add_argument("--chats", type=int, help=f"measured chats per {chats_per}")
    p.add_argument("--concurrency", type=int)
    return p

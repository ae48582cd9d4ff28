"""The command line the benchmarks share: the module's docstring as its help, and the chat
benchmarks' load options (rounds, measured chats, concurrency), whose defaults each sets."""

from __future__ import annotations

import argparse


def doc_parser(doc: str | None, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser whose help is ``doc`` (a benchmark module's docstring), its lines kept as
    written."""
    return argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def chat_load_parser(
    prog: str | None, doc: str | None, *, chats_per: str
) -> argparse.ArgumentParser:
    """A parser with ``--rounds``, ``--chats`` (measured chats per ``chats_per``) and
    ``--concurrency``; the caller sets their defaults (``set_defaults``) and adds its own."""
    p = doc_parser(doc, prog)
    p.add_argument("--rounds", type=int)
    p.add_argument("--chats", type=int, help=f"measured chats per {chats_per}")
    p.add_argument("--concurrency", type=int)
    return p

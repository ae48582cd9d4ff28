"""Running `orchestrator-reference` (the reference Query/Embedding services) as a real child
process that reports to one or more orchestrators."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.processes import BIN, stop_process, wait_healthy
from tests.support.redis_process import free_port


class ReferenceProcess:
    """`orchestrator-reference` on a free loopback port, output captured to a file."""

    def __init__(
        self,
        log_path: Path,
        orchestrator_address: str,
        api_key: str,
        *,
        port: int | None = None,
        **env: str,
    ) -> None:
        """``orchestrator_address``: REF_ORCHESTRATOR_ADDRESS (one or more addresses)."""
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._env = {
            **os.environ,
            "REF_LISTEN_ADDRESS": self.address,
            "REF_ORCHESTRATOR_ADDRESS": orchestrator_address,
            "REF_PUBLISH_API_KEY": api_key,
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(BIN / "orchestrator-reference")],
            env=self._env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_healthy(self.proc, self.address, "reference services", self.log, timeout_s)

    def kill(self) -> None:
        stop_process(self.proc)
        if hasattr(self, "_log"):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

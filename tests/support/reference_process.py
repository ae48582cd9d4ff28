"""Running `orchestrator-reference` (the reference Query/Embedding services) as a real child
process that reports to one or more orchestrators."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.support.processes import BIN
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
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"reference services exited early:\n{self.log()}")
            probe = subprocess.run(
                [str(BIN / "orchestrator"), "health", "--address", self.address, "--timeout", "1"],
                capture_output=True,
                check=False,
            )
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"reference services did not become healthy:\n{self.log()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

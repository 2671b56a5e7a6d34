"""Reaching Host B: a shell command over `ssh`, as `xl migrate` and Proxmox do.

`RemoteHost(host, ssh="ssh", postcopy="postcopy")` builds the command line `SSH... HOST 'REMOTE
COMMAND'`: `ssh` is split like a shell would (`--ssh "ssh -p 2222 -i key"`), and the remote
command is one shell-quoted string, which ssh hands to the remote user's shell.  A test passes a
wrapper as `--ssh` that runs the string in B's network namespace instead.

`run` runs one short command (`postcopy --version`).  `open_agent` starts `postcopy
migrate-receive` on B and yields an `AgentSession`: `request(op, **arguments)` sends one JSON line
and waits for the answer (`AgentError` with B's one-line reason when it says no; `AgentGone` when
the pipe closed).  The ssh process runs in its own session, so a Ctrl-C on A's terminal reaches
`postcopy migrate` only, which then tells B what to do.  `RemoteQMP` is B's QEMU monitor as seen
through the agent, with the `QMPSession` shape `integrations.qemu_migrate` drives.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from postcopy.errors import PostcopyError, UserError
from postcopy.integrations.qmp import QMPCommandError, QMPConnectionError

AGENT_REPLY_SECONDS = 120.0


class AgentError(PostcopyError):
    """B's side refused or failed an operation; the message is B's one line."""


class AgentGone(AgentError):
    """The remote command ended: B cannot be driven any more."""


@dataclass(frozen=True)
class RemoteHost:
    host: str
    ssh: str = "ssh"
    postcopy: str = "postcopy"

    def command(self, remote_argv: Sequence[str]) -> list[str]:
        remote = [*shlex.split(self.postcopy), *remote_argv]
        return [*shlex.split(self.ssh), self.host, shlex.join(remote)]

    async def run(self, remote_argv: Sequence[str], timeout: float = 30.0) -> str:
        """Run one command on B; its stdout.  UserError (one line) when B cannot be reached or
        the command fails."""
        argv = self.command(remote_argv)
        try:
            with trio.fail_after(timeout):
                result = await trio.run_process(
                    argv, capture_stdout=True, capture_stderr=True, check=False,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
        except trio.TooSlowError:
            raise UserError(
                f"B ({self.host}) did not answer `{shlex.join(argv)}` in {timeout:g} s"
            ) from None
        except OSError as exc:
            raise UserError(f"cannot run {argv[0]}: {exc.strerror}") from None
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).decode(errors="replace").strip()
            detail = detail.splitlines()[-1] if detail else f"exit status {result.returncode}"
            raise UserError(f"B ({self.host}): `{shlex.join(remote_argv)}` failed: {detail}")
        return str(result.stdout.decode(errors="replace"))

    async def run_with_input(
        self, remote_argv: Sequence[str], data: bytes, timeout: float = 300.0
    ) -> tuple[int, str, str]:
        """Run one command on B with `data` on its stdin: (exit status, stdout, stderr)."""
        argv = self.command(remote_argv)
        try:
            with trio.fail_after(timeout):
                result = await trio.run_process(
                    argv, stdin=data, capture_stdout=True, capture_stderr=True, check=False,
                    start_new_session=True,
                )  # fmt: skip
        except trio.TooSlowError:
            raise UserError(
                f"B ({self.host}) did not finish `{shlex.join(remote_argv)}` in {timeout:g} s"
            ) from None
        except OSError as exc:
            raise UserError(f"cannot run {argv[0]}: {exc.strerror}") from None
        return (
            result.returncode,
            result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace"),
        )

    @asynccontextmanager
    async def open_agent(
        self, remote_argv: Sequence[str], log: Path
    ) -> AsyncIterator[AgentSession]:
        argv = self.command(remote_argv)
        with open(log, "ab") as stderr:
            process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                start_new_session=True,
            )  # fmt: skip
        session = AgentSession(process, log)
        try:
            yield session
        finally:
            with trio.CancelScope(shield=True):
                await session.close()


class AgentSession:
    """One `postcopy migrate-receive` on B, driven request by request."""

    def __init__(self, process: trio.Process, log: Path) -> None:
        self._process = process
        self._log = log
        self._buffer = b""
        self._lock = trio.Lock()
        self.gone = False

    async def request(
        self, op: str, timeout: float = AGENT_REPLY_SECONDS, **arguments: Any
    ) -> dict[str, Any]:
        if self.gone:
            raise AgentGone(f"B's migrate-receive is gone ({self._why()})")
        assert self._process.stdin is not None and self._process.stdout is not None
        async with self._lock:
            try:
                with trio.fail_after(timeout):
                    await self._process.stdin.send_all(
                        json.dumps({"op": op, **arguments}).encode() + b"\n"
                    )
                    while b"\n" not in self._buffer:
                        data = await self._process.stdout.receive_some(65536)
                        if not data:
                            raise trio.BrokenResourceError
                        self._buffer += data
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.gone = True
                raise AgentGone(f"B's migrate-receive is gone ({self._why()})") from None
            except trio.TooSlowError:
                self.gone = True
                raise AgentGone(f"B did not answer {op} in {timeout:g} s") from None
            line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            answer: dict[str, Any] = json.loads(line)
        except ValueError:
            raise AgentError(f"B answered {op} with {line[:100]!r}") from None
        if not answer.get("ok"):
            raise AgentError(str(answer.get("error", "no reason")))
        return answer

    def _why(self) -> str:
        try:
            text = self._log.read_text(errors="replace").strip().splitlines()
        except OSError:
            text = []
        code = self._process.poll()
        return (text[-1] if text else "") or (f"exit status {code}" if code is not None else "")

    async def close(self) -> None:
        """Close B's stdin (B cleans up by itself if the migration never switched) and wait."""
        if self._process.stdin is not None:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self._process.stdin.aclose()
        with trio.move_on_after(30):
            await self._process.wait()
        if self._process.poll() is None:
            self._process.kill()
            await self._process.wait()
        self.gone = True


class RemoteQMP:
    """B's QEMU monitor through the agent (`QMPSession` of `integrations.qemu_migrate`)."""

    def __init__(self, session: AgentSession) -> None:
        self._session = session
        self._closed = False

    @property
    def is_closed(self) -> bool:
        return self._closed or self._session.gone

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            answer = await self._session.request("qmp", command=command, arguments=arguments)
        except AgentError as exc:
            raise QMPConnectionError(f"{command}: {exc}") from None
        if "qmp_error" in answer:
            error = answer["qmp_error"]
            raise QMPCommandError(command, str(error["class"]), str(error["desc"]))
        if "qmp_closed" in answer:
            self._closed = True
            raise QMPConnectionError(f"{command}: {answer['qmp_closed']}")
        return answer.get("return")

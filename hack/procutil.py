"""Helpers shared by the dev/test launchers in ``hack/`` (triton, prometheus, s3server, localcluster).

* free loopback ports: :func:`free_ports`, :func:`free_port`;
* tiny HTTP client that never raises for an answer: :func:`http_request`, :func:`http_get`;
* waiting: :func:`poll`;
* the cache directory: :func:`cache_dir` (``$MODELDEPLOY_CACHE``, default ``~/.cache/modeldeploy``);
* cross-process lock: :func:`file_lock`;
* child processes in their own session, logging to a file: :func:`popen_logged`,
  :func:`die_with_parent_hook`, :func:`terminate`, :func:`log_tail`;
* :class:`ServerProcess`, the lifecycle of one server process (start with a log file, wait until
  ready, stop, log tail, context manager, CLI foreground), :func:`start_with_port_retries` and
  :func:`interrupt_on_signals`.

``hack`` is a package: the launchers import this as ``hack.procutil``, with the repository root on
``sys.path`` (``python -m hack.<module>`` from the root; the tests' pytest configuration adds it).

Dependencies: the standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, ClassVar, Self, TypeVar

T = TypeVar("T")
S = TypeVar("S", bound="ServerProcess")

KILL_WAIT_SECONDS = 10.0  # how long a SIGKILLed process is waited for

# --------------------------------------------------------------------------- ports and HTTP


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (all bound at once, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_ports(1)[0]


def http_request(method: str, url: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a request; status 0 when nothing answered.

    A ``body`` goes as ``application/octet-stream`` (not urllib's default form encoding), so
    the server reads it as raw data.
    """
    headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as err:
        return int(err.code), bytes(err.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET; status 0 when nothing answered."""
    return http_request("GET", url, timeout=timeout)


def poll(
    check: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.1,
    what: str = "condition",
    abort: Callable[[], str | None] | None = None,
) -> T:
    """Call ``check`` until it returns something other than None, or raise TimeoutError.

    ``abort`` (optional) returns a reason to stop waiting early (e.g. the process died),
    raised as RuntimeError.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if abort is not None and (reason := abort()) is not None:
            raise RuntimeError(reason)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(min(interval, remaining))


# --------------------------------------------------------------------------- files


def cache_dir(*, expand_user: bool = True) -> Path:
    """``$MODELDEPLOY_CACHE`` (default ``~/.cache/modeldeploy``), where ``hack/`` keeps what it builds.

    ``expand_user=False`` takes the variable literally (a leading ``~`` is not expanded).
    """
    env = os.environ.get("MODELDEPLOY_CACHE")
    if not env:
        return Path.home() / ".cache" / "modeldeploy"
    return Path(env).expanduser() if expand_user else Path(env)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing), across processes."""
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of the file at ``path``; "" when it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- processes


def interrupt_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt (SIGTERM too: a shell's background job
    ignores SIGINT), so a foreground CLI stops its server in ``finally``."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


_PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None = None
_libc_loaded = False


def _die_with_parent() -> None:  # runs in the forked child before exec
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def die_with_parent_hook() -> Callable[[], None]:
    """A ``preexec_fn`` that has the child get SIGTERM when this process dies (Linux ``prctl``;
    a no-op where libc cannot be loaded). Only ``prctl`` runs between fork and exec."""
    global _libc, _libc_loaded
    if not _libc_loaded:  # load in the parent: the child must not
        _libc_loaded = True
        with contextlib.suppress(OSError):  # non-glibc
            _libc = ctypes.CDLL(None, use_errno=True)
    return _die_with_parent


def popen_logged(
    argv: Sequence[str],
    log: IO[bytes],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session (process group id == pid), stdin from /dev/null,
    stdout and stderr to ``log``; ``env`` None inherits this process's environment."""
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=None if env is None else dict(env),
        start_new_session=True,
        preexec_fn=die_with_parent_hook() if die_with_parent else None,
    )


def terminate(
    proc: subprocess.Popen[bytes], timeout: float, *, term_group: bool = False, reap_group: bool = False
) -> int | None:
    """Stop a process started by :func:`popen_logged`; its exit code.

    SIGTERM to the process (to its whole group with ``term_group``), SIGKILL to the group
    when it is still there after ``timeout`` seconds. ``reap_group``: SIGKILL whatever is left
    of the group afterwards (also when the process had exited already).
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if term_group:
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                os.kill(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait(timeout=KILL_WAIT_SECONDS)
    else:
        code = proc.returncode
    if reap_group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return code


class ServerProcess:
    """Lifecycle of one server process on 127.0.0.1, for the launchers' dataclasses.

    A subclass is a dataclass with the fields ``process``, ``started_at``, ``ready_seconds``
    and ``_log`` (see :class:`triton.TritonServer`), a ``log_path`` (field or property),
    ``label`` (the name in "<label> exited with code N") and ``tail_lines`` (the default
    length of :meth:`log_tail`). It implements ``wait_ready`` (with :meth:`_wait_ready`) and
    ``stop`` (with :meth:`_stop`), each with its own defaults.
    """

    label: ClassVar[str] = "process"
    tail_lines: ClassVar[int] = 40

    process: subprocess.Popen[bytes] | None
    started_at: float
    ready_seconds: float | None
    _log: IO[bytes] | None

    if TYPE_CHECKING:  # a dataclass field or a property in the subclass; not defined here

        @property
        def log_path(self) -> Path: ...

    def _launch(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        header: bool = True,
        die_with_parent: bool = False,
    ) -> None:
        """Open ``log_path`` for appending (``header``: first the command line, ``$ argv``) and
        start ``argv`` with :func:`popen_logged`."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        if header:
            self._log.write(f"$ {' '.join(argv)}\n".encode())
            self._log.flush()
        self.started_at = time.monotonic()
        self.process = popen_logged(argv, self._log, cwd=cwd, env=env, die_with_parent=die_with_parent)

    def exited(self) -> str | None:
        """Why the process is gone (None while it runs)."""
        if self.process is None:
            return "not started"
        code = self.process.poll()
        return None if code is None else f"{self.label} exited with code {code}"

    def _wait_ready(
        self,
        check: Callable[[], bool],
        *,
        timeout: float,
        what: str,
        error: type[Exception],
        name_log: bool = True,
    ) -> None:
        """:func:`poll` ``check`` until true, aborting when the process exits; sets ``ready_seconds``.

        Raises ``error`` with the reason and the log tail (``name_log``: and the log's path).
        """
        try:
            poll(lambda: True if check() else None, timeout=timeout, what=what, abort=self.exited)
        except (TimeoutError, RuntimeError) as err:
            where = f" {self.log_path}" if name_log else ""
            raise error(f"{err}; log{where}:\n{self.log_tail()}") from None
        self.ready_seconds = time.monotonic() - self.started_at

    def wait_ready(self, timeout: float) -> None:
        raise NotImplementedError

    def _stop(self, timeout: float, *, term_group: bool = False, reap_group: bool = False) -> int | None:
        """:func:`terminate` the process (if it was started), then close the log."""
        code = None
        if self.process is not None:
            code = terminate(self.process, timeout, term_group=term_group, reap_group=reap_group)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def stop(self) -> int | None:
        raise NotImplementedError

    def serve(self, ready_message: str) -> int:
        """CLI foreground: print ``ready_message``, wait until the process exits (its code) or a
        KeyboardInterrupt (0, see :func:`interrupt_on_signals`); stop it either way."""
        try:
            print(ready_message, flush=True)
            assert self.process is not None
            return self.process.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            self.stop()

    def log_tail(self, lines: int | None = None) -> str:
        """The last ``lines`` (default ``tail_lines``) lines of the log; "" when it cannot be read."""
        return log_tail(self.log_path, self.tail_lines if lines is None else lines)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_with_port_retries(
    launch: Callable[[], S],
    *,
    attempts: int,
    ready_timeout: float,
    error: type[Exception],
    port_in_use: str,
    tail_lines: int | None = None,
) -> S:
    """``launch()`` a server (on freshly picked ports) and wait until it is ready.

    A server that fails (``error``) is stopped; when its log tail says ``port_in_use`` (someone
    took a port between picking and binding) it is launched again, up to ``attempts`` times.
    """
    for attempt in range(1, attempts + 1):
        server = launch()
        try:
            server.wait_ready(ready_timeout)
            return server
        except error:
            server.stop()
            if attempt < attempts and port_in_use in server.log_tail(tail_lines):
                continue
            raise
    raise AssertionError("unreachable")  # pragma: no cover

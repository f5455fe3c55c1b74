"""A local Ray head for development and tests: loopback only, token auth on, stopped by what it started.

    python -m infra.local.ray_head start [--num-cpus N] [--port 6379] [--dashboard-port 8265] [--temp-dir D]
    python -m infra.local.ray_head stop [--temp-dir D]
    python -m infra.local.ray_head env [--temp-dir D]     # the client exports again
(``infra/local/ray_head.sh`` runs this with the project's virtualenv.) ``start`` prints ``export`` lines
(``RAY_ADDRESS``, ``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``, ...) for ``eval "$(...)"``.

Why each piece (measured on Ray 2.60):
- Token auth: ``ray start`` enables it only when a token already exists, so a fresh machine got an open jobs
  API. We write a random token to ``<temp-dir>/clipcap/auth_token`` (mode 0600) and start with
  ``RAY_AUTH_MODE=token``; ``--no-auth`` is the explicit opt-out.
- Loopback: Ray rewrites ``--node-ip-address 127.0.0.1`` to the machine's address, and GCS, raylet, the
  dashboard agent (which serves the jobs API too) and the runtime-env agent then listen on it or on all
  interfaces. With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's single-machine mode) the node address stays
  127.0.0.1 and every port binds to it. Clients that ``ray.init(address=...)`` this head need that variable
  too (it is in the exports); multi-node use passes ``--node-ip-address <lan ip>`` (auth stays on).
- Stop: ``ray stop`` (even without ``--force``) stops every Ray instance of the user on the host. We start
  the head in its own session and record its id; ``stop`` signals that session plus any process holding
  files under this temp dir's session folders (job drivers run in sessions of their own), nothing else.
- A busy port is an error naming it before anything starts (Ray would otherwise pick another or fail late).
- A failed ``start`` / ``env`` exits 3 with the error on stderr and prints ``(exit 3)`` on stdout, so
  ``eval "$(...)"`` fails too (an empty eval returns 0).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
STATE = "clipcap"  # our files inside the Ray temp dir: auth_token, head.json-like plain files


def default_temp_dir() -> str:
    # Not Ray's shared /tmp/ray: one folder per user, so `stop` can only ever reach this user's head.
    return os.environ.get("RAY_TMPDIR") or f"/tmp/clipcap-ray-{os.getuid()}"


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    temp_dir: str
    num_cpus: int
    port: int = 6379
    dashboard_port: int = 8265
    agent_port: int = 0  # 0: a free one (Ray's fixed 52365 collides between heads on one machine)
    client_port: int = 0
    auth: bool = True
    node_ip: str = LOOPBACK


def state_dir(temp_dir: str) -> Path:
    return Path(temp_dir) / STATE


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def check_port_free(port: int, what: str, host: str = LOOPBACK) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are not "busy"
        try:
            s.bind((host, port))
        except OSError as exc:
            raise RuntimeError(f"{what} port {port} on {host} is busy ({exc.strerror}): stop what uses it "
                               f"or pass another port") from None


def client_env(temp_dir: str) -> dict[str, str]:
    """What a client (ray job submit, ray.init) needs to reach the head recorded in ``temp_dir``."""
    st = state_dir(temp_dir)
    info = dict(line.split("=", 1) for line in (st / "head.env").read_text().splitlines() if "=" in line)
    return info


def _write_token(st: Path) -> Path:
    path = st / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def _server_env(cfg: HeadConfig, st: Path) -> dict[str, str]:
    # Jobs run `python ...` from the head's PATH: put this interpreter's bin first, or a head started from
    # a shell without the venv runs jobs with a Python that lacks torch and the project.
    bin_dir = str(Path(sys.executable).parent)
    env = {"RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    if cfg.auth:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(_write_token(st)))
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    if cfg.node_ip == LOOPBACK:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def _ray_exe() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else "ray"


def start(cfg: HeadConfig) -> dict[str, str]:
    """Start the head (refusing busy ports and a head already recorded here); returns the client env."""
    st = state_dir(cfg.temp_dir)
    if (st / "session_id").exists() and _session_pids(int((st / "session_id").read_text())):
        raise RuntimeError(f"a head from {cfg.temp_dir} is already running: stop it first")
    agent, client = cfg.agent_port or free_port(), cfg.client_port or free_port()
    for port, what in ((cfg.port, "GCS"), (cfg.dashboard_port, "dashboard"), (agent, "agent"), (client, "client")):
        check_port_free(port, what, cfg.node_ip)
    st.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A stale ray_current_cluster from an earlier head makes ray.init() dial a dead address.
    (Path(cfg.temp_dir) / "ray_current_cluster").unlink(missing_ok=True)
    cmd = [_ray_exe(), "start", "--head", "--node-ip-address", cfg.node_ip, "--port", str(cfg.port),
           "--num-cpus", str(cfg.num_cpus), "--include-dashboard", "true", "--dashboard-host", LOOPBACK,
           "--dashboard-port", str(cfg.dashboard_port), "--dashboard-agent-listen-port", str(agent),
           "--ray-client-server-port", str(client), "--temp-dir", cfg.temp_dir, "--disable-usage-stats"]
    for attempt in (1, 2):
        env = _server_env(cfg, st)
        rc, log = _ray_start(cmd, env, st)
        if rc == 0:
            break
        stop(cfg.temp_dir)
        # Ray gives the raylet a fixed 30 s to register and the dashboard a fixed time to come up: on an
        # overloaded machine (load 50+ on 2 cores, measured) one retry usually does it.
        if attempt == 2:
            failed = [line for line in log.splitlines() if re.search(r"Error|Exception|Failed|failed", line)]
            raise RuntimeError(f"ray start failed (rc {rc}): " + "\n".join(failed[-15:])[-3000:])
    client_vars = {**{k: v for k, v in env.items() if k not in ("RAY_USAGE_STATS_ENABLED", "PATH")},
                   # `ray job submit` reads RAY_API_SERVER_ADDRESS first; ray.init() / clipcap read RAY_ADDRESS.
                   "RAY_API_SERVER_ADDRESS": f"http://{LOOPBACK}:{cfg.dashboard_port}",
                   "RAY_ADDRESS": f"{cfg.node_ip}:{cfg.port}", "CLIPCAP_RAY_AGENT_PORT": str(agent)}
    (st / "head.env").write_text("".join(f"{k}={v}\n" for k, v in client_vars.items()))
    return client_vars


def _ray_start(cmd: list[str], env: dict[str, str], st: Path) -> tuple[int, str]:
    log = st / "ray-start.log"
    # Output to a file, not a pipe: the daemons would inherit the pipe and keep it open for ever.
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        (st / "session_id").write_text(str(proc.pid))  # the session leader: every Ray daemon inherits it
        rc = proc.wait()
    return rc, log.read_text(errors="replace")


def _session_pids(sid: int) -> list[int]:
    return [pid for pid in _live_pids() if _sid(pid) == sid]


def _live_pids() -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if (p / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _logs_to(pid: int, marker: str) -> bool:
    """True when the process's stdout goes to a file under ``marker``: Ray daemons, workers and job drivers
    (which the job supervisor starts in sessions of their own) do; a user's own driver or shell does not."""
    try:
        return os.readlink(f"/proc/{pid}/fd/1").startswith(marker)
    except OSError:
        return False


def _recorded_session(temp_dir: str) -> int | None:
    try:
        return int((state_dir(temp_dir) / "session_id").read_text())
    except (OSError, ValueError):
        return None


def _ours(temp_dir: str, sid: int | None = None) -> list[int]:
    sid = sid if sid is not None else _recorded_session(temp_dir)
    marker = str(Path(temp_dir).resolve() / "session_")
    return [pid for pid in _live_pids() if (sid is not None and _sid(pid) == sid) or _logs_to(pid, marker)]


def stop(temp_dir: str, grace_s: float = 10.0) -> int:
    """Stop the processes of the head recorded in ``temp_dir`` (TERM, then KILL after ``grace_s``)."""
    sid = _recorded_session(temp_dir)  # read once: the folder may be cleaned up while we wait
    pids = found = _ours(temp_dir, sid)
    _signal(pids, signal.SIGTERM)
    deadline = time.time() + grace_s
    while pids and time.time() < deadline:
        time.sleep(0.5)
        pids = _ours(temp_dir, sid)
    _signal(pids, signal.SIGKILL)
    for name in ("session_id", "head.env", "auth_token"):
        (state_dir(temp_dir) / name).unlink(missing_ok=True)
    (Path(temp_dir) / "ray_current_cluster").unlink(missing_ok=True)
    return len(found)


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# What a failed start or env prints on stdout: `eval "$(ray_head.sh start)"` would otherwise eval nothing and
# return 0, and the next pasted `ray job submit` would go to whatever Ray holds the jobs port.
FAILED_EVAL = "(exit 3)  # ray_head failed: see the error above\n"


def _exports(env: dict[str, str]) -> str:
    return "".join(f"export {k}={v}\n" for k, v in env.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "env"])
    parser.add_argument("--temp-dir", default=default_temp_dir(), help="Ray temp dir (default: RAY_TMPDIR or "
                        "/tmp/clipcap-ray-<uid>); also where the token and session id are kept")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1, help="CPUs the head offers")
    parser.add_argument("--port", type=int, default=int(os.environ.get("CLIPCAP_RAY_PORT", 6379)), help="GCS port")
    parser.add_argument("--dashboard-port", type=int, default=int(os.environ.get("CLIPCAP_DASHBOARD_PORT", 8265)),
                        help="dashboard + jobs API port (RAY_ADDRESS)")
    parser.add_argument("--agent-port", type=int, default=0, help="dashboard agent HTTP port (default: free)")
    parser.add_argument("--client-port", type=int, default=0, help="Ray client port (default: free)")
    parser.add_argument("--node-ip-address", default=LOOPBACK,
                        help="address the head listens on (default 127.0.0.1; a LAN address for multi-node)")
    parser.add_argument("--no-auth", action="store_true",
                        help="opt out of token auth (anyone who can reach the ports can run code: never on a "
                             "shared machine)")
    args = parser.parse_args(argv)
    temp_dir = str(Path(args.temp_dir).resolve())
    try:
        if args.action == "stop":
            print(f"# stopped {stop(temp_dir)} process(es) of the head in {temp_dir}", file=sys.stderr)
            return 0
        if args.action == "env":
            sys.stdout.write(_exports(client_env(temp_dir)))
            return 0
        cfg = HeadConfig(temp_dir=temp_dir, num_cpus=args.num_cpus, port=args.port,
                         dashboard_port=args.dashboard_port, agent_port=args.agent_port,
                         client_port=args.client_port, auth=not args.no_auth, node_ip=args.node_ip_address)
        env = start(cfg)
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.stdout.write(FAILED_EVAL)
        return 3
    if not cfg.auth:
        print("# WARNING: token auth is OFF (--no-auth): anyone reaching these ports can run code", file=sys.stderr)
    print(f"# Ray head up: jobs API {env['RAY_API_SERVER_ADDRESS']}, GCS {env['RAY_ADDRESS']}; eval these lines:",
          file=sys.stderr)
    sys.stdout.write(_exports(env))
    return 0


if __name__ == "__main__":
    sys.exit(main())

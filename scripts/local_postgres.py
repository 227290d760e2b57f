#!/usr/bin/env python3
"""A throwaway PostgreSQL server for local multi-worker sweeps and for tests/test_hpo_workers.py.

    python scripts/local_postgres.py start [--dir DIR] [--port PORT]   # prints the storage URL
    python -m hpo --study s --storage URL ...                          # in as many shells as you like
    python scripts/local_postgres.py stop --dir DIR

Uses the server binaries of the `postgresql` package (initdb, pg_ctl; found on PATH or under
/usr/lib/postgresql/*/bin). Listens on 127.0.0.1 only, trust authentication, user `hpo`,
database `optuna`: for a single machine or a test, not for a shared server. PostgreSQL refuses
to run as root, so as root the server runs as the `postgres` user (or `nobody`).
"""
from __future__ import annotations

import argparse
import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

USER = "hpo"
DATABASE = "optuna"


class PostgresUnavailable(RuntimeError):
    pass


def find_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if candidates:
        return candidates[-1]
    raise PostgresUnavailable(f"{name} not found (install the postgresql package)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> str | None:
    """None: run as ourselves; else the unprivileged user to run the server as (we are root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise PostgresUnavailable("running as root and no 'postgres' or 'nobody' user to run the server")


def _as_user(user: str | None, argv: list[str]) -> list[str]:
    if user is None:
        return argv
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "--", *argv]
    if shutil.which("su"):
        return ["su", "-s", "/bin/sh", user, "-c", shlex.join(argv)]
    raise PostgresUnavailable("running as root without runuser/su to drop privileges")


def _run(argv: list[str], timeout: float = 60) -> None:
    r = subprocess.run(argv, cwd="/", capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise PostgresUnavailable(f"{shlex.join(argv)} failed ({r.returncode}): {r.stderr or r.stdout}")


@dataclass
class Server:
    data_dir: Path
    port: int
    user: str | None  # the OS user the server runs as (None: the current one)

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def stop(self, remove: bool = True) -> None:
        try:
            _run(_as_user(self.user, [find_bin("pg_ctl"), "-D", str(self.pgdata), "-m", "immediate",
                                      "-w", "stop"]), timeout=30)
        except (PostgresUnavailable, subprocess.TimeoutExpired):
            pass
        if remove:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"


def start(data_dir: str | Path | None = None, port: int | None = None) -> Server:
    """initdb + pg_ctl start on 127.0.0.1:port, create database `optuna`; PostgresUnavailable if not possible."""
    initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
    user = _server_user()
    root = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="hpo-pg-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(root, pw.pw_uid, pw.pw_gid)
    server = Server(root, port or free_port(), user)
    pgdata, sock = server.pgdata, root
    _run(_as_user(user, [initdb, "-D", str(pgdata), "-U", USER, "--auth=trust", "-E", "UTF8",
                         "--no-sync"]), timeout=120)
    opts = (f"-p {server.port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
    try:
        _run(_as_user(user, [pg_ctl, "-D", str(pgdata), "-l", str(root / "server.log"), "-o", opts,
                             "-w", "-t", "60", "start"]), timeout=90)
    except PostgresUnavailable as e:
        log = root / "server.log"
        tail = log.read_text()[-2000:] if log.exists() else ""
        server.stop()
        raise PostgresUnavailable(f"{e}\n{tail}") from None
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=server.port, user=USER, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {DATABASE}")
        conn.close()
    except Exception as e:
        server.stop()
        raise PostgresUnavailable(f"cannot create database: {e}") from e
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("start", "stop"))
    p.add_argument("--dir", help="server folder (start: default a new /tmp/hpo-pg-*)")
    p.add_argument("--port", type=int, help="default: a free port")
    args = p.parse_args(argv)
    if args.command == "start":
        try:
            server = start(args.dir, args.port)
        except PostgresUnavailable as e:
            print(f"cannot start PostgreSQL: {e}", file=sys.stderr)
            return 1
        print(server.url)
        print(f"stop it with: python {sys.argv[0]} stop --dir {server.data_dir}", file=sys.stderr)
        return 0
    if not args.dir:
        p.error("stop needs --dir")
    root = Path(args.dir)
    owner = root.stat().st_uid
    user = None if owner == os.geteuid() else pwd.getpwuid(owner).pw_name
    Server(root, 0, user).stop(remove=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

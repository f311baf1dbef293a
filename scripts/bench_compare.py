#!/usr/bin/env python3
"""Weir vs PgBouncer vs direct PostgreSQL, measured with pgbench in one run.

Starts its own PostgreSQL (from the system's binaries; as the `postgres` user when run as
root), PgBouncer (system package) and Weir (release build) with the same pool size in
transaction mode, then runs `pgbench -S -j 2 -T SECONDS` for each query mode and client
count against each target, alternating the order of targets between cells so that a
noisy machine shows up as spread rather than as a bias. Prints a Markdown table with the
Weir/PgBouncer and Weir/direct throughput ratios, and writes it to --out if given.

Each cell is run --repeat times (targets in rotating order); the table shows the median
throughput and, in brackets, the lowest and highest run.

Usage: scripts/bench_compare.py [--seconds 20] [--clients 1,10,100,500] [--repeat 3]
                                [--modes simple,prepared] [--pool-size 20] [--workers N]
                                [--out FILE]
"""
import argparse
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bindir():
    try:
        d = subprocess.check_output(["pg_config", "--bindir"], text=True).strip()
        if os.path.exists(os.path.join(d, "initdb")):
            return d
    except (OSError, subprocess.CalledProcessError):
        pass
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    if not dirs:
        sys.exit("PostgreSQL binaries not found: run scripts/setup.sh --with-pgbouncer")
    return dirs[-1]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def demote():
    """preexec_fn: run as postgres when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return None
    pw = pwd.getpwnam("postgres")

    def fn():
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)

    return fn


def owner_chown(path):
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


def wait_port(port, proc, what, timeout=30):
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            sys.exit(f"{what} exited early with code {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not start listening on {port}")


def cpu_seconds(pid):
    """User+system CPU seconds a process has used so far (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def run_pgbench(bd, port, clients, mode, seconds, db):
    cmd = [os.path.join(bd, "pgbench"), "-n", "-S", "-j", "2", "-c", str(clients), "-T", str(seconds),
           "-M", mode, "-h", "127.0.0.1", "-p", str(port), "-U", "bench", db]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PGPASSWORD": "bench"})
    text = out.stdout + out.stderr
    tps = re.search(r"tps = ([\d.]+) \(without initial", text)
    lat = re.search(r"latency average = ([\d.]+) ms", text)
    processed = re.search(r"actually processed: (\d+)", text)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    ok = out.returncode == 0 and tps is not None
    return {
        "ok": ok,
        "tps": float(tps.group(1)) if tps else 0.0,
        "lat": float(lat.group(1)) if lat else None,
        "processed": int(processed.group(1)) if processed else 0,
        "failed": int(failed.group(1)) if failed else None,
        "error": None if ok else (text.strip().splitlines() or ["no output"])[-1][:120],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--clients", default="1,10,100,500")
    ap.add_argument("--modes", default="simple,prepared")
    ap.add_argument("--pool-size", type=int, default=20)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="Weir worker threads (0 = one per core)")
    ap.add_argument("--out")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    modes = args.modes.split(",")

    pgbouncer = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
    if not pgbouncer:
        sys.exit("pgbouncer not found: run scripts/setup.sh --with-pgbouncer")
    print("building weir (release)...", file=sys.stderr)
    subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "weir"], cwd=ROOT, check=True)
    weir_bin = os.path.join(ROOT, "target", "release", "weir")

    bd = bindir()
    work = tempfile.mkdtemp(prefix="weir-bench-")
    os.chmod(work, 0o777)
    procs = []
    try:
        # PostgreSQL
        data = os.path.join(work, "data")
        pg_port = free_port()
        subprocess.run([os.path.join(bd, "initdb"), "-D", data, "-U", "bench", "--auth=trust", "-N", "-E", "UTF8",
                        "--locale=C"], check=True, stdout=subprocess.DEVNULL, preexec_fn=demote())
        with open(os.path.join(data, "postgresql.conf"), "a") as f:
            f.write(f"listen_addresses='127.0.0.1'\nport={pg_port}\nunix_socket_directories='{work}'\n"
                    f"max_connections={max(clients) + 50}\nshared_buffers=256MB\nfsync=off\n"
                    "synchronous_commit=off\n")
        pg = subprocess.Popen([os.path.join(bd, "postgres"), "-D", data], stdout=subprocess.DEVNULL,
                              stderr=open(os.path.join(work, "pg.log"), "w"), preexec_fn=demote())
        procs.append(pg)
        wait_port(pg_port, pg, "postgres")
        time.sleep(0.5)
        db = "postgres"
        subprocess.run([os.path.join(bd, "pgbench"), "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1", "-p",
                        str(pg_port), "-U", "bench", db], check=True, capture_output=True)

        # PgBouncer: transaction mode, same pool size.
        pgb_port = free_port()
        ini = os.path.join(work, "pgbouncer.ini")
        users = os.path.join(work, "userlist.txt")
        with open(users, "w") as f:
            f.write('"bench" "bench"\n')
        with open(ini, "w") as f:
            f.write(f"[databases]\n{db} = host=127.0.0.1 port={pg_port} dbname={db}\n\n[pgbouncer]\n"
                    f"listen_addr = 127.0.0.1\nlisten_port = {pgb_port}\nunix_socket_dir =\n"
                    f"auth_type = trust\nauth_file = {users}\npool_mode = transaction\n"
                    f"default_pool_size = {args.pool_size}\nmax_client_conn = {max(clients) * 2 + 100}\n"
                    f"logfile = {work}/pgbouncer.log\npidfile =\nadmin_users = bench\n")
        owner_chown(ini)
        owner_chown(users)
        pgb = subprocess.Popen([pgbouncer, ini], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               preexec_fn=demote())
        procs.append(pgb)
        wait_port(pgb_port, pgb, "pgbouncer")

        # Weir: transaction mode, same pool size.
        weir_port = free_port()
        toml = os.path.join(work, "weir.toml")
        with open(toml, "w") as f:
            f.write(f'[proxy]\nlisten = "127.0.0.1:{weir_port}"\n\n[pool]\nmode = "transaction"\n'
                    f'size = {args.pool_size}\n\n[auth]\ntype = "trust"\n\n'
                    f'[databases.{db}]\nurl = "postgres://bench@127.0.0.1:{pg_port}/{db}"\n')
        weir = subprocess.Popen([weir_bin, "run", "--config", toml, "--workers", str(args.workers)],
                                stdout=subprocess.DEVNULL,
                                stderr=open(os.path.join(work, "weir.log"), "w"), env={**os.environ, "WEIR_LOG": "warn"})
        procs.append(weir)
        wait_port(weir_port, weir, "weir")

        targets = [("direct", pg_port, None), ("pgbouncer", pgb_port, pgb.pid), ("weir", weir_port, weir.pid)]
        results = {}
        cell = 0
        for rep in range(args.repeat):
            for mode in modes:
                for c in clients:
                    order = targets[cell % 3:] + targets[:cell % 3]
                    cell += 1
                    for name, port, pid in order:
                        cpu0 = cpu_seconds(pid) if pid else None
                        r = run_pgbench(bd, port, c, mode, args.seconds, db)
                        if pid:
                            used = cpu_seconds(pid) - cpu0
                            r["cpu_per_1k"] = used / r["processed"] * 1000 if r["processed"] else None
                        results.setdefault((mode, c, name), []).append(r)
                        status = f"{r['tps']:.0f} tps" if r["ok"] else f"FAILED: {r['error']}"
                        print(f"  [{rep + 1}/{args.repeat}] -M {mode:8} -c {c:4} {name:9} {status}", file=sys.stderr)
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)

    lines = []
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    weir_workers = args.workers or os.cpu_count()
    lines.append(f"pgbench -S -j 2 -T {args.seconds}, scale {args.scale}, pool_size {args.pool_size} (transaction "
                 f"mode) for PgBouncer and Weir (Weir with {weir_workers} worker threads); median of "
                 f"{args.repeat} runs per cell, [lowest-highest] in brackets; targets alternated; {now}; "
                 f"{os.cpu_count()} cores, {mem:.0f} GiB; PostgreSQL, PgBouncer, Weir and pgbench on the "
                 f"same machine.")
    lines.append("")
    lines.append("| mode | clients | direct tps | PgBouncer tps | Weir tps | Weir/PgBouncer | Weir/direct | "
                 "avg latency ms direct / PgB / Weir | pooler CPU ms per 1k tx PgB / Weir |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---|---|")

    def ok_runs(runs):
        return [r for r in runs if r["ok"]]

    def med(runs, key):
        vals = [r[key] for r in ok_runs(runs) if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def fmt(runs):
        good = ok_runs(runs)
        if not good:
            return "fails"
        tps = [r["tps"] for r in good]
        spread = f" [{min(tps):.0f}-{max(tps):.0f}]" if len(tps) > 1 else ""
        failed = f" ({len(runs) - len(good)} of {len(runs)} runs failed)" if len(good) < len(runs) else ""
        return f"{statistics.median(tps):.0f}{spread}{failed}"

    for mode in modes:
        for c in clients:
            d, b, w = (results[(mode, c, n)] for n in ("direct", "pgbouncer", "weir"))
            td, tb, tw = med(d, "tps"), med(b, "tps"), med(w, "tps")
            wb = f"{tw / tb:.2f}" if tb and tw else "n/a"
            wd = f"{tw / td:.2f}" if td and tw else "n/a"
            lat = " / ".join(f"{med(r, 'lat'):.2f}" if med(r, "lat") is not None else "-" for r in (d, b, w))
            cpu = " / ".join(f"{med(r, 'cpu_per_1k') * 1000:.0f}" if med(r, "cpu_per_1k") else "-" for r in (b, w))
            lines.append(f"| {mode} | {c} | {fmt(d)} | {fmt(b)} | {fmt(w)} | {wb} | {wd} | {lat} | {cpu} |")
    failures = sorted({(k, r["error"]) for k, runs in results.items() for r in runs if not r["ok"]})
    if failures:
        lines.append("")
        for (mode, c, name), err in failures:
            lines.append(f"- {name}, -M {mode}, {c} clients failed: `{err}`")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Weir vs PgBouncer vs direct PostgreSQL, measured with pgbench in one run.

Starts its own PostgreSQL (from the system's binaries; as the `postgres` user when run as
root), PgBouncer (system package) and Weir (release build) with the same pool size in
transaction mode, then measures, against each target:

- `pgbench -S -j 2 -T SECONDS` for each query mode (-M simple, extended, prepared) and
  client count: throughput, average and p99 latency (from pgbench's per-transaction log),
  the pooler's CPU time per 1,000 transactions and its context switches per transaction
  (from /proc);
- the connection rate: `pgbench -S -C` (a new connection per transaction);
- the poolers' resident memory per idle client, with --idle N logged-in connections held,
  in a fresh process of each pooler every round.

The order of targets rotates from cell to cell and every cell runs --repeat times, so a
noisy machine shows up as spread rather than as a bias. Prints Markdown tables with the
Weir/PgBouncer and Weir/direct ratios; writes them to --out, and with --doc appends them,
dated, to that file (docs/BENCHMARKS.md).

Usage: scripts/bench_compare.py [--seconds 10] [--clients 1,10,100,1000] [--repeat 3]
                                [--modes simple,extended,prepared] [--pool-size 20]
                                [--workers N] [--idle 10000] [--out FILE] [--doc FILE]
       scripts/bench_compare.py --serve   (start the targets and wait, for profiling)
"""
import argparse
import glob
import os
import pwd
import re
import resource
import struct
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


def context_switches(pid):
    """Context switches (voluntary and not) of all a process's threads so far (from /proc).
    A pooler's CPU here is mostly the price of sleeping in epoll_wait and being woken."""
    total = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(status) as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except OSError:
            pass  # a thread that ended meanwhile
    return total


def measured(pid, run):
    """Runs `run()` (a pgbench run) and adds to its result the pooler's CPU seconds per 1,000
    transactions and its context switches per transaction."""
    if not pid:
        return run()
    cpu0, cs0 = cpu_seconds(pid), context_switches(pid)
    r = run()
    n = r["processed"]
    r["cpu_per_1k"] = (cpu_seconds(pid) - cpu0) / n * 1000 if n else None
    r["cs_per_tx"] = (context_switches(pid) - cs0) / n if n else None
    return r


def p99_from_logs(logdir):
    """p99 of the per-transaction latencies (microseconds, 3rd field) pgbench logged."""
    lat = []
    for name in os.listdir(logdir):
        with open(os.path.join(logdir, name)) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    lat.append(int(parts[2]))
    if not lat:
        return None
    lat.sort()
    return lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000.0


def run_pgbench(bd, port, clients, mode, seconds, db, connect_each=False):
    logdir = tempfile.mkdtemp(prefix="pgbench-log-")
    cmd = [os.path.join(bd, "pgbench"), "-n", "-S", "-j", "2", "-c", str(clients), "-T", str(seconds),
           "-M", mode, "-h", "127.0.0.1", "-p", str(port), "-U", "bench", "--log", "--log-prefix",
           os.path.join(logdir, "tx")]
    if connect_each:
        cmd.append("-C")
    cmd.append(db)
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PGPASSWORD": "bench"})
    p99 = p99_from_logs(logdir)
    shutil.rmtree(logdir, ignore_errors=True)
    text = out.stdout + out.stderr
    # "(without initial connection time)", or with -C "(including reconnection times)".
    tps = re.search(r"tps = ([\d.]+) \((?:without initial|including reconnection)", text)
    lat = re.search(r"latency average = ([\d.]+) ms", text)
    processed = re.search(r"actually processed: (\d+)", text)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    ok = out.returncode == 0 and tps is not None
    return {
        "ok": ok,
        "tps": float(tps.group(1)) if tps else 0.0,
        "lat": float(lat.group(1)) if lat else None,
        "p99": p99 if ok else None,
        "processed": int(processed.group(1)) if processed else 0,
        "failed": int(failed.group(1)) if failed else None,
        "error": None if ok else first_error(text),
    }


def first_error(text):
    """The line that says why a pgbench run failed: its first error, not its last line (which
    may be a summary such as "number of failed transactions: 0 (NaN%)")."""
    lines = text.strip().splitlines()
    errors = [l for l in lines if re.search(r"error|fatal|abort", l, re.IGNORECASE)]
    return (errors[0] if errors else lines[-1] if lines else "no output")[:160]


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def startup_packet(user, db):
    body = struct.pack("!I", 196608)
    for k, v in (("user", user), ("database", db)):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def open_idle(port, n, db):
    """n logged-in (trust) client connections, left idle. Returns the sockets."""
    socks = []
    packet = startup_packet("bench", db)
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(packet)
        buf = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError(f"port {port} closed a login after {len(socks)} connections")
            buf += chunk
            # Walk whole messages; stop at ReadyForQuery, fail on ErrorResponse.
            i, ready = 0, False
            while i + 5 <= len(buf):
                tag, length = buf[i:i + 1], struct.unpack("!I", buf[i + 1:i + 5])[0]
                if i + 1 + length > len(buf):
                    break
                if tag == b"E":
                    raise RuntimeError(f"login refused after {len(socks)}: {buf[i + 5:i + 1 + length]!r}")
                if tag == b"Z":
                    ready = True
                i += 1 + length
            if ready:
                break
        socks.append(s)
    return socks


def idle_memory(port, pid, n, db):
    """Resident memory the pooler gains per idle client, holding n of them (bytes)."""
    warm = open_idle(port, 10, db)
    time.sleep(0.5)
    before = rss_bytes(pid)
    socks = open_idle(port, n, db)
    time.sleep(1.0)
    after = rss_bytes(pid)
    for s in socks + warm:
        s.close()
    time.sleep(1.0)
    return (after - before) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--clients", default="1,10,100,1000")
    ap.add_argument("--modes", default="simple,extended,prepared")
    ap.add_argument("--idle", type=int, default=10000, help="idle clients held for the memory figure (0: skip)")
    ap.add_argument("--connect-clients", type=int, default=10, help="clients of the pgbench -C run (0: skip)")
    ap.add_argument("--doc", help="append the dated tables to this Markdown file")
    ap.add_argument("--pool-size", type=int, default=20)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="Weir worker threads (0 = one per core)")
    ap.add_argument("--also-workers", type=int, default=1,
                    help="also measure a second Weir with this many worker threads, like single-threaded "
                         "PgBouncer (0: skip; skipped too when it equals --workers' count)")
    ap.add_argument("--out")
    ap.add_argument("--pgbouncer", default=os.environ.get("WEIR_BENCH_PGBOUNCER"),
                    help="the PgBouncer binary (default: the system's; scripts/pgbouncer_newer.sh builds 1.24 "
                         "from Debian's next release, whose prepared-statement support 1.18 lacks)")
    ap.add_argument("--serve", action="store_true",
                    help="start the targets, print their ports and pids, and wait (for profiling)")
    args = ap.parse_args()
    # SIGINT and SIGTERM both end a run through the cleanup below (a shell that starts this in
    # the background leaves SIGINT ignored, and kill sends SIGTERM): no server is left behind.
    def interrupted(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    clients = [int(c) for c in args.clients.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]  # --modes "" runs only -C and the idle memory
    # A socket per client, for pgbench, the poolers and the idle connections we hold.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.idle + 2000:
        sys.exit(f"the open-files limit ({hard}) is too low for --idle {args.idle}")

    pgbouncer = args.pgbouncer or shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
    if not pgbouncer or not os.access(pgbouncer, os.X_OK):
        sys.exit(f"pgbouncer not found ({pgbouncer or 'not on PATH'}): run scripts/setup.sh --with-pgbouncer")
    # "PgBouncer 1.24.1" on the first line; 1.21 added prepared statements in transaction mode,
    # off unless max_prepared_statements is set (its default became 200 in 1.22).
    pgb_version = subprocess.run([pgbouncer, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    m = re.search(r"(\d+)\.(\d+)", pgb_version)
    pgb_prepared = bool(m) and (int(m.group(1)), int(m.group(2))) >= (1, 21)
    print("building weir (release)...", file=sys.stderr)
    subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "weir"], cwd=ROOT, check=True)
    weir_bin = os.path.join(ROOT, "target", "release", "weir")

    weir_workers = args.workers or os.cpu_count()
    weir_second = (f"weir-{args.also_workers}w"
                   if args.also_workers and args.also_workers != weir_workers else None)
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
                    f"max_connections={max(clients + [args.connect_clients]) + 100}\nshared_buffers=256MB\nfsync=off\n"
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
                    f"default_pool_size = {args.pool_size}\nmax_client_conn = {max(clients + [10]) * 2 + args.idle + 100}\n"
                    f"logfile = {work}/pgbouncer.log\npidfile =\nadmin_users = bench\n"
                    + ("max_prepared_statements = 200\n" if pgb_prepared else ""))
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
            f.write(f'[proxy]\nlisten = "127.0.0.1:{weir_port}"\nmax_client_conn = {max(clients + [10]) * 2 + args.idle + 100}\n'
                    f'\n[pool]\nmode = "transaction"\n'
                    f'size = {args.pool_size}\n\n[auth]\ntype = "trust"\n\n'
                    f'[databases.{db}]\nurl = "postgres://bench@127.0.0.1:{pg_port}/{db}"\n'
                    # Its own admin port, so the run never collides with a Weir already running.
                    f'\n[admin]\nlisten = "127.0.0.1:{free_port()}"\n')
        weir = subprocess.Popen([weir_bin, "run", "--config", toml, "--workers", str(args.workers)],
                                stdout=subprocess.DEVNULL,
                                stderr=open(os.path.join(work, "weir.log"), "w"), env={**os.environ, "WEIR_LOG": "warn"})
        procs.append(weir)
        wait_port(weir_port, weir, "weir")

        def weir_copy(name, workers):
            """Weir with the config above on ports of its own (`name` names its files), started and listening."""
            port = free_port()
            with open(toml) as f:
                text = f.read()
            text = text.replace(f"127.0.0.1:{weir_port}", f"127.0.0.1:{port}")
            text = re.sub(r'(\[admin\]\nlisten = "127\.0\.0\.1:)\d+', lambda m: m.group(1) + str(free_port()), text)
            path = os.path.join(work, f"{name}.toml")
            with open(path, "w") as f:
                f.write(text)
            p = subprocess.Popen([weir_bin, "run", "--config", path, "--workers", str(workers)],
                                 stdout=subprocess.DEVNULL,
                                 stderr=open(os.path.join(work, f"{name}.log"), "a"),
                                 env={**os.environ, "WEIR_LOG": "warn"})
            procs.append(p)
            wait_port(port, p, name)
            return p, port

        targets = [("direct", pg_port, None), ("pgbouncer", pgb_port, pgb.pid), ("weir", weir_port, weir.pid)]
        if weir_second:
            # The same config on its own ports, with a different worker count.
            weir2, port2 = weir_copy("weir2", args.also_workers)
            targets.append((weir_second, port2, weir2.pid))
        if args.serve:
            for name, port, pid in targets:
                print(f"{name} port={port} pid={pid or pg.pid}", flush=True)
            print(f"database {db}, user bench (trust); Ctrl-C stops", flush=True)
            try:
                while all(p.poll() is None for p in procs):
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
            return
        def start_fresh(name):
            """A new process of the pooler `name`, configured as the measured one, on a port of its own
            (in `procs` until stopped, so an interrupted run stops it too)."""
            if name != "pgbouncer":
                return weir_copy(f"{name}-idle", args.workers if name == "weir" else args.also_workers)
            port = free_port()
            with open(ini) as f:
                text = f.read()
            text = re.sub(r"listen_port = \d+", f"listen_port = {port}", text)
            text = text.replace("pgbouncer.log", "pgbouncer-idle.log")
            path = os.path.join(work, "pgbouncer-idle.ini")
            with open(path, "w") as f:
                f.write(text)
            owner_chown(path)
            p = subprocess.Popen([pgbouncer, path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 preexec_fn=demote())
            procs.append(p)
            wait_port(port, p, "pgbouncer (idle)")
            return p, port

        results = {}
        memory = {}
        cell = 0
        for rep in range(args.repeat):
            for mode in modes:
                for c in clients:
                    order = targets[cell % len(targets):] + targets[:cell % len(targets)]
                    cell += 1
                    for name, port, pid in order:
                        r = measured(pid, lambda: run_pgbench(bd, port, c, mode, args.seconds, db))
                        results.setdefault((mode, c, name), []).append(r)
                        status = f"{r['tps']:.0f} tps" if r["ok"] else f"FAILED: {r['error']}"
                        print(f"  [{rep + 1}/{args.repeat}] -M {mode:8} -c {c:4} {name:9} {status}", file=sys.stderr)
            if args.connect_clients:
                order = targets[rep % len(targets):] + targets[:rep % len(targets)]
                for name, port, pid in order:
                    r = measured(pid, lambda: run_pgbench(bd, port, args.connect_clients, "simple",
                                                          args.seconds, db, connect_each=True))
                    results.setdefault(("connect", args.connect_clients, name), []).append(r)
                    status = f"{r['tps']:.0f} conn/s" if r["ok"] else f"FAILED: {r['error']}"
                    print(f"  [{rep + 1}/{args.repeat}] -C -c {args.connect_clients} {name:9} {status}", file=sys.stderr)
            # Idle memory in every round, each time in a fresh process: one that has served
            # a load keeps the memory it freed and fills idle clients into it (a second reading
            # in one process gave PgBouncer 0 bytes a client), and the resident figure moves in
            # 2 MiB steps (210 bytes a client at 10,000 for Weir here), so one reading alone is
            # noisy.
            if args.idle:
                names = [t[0] for t in targets[1:]]
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    got = memory.setdefault(name, [])
                    p = None
                    try:
                        p, port = start_fresh(name)
                        got.append(idle_memory(port, p.pid, args.idle, db))
                        print(f"  [{rep + 1}/{args.repeat}] idle {args.idle}: {name} {got[-1]:.0f} bytes per client",
                              file=sys.stderr)
                    # (SystemExit: wait_port's way to say the process did not start.)
                    except (OSError, RuntimeError, SystemExit) as e:
                        print(f"  [{rep + 1}/{args.repeat}] idle {args.idle}: {name} failed: {e}", file=sys.stderr)
                    if p is not None:
                        p.terminate()
                        try:
                            p.wait(timeout=15)
                        except subprocess.TimeoutExpired:
                            p.kill()
                            p.wait()
                        procs.remove(p)
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
    weirs = ["weir"] + ([weir_second] if weir_second else [])
    label_of = {"direct": "direct", "pgbouncer": "PgB", "weir": f"Weir {weir_workers}w"}
    if weir_second:
        label_of[weir_second] = f"Weir {args.also_workers}w"
    second = f", and a second Weir with {args.also_workers}" if weir_second else ""
    lines.append(f"pgbench -S -j 2 -T {args.seconds}, scale {args.scale}, pool_size {args.pool_size} (transaction "
                 f"mode) for PgBouncer and Weir (Weir with {weir_workers} worker threads, its default here"
                 f"{second}); median of {args.repeat} runs per cell, [lowest-highest] in brackets; targets "
                 f"alternated; {now}; {os.cpu_count()} cores, {mem:.0f} GiB; {pgb_version.strip() or 'PgBouncer'}"
                 f"{' (max_prepared_statements = 200)' if pgb_prepared else ''}; PostgreSQL, PgBouncer, Weir and "
                 f"pgbench on the same machine.")
    lines.append("")
    head = "| mode | clients | direct tps | PgBouncer tps |"
    rule = "|---|---:|---:|---:|"
    for w in weirs:
        head += f" {label_of[w]} tps | {label_of[w]}/PgB | {label_of[w]}/direct |"
        rule += "---:|---:|---:|"
    names = ["direct", "pgbouncer"] + weirs
    poolers = ["pgbouncer"] + weirs
    head += (f" avg latency ms {' / '.join(label_of[n] for n in names)} |"
             f" p99 latency ms {' / '.join(label_of[n] for n in names)} |"
             f" pooler CPU ms per 1k tx {' / '.join(label_of[n] for n in poolers)} |"
             f" pooler context switches per tx {' / '.join(label_of[n] for n in poolers)} |")
    rule += "---|---|---|---|"
    lines.append(head)
    lines.append(rule)

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

    cells = [(m, c) for m in modes for c in clients]
    if args.connect_clients:
        cells.append(("connect", args.connect_clients))
    for mode, c in cells:
        runs = {n: results[(mode, c, n)] for n in names}
        td, tb = med(runs["direct"], "tps"), med(runs["pgbouncer"], "tps")
        row = f"| {'simple, `-C` (tps = connections/s)' if mode == 'connect' else mode} | {c} | " \
              f"{fmt(runs['direct'])} | {fmt(runs['pgbouncer'])} |"
        for w in weirs:
            tw = med(runs[w], "tps")
            wb = f"{tw / tb:.2f}" if tb and tw else "n/a"
            wd = f"{tw / td:.2f}" if td and tw else "n/a"
            row += f" {fmt(runs[w])} | {wb} | {wd} |"
        lat = " / ".join(f"{med(runs[n], 'lat'):.2f}" if med(runs[n], "lat") is not None else "-" for n in names)
        p99 = " / ".join(f"{med(runs[n], 'p99'):.2f}" if med(runs[n], "p99") is not None else "-" for n in names)
        cpu = " / ".join(f"{med(runs[n], 'cpu_per_1k') * 1000:.0f}" if med(runs[n], "cpu_per_1k") else "-"
                         for n in poolers)
        cs = " / ".join(f"{med(runs[n], 'cs_per_tx'):.2f}" if med(runs[n], "cs_per_tx") is not None else "-"
                        for n in poolers)
        lines.append(f"{row} {lat} | {p99} | {cpu} | {cs} |")
    if memory:
        lines.append("")
        lines.append(f"Resident memory per idle client, {args.idle} logged-in connections held open "
                     "(VmRSS after minus before, divided by the count), each round in a fresh process: "
                     "median of the rounds, [lowest-highest]:")
        lines.append("")
        lines.append("| " + " | ".join(f"{label_of[n]} bytes/client" for n in poolers) + " | " +
                     " | ".join(f"{label_of[w]}/PgB" for w in weirs) + " |")
        lines.append("|" + "---:|" * (len(poolers) + len(weirs)))
        mid = {n: statistics.median(v) for n, v in memory.items() if v}

        def mem_cell(n):
            v = memory.get(n)
            if not v:
                return "n/a"
            failed = f" ({args.repeat - len(v)} of {args.repeat} rounds failed)" if len(v) < args.repeat else ""
            return f"{mid[n]:.0f}" + (f" [{min(v):.0f}-{max(v):.0f}]" if len(v) > 1 else "") + failed

        pb = mid.get("pgbouncer")
        cells_m = [mem_cell(n) for n in poolers]
        ratios = [f"{mid[w] / pb:.2f}" if pb and mid.get(w) else "n/a" for w in weirs]
        lines.append("| " + " | ".join(cells_m + ratios) + " |")
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
    if args.doc:
        with open(args.doc, "a") as f:
            f.write(f"\n## {now}: scripts/bench_compare.py\n\n{table}\n")


if __name__ == "__main__":
    main()

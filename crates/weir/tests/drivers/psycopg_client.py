"""psycopg 3 through Weir: run by crates/weir/tests/it/drivers.rs with a DSN and a client count.

Every query prepared server-side (prepare_threshold=0, names `_pg3_N` that collide across
clients with different text), pipeline mode with an error in the middle, server-side cursors,
COPY both ways and a cancel. Exits non-zero, with the reason, on any wrong answer.
"""
import sys
import threading
import time

import psycopg
from psycopg import errors

DSN, N = sys.argv[1], int(sys.argv[2])
failures = []


def client(i):
    with psycopg.connect(DSN, prepare_threshold=0) as c:
        for k in range(60):
            # Clients prepare in different orders, so one `_pg3_N` name means different SQL.
            texts = ["select %s::int + 1", "select %s::int + 2"]
            if i % 2:
                texts.reverse()
            for t in texts:
                assert c.execute(t, (k,)).fetchone()[0] == k + int(t[-1]), t
            assert c.execute("select %s::text || %s::text", (f"c{i}", str(k))).fetchone()[0] == f"c{i}{k}"
            c.commit()
            if k % 10:
                continue
            key = i * 10000 + k
            with c.transaction():
                c.execute("insert into pg3_t values (%s, %s)", (key, "x"))
            try:
                with c.transaction():
                    c.execute("insert into pg3_t values (%s, %s)", (key, "y"))
                raise AssertionError("a duplicate key was accepted")
            except errors.UniqueViolation:
                pass
            with c.pipeline():
                cur = c.cursor()
                cur.executemany(
                    "insert into pg3_t values (%s, %s) on conflict (id) do update set name = excluded.name",
                    [(key + 5000 + j, f"p{j}") for j in range(5)],
                )
                count = c.execute("select count(*) from pg3_t where id between %s and %s", (key + 5000, key + 5004))
            assert count.fetchone()[0] == 5
            c.commit()
            # An error in the middle of a pipeline: up to its Sync, one implicit transaction, undone whole.
            c.autocommit = True
            try:
                with c.pipeline():
                    c.execute("insert into pg3_t values (%s, 'before')", (key + 6000,))
                    c.execute("select 1 / 0")
                    c.execute("insert into pg3_t values (%s, 'after')", (key + 6001,))
                raise AssertionError("the pipeline's error was lost")
            except errors.DivisionByZero:
                pass
            got = c.execute("select array_agg(id order by id) from pg3_t where id between %s and %s", (key + 6000, key + 6001)).fetchone()[0]
            assert got is None, got
            c.autocommit = False
            with c.cursor(name=f"sc{i}") as sc:  # DECLARE ... and FETCH, in a transaction
                sc.execute("select generate_series(1, 500)")
                rows = sc.fetchmany(100) + sc.fetchall()
                assert len(rows) == 500, len(rows)
            c.commit()
            with c.cursor() as cur:
                with cur.copy("copy pg3_copy (a, b) from stdin") as cp:
                    for j in range(200):
                        cp.write_row((key * 1000 + j, f"v{j}"))
                with cur.copy("copy (select a, b from pg3_copy where a between %s and %s order by a) to stdout", (key * 1000, key * 1000 + 199)) as cp:
                    rows = list(cp.rows())
            assert len(rows) == 200 and rows[5] == (str(key * 1000 + 5), "v5"), rows[:2]
            c.commit()


def cancel():
    with psycopg.connect(DSN, autocommit=True) as c:
        done = threading.Event()

        def canceller():
            # Again until it takes: a cancel that arrives while the query still waits for a
            # server connection has nothing to cancel yet.
            while not done.wait(0.5):
                c.cancel()

        thread = threading.Thread(target=canceller)
        thread.start()
        t = time.monotonic()
        try:
            c.execute("select pg_sleep(10)")
            raise AssertionError("not cancelled")
        except errors.QueryCanceled:
            pass
        finally:
            done.set()
            thread.join()
        assert time.monotonic() - t < 5
        assert c.execute("select 7").fetchone()[0] == 7


def run(f, *a):
    try:
        f(*a)
    except BaseException as e:  # reported below: a thread's exception would otherwise be lost
        import traceback
        failures.append(f"{f.__name__}{a}: {e!r} {traceback.format_exc(limit=-1)}")


with psycopg.connect(DSN, autocommit=True) as c:
    c.execute("create table pg3_t (id int primary key, name text)")
    c.execute("create table pg3_copy (a int, b text)")
threads = [threading.Thread(target=run, args=(client, i)) for i in range(N)]
threads.append(threading.Thread(target=run, args=(cancel,)))
for t in threads:
    t.start()
for t in threads:
    t.join()
if failures:
    sys.exit("\n".join(failures))
print(f"psycopg {psycopg.__version__}: {N} clients ok")

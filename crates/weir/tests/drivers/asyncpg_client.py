"""asyncpg through Weir: run by crates/weir/tests/it/drivers.rs with a DSN and a client count.

asyncpg prepares every query as a named statement and keeps it per connection, binds in
binary, and prepares again when PostgreSQL reports a plan out of date: the driver that
transaction pooling most often breaks. Exits non-zero, with the reason, on any wrong answer.
"""
import asyncio
import datetime
import decimal
import json
import sys
import time
import uuid

import asyncpg

DSN, N = sys.argv[1], int(sys.argv[2])


async def client(i):
    c = await asyncpg.connect(DSN)
    for k in range(100):
        assert await c.fetchval("select $1::int + 1", k) == k + 1
        # The same text on every client, and a text only this client uses.
        r = await c.fetchrow(f"select $1::text || '-' || $2::text as s, $3::numeric * {i} as n", f"c{i}", str(k), decimal.Decimal("1.5"))
        assert r["s"] == f"c{i}-{k}" and r["n"] == decimal.Decimal("1.5") * i, r
        if k % 20:
            continue
        key = i * 100000 + k
        uid, now = uuid.uuid4(), datetime.datetime.now(datetime.timezone.utc)
        async with c.transaction():
            await c.execute("insert into apg_t values ($1, $2, $3, $4, $5, $6, $7)", key, f"n{key}", decimal.Decimal("2.25"), json.dumps({"a": k}), uid, now, [1, 2, k])
            row = await c.fetchrow("select * from apg_t where id = $1", key)
            assert row["u"] == uid and row["ts"] == now and row["arr"] == [1, 2, k] and json.loads(row["j"]) == {"a": k}, row
        try:
            await c.execute("insert into apg_t (id) values ($1)", key)
            raise AssertionError("a duplicate key was accepted")
        except asyncpg.UniqueViolationError:
            pass
        try:
            async with c.transaction():
                await c.execute("insert into apg_t (id) values ($1)", key + 50000)
                await c.fetchval("select 1 / 0")
        except asyncpg.DivisionByZeroError:
            pass
        assert await c.fetchval("select count(*) from apg_t where id = $1", key + 50000) == 0, "rolled back"
        st = await c.prepare("select generate_series(1, $1::int) as g")
        assert [r["g"] for r in await st.fetch(5)] == [1, 2, 3, 4, 5]
        async with c.transaction():
            # A portal read in pieces (Execute with a row limit, PortalSuspended).
            got = [r["g"] async for r in c.cursor("select generate_series(1, 1000) as g", prefetch=50)]
            assert got == list(range(1, 1001)), len(got)
            cur = await c.cursor("select generate_series(1, 100) as g")
            assert len(await cur.fetch(30)) == 30 and len(await cur.fetch(100)) == 70
        await c.executemany("insert into apg_t (id, name) values ($1, $2) on conflict (id) do update set name = excluded.name", [(key + 70000 + j, f"m{j}") for j in range(5)])
        assert await c.fetchval("select count(*) from apg_t where id between $1 and $2", key + 70000, key + 70004) == 5
    await c.close()


async def uncached(i):
    """statement_cache_size=0 (the usual advice for transaction pooling): asyncpg describes
    the unnamed statement in one round trip and sends its Parse again with the Bind in the
    next, each text this client's own."""
    c = await asyncpg.connect(DSN, statement_cache_size=0)
    for k in range(50):
        assert await c.fetchval(f"select $1::int * 10 + {i}", k) == k * 10 + i
    await c.close()


async def copy_in():
    c = await asyncpg.connect(DSN)
    await c.copy_records_to_table("apg_copy", records=[(j, f"r{j}") for j in range(10000)])
    assert await c.fetchval("select count(*) from apg_copy") == 10000
    assert await c.fetchval("select sum(a) from apg_copy") == sum(range(10000))
    await c.close()


async def schema_change():
    """A column added under a prepared `select *`: asyncpg's retry must then succeed."""
    c = await asyncpg.connect(DSN)
    assert (await c.fetchrow("select * from apg_shape"))["a"] == 1
    other = await asyncpg.connect(DSN)
    await other.execute("alter table apg_shape add column b text default 'x'")
    assert (await c.fetchrow("select * from apg_shape"))["b"] == "x"
    await other.close()
    await c.close()


async def timeout_cancels():
    """asyncpg's timeout sends a CancelRequest; the connection stays usable."""
    c = await asyncpg.connect(DSN)
    t = time.monotonic()
    try:
        await c.fetchval("select pg_sleep(10)", timeout=0.5)
        raise AssertionError("no timeout")
    except asyncio.TimeoutError:
        pass
    assert time.monotonic() - t < 5, time.monotonic() - t
    assert await c.fetchval("select 42") == 42
    big = b"\x01\x02" * (2 * 1024 * 1024)
    assert await c.fetchval("select length($1::bytea)", big) == len(big)
    assert len(await c.fetchval("select repeat('z', 8000000)")) == 8000000
    await c.close()


async def pooled():
    """asyncpg's own pool, which resets each connection it takes back."""
    pool = await asyncpg.create_pool(DSN, min_size=2, max_size=6)

    async def job(i):
        async with pool.acquire() as con:
            async with con.transaction():
                return await con.fetchval("select $1::int * 2", i)

    assert await asyncio.gather(*(job(i) for i in range(300))) == [i * 2 for i in range(300)]
    await pool.close()


async def main():
    c = await asyncpg.connect(DSN)
    await c.execute("""
        create table apg_t (id int primary key, name text, v numeric, j jsonb, u uuid, ts timestamptz, arr int[]);
        create table apg_copy (a int, b text);
        create table apg_shape (a int); insert into apg_shape values (1);
    """)
    await c.close()
    await asyncio.gather(*(client(i) for i in range(N)), *(uncached(i) for i in range(N)), copy_in(), timeout_cancels(), pooled())
    await schema_change()
    print(f"asyncpg {asyncpg.__version__}: {N} clients ok")


asyncio.run(main())

// node-postgres (pg) through Weir: run by crates/weir/tests/it/drivers.rs as
// `node node_pg_client.js URL CLIENTS`, with NODE_PATH pointing at the installed `pg`.
//
// Named statements (`name:` in a query: Parse once per connection, then Bind/Execute only),
// the same name with different SQL on different clients, unnamed parameterised queries,
// multi-statement simple queries, errors, and a transaction. Exits non-zero on a wrong answer.
const { Client } = require('pg');

const url = process.argv[2];
const n = Number(process.argv[3]);

function check(ok, what) {
  if (!ok) throw new Error('check failed: ' + what);
}

async function client(i) {
  const c = new Client({ connectionString: url });
  await c.connect();
  // One name, two texts: odd clients add 100.
  const mine = i % 2 ? 'select $1::int + 100 as v' : 'select $1::int as v';
  for (let k = 0; k < 150; k++) {
    const r = await c.query({ name: 'q', text: mine, values: [k] });
    check(r.rows[0].v === k + (i % 2 ? 100 : 0), `named statement: ${r.rows[0].v}`);
    const r2 = await c.query('select $1::text || $2::text as s', ['c' + i, String(k)]);
    check(r2.rows[0].s === 'c' + i + k, 'unnamed');
    if (k % 15) continue;
    const key = i * 100000 + k;
    await c.query('begin');
    await c.query({ name: 'ins', text: 'insert into node_t values ($1, $2)', values: [key, 'x'] });
    const inTx = await c.query({ name: 'cnt', text: 'select count(*)::int as n from node_t where id = $1', values: [key] });
    check(inTx.rows[0].n === 1, 'own insert seen in the transaction');
    await c.query('commit');
    try {
      await c.query({ name: 'ins', text: 'insert into node_t values ($1, $2)', values: [key, 'y'] });
      throw new Error('a duplicate key was accepted');
    } catch (e) {
      check(e.code === '23505', `sqlstate ${e.code}: ${e.message}`);
    }
    const multi = await c.query('select 1 as a; select 2 as b');
    check(multi.length === 2 && multi[1].rows[0].b === 2, 'multi-statement');
    try {
      await c.query('select 1 / 0');
      throw new Error('no error');
    } catch (e) {
      check(e.code === '22012', `sqlstate ${e.code}`);
    }
    const after = await c.query({ name: 'cnt', text: 'select count(*)::int as n from node_t where id = $1', values: [key] });
    check(after.rows[0].n === 1, 'committed row');
  }
  await c.end();
}

(async () => {
  const c = new Client({ connectionString: url });
  await c.connect();
  await c.query('create table node_t (id int primary key, name text)');
  await c.end();
  await Promise.all([...Array(n).keys()].map(client));
  console.log(`pg ${require('pg/package.json').version}: ${n} clients ok`);
})().catch((e) => {
  console.error(e);
  process.exit(1);
});

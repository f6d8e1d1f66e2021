-- The benchmark's scratch table does not belong in a production database: the benchmark now
-- creates it in its own scratch database (benches/migrations). Migration 0004 stays as it was
-- (an applied migration must not change), this one removes what it created.
DROP TABLE IF EXISTS bench_scratch;

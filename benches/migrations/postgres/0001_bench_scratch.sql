-- The benchmark's scratch table (`cargo bench --bench e2e`), in its own scratch database: raw batched inserts are measured into it.
CREATE TABLE bench_scratch
(
    id      bigint NOT NULL,
    payload text   NOT NULL
);

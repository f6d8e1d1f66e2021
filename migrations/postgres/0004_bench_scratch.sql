-- Scratch table the benchmark (`cargo bench --bench e2e`) measures raw batched inserts in.
CREATE TABLE bench_scratch
(
    id      bigint NOT NULL,
    payload text   NOT NULL
);

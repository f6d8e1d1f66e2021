-- A daily budget per carrier account (Rev: 150,000 calls a day): `per_day` calls on each UTC day
-- of the database's clock; `day` is the day (seconds since the epoch / 86,400, rounded down) that
-- `day_used` slots were reserved on. NULL per_day: no budget.
ALTER TABLE rate_limits
    ADD COLUMN per_day bigint,
    ADD COLUMN day bigint NOT NULL DEFAULT 0,
    ADD COLUMN day_used bigint NOT NULL DEFAULT 0;

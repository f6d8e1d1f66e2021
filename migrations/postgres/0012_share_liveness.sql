-- A worker's share of an account's concurrency stops counting as soon as its worker is gone,
-- not only when it runs out: a worker writing a share with `live_locked` holds the session
-- advisory lock hashtextextended('bulkflow:limits:' || owner, 0) on a connection of its own, so
-- when its process dies (and PostgreSQL closes that connection) the share is ignored at once.
-- Shares of workers that do not hold such a lock (false) count until `expires_at`.
ALTER TABLE rate_limit_shares ADD COLUMN live_locked boolean NOT NULL DEFAULT false;

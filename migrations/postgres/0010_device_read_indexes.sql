-- The API's reads of one bulk change's devices stay cheap at 1,000,000 devices:
-- * a page of its devices by id (keyset paging: `id > last`), in one status or in any (one
--   range of this index per status, merged: no index of its own, as every status change of a
--   device updates every index of its row);
-- * its failures and billing warnings (the few rows with has_errors).
-- Index names move with their tables when a rebuild swaps the live and shadow tables, so both
-- tables lose the old index under either name and get the new ones.
-- (The shadow table's copy has a generated name: LIKE … INCLUDING ALL.)
DO $$
DECLARE r record;
BEGIN
  FOR r IN SELECT indexname FROM pg_indexes
            WHERE tablename IN ('m2m_device_change', 'm2m_device_change_rebuild')
              AND indexdef LIKE '%(bulk_change_id, status)' LOOP
    EXECUTE format('DROP INDEX %I', r.indexname);
  END LOOP;
END $$;
CREATE INDEX m2m_device_change_bulk_status_id ON m2m_device_change (bulk_change_id, status, id);
CREATE INDEX m2m_device_change_bulk_status_id_rebuild ON m2m_device_change_rebuild (bulk_change_id, status, id);
-- (status in the key: with it, the planner prefers this small index even without statistics.)
CREATE INDEX m2m_device_change_errors ON m2m_device_change (bulk_change_id, status) WHERE has_errors;
CREATE INDEX m2m_device_change_errors_rebuild ON m2m_device_change_rebuild (bulk_change_id, status) WHERE has_errors;

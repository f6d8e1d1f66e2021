-- Fencing: every acquisition of a bulk change's lease takes the next epoch. A runner's appends
-- are checked against it in the same transaction, so a holder that was only presumed dead (and
-- replaced) cannot write on top of its successor. Rows now outlive their holder (a release
-- expires the lease instead of deleting it) so that epochs never go back.
ALTER TABLE bulk_change_leases ADD COLUMN epoch bigint NOT NULL DEFAULT 0;

-- Devices that ended CANCELLED, counted like processed and failed, so that a bulk change's
-- summary needs no scan of its devices. Both the live table and its rebuild shadow (they swap).
ALTER TABLE device_bulk_change ADD COLUMN cancelled BIGINT NOT NULL DEFAULT 0;
ALTER TABLE device_bulk_change_rebuild ADD COLUMN cancelled BIGINT NOT NULL DEFAULT 0;

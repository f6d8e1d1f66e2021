-- Shadow tables `bulkflow rebuild` fills from the events and then swaps with the live ones.
CREATE TABLE device_bulk_change_rebuild (LIKE device_bulk_change INCLUDING ALL);
CREATE TABLE m2m_device_change_rebuild (LIKE m2m_device_change INCLUDING ALL);
CREATE TABLE device_bulk_change_log_rebuild (LIKE device_bulk_change_log INCLUDING ALL);

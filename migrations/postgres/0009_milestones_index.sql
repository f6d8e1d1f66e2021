-- A bulk change's own milestones (accepted, started, paused, held, cancelled, completed, retried)
-- without its device events: `bulkflow replay ID --summary` reads them through this index, so
-- its cost does not grow with the bulk change (a 1,000,000-device one has ~5,000,000 events and
-- a dozen milestones). The list names the device-level event types: a new bulk-level type is
-- then found without a new index. (Building it reads the events table once.)
CREATE INDEX events_milestones ON events (aggregate_id, sequence)
 WHERE event_type NOT IN ('DevicesAdded', 'DeviceStatusUpdated', 'ServiceStatusUpdated',
   'RevServiceCreationStarted', 'RevServiceCreated', 'RevServiceFailed',
   'DeviceStepRetryScheduled', 'DeviceFailed', 'DeviceProcessed', 'DevicesCancelled');

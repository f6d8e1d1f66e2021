//! The pure domain: identifiers, statuses, the bulk change request and the `BulkChange`
//! aggregate. Nothing in here performs I/O, reads the clock or draws random numbers: time and
//! the outcomes of external calls arrive inside commands.

pub mod api_call;
pub mod bulk_change;
pub mod ids;
pub mod policy;
pub mod request;
pub mod scan;
pub mod status;

pub use api_call::ApiCall;
pub use bulk_change::{BulkChange, BulkChangeCommand, BulkChangeEvent};
pub use ids::{BulkChangeId, DeviceChangeId, Iccid, Msisdn, ServiceProviderId, TenantId};
pub use policy::{Policy, RetryPolicy, WorkflowRef};
pub use request::{BulkChangeRequest, DeviceRequest, Origin, RevServiceRequest};
pub use status::{
    BulkChangeStatus, DeviceStatus, Downstream, ServiceFlag, SimStatus, Step, TargetStatus,
};

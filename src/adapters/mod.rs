//! Clients of the external systems. They record every exchange as an [`ApiCall`] without
//! credentials, and classify failures as the workflow needs them.

pub mod http;
pub mod pond;
pub mod queue;
pub mod rev;
pub mod sqs;

pub use http::Failure;

use std::future::Future;

use crate::domain::{ApiCall, Iccid, RevServiceRequest, ServiceFlag, SimStatus};

/// What the workflow needs of POND (implemented by [`pond::PondClient`]).
pub trait PondApi: Send + Sync {
    /// `GET …/sim/{ICCID}/status`.
    fn get_status(
        &self,
        iccid: &Iccid,
        request_id: String,
    ) -> impl Future<Output = Result<(SimStatus, ApiCall), Failure>> + Send;

    /// `POST …/sim/{ICCID}/status` with all three flags.
    fn set_service_status(
        &self,
        iccid: &Iccid,
        flag: ServiceFlag,
        request_id: String,
    ) -> impl Future<Output = Result<ApiCall, Failure>> + Send;

    /// `DELETE …/sim/{ICCID}/purge`; returns `earlier` plus this call.
    fn purge(
        &self,
        iccid: &Iccid,
        request_id: String,
        earlier: Vec<ApiCall>,
    ) -> impl Future<Output = Result<Vec<ApiCall>, Failure>> + Send;
}

/// What the workflow needs of Rev.io (implemented by [`rev::RevClient`]).
pub trait RevApi: Send + Sync {
    /// `POST /v1/Services`: the new service's id; returns `earlier` plus this call. Not sent
    /// after `send_by` (the end of its intent's send window): checked right before the POST,
    /// after any wait for a rate slot or a hold.
    fn create_service(
        &self,
        service: &RevServiceRequest,
        number: &str,
        iccid: &Iccid,
        send_by: Option<chrono::DateTime<chrono::Utc>>,
        earlier: Vec<ApiCall>,
    ) -> impl Future<Output = Result<(i64, Vec<ApiCall>), Failure>> + Send;

    /// `GET /v1/Services?search.number=`: an existing service for `number` with the customer and
    /// service type of `service` (a service of another customer or type is not ours).
    fn find_service(
        &self,
        number: &str,
        service: &RevServiceRequest,
    ) -> impl Future<Output = Result<(Option<i64>, Vec<ApiCall>), Failure>> + Send;

    /// `POST /v1/ServiceProduct`: adds product `product_id` to service `service_id` (not
    /// idempotent: a repeated POST adds it twice).
    fn create_product(
        &self,
        service_id: i64,
        product_id: i64,
        service: &RevServiceRequest,
    ) -> impl Future<Output = Result<ApiCall, Failure>> + Send;

    /// `GET /v1/ServiceProduct?search.service_id=`: the products service `service_id` has.
    fn find_products(
        &self,
        service_id: i64,
    ) -> impl Future<Output = Result<(Vec<i64>, Vec<ApiCall>), Failure>> + Send;
}

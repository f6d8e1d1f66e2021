//! The carrier clients behind an account's rate: every call waits for a slot, and a 429 is
//! reported to the account (it holds the account and lowers its rate).

use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::Account;
use crate::adapters::{Failure, PondApi, RevApi};
use crate::domain::bulk_change::FailureClass;
use crate::domain::{ApiCall, BulkChangeId, Iccid, RevServiceRequest, ServiceFlag, SimStatus};

/// `C`'s calls for one bulk change, each in a rate slot of `account`.
#[derive(Clone)]
pub struct Paced<C> {
    pub inner: C,
    pub account: Arc<Account>,
    pub bulk: BulkChangeId,
}

impl<C> Paced<C> {
    async fn call<T>(&self, call: impl Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
        let slot = self.account.slot(self.bulk).await;
        let result = call.await;
        if let Err(Failure {
            class:
                FailureClass::Retryable {
                    throttled: true,
                    retry_after_secs,
                    ..
                },
            ..
        }) = &result
        {
            self.account.throttled(slot, *retry_after_secs);
        }
        result
    }
}

impl<P: PondApi> PondApi for Paced<P> {
    async fn get_status(
        &self,
        iccid: &Iccid,
        request_id: String,
    ) -> Result<(SimStatus, ApiCall), Failure> {
        self.call(self.inner.get_status(iccid, request_id)).await
    }

    async fn set_service_status(
        &self,
        iccid: &Iccid,
        flag: ServiceFlag,
        request_id: String,
    ) -> Result<ApiCall, Failure> {
        self.call(self.inner.set_service_status(iccid, flag, request_id))
            .await
    }

    async fn purge(
        &self,
        iccid: &Iccid,
        request_id: String,
        earlier: Vec<ApiCall>,
    ) -> Result<Vec<ApiCall>, Failure> {
        self.call(self.inner.purge(iccid, request_id, earlier))
            .await
    }
}

impl<R: RevApi> RevApi for Paced<R> {
    async fn create_service(
        &self,
        service: &RevServiceRequest,
        number: &str,
        iccid: &Iccid,
        send_by: Option<DateTime<Utc>>,
        earlier: Vec<ApiCall>,
    ) -> Result<(i64, Vec<ApiCall>), Failure> {
        self.call(
            self.inner
                .create_service(service, number, iccid, send_by, earlier),
        )
        .await
    }

    async fn find_service(
        &self,
        number: &str,
        service: &RevServiceRequest,
    ) -> Result<(Option<i64>, ApiCall), Failure> {
        self.call(self.inner.find_service(number, service)).await
    }

    async fn create_product(
        &self,
        service_id: i64,
        product_id: i64,
        service: &RevServiceRequest,
    ) -> Result<ApiCall, Failure> {
        self.call(self.inner.create_product(service_id, product_id, service))
            .await
    }

    async fn find_products(&self, service_id: i64) -> Result<(Vec<i64>, ApiCall), Failure> {
        self.call(self.inner.find_products(service_id)).await
    }
}

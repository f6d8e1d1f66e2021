//! The carrier clients behind an account's rate: every call waits for a slot, and a 429 is
//! reported to the account (it holds the account and lowers its rate).

use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

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
    /// Fired when the bulk change is being cancelled: a call that would change something and
    /// has not gone out yet (still waiting for its slot) is not sent. Lookups and a product of
    /// a service already created still go out: they resolve what is in flight.
    pub halt: CancellationToken,
}

/// A call not sent because its bulk change is being cancelled: not counted, nothing to look up.
fn halted(earlier: Vec<ApiCall>) -> Failure {
    Failure {
        class: FailureClass::Retryable {
            retry_after_secs: None,
            outcome_unknown: false,
            throttled: false,
            not_sent: true,
        },
        reason: "not sent: the bulk change is being cancelled".into(),
        calls: earlier,
    }
}

impl<C> Paced<C> {
    async fn call<T>(&self, call: impl Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
        let slot = self.account.slot(self.bulk).await;
        self.sent(slot, call).await
    }

    /// A call that changes something: not sent once the bulk change is being cancelled (also
    /// while it waits for its slot). `earlier` are the step's calls made before it.
    async fn change<T>(
        &self,
        earlier: &[ApiCall],
        call: impl Future<Output = Result<T, Failure>>,
    ) -> Result<T, Failure> {
        let slot = tokio::select! {
            biased;
            _ = self.halt.cancelled() => return Err(halted(earlier.to_vec())),
            slot = self.account.slot(self.bulk) => slot,
        };
        if self.halt.is_cancelled() {
            self.account.unused(slot);
            return Err(halted(earlier.to_vec()));
        }
        self.sent(slot, call).await
    }

    async fn sent<T>(
        &self,
        slot: super::Slot,
        call: impl Future<Output = Result<T, Failure>>,
    ) -> Result<T, Failure> {
        let result = call.await;
        if let Err(Failure {
            class: FailureClass::Retryable { not_sent: true, .. },
            ..
        }) = &result
        {
            // Nothing went out (a Rev creation past its send window).
            self.account.unused(slot);
            return result;
        }
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
        self.change(&[], self.inner.get_status(iccid, request_id))
            .await
    }

    async fn set_service_status(
        &self,
        iccid: &Iccid,
        flag: ServiceFlag,
        request_id: String,
    ) -> Result<ApiCall, Failure> {
        self.change(&[], self.inner.set_service_status(iccid, flag, request_id))
            .await
    }

    async fn purge(
        &self,
        iccid: &Iccid,
        request_id: String,
        earlier: Vec<ApiCall>,
    ) -> Result<Vec<ApiCall>, Failure> {
        self.change(
            &earlier.clone(),
            self.inner.purge(iccid, request_id, earlier),
        )
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
        self.change(
            &earlier.clone(),
            self.inner
                .create_service(service, number, iccid, send_by, earlier),
        )
        .await
    }

    async fn find_service(
        &self,
        number: &str,
        service: &RevServiceRequest,
    ) -> Result<(Option<i64>, Vec<ApiCall>), Failure> {
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

    async fn find_products(&self, service_id: i64) -> Result<(Vec<i64>, Vec<ApiCall>), Failure> {
        self.call(self.inner.find_products(service_id)).await
    }
}

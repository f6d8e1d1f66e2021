//! From the portal's rows to a bulk change request: `DeviceBulkChange` gives the header, each
//! active, unprocessed `M2M_DeviceChange` row a device, its `ChangeRequest` JSON the target and
//! the Rev service. Every refusal names the table, the row and the field.

use chrono::NaiveDate;
use serde::Deserialize;
use serde_json::Value;

use super::Refusal;
use crate::domain::{
    BulkChangeId, BulkChangeRequest, DeviceChangeId, DeviceRequest, Iccid, Msisdn, Origin,
    RevServiceRequest, ServiceProviderId, TargetStatus, TenantId,
};

/// A `DeviceBulkChange` row, as far as bulkflow reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkRow {
    pub id: i64,
    pub tenant_id: i64,
    pub status: String,
    pub change_request_type: Option<String>,
    pub service_provider_id: i64,
    pub integration: Option<String>,
    pub portal_type_id: Option<i64>,
    pub created_by: Option<String>,
    pub is_active: bool,
    pub is_deleted: bool,
}

/// An `M2M_DeviceChange` row, as far as bulkflow reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRow {
    pub id: i64,
    pub iccid: Option<String>,
    pub msisdn: Option<String>,
    pub device_identifier: Option<String>,
    pub change_request: Option<String>,
}

/// The portal type whose logs go to `DeviceBulkChangeLog` (M2M = 0, LNP = 1, Mobility = 2).
const PORTAL_M2M: i64 = 0;

/// The request's header and every device so far; built row by row so that a large bulk change
/// is never held twice (rows and requests) in memory.
#[derive(Debug)]
pub struct Builder {
    request: BulkChangeRequest,
    /// Rows that do not map, with why (the first refuses the bulk change).
    pub bad_rows: Vec<(i64, String)>,
}

/// Statuses after which the portal's bulk change needs nothing more.
pub fn is_finished(status: &str) -> bool {
    ["PROCESSED", "ERROR", "CANCELLED"]
        .iter()
        .any(|s| status.trim().eq_ignore_ascii_case(s))
}

impl Builder {
    /// Starts from the bulk change row; refuses a type, integration or portal bulkflow does not
    /// run.
    pub fn new(row: &BulkRow, skipped: u64) -> Result<Self, Refusal> {
        let refuse = |field: &str, why: String| {
            Refusal::bulk(format!("DeviceBulkChange {}.{field}: {why}", row.id))
        };
        if !row.is_active || row.is_deleted {
            return Err(refuse(
                "IsDeleted",
                "the bulk change is deleted or inactive".into(),
            ));
        }
        let kind = row.change_request_type.as_deref().unwrap_or("").trim();
        if !kind.eq_ignore_ascii_case("statusupdate") {
            return Err(refuse(
                "ChangeRequestType",
                format!(
                    "bulkflow runs StatusUpdate bulk changes only, not {:?}",
                    short(kind)
                ),
            ));
        }
        let integration = row.integration.as_deref().unwrap_or("").trim();
        if !integration.eq_ignore_ascii_case("pond") {
            return Err(refuse(
                "Integration",
                format!(
                    "bulkflow runs the Pond integration only, not {:?}",
                    short(integration)
                ),
            ));
        }
        if let Some(portal) = row.portal_type_id.filter(|p| *p != PORTAL_M2M) {
            return Err(refuse(
                "PortalTypeId",
                format!("bulkflow runs M2M bulk changes (0) only, not {portal}"),
            ));
        }
        let id = |field: &str, e: crate::domain::ids::Error| refuse(field, e.to_string());
        Ok(Self {
            request: BulkChangeRequest {
                bulk_change_id: BulkChangeId::new(row.id).map_err(|e| id("Id", e))?,
                tenant_id: TenantId::new(row.tenant_id).map_err(|e| id("TenantId", e))?,
                service_provider_id: ServiceProviderId::new(row.service_provider_id)
                    .map_err(|e| id("ServiceProviderId", e))?,
                change_request_type: "StatusUpdate".into(),
                integration: "Pond".into(),
                requested_by: row
                    .created_by
                    .as_deref()
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| s.chars().take(crate::domain::request::MAX_TEXT).collect()),
                origin: Origin::Platform { skipped },
                devices: Vec::new(),
            },
            bad_rows: Vec::new(),
        })
    }

    /// Adds one device row (or notes why it does not map).
    pub fn add(&mut self, row: DeviceRow) {
        let id = row.id;
        match device(row) {
            Ok(device) => self.request.devices.push(device),
            Err(why) => self.bad_rows.push((id, why)),
        }
    }

    /// The request, validated; or the refusal naming the first row that does not map.
    pub fn finish(self) -> Result<BulkChangeRequest, Refusal> {
        if !self.bad_rows.is_empty() {
            return Err(Refusal {
                reason: self.bad_rows[0].1.clone(),
                rows: self.bad_rows,
            });
        }
        if self.request.devices.is_empty() {
            return Err(Refusal::bulk(format!(
                "DeviceBulkChange {}: no active, unprocessed M2M_DeviceChange rows",
                self.request.bulk_change_id
            )));
        }
        if let Err(e) = self.request.validate() {
            return Err(refusal_of(&self.request, &e));
        }
        Ok(self.request)
    }
}

/// A validation error of the assembled request, named by the platform's row where it has one.
fn refusal_of(request: &BulkChangeRequest, e: &crate::domain::request::Error) -> Refusal {
    use crate::domain::request::Error as E;
    let index = match e {
        E::DuplicateDeviceChangeId { index, .. }
        | E::DuplicateIccid { index, .. }
        | E::DuplicateMsisdn { index, .. }
        | E::RevServiceNeedsActive { index, .. }
        | E::CustomerIdNotNumeric { index, .. }
        | E::ProductsWithPackage { index }
        | E::BadProductId { index, .. } => Some(*index),
        _ => None,
    };
    match index.and_then(|i| request.devices.get(i)) {
        Some(d) => {
            let row = d.device_change_id.get();
            let reason = format!("M2M_DeviceChange {row}: {e}");
            Refusal {
                reason: reason.clone(),
                rows: vec![(row, reason)],
            }
        }
        None => Refusal::bulk(format!("DeviceBulkChange {}: {e}", request.bulk_change_id)),
    }
}

/// `ChangeRequest` of a status update, as the portal writes it (other fields are ignored).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ChangeRequest {
    update_status: Option<String>,
    post_update_status_id: Option<i64>,
    is_ignore_current_status: Option<bool>,
    rev_service: Option<RevService>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RevService {
    rev_customer_id: Option<Value>,
    number: Option<String>,
    service_type_id: Option<i64>,
    provider_id: Option<i64>,
    usage_plan_group_id: Option<i64>,
    rev_package_id: Option<i64>,
    rev_product_id_list: Option<Vec<i64>>,
    effective_date: Option<String>,
    activated_date: Option<String>,
    prorate: Option<bool>,
}

/// One device from its row; the error names the row and field.
fn device(row: DeviceRow) -> Result<DeviceRequest, String> {
    let at = |field: &str, why: String| format!("M2M_DeviceChange {}.{field}: {why}", row.id);
    let device_change_id = DeviceChangeId::new(row.id).map_err(|e| at("Id", e.to_string()))?;
    let iccid_text = row
        .iccid
        .as_deref()
        .or(row.device_identifier.as_deref())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| at("ICCID", "missing (and no DeviceIdentifier)".into()))?;
    let iccid = Iccid::parse(iccid_text).map_err(|e| at("ICCID", e.to_string()))?;
    let text = row
        .change_request
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| at("ChangeRequest", "missing".into()))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let change: ChangeRequest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path.is_empty() || path == "." {
            "ChangeRequest".to_string()
        } else {
            format!("ChangeRequest.{path}")
        };
        at(&field, e.into_inner().to_string())
    })?;
    let status = change
        .update_status
        .as_deref()
        .ok_or_else(|| at("ChangeRequest.UpdateStatus", "missing".into()))?;
    let target_status: TargetStatus =
        status
            .trim()
            .parse()
            .map_err(|e: crate::domain::status::UnknownTargetStatus| {
                at("ChangeRequest.UpdateStatus", e.to_string())
            })?;
    let number = row
        .msisdn
        .as_deref()
        .or(change
            .rev_service
            .as_ref()
            .and_then(|r| r.number.as_deref()))
        .map(str::trim)
        .filter(|s| !s.is_empty());
    let msisdn = number
        .map(Msisdn::parse)
        .transpose()
        .map_err(|e| at("MSISDN", e.to_string()))?;
    let rev_service = change
        .rev_service
        .map(|r| {
            rev_service(r, &|field, why| {
                at(&format!("ChangeRequest.RevService.{field}"), why)
            })
        })
        .transpose()?;
    Ok(DeviceRequest {
        device_change_id,
        iccid,
        msisdn,
        target_status,
        is_ignore_current_status: change.is_ignore_current_status.unwrap_or(false),
        post_update_status_id: change.post_update_status_id,
        rev_service: rev_service.map(std::sync::Arc::new),
    })
}

fn rev_service(
    r: RevService,
    at: &dyn Fn(&str, String) -> String,
) -> Result<RevServiceRequest, String> {
    let customer_id = match r.rev_customer_id {
        Some(Value::String(s)) => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => return Err(at("RevCustomerId", format!("{other} is not a number"))),
        None => return Err(at("RevCustomerId", "missing".into())),
    };
    if customer_id.is_empty() || !customer_id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(at(
            "RevCustomerId",
            format!(
                "{:?} is not a whole number (Rev takes customer_id as an integer)",
                short(&customer_id)
            ),
        ));
    }
    let service_type_id = r
        .service_type_id
        .ok_or_else(|| at("ServiceTypeId", "missing".into()))?;
    let provider_id = r.provider_id.ok_or_else(|| {
        at(
            "ProviderId",
            "missing (bulkflow sends provider_id with every service)".into(),
        )
    })?;
    let date = |field: &str, value: Option<String>| -> Result<Option<NaiveDate>, String> {
        value
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.get(..10)
                    .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
                    .ok_or_else(|| at(field, format!("{:?} is not a date (yyyy-MM-dd…)", short(s))))
            })
            .transpose()
    };
    let effective_date = date("EffectiveDate", r.effective_date)?;
    let activated_date = date("ActivatedDate", r.activated_date)?;
    Ok(RevServiceRequest {
        customer_id,
        provider_id,
        service_type_id,
        usage_plan_group_id: r.usage_plan_group_id,
        package_id: r.rev_package_id,
        // As the original: the effective date is sent only for a prorated service.
        effective_date: effective_date.filter(|_| r.prorate.unwrap_or(false)),
        activated_date,
        // As the original: the products are created one by one only without a package.
        product_ids: if r.rev_package_id.is_none() {
            r.rev_product_id_list.unwrap_or_default()
        } else {
            Vec::new()
        },
    })
}

fn short(value: &str) -> String {
    value.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk_row() -> BulkRow {
        BulkRow {
            id: 900,
            tenant_id: 1,
            status: "PROCESSING".into(),
            change_request_type: Some("StatusUpdate".into()),
            service_provider_id: 12,
            integration: Some("Pond".into()),
            portal_type_id: Some(0),
            created_by: Some("ops@example.com".into()),
            is_active: true,
            is_deleted: false,
        }
    }

    fn row(id: i64, change_request: &str) -> DeviceRow {
        DeviceRow {
            id,
            iccid: Some(format!("89012608823100{id:05}")),
            msisdn: Some(format!("1555{id:07}")),
            device_identifier: None,
            change_request: Some(change_request.into()),
        }
    }

    const REV: &str = r#"{"UpdateStatus":"ACTIVE","PostUpdateStatusId":3,"IsIgnoreCurrentStatus":true,
        "AccountNumber":"A1","RevService":{"RevCustomerId":"4411","Number":"15550000001","DeviceId":7,
        "ServiceTypeId":5,"ProviderId":9,"UsagePlanGroupId":2,"RevPackageId":31,
        "EffectiveDate":"2026-03-01T00:00:00","ActivatedDate":"2026-03-02","Prorate":false,
        "IntegrationAuthenticationId":1}}"#;

    #[test]
    fn maps_the_portals_rows_to_a_request() {
        let mut b = Builder::new(&bulk_row(), 2).unwrap();
        b.add(row(1, REV));
        b.add(row(2, r#"{"UpdateStatus":"Suspend"}"#));
        let request = b.finish().unwrap();
        assert_eq!(request.bulk_change_id.get(), 900);
        assert_eq!(request.origin, Origin::Platform { skipped: 2 });
        assert_eq!(request.requested_by.as_deref(), Some("ops@example.com"));
        let first = &request.devices[0];
        assert_eq!(first.target_status, TargetStatus::Active);
        assert!(first.is_ignore_current_status);
        assert_eq!(first.post_update_status_id, Some(3));
        let rev = first.rev_service.as_ref().unwrap();
        assert_eq!(
            (
                rev.customer_id.as_str(),
                rev.provider_id,
                rev.service_type_id,
                rev.package_id
            ),
            ("4411", 9, 5, Some(31))
        );
        // Not prorated: no effective date, as the original.
        assert_eq!(rev.effective_date, None);
        assert_eq!(rev.activated_date, NaiveDate::from_ymd_opt(2026, 3, 2));
        assert_eq!(request.devices[1].target_status, TargetStatus::Suspended);
        assert!(request.devices[1].rev_service.is_none());
    }

    #[test]
    fn products_are_taken_only_without_a_package() {
        let mut b = Builder::new(&bulk_row(), 0).unwrap();
        b.add(row(
            1,
            &REV.replace(r#""RevPackageId":31,"#, r#""RevProductIdList":[501,502],"#),
        ));
        b.add(row(
            2,
            &REV.replace(
                r#""RevPackageId":31,"#,
                r#""RevPackageId":31,"RevProductIdList":[503],"#,
            ),
        ));
        let request = b.finish().unwrap();
        let rev = |i: usize| request.devices[i].rev_service.clone().unwrap();
        assert_eq!(
            (rev(0).package_id, rev(0).product_ids.clone()),
            (None, vec![501, 502])
        );
        assert_eq!(
            (rev(1).package_id, rev(1).product_ids.clone()),
            (Some(31), vec![])
        );
    }

    #[test]
    fn a_prorated_service_keeps_its_effective_date() {
        let mut b = Builder::new(&bulk_row(), 0).unwrap();
        b.add(row(
            1,
            &REV.replace(r#""Prorate":false"#, r#""Prorate":true"#),
        ));
        let request = b.finish().unwrap();
        let rev = request.devices[0].rev_service.as_ref().unwrap();
        assert_eq!(rev.effective_date, NaiveDate::from_ymd_opt(2026, 3, 1));
    }

    #[test]
    fn refusals_name_the_row_and_the_field() {
        let cases = [
            (
                REV.replace(r#""RevCustomerId":"4411""#, r#""RevCustomerId":"C-44""#),
                "M2M_DeviceChange 7.ChangeRequest.RevService.RevCustomerId",
            ),
            (
                r#"{"UpdateStatus":"Frozen"}"#.to_string(),
                "M2M_DeviceChange 7.ChangeRequest.UpdateStatus",
            ),
            (
                r#"{"IsIgnoreCurrentStatus":true}"#.to_string(),
                "M2M_DeviceChange 7.ChangeRequest.UpdateStatus: missing",
            ),
            (
                r#"{"UpdateStatus":"Active","IsIgnoreCurrentStatus":"yes"}"#.to_string(),
                "M2M_DeviceChange 7.ChangeRequest.IsIgnoreCurrentStatus",
            ),
            (
                REV.replace(r#""ServiceTypeId":5,"#, ""),
                "M2M_DeviceChange 7.ChangeRequest.RevService.ServiceTypeId: missing",
            ),
            (
                REV.replace(r#""RevPackageId":31,"#, r#""RevProductIdList":[1,1],"#),
                "M2M_DeviceChange 7: devices[1].rev_service.product_ids",
            ),
            (
                REV.replace("2026-03-02", "next week"),
                "M2M_DeviceChange 7.ChangeRequest.RevService.ActivatedDate",
            ),
            ("{not json".to_string(), "M2M_DeviceChange 7.ChangeRequest"),
        ];
        for (change_request, expected) in cases {
            let mut b = Builder::new(&bulk_row(), 0).unwrap();
            b.add(row(1, r#"{"UpdateStatus":"Active"}"#));
            b.add(row(7, &change_request));
            let refusal = b.finish().unwrap_err();
            assert!(
                refusal.reason.starts_with(expected),
                "{expected}: {}",
                refusal.reason
            );
            assert_eq!(refusal.rows.len(), 1);
            assert_eq!(refusal.rows[0].0, 7);
        }
        let mut bad_iccid = row(8, r#"{"UpdateStatus":"Active"}"#);
        bad_iccid.iccid = Some("123".into());
        let mut b = Builder::new(&bulk_row(), 0).unwrap();
        b.add(bad_iccid);
        assert!(b
            .finish()
            .unwrap_err()
            .reason
            .starts_with("M2M_DeviceChange 8.ICCID"));
    }

    #[test]
    fn a_duplicate_is_named_by_its_row() {
        let mut b = Builder::new(&bulk_row(), 0).unwrap();
        b.add(row(1, r#"{"UpdateStatus":"Active"}"#));
        let mut twin = row(2, r#"{"UpdateStatus":"Active"}"#);
        twin.iccid = row(1, "").iccid;
        b.add(twin);
        let refusal = b.finish().unwrap_err();
        assert!(
            refusal
                .reason
                .starts_with("M2M_DeviceChange 2: devices[1].iccid"),
            "{}",
            refusal.reason
        );
    }

    #[test]
    fn bulk_changes_bulkflow_does_not_run_are_refused_by_field() {
        let mut other = bulk_row();
        other.change_request_type = Some("CarrierRatePlanChange".into());
        assert!(Builder::new(&other, 0)
            .unwrap_err()
            .reason
            .contains("DeviceBulkChange 900.ChangeRequestType"));
        let mut other = bulk_row();
        other.integration = Some("Telegence".into());
        assert!(Builder::new(&other, 0)
            .unwrap_err()
            .reason
            .contains("DeviceBulkChange 900.Integration"));
        let mut other = bulk_row();
        other.portal_type_id = Some(2);
        assert!(Builder::new(&other, 0)
            .unwrap_err()
            .reason
            .contains("PortalTypeId"));
        let empty = Builder::new(&bulk_row(), 3).unwrap().finish().unwrap_err();
        assert!(
            empty.reason.contains("no active, unprocessed"),
            "{}",
            empty.reason
        );
        assert!(empty.rows.is_empty());
    }
}

//! Clients of other Shoal services: traced channels and a health probe used by status RPCs and
//! readiness.

use std::time::Duration;

use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::layers::{TracedChannel, traced_channel};

/// Another service this one calls.
#[derive(Clone)]
pub struct Upstream {
    /// Short name, e.g. `metrics`.
    pub name: &'static str,
    /// `http://host:port`.
    pub address: String,
    /// gRPC service name to health-check, e.g. `shoal.v1.MetricsService`.
    pub service: &'static str,
    /// A lazily connecting, trace-propagating channel.
    pub channel: TracedChannel,
}

impl Upstream {
    /// A client of `service` at `address` (connects on first use; `https://` over `tls`).
    pub fn new(
        name: &'static str,
        address: &str,
        service: &'static str,
        tls: Option<&crate::tls::Tls>,
    ) -> Result<Upstream, crate::layers::ChannelError> {
        Ok(Upstream {
            name,
            address: address.to_string(),
            service,
            channel: traced_channel(address, tls)?,
        })
    }

    /// The upstream's grpc.health.v1 status for its service, or `UNREACHABLE: <why>`.
    pub async fn health(&self) -> shoal_proto::v1::UpstreamStatus {
        let mut client = HealthClient::new(self.channel.clone());
        let request = HealthCheckRequest {
            service: self.service.to_string(),
        };
        let status = match tokio::time::timeout(Duration::from_secs(2), client.check(request)).await
        {
            Ok(Ok(response)) => response.into_inner().status().as_str_name().to_string(),
            Ok(Err(status)) => format!("UNREACHABLE: {}: {}", status.code(), status.message()),
            Err(_) => "UNREACHABLE: no answer within 2s".to_string(),
        };
        shoal_proto::v1::UpstreamStatus {
            name: self.name.to_string(),
            address: self.address.clone(),
            status,
        }
    }
}

/// The status for an RPC whose logic a later version of the service brings.
pub fn not_yet_implemented(method: &str) -> tonic::Status {
    tonic::Status::unimplemented(format!(
        "{method} is not implemented in this version of Shoal"
    ))
}

/// Checks a `service.*Addr` setting: `http(s)://host:port`.
pub fn validate_address(path: &str, value: &str, errors: &mut shoal_core::ValidationErrors) {
    let ok = value
        .strip_prefix("http://")
        .or_else(|| value.strip_prefix("https://"))
        .and_then(|rest| rest.rsplit_once(':'))
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
    if !ok {
        errors.add(
            path,
            format!("{value:?} is not of the form http(s)://host:port"),
        );
    }
}

/// `INVALID_ARGUMENT` listing every invalid field, in the message and as `google.rpc.BadRequest`
/// field violations (grpcurl shows both). `prefix` is put before each path (e.g. `pools[1].`).
pub fn invalid_argument(errors: &shoal_core::ValidationErrors, prefix: &str) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let fields: Vec<(String, String)> = errors
        .errors
        .iter()
        .map(|e| (format!("{prefix}{}", e.path), e.reason.clone()))
        .collect();
    let message = fields
        .iter()
        .map(|(path, reason)| format!("{path}: {reason}"))
        .collect::<Vec<_>>()
        .join("; ");
    let mut details = ErrorDetails::new();
    for (path, reason) in &fields {
        details.add_bad_request_violation(path.clone(), reason.clone());
    }
    tonic::Status::with_error_details(tonic::Code::InvalidArgument, message, details)
}

//! Who is asking: the bearer token checked against the client tokens (the join token or a
//! hive's issued credential on the heartbeat route), admin routes for admin tokens only, new work refused while draining.

use std::sync::Arc;

use axum::Extension;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use rbee_api::codes;
use rbee_http::tls::ClientCertificate;
use rbee_http::{ApiError, RequestId, presented_bearer};
use serde_json::json;
use tracing::warn;

use crate::queen::Queen;

type Shared = Arc<Queen>;
use crate::respond::api_error;

/// The name of the client token a request presented (`dev` in dev mode).
#[derive(Clone, Debug)]
pub struct ClientName(pub String);

pub(crate) async fn require_token(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_owned();
    // Hives keep beating and clients may cancel while the queen drains; everything else new
    // is refused.
    let cancelling =
        req.method() == axum::http::Method::DELETE && path.starts_with("/v1/inference/");
    if q.is_draining() && path != "/v1/hives/heartbeat" && !cancelling {
        return api_error(
            ApiError::new(
                codes::SHUTTING_DOWN,
                "the queen is shutting down; retry against another queen or after its restart",
            )
            .retry_after(5),
            &rid.0,
        );
    }
    let tokens = q.tokens();
    // Dev mode answers anyone who reaches the port, so a web page must not reach it through
    // a DNS name rebound to 127.0.0.1: only loopback names are served there.
    if tokens.clients.is_empty() && !loopback_host(req.headers()) {
        let host = req
            .headers()
            .get(axum::http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .chars()
            .take(64)
            .collect::<String>();
        warn!(%path, %host, "dev mode: refused a request for a non-loopback Host");
        return api_error(
            ApiError::new(
                codes::FORBIDDEN,
                format!(
                    "dev mode (no client tokens) serves only `Host: localhost`, `127.0.0.1` or `[::1]`, not `{host}`"
                ),
            ),
            &rid.0,
        );
    }
    let presented = presented_bearer(req.headers()).map(str::to_owned);
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    // With `tls.client_ca_file`, a heartbeat must come over a connection that showed a
    // certificate that CA signed, whatever token it carries.
    if path == "/v1/hives/heartbeat"
        && !q.config().tls.client_ca_file.is_empty()
        && req.extensions().get::<ClientCertificate>() != Some(&ClientCertificate(true))
    {
        warn!(%path, "heartbeat without a client certificate");
        q.auth_failure(
            peer,
            "client_certificate",
            json!({"path": path, "request_id": rid.0}),
        );
        return api_error(ApiError::unauthorized(), &rid.0);
    }
    let name = if path == "/v1/hives/heartbeat" {
        // An issued hive credential is checked by the registry against the beat's hive id.
        let credential = presented
            .as_deref()
            .is_some_and(|p| p.starts_with(rbee_registry::identity::CREDENTIAL_PREFIX));
        (credential || q.join_allowed(presented.as_deref())).then(|| "hive".to_owned())
    } else if tokens.clients.is_empty() {
        Some("dev".to_owned())
    } else {
        presented
            .as_deref()
            .and_then(|p| tokens.clients.verify(p))
            .map(str::to_owned)
    };
    let Some(name) = name else {
        let reason = match (&presented, path == "/v1/hives/heartbeat") {
            (None, _) => "no_token",
            (Some(_), true) => "join_token",
            (Some(_), false) => "wrong_token",
        };
        warn!(%path, reason, "authentication failed");
        q.auth_failure(peer, reason, json!({"path": path, "request_id": rid.0}));
        return api_error(ApiError::unauthorized(), &rid.0);
    };
    if path.starts_with("/v1/admin/") && !q.is_admin(&name) {
        q.metrics.auth_failures.inc(&[]);
        warn!(%path, client = %name, "a client token without `admin` asked for an admin route");
        q.audit(
            "auth.forbidden",
            &name,
            json!({"path": path, "request_id": rid.0}),
        );
        return api_error(
            ApiError::new(
                codes::FORBIDDEN,
                format!(
                    "client `{name}` may not use the admin routes (set `admin = true` on its token)"
                ),
            ),
            &rid.0,
        );
    }
    req.extensions_mut().insert(ClientName(name));
    next.run(req).await
}

/// Whether the request's `Host` names the loopback interface (`localhost`, `127.x.y.z`,
/// `[::1]`, any port). A request without `Host` (HTTP/1.0) is not from a browser.
fn loopback_host(headers: &axum::http::HeaderMap) -> bool {
    let Some(host) = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        return headers.get(axum::http::header::HOST).is_none();
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(n, _)| n)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_pass() {
        let check = |h: &str| {
            let mut headers = axum::http::HeaderMap::new();
            headers.insert(axum::http::header::HOST, h.parse().unwrap());
            loopback_host(&headers)
        };
        for ok in [
            "localhost",
            "localhost:7833",
            "127.0.0.1:7833",
            "127.1.2.3",
            "[::1]:7833",
            "LOCALHOST",
        ] {
            assert!(check(ok), "{ok}");
        }
        for bad in [
            "evil.example:7833",
            "rebind.attacker.com",
            "10.0.0.1:7833",
            "[::2]:1",
            "localhost.evil.com",
        ] {
            assert!(!check(bad), "{bad}");
        }
        assert!(loopback_host(&axum::http::HeaderMap::new()));
    }
}

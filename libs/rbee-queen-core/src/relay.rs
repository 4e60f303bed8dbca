//! One request's trip down the chain: lease a worker, send the request to its hive, and turn
//! the hive's SSE into a stream of worker events. A failure before the worker answers is
//! retried once on another worker; after that the stream ends with an `error` event, never
//! silently.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use futures_util::{Stream, StreamExt};
use rbee_api::sse::SseDecoder;
use rbee_api::{
    ErrorBody, ErrorCode, HEADER_DEADLINE_MS, HEADER_REQUEST_ID, InferenceRequest, SSE_DONE,
    StreamEvent, codes,
};
use rbee_http::ApiError;
use tracing::{error, warn};

use crate::queen::{Lease, Queen};
use crate::sched::{Avoid, Requester};

pub type EventStream = Pin<Box<dyn Stream<Item = StreamEvent> + Send>>;

/// A request on its way: the worker's events, and the lease that keeps the worker ours until
/// the stream is dropped.
pub struct Upstream {
    pub events: EventStream,
    pub lease: Lease,
    pub accepted: Instant,
    /// The model reference the request was routed by.
    pub model_ref: String,
}

/// Sends `req` for `model_ref` to a worker (spawning one when needed) and returns its events.
pub async fn start(
    queen: &Arc<Queen>,
    model_ref: &str,
    req: &InferenceRequest,
    request_id: &str,
    who: &Requester,
    (deadline, deadline_ms): (Instant, i64),
    accepted: Instant,
) -> Result<Upstream, ApiError> {
    let mut avoid: Option<Avoid> = None;
    let mut last_err = None;
    for attempt in 0..2 {
        let lease = match queen
            .lease(model_ref, request_id, who.clone(), deadline, avoid.clone())
            .await
        {
            Ok(l) => l,
            // No other worker for the retry: the first failure is the one worth reporting
            // (a cancellation, deadline or full queue during the retry is reported as such).
            Err(e) if e.code == codes::NO_CAPACITY => return Err(last_err.unwrap_or(e)),
            Err(e) => return Err(e),
        };
        let url = format!(
            "{}/v1/workers/{}/inference",
            lease.hive_url.trim_end_matches('/'),
            lease.worker_id
        );
        // The queen leased this worker, so a busy answer means it is still winding down a
        // request whose client just left (milliseconds): retry the same worker briefly.
        let settle = Instant::now() + Duration::from_secs(2);
        let sent = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let sent = queen
                .hive_post(&lease.hive_id, &url)
                .header(HEADER_REQUEST_ID, request_id)
                .header(HEADER_DEADLINE_MS, deadline_ms.to_string())
                .json(req)
                // The worker ends the stream at the deadline (with `stop_reason: deadline`);
                // the margin only guards against a hive that stops answering.
                .timeout(left + Duration::from_secs(5))
                .send()
                .await;
            match sent {
                Ok(r)
                    if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE
                        && Instant::now() < settle =>
                {
                    let body: Option<ErrorBody> = r.json().await.ok();
                    if body.as_ref().map(|b| b.error.code) != Some(codes::ALL_SLOTS_BUSY) {
                        break Err(BusyOrError::Refused(body));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => break Ok(other),
            }
        };
        let sent = match sent {
            Ok(s) => s,
            Err(BusyOrError::Refused(body)) => {
                let (code, message) = body
                    .map(|b| (b.error.code, b.error.message))
                    .unwrap_or_else(|| (codes::INTERNAL, "the hive is unavailable".to_owned()));
                let err = ApiError::new(code, message).retry_after(queen.retry_after(1, 0));
                queen.metrics.upstream_errors.inc(&["worker_refused"]);
                if attempt == 1 {
                    return Err(err);
                }
                avoid = Some(Avoid::Worker(lease.key()));
                last_err = Some(err);
                queen.metrics.retries.inc(&[]);
                continue;
            }
        };
        match sent {
            Ok(r) if r.status().is_success() => {
                let mut events = parse_events(r.bytes_stream());
                // Hold the events back until the first token: a worker that fails before it
                // (crashed during prefill, gone) is worth one more try elsewhere, and the
                // client has seen nothing yet.
                let mut held = Vec::new();
                let failed = loop {
                    match events.next().await {
                        Some(ev @ StreamEvent::Token { .. })
                        | Some(ev @ StreamEvent::End { .. }) => {
                            held.push(ev);
                            break None;
                        }
                        Some(StreamEvent::Error { code, message })
                            if attempt == 0 && retry_worthy(code) =>
                        {
                            break Some((code, message));
                        }
                        Some(ev @ StreamEvent::Error { .. }) => {
                            held.push(ev);
                            break None;
                        }
                        Some(ev) => held.push(ev),
                        None => break None,
                    }
                };
                match failed {
                    None => {
                        let events = futures_util::stream::iter(held).chain(events);
                        return Ok(Upstream {
                            events: Box::pin(events),
                            lease,
                            accepted,
                            model_ref: model_ref.to_owned(),
                        });
                    }
                    Some((code, message)) => {
                        queen.metrics.upstream_errors.inc(&["before_first_token"]);
                        warn!(hive = %lease.hive_id, worker = %lease.worker_id, %code, %message,
                              "failed before the first token; retrying on another worker");
                        avoid = Some(Avoid::Worker(lease.key()));
                        last_err =
                            Some(ApiError::new(code, message).with_status(StatusCode::BAD_GATEWAY));
                    }
                }
            }
            Ok(r) => {
                let status = r.status();
                let retry_after = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                let body: Option<ErrorBody> = r.json().await.ok();
                let (code, message) = body
                    .map(|b| (b.error.code, b.error.message))
                    .unwrap_or_else(|| (codes::INTERNAL, format!("hive answered {status}")));
                // A worker refusing the request itself (400, 504) is the client's answer; a
                // busy or broken worker is worth one more try elsewhere.
                // A 404 is a worker the hive no longer has (stopped after its keep-alive).
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                    // The queen's own token for this hive is wrong: an operator's problem, not
                    // the client's; another hive may take it.
                    error!(hive = %lease.hive_id, %status, "the hive refused the queen's hive token: check hive_token_file or the hive's [[hives]] token_file");
                    queen.metrics.upstream_errors.inc(&["hive_auth"]);
                    // A 502, not the 500 INTERNAL usually means: the hop behind the queen failed.
                    let err = ApiError::new(
                        codes::INTERNAL,
                        format!(
                            "hive {} refused the queen's credentials ({status}); the operator must fix the queen's hive token",
                            lease.hive_id
                        ),
                    )
                    .with_status(StatusCode::BAD_GATEWAY);
                    if attempt == 1 {
                        return Err(err);
                    }
                    avoid = Some(Avoid::Hive(lease.hive_id.clone()));
                    last_err = Some(err);
                    queen.metrics.retries.inc(&[]);
                    continue;
                }
                let retryable = (status.is_server_error() && status != StatusCode::GATEWAY_TIMEOUT)
                    || status == StatusCode::NOT_FOUND;
                // The hive's answer is passed on with the status it came with.
                let err = ApiError {
                    retry_after,
                    ..ApiError::new(code, message).with_status(status)
                };
                if retryable {
                    queen.metrics.upstream_errors.inc(&["worker_refused"]);
                }
                if !retryable || attempt == 1 {
                    return Err(err);
                }
                warn!(hive = %lease.hive_id, worker = %lease.worker_id, %code, "retrying on another worker");
                avoid = Some(Avoid::Worker(lease.key()));
                last_err = Some(err);
            }
            Err(e) => {
                queen.metrics.upstream_errors.inc(&["hive_unreachable"]);
                warn!(hive = %lease.hive_id, error = %e, "hive unreachable; retrying on another hive");
                // The whole hive is unreachable, not just this worker.
                avoid = Some(Avoid::Hive(lease.hive_id.clone()));
                last_err = Some(ApiError::new(
                    codes::WORKER_UNAVAILABLE,
                    format!("hive {} did not answer: {e}", lease.hive_id),
                ));
            }
        }
        queen.metrics.retries.inc(&[]);
    }
    Err(last_err.unwrap_or_else(|| ApiError::internal("no attempt was made")))
}

enum BusyOrError {
    /// A 503 that is not "busy" (shutting down, loading): its body.
    Refused(Option<ErrorBody>),
}

/// Failures of the worker itself (not of the request) before any token.
fn retry_worthy(code: ErrorCode) -> bool {
    matches!(
        code,
        codes::WORKER_UNAVAILABLE | codes::INFERENCE_FAILED | codes::SHUTTING_DOWN
    )
}

/// The hive's SSE bytes as worker events; a broken or truncated stream ends with an `error`.
fn parse_events(
    body: impl Stream<Item = reqwest::Result<axum::body::Bytes>> + Send + 'static,
) -> EventStream {
    let state = (
        Box::pin(body),
        SseDecoder::default(),
        false,
        Vec::<StreamEvent>::new(),
    );
    let s = futures_util::stream::unfold(
        state,
        |(mut body, mut parser, mut done, mut queue)| async move {
            loop {
                if !queue.is_empty() {
                    let ev = queue.remove(0);
                    return Some((ev, (body, parser, done, queue)));
                }
                if done {
                    return None;
                }
                match body.next().await {
                    Some(Ok(chunk)) => {
                        for data in parser.push(&chunk) {
                            if data == SSE_DONE {
                                done = true;
                                break;
                            }
                            match serde_json::from_str::<StreamEvent>(&data) {
                                Ok(ev) => {
                                    let terminal = matches!(
                                        ev,
                                        StreamEvent::End { .. } | StreamEvent::Error { .. }
                                    );
                                    queue.push(ev);
                                    if terminal {
                                        done = true;
                                        break;
                                    }
                                }
                                Err(e) => warn!(error = %e, "unparseable event from the hive"),
                            }
                        }
                    }
                    Some(Err(e)) => {
                        done = true;
                        queue.push(StreamEvent::Error {
                            code: codes::WORKER_UNAVAILABLE,
                            message: format!("the stream from the hive broke off: {e}"),
                        });
                    }
                    None => {
                        done = true;
                        queue.push(StreamEvent::Error {
                            code: codes::WORKER_UNAVAILABLE,
                            message: "the stream from the hive ended without an end event".into(),
                        });
                    }
                }
            }
        },
    );
    Box::pin(s)
}

/// `events` until the stream ends or the queen cuts it, then an `error` event.
pub fn cuttable(queen: &Queen, events: EventStream) -> EventStream {
    use futures_util::StreamExt;
    let mut rx = queen.cut_signal();
    let cut = Box::pin(async move {
        let _ = rx.wait_for(|c| *c).await;
    });
    let tail = futures_util::stream::once(async {
        rbee_api::StreamEvent::Error {
            code: codes::SHUTTING_DOWN,
            message: "the queen is shutting down; the stream was cut after the drain window".into(),
        }
    });
    // A stream that ends by itself ends there; only a cut one gets the error.
    let cut_flag = queen.cut_signal();
    Box::pin(events.take_until(cut).chain(tail.filter(move |_| {
        let was_cut = *cut_flag.borrow();
        async move { was_cut }
    })))
}

//! Inference through the hive: a worker's SSE stream passed to the client over loopback.
//!
//! Request id and deadline go down with the request; when the client goes away the upstream
//! response is dropped, which closes the worker's connection and cancels the generation there.
//! A stream the worker breaks off (crash) or the hive cuts (shutdown) ends with an `error`
//! event and `[DONE]`, never silently.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use rbee_api::sse::{self, StreamObserver, Terminal};
use rbee_api::{ErrorBody, ErrorCode, HEADER_DEADLINE_MS, HEADER_REQUEST_ID, StreamEvent, codes};
use rbee_http::ApiError;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{info, warn};

use crate::hive::Hive;
use crate::worker::{Worker, WorkerState};

/// Forwards one inference request to `worker` and streams its answer back.
pub async fn forward(
    hive: Arc<Hive>,
    worker: Arc<Worker>,
    rid: String,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some((port, token)) = worker.endpoint() else {
        let (code, msg) = match worker.state() {
            WorkerState::Starting => (
                codes::MODEL_LOADING,
                "the worker is still loading its model",
            ),
            _ => (codes::WORKER_NOT_READY, "the worker is not ready"),
        };
        hive.metrics.inference_requests.inc(&["not_ready"]);
        return Err(
            ApiError::new(code, format!("{msg} (state {})", worker.state().as_str()))
                .retry_after(1),
        );
    };
    let permit = match worker.slots.clone().try_acquire_owned() {
        Ok(p) => p,
        // A health probe is quick (one token); wait for it rather than refuse.
        Err(_) if worker.probe_holds.load(Ordering::SeqCst) => {
            match tokio::time::timeout(PROBE_WAIT, worker.slots.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                _ => return Err(busy(&hive)),
            }
        }
        Err(_) => return Err(busy(&hive)),
    };
    // Counted as in flight from here: drain and keep-alive see it before the worker answers.
    let inflight = Inflight::new(&hive, &worker, &rid);
    // The worker answers with headers at once (tokens follow as events); a worker that does
    // not is frozen or gone. A client deadline shortens the wait.
    let header_wait = match rbee_http::parse_deadline(&headers) {
        Ok(Some((_, left_ms))) if left_ms > 0 => {
            HEADER_WAIT.min(Duration::from_millis(left_ms as u64 + 1000))
        }
        _ => HEADER_WAIT,
    };
    let send = || {
        let mut req = hive
            .http
            .post(format!("http://127.0.0.1:{port}/v1/inference"))
            .bearer_auth(token.expose())
            .header(HEADER_REQUEST_ID, &rid)
            .body(body.clone());
        for name in [header::CONTENT_TYPE.as_str(), HEADER_DEADLINE_MS] {
            if let Some(v) = headers.get(name) {
                req = req.header(name, v);
            }
        }
        tokio::time::timeout(header_wait, req.send())
    };
    // We hold one of the worker's slots, so ALL_SLOTS_BUSY from the worker means it is still
    // winding down a generation whose client just left (milliseconds): retry briefly.
    let settle = tokio::time::Instant::now() + Duration::from_secs(2);
    let upstream = loop {
        let r = match send().await {
            Ok(Ok(r)) => r,
            Err(_) => {
                hive.metrics.inference_requests.inc(&["upstream_error"]);
                warn!(worker_id = %worker.id(), waited_s = header_wait.as_secs_f64(), "worker did not answer");
                return Err(ApiError::new(
                    codes::WORKER_UNAVAILABLE,
                    format!(
                        "worker {} did not answer within {:.1} s",
                        worker.id(),
                        header_wait.as_secs_f64()
                    ),
                )
                .with_status(StatusCode::GATEWAY_TIMEOUT));
            }
            Ok(Err(e)) => {
                hive.metrics.inference_requests.inc(&["upstream_error"]);
                warn!(worker_id = %worker.id(), error = %e, "worker unreachable");
                return Err(ApiError::new(
                    codes::WORKER_UNAVAILABLE,
                    format!("worker {} did not answer: {e}", worker.id()),
                ));
            }
        };
        if r.status().is_success() {
            break r;
        }
        // The worker's own error, in the same JSON shape, passed through.
        let status = StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let retry = r.headers().get(header::RETRY_AFTER).cloned();
        let bytes = r.bytes().await.unwrap_or_default();
        let busy = serde_json::from_slice::<ErrorBody>(&bytes)
            .is_ok_and(|b| b.error.code == codes::ALL_SLOTS_BUSY);
        if busy && tokio::time::Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        hive.metrics.inference_requests.inc(&["refused"]);
        let mut resp =
            (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response();
        if let Some(r) = retry {
            resp.headers_mut().insert(header::RETRY_AFTER, r);
        }
        worker.record_use(false);
        return Ok(resp);
    };
    let stream = PassThrough {
        upstream: Box::pin(upstream.bytes_stream()),
        cut: Box::pin(wait_cut(hive.clone())),
        observer: StreamObserver::default(),
        finished: false,
        guard: Some(StreamGuard {
            hive,
            worker,
            rid,
            _inflight: inflight,
            _permit: permit,
            ok: false,
        }),
    };
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

fn busy(hive: &Hive) -> ApiError {
    hive.metrics.inference_requests.inc(&["busy"]);
    ApiError::new(
        codes::ALL_SLOTS_BUSY,
        "the worker is generating for another request",
    )
    .retry_after(1)
}

async fn wait_cut(hive: Arc<Hive>) {
    let mut rx = hive.cut_streams.subscribe();
    let _ = rx.wait_for(|c| *c).await;
}

/// Releases the slot and the in-flight entry and records the outcome, however the stream ends
/// (finished, worker gone, client gone).
struct StreamGuard {
    hive: Arc<Hive>,
    worker: Arc<Worker>,
    rid: String,
    _inflight: Inflight,
    _permit: OwnedSemaphorePermit,
    ok: bool,
}

/// How long a client waits for a health probe holding the worker (the probe's own limit).
const PROBE_WAIT: Duration = Duration::from_secs(12);
/// How long the hive waits for a worker's response headers.
const HEADER_WAIT: Duration = Duration::from_secs(30);

/// A request counted as in flight (drain, keep-alive, busy) until dropped.
struct Inflight {
    hive: Arc<Hive>,
    worker: Arc<Worker>,
    key: u64,
}

impl Inflight {
    fn new(hive: &Arc<Hive>, worker: &Arc<Worker>, rid: &str) -> Self {
        let key = hive.inflight_insert(rid, worker.id());
        worker.inflight.fetch_add(1, Ordering::SeqCst);
        hive.metrics.inflight.add(&[], 1.0);
        Self {
            hive: hive.clone(),
            worker: worker.clone(),
            key,
        }
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.hive.inflight_remove(self.key);
        self.worker.inflight.fetch_sub(1, Ordering::SeqCst);
        self.hive.metrics.inflight.add(&[], -1.0);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.worker.record_use(self.ok);
        let outcome = if self.ok { "ok" } else { "interrupted" };
        self.hive.metrics.inference_requests.inc(&[outcome]);
        if !self.ok {
            info!(request_id = %self.rid, worker_id = %self.worker.id(), "stream ended early");
        }
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

struct PassThrough {
    upstream: ByteStream,
    cut: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    /// Notices the terminal `end`/`error` event as the bytes pass.
    observer: StreamObserver,
    finished: bool,
    guard: Option<StreamGuard>,
}

fn error_tail(code: ErrorCode, message: &str) -> Bytes {
    let ev = StreamEvent::Error {
        code,
        message: message.to_owned(),
    };
    Bytes::from(sse::encode_event(&ev) + &sse::encode_done())
}

impl PassThrough {
    fn note(&mut self, chunk: &[u8]) {
        self.observer.observe(chunk);
        if self.observer.terminal() == Some(Terminal::End)
            && let Some(g) = &mut self.guard
        {
            g.ok = true;
        }
    }

    fn terminal(&self) -> bool {
        self.observer.terminal().is_some()
    }

    fn end(&mut self) {
        self.finished = true;
        self.guard.take();
    }
}

impl Stream for PassThrough {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        if !self.terminal() && self.cut.as_mut().poll(cx).is_ready() {
            self.end();
            return Poll::Ready(Some(Ok(error_tail(
                codes::SHUTTING_DOWN,
                "the hive is shutting down; the stream was cut after the drain window",
            ))));
        }
        match self.upstream.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                self.note(&chunk);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                let terminal = self.terminal();
                self.end();
                if terminal {
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Ok(error_tail(
                    codes::WORKER_UNAVAILABLE,
                    &format!("the worker's stream broke off: {e}"),
                ))))
            }
            Poll::Ready(None) => {
                let terminal = self.terminal();
                self.end();
                if terminal {
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Ok(error_tail(
                    codes::WORKER_UNAVAILABLE,
                    "the worker's stream ended without an end event",
                ))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

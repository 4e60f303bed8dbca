//! The inference routes: OpenAI chat, completions and responses (streamed or aggregated), the
//! native SSE route, cancel; and the accounting when a response ends however it ends.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::StreamExt;
use rbee_api::{
    HEADER_REQUEST_PRIORITY, HEADER_REQUEST_TIMEOUT, InferenceRequest, StreamEvent, codes,
};
use rbee_http::{ApiError, RequestId};
use rbee_openai::{
    Aggregator, ChatCompletionRequest, ChunkStream, CompletionRequest, EndpointKind, OpenAiError,
    ResponseEcho, ResponsesRequest, ResponsesStream, sse_data,
};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::queen::Queen;
use crate::relay;
use crate::sched::Requester;

type Shared = Arc<Queen>;
use crate::auth::ClientName;
use crate::respond::{api_error, count_refusal, early, error, openai_error, sse_response};

/// The client's `X-Request-Timeout` (seconds) or the default, as an instant and unix ms.
pub(crate) fn deadline(q: &Queen, headers: &HeaderMap) -> Result<(Instant, i64), String> {
    let secs = match headers.get(HEADER_REQUEST_TIMEOUT) {
        None => q.config().scheduling.default_timeout_seconds as f64,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
            .ok_or("`X-Request-Timeout` must be seconds, more than 0 and at most 86400")?,
    };
    let d = Duration::from_secs_f64(secs);
    Ok((
        Instant::now() + d,
        rbee_http::unix_ms() + d.as_millis() as i64,
    ))
}

/// The client's `X-Request-Priority` (default 0): orders its own waiting requests.
pub(crate) fn priority(headers: &HeaderMap) -> Result<i32, String> {
    match headers.get(HEADER_REQUEST_PRIORITY) {
        None => Ok(0),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|p| (-100..=100).contains(p))
            .ok_or_else(|| "`X-Request-Priority` must be an integer from -100 to 100".to_owned()),
    }
}

pub(crate) fn unix_secs() -> u64 {
    (rbee_http::unix_ms() / 1000).max(0) as u64
}

/// What every inference route shares: model resolution (and whether the client may use it),
/// the deadline and priority, the trip down.
pub(crate) async fn begin(
    q: &Shared,
    rid: &str,
    client: &str,
    headers: &HeaderMap,
    model: &str,
    req: &InferenceRequest,
    accepted: Instant,
) -> Result<relay::Upstream, Box<Response>> {
    // Parsing and checking the request, up to here.
    q.metrics
        .stage
        .observe(&["validation"], accepted.elapsed().as_secs_f64());
    let Some(model_ref) = q.resolve_model(model) else {
        return Err(Box::new(error(
            ApiError::new(
                codes::MODEL_NOT_SERVED,
                format!("model `{model}` is not served here; GET /v1/models lists what is"),
            ),
            Some("model"),
            rid,
        )));
    };
    q.client_may_use(client, model, &model_ref)
        .map_err(|e| Box::new(error(e, Some("model"), rid)))?;
    let invalid = |m| Box::new(api_error(ApiError::new(codes::INVALID_PARAMETER, m), rid));
    let at = deadline(q, headers).map_err(invalid)?;
    let who = Requester::new(client, priority(headers).map_err(invalid)?);
    let req = q.with_model_defaults(model, req);
    relay::start(q, &model_ref, &req, rid, &who, at, accepted)
        .await
        .map_err(|e| Box::new(api_error(e, rid)))
}

/// Accounting when a stream ends, however it ends.
pub(crate) struct Finish {
    q: Shared,
    route: &'static str,
    model: String,
    client: String,
    accepted: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    outcome: (u16, String),
    usage: Option<(u32, u32)>,
    /// Token events relayed (what a stream cut before its end used, as far as we know).
    tokens_seen: u32,
    /// The OpenAI `user` the client sent (its own end user), for the usage record.
    user: Option<String>,
    /// request id, model reference, hive, worker, whether the worker was spawned for it.
    trip: (String, String, String, String, bool),
    _slot: crate::queen::ClientSlot,
}

impl Finish {
    fn new(
        q: &Shared,
        route: &'static str,
        model: &str,
        client: &str,
        rid: &str,
        up: &relay::Upstream,
        slot: crate::queen::ClientSlot,
    ) -> Self {
        let accepted = up.accepted;
        q.metrics.inflight.add(&[], 1.0);
        Self {
            _slot: slot,
            trip: (
                rid.to_owned(),
                up.model_ref.clone(),
                up.lease.hive_id.clone(),
                up.lease.worker_id.clone(),
                up.lease.spawned,
            ),
            q: q.clone(),
            route,
            model: model.to_owned(),
            client: client.to_owned(),
            accepted,
            first_token: None,
            last_token: None,
            outcome: (200, String::new()),
            usage: None,
            tokens_seen: 0,
            user: None,
        }
    }

    fn see(&mut self, ev: &StreamEvent) {
        match ev {
            StreamEvent::Token { .. } => {
                self.tokens_seen += 1;
                let now = Instant::now();
                match self.last_token {
                    None => {
                        self.first_token = Some(now);
                        self.q
                            .metrics
                            .ttft
                            .observe(&[&self.model], self.accepted.elapsed().as_secs_f64());
                    }
                    Some(prev) => self
                        .q
                        .metrics
                        .inter_token
                        .observe(&[&self.model], (now - prev).as_secs_f64()),
                }
                self.last_token = Some(now);
            }
            StreamEvent::End {
                prompt_tokens,
                completion_tokens,
                timings,
                ..
            } => {
                self.usage = Some((*prompt_tokens, *completion_tokens));
                let st = &self.q.metrics.stage;
                st.observe(&["worker_queue"], timings.queue_ms / 1000.0);
                st.observe(&["prefill"], timings.prefill_ms / 1000.0);
                st.observe(&["decode"], timings.decode_ms / 1000.0);
            }
            StreamEvent::Error { code, .. } => self.outcome = (200, code.as_str().to_owned()),
            _ => {}
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        let m = &self.q.metrics;
        m.inflight.add(&[], -1.0);
        let secs = self.accepted.elapsed().as_secs_f64();
        m.duration.observe(&[&self.model], secs);
        self.q.record_duration(secs);
        if let Some((p, c)) = self.usage {
            m.tokens_in.inc_by(&[&self.model], f64::from(p));
            m.tokens_out.inc_by(&[&self.model], f64::from(c));
        } else if self.outcome.1.is_empty() {
            self.outcome.1 = "CLIENT_GONE".into();
        }
        m.requests.inc(&[
            self.route,
            &self.model,
            &self.client,
            &self.outcome.0.to_string(),
            &self.outcome.1,
        ]);
        let (rid, model_ref, hive, worker, spawned) = &self.trip;
        let (prompt, completion) = self.usage.unwrap_or((0, 0));
        let used = match self.usage {
            Some((p, c)) => u64::from(p) + u64::from(c),
            None => u64::from(self.tokens_seen),
        };
        self.q.client_tokens_used(&self.client, used);
        let sha = self
            .q
            .registry
            .get(hive)
            .ok()
            .flatten()
            .and_then(|h| h.heartbeat)
            .and_then(|hb| hb.model_sha256.get(model_ref).cloned());
        self.q.usage(json!({
            "ts_unix_ms": rbee_http::unix_ms(),
            "request_id": rid,
            "client": self.client,
            "user": self.user,
            "route": self.route,
            "model": self.model,
            "model_ref": model_ref,
            "model_sha256": sha,
            "hive": hive,
            "worker": worker,
            "spawned_worker": spawned,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "ttft_ms": self.first_token.map(|t| (t - self.accepted).as_secs_f64() * 1000.0),
            "total_ms": secs * 1000.0,
            "outcome": if self.outcome.1.is_empty() { "ok" } else { self.outcome.1.as_str() },
        }));
    }
}

pub(crate) async fn chat_completions(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Extension(client): Extension<ClientName>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    openai_route(q, rid, client, headers, body, Api::Chat).await
}

pub(crate) async fn responses(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Extension(client): Extension<ClientName>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    openai_route(q, rid, client, headers, body, Api::Responses).await
}

pub(crate) async fn completions(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Extension(client): Extension<ClientName>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    openai_route(q, rid, client, headers, body, Api::Completion).await
}

/// Which OpenAI route a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    Chat,
    Completion,
    Responses,
}

impl Api {
    fn route(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Completion => "/v1/completions",
            Api::Responses => "/v1/responses",
        }
    }
}

/// What both OpenAI request kinds come down to.
pub(crate) struct OpenAiCall {
    model: String,
    inference: InferenceRequest,
    stream: bool,
    include_usage: bool,
    user: Option<String>,
    /// What a Responses answer repeats of its request.
    echo: Option<ResponseEcho>,
}

/// The `user` field as the usage record keeps it: at most 256 characters.
fn end_user(user: &Option<String>) -> Option<String> {
    user.as_ref()
        .filter(|u| !u.is_empty())
        .map(|u| u.chars().take(256).collect())
}

pub(crate) fn parse_openai(kind: Api, body: &[u8]) -> Result<OpenAiCall, OpenAiError> {
    match kind {
        Api::Chat => {
            let r = ChatCompletionRequest::from_json(body)?;
            Ok(OpenAiCall {
                inference: r.to_inference()?,
                stream: r.is_stream(),
                include_usage: r.include_usage(),
                user: end_user(&r.user),
                model: r.model,
                echo: None,
            })
        }
        Api::Completion => {
            let r = CompletionRequest::from_json(body)?;
            Ok(OpenAiCall {
                inference: r.to_inference()?,
                stream: r.is_stream(),
                include_usage: r.include_usage(),
                user: end_user(&r.user),
                model: r.model,
                echo: None,
            })
        }
        Api::Responses => {
            let r = ResponsesRequest::from_json(body)?;
            Ok(OpenAiCall {
                inference: r.to_inference()?,
                stream: r.is_stream(),
                include_usage: false,
                user: end_user(&r.user),
                echo: Some(ResponseEcho::of(&r)),
                model: r.model,
            })
        }
    }
}

/// `/v1/chat/completions` and `/v1/completions`: parse, schedule, then stream chunks or
/// answer with the aggregated response.
pub(crate) async fn openai_route(
    q: Shared,
    rid: RequestId,
    client: ClientName,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Api,
) -> Response {
    let accepted = Instant::now();
    let route = kind.route();
    let body = match rbee_http::read_json_body(&headers, body) {
        Ok(b) => b,
        Err(e) => {
            let code = e.code;
            return early(&q, route, &client.0, code, api_error(e, &rid.0));
        }
    };
    let call = match parse_openai(kind, &body) {
        Ok(c) => c,
        Err(e) => return early(&q, route, &client.0, e.code(), openai_error(&e, &rid.0)),
    };
    let slot = match q.client_slot(&client.0, &rid.0) {
        Ok(s) => s,
        Err(e) => {
            let code = e.code;
            return early(&q, route, &client.0, code, api_error(e, &rid.0));
        }
    };
    let upstream = match begin(
        &q,
        &rid.0,
        &client.0,
        &headers,
        &call.model,
        &call.inference,
        accepted,
    )
    .await
    {
        Ok(u) => u,
        Err(resp) => {
            count_refusal(&q, route, &call.model, &client.0, &resp);
            return *resp;
        }
    };
    let mut finish = Finish::new(&q, route, &call.model, &client.0, &rid.0, &upstream, slot);
    finish.user = call.user.clone();
    let model = call.model;
    let logprobs = call.inference.logprobs.is_some();
    let choices = call.inference.n.unwrap_or(1) as usize;
    let (endpoint, id) = match kind {
        Api::Chat => (EndpointKind::Chat, rbee_openai::chat_completion_id(&rid.0)),
        Api::Completion => (EndpointKind::Completion, rbee_openai::completion_id(&rid.0)),
        Api::Responses => {
            let mut echo = call
                .echo
                .unwrap_or_else(|| ResponseEcho::of(&ResponsesRequest::default()));
            // The sampling the worker gets, `[[models]]` defaults included.
            let sent = q.with_model_defaults(&model, &call.inference);
            echo.temperature = sent.temperature.unwrap_or(1.0);
            echo.top_p = sent.top_p.unwrap_or(1.0);
            let id = rbee_openai::response_id(&rid.0);
            if call.stream {
                let mut events = ResponsesStream::new(&id, unix_secs(), &model, &echo);
                return relay_stream(upstream, finish, move |ev| {
                    let text = match ev {
                        Some(ev) => events.on_event(ev),
                        None => events.on_upstream_eof(),
                    };
                    (text, events.is_finished())
                });
            }
            return aggregate(upstream, finish, &rid.0, move |agg| {
                let r =
                    agg.with_logprobs(logprobs)
                        .into_response(&id, unix_secs(), &model, &echo)?;
                Ok(serde_json::to_value(r).unwrap_or(Value::Null))
            })
            .await;
        }
    };
    if call.stream {
        let chunks = ChunkStream::new(id, unix_secs(), model, endpoint, call.include_usage)
            .with_request_id(rid.0.clone())
            .with_choices(choices);
        return openai_stream(upstream, chunks, finish);
    }
    aggregate(upstream, finish, &rid.0, move |agg| {
        let agg = agg.with_logprobs(logprobs);
        let value = match endpoint {
            EndpointKind::Chat => {
                serde_json::to_value(agg.into_chat_completion(id, unix_secs(), model)?)
            }
            EndpointKind::Completion => {
                serde_json::to_value(agg.into_completion(id, unix_secs(), model)?)
            }
        };
        Ok(value.unwrap_or(Value::Null))
    })
    .await
}

/// Worker events as OpenAI chunks (see [`relay_stream`]).
pub(crate) fn openai_stream(
    up: relay::Upstream,
    mut chunks: ChunkStream,
    finish: Finish,
) -> Response {
    relay_stream(up, finish, move |ev| {
        let payloads = match ev {
            Some(ev) => chunks.on_event(ev),
            None => chunks.on_upstream_eof(),
        };
        let text: String = payloads.iter().map(|p| sse_data(p)).collect();
        (text, chunks.is_finished())
    })
}

/// Frames queued between the relay task and the client's connection.
const RELAY_QUEUE: usize = 8;

/// Relays worker events to the client as the frames `frame` makes of each (and of the end of
/// the upstream, `None`; it says when the response is complete). A task reads the upstream
/// and hands the frames over through a small queue, holding the lease and the accounting: a
/// client that leaves, or that stops reading so that the queue stays full for
/// `server.stream_stall_seconds`, ends the task, which drops the lease and the upstream
/// response, and the worker's generation is cancelled down the chain.
fn relay_stream(
    up: relay::Upstream,
    mut finish: Finish,
    mut frame: impl FnMut(Option<&StreamEvent>) -> (String, bool) + Send + 'static,
) -> Response {
    let relay::Upstream { events, lease, .. } = up;
    let q = lease.queen().clone();
    let mut events = relay::cuttable(&q, events);
    let stall = q.stream_stall;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(RELAY_QUEUE);
    tokio::spawn(async move {
        let _lease = lease;
        loop {
            let ev = tokio::select! {
                ev = events.next() => ev,
                // The client left while the worker was quiet (a long prefill).
                _ = tx.closed() => break,
            };
            if let Some(ev) = &ev {
                finish.see(ev);
            }
            let (text, done) = frame(ev.as_ref());
            if !text.is_empty() {
                match tokio::time::timeout(stall, tx.send(Bytes::from(text))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break,
                    Err(_) => {
                        warn!(request_id = %finish.trip.0, client = %finish.client, stall_s = stall.as_secs(), "the client stopped reading its stream; cut it to free the worker");
                        q.metrics.streams_cut.inc(&["stalled_reader"]);
                        finish.outcome = (200, "CLIENT_STALLED".into());
                        break;
                    }
                }
            }
            if done || ev.is_none() {
                break;
            }
        }
        // The accounting (metrics, usage record) is written here, however the relay ended.
        drop(finish);
    });
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    sse_response(Body::from_stream(frames))
}

pub(crate) async fn aggregate(
    up: relay::Upstream,
    mut finish: Finish,
    rid: &str,
    build: impl FnOnce(Aggregator) -> Result<Value, OpenAiError>,
) -> Response {
    let relay::Upstream { events, lease, .. } = up;
    let mut events = relay::cuttable(lease.queen(), events);
    let mut agg = Aggregator::new();
    while let Some(ev) = events.next().await {
        finish.see(&ev);
        agg.push(&ev);
        if agg.is_done() {
            break;
        }
    }
    drop(lease);
    match build(agg) {
        Ok(v) => Json(v).into_response(),
        Err(e) => {
            finish.outcome = (e.status(), e.code().as_str().to_owned());
            openai_error(&e, rid)
        }
    }
}

/// The native route: `{"model": ..., <worker inference fields>}` in, the worker's own event
/// stream out.
pub(crate) async fn native_inference(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Extension(client): Extension<ClientName>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let accepted = Instant::now();
    let body = match rbee_http::read_json_body(&headers, body) {
        Ok(b) => b,
        Err(e) => {
            let code = e.code;
            return early(&q, "/v1/inference", &client.0, code, api_error(e, &rid.0));
        }
    };
    let mut value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            let resp = error(
                ApiError::new(codes::INVALID_JSON, format!("invalid request body: {e}")),
                None,
                &rid.0,
            );
            return early(&q, "/v1/inference", &client.0, codes::INVALID_JSON, resp);
        }
    };
    let model = match value.as_object_mut().and_then(|o| o.remove("model")) {
        Some(Value::String(m)) if !m.is_empty() => m,
        _ => {
            let resp = error(
                ApiError::new(codes::INVALID_PARAMETER, "`model` (a string) is required"),
                Some("model"),
                &rid.0,
            );
            return early(
                &q,
                "/v1/inference",
                &client.0,
                codes::INVALID_PARAMETER,
                resp,
            );
        }
    };
    let req: InferenceRequest = match rbee_http::parse_json(value.to_string().as_bytes()) {
        Ok(r) => r,
        Err(e) => {
            let code = e.code;
            return early(&q, "/v1/inference", &client.0, code, api_error(e, &rid.0));
        }
    };
    let route = "/v1/inference";
    let slot = match q.client_slot(&client.0, &rid.0) {
        Ok(s) => s,
        Err(e) => {
            let code = e.code;
            return early(&q, "/v1/inference", &client.0, code, api_error(e, &rid.0));
        }
    };
    let upstream = match begin(&q, &rid.0, &client.0, &headers, &model, &req, accepted).await {
        Ok(u) => u,
        Err(resp) => {
            count_refusal(&q, route, &model, &client.0, &resp);
            return *resp;
        }
    };
    let finish = Finish::new(&q, route, &model, &client.0, &rid.0, &upstream, slot);
    relay_stream(upstream, finish, |ev| match ev {
        Some(ev) => {
            let terminal = matches!(ev, StreamEvent::End { .. } | StreamEvent::Error { .. });
            let mut text = sse_data(&serde_json::to_string(ev).unwrap_or_default());
            if terminal {
                text.push_str(&sse_data(rbee_api::SSE_DONE));
            }
            (text, terminal)
        }
        None => (String::new(), true),
    })
}

pub(crate) async fn cancel(
    State(q): State<Shared>,
    Extension(rid): Extension<RequestId>,
    Extension(client): Extension<ClientName>,
    Path(request_id): Path<String>,
) -> Response {
    if !rbee_http::valid_request_id(&request_id) || request_id.contains("..") {
        return error(
            ApiError::new(
                codes::INVALID_PARAMETER,
                "a request id is 1-128 letters, digits, `-`, `_`, `.` or `:`",
            ),
            None,
            &rid.0,
        );
    }
    // Only the client that sent it (or an admin) may cancel a request; to anyone else it
    // does not exist.
    let mine = q
        .owner_of(&request_id)
        .is_some_and(|owner| owner == client.0 || q.is_admin(&client.0));
    if !mine {
        return error(
            ApiError::new(
                codes::NOT_FOUND,
                format!("no request `{request_id}` of yours is in flight"),
            ),
            None,
            &rid.0,
        );
    }
    if q.cancel_queued(&request_id) {
        info!(%request_id, "cancelled while waiting for a worker");
        return Json(json!({"request_id": request_id, "cancelled": true, "queued": true}))
            .into_response();
    }
    // The hives know which worker carries the request; ask each that is up.
    let hives = q.registry.up().unwrap_or_default();
    for h in hives {
        let url = format!("{}/v1/inference/{request_id}", h.url.trim_end_matches('/'));
        if let Ok(r) = q
            .hive_delete(&h.id, &url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            && r.status().is_success()
        {
            info!(%request_id, hive = %h.id, "cancelled");
            return Json(json!({"request_id": request_id, "cancelled": true, "hive": h.id}))
                .into_response();
        }
    }
    error(
        ApiError::new(
            codes::NOT_FOUND,
            format!("no request `{request_id}` is in flight"),
        ),
        None,
        &rid.0,
    )
}

//! The queen's typed calls to a hive's worker API (spawn a worker, look at one), with the
//! token `Queen::hive_token` picks for each hive. Answers are `rbee_api::worker` types, not raw JSON.

use std::collections::HashMap;
use std::time::Duration;

use rbee_api::ErrorBody;
use rbee_api::worker::{SpawnRequest, WorkerView};

use rbee_auth::Token;

/// Why a call to a hive did not give the expected answer.
#[derive(Debug, thiserror::Error)]
pub enum HiveCallError {
    #[error("hive {0} unreachable: {1}")]
    Unreachable(String, String),
    /// The hive answered with an unexpected status; the text holds its body.
    #[error("{1}")]
    Status(u16, String),
    #[error("hive {0} answered with an unreadable body: {1}")]
    Body(String, String),
}

pub struct HiveClient {
    http: reqwest::Client,
    /// The token to present to each hive (`Queen::hive_token`).
    tokens: HashMap<String, Token>,
}

impl HiveClient {
    pub fn new(http: reqwest::Client, tokens: HashMap<String, Token>) -> Self {
        Self { http, tokens }
    }

    fn authed(&self, hive_id: &str, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.tokens.get(hive_id) {
            Some(t) => req.bearer_auth(t.expose()),
            None => req,
        }
    }

    /// `POST /v1/workers`: the worker being started (202), else the hive's refusal.
    pub async fn spawn_worker(
        &self,
        hive_id: &str,
        url: &str,
        model: &str,
    ) -> Result<WorkerView, HiveCallError> {
        let req = self
            .http
            .post(format!("{}/v1/workers", url.trim_end_matches('/')))
            .json(&SpawnRequest::new(model))
            .timeout(Duration::from_secs(10));
        let r = self
            .authed(hive_id, req)
            .send()
            .await
            .map_err(|e| HiveCallError::Unreachable(hive_id.to_owned(), e.to_string()))?;
        let status = r.status();
        if status.as_u16() != 202 {
            let body = r.text().await.unwrap_or_default();
            return Err(HiveCallError::Status(
                status.as_u16(),
                format!("hive {hive_id} answered {status}: {body}"),
            ));
        }
        r.json()
            .await
            .map_err(|e| HiveCallError::Body(hive_id.to_owned(), e.to_string()))
    }

    /// `GET /v1/workers/{id}`, with a 5 s limit.
    pub async fn worker(
        &self,
        hive_id: &str,
        url: &str,
        worker_id: &str,
    ) -> Result<WorkerView, HiveCallError> {
        let req = self
            .http
            .get(format!(
                "{}/v1/workers/{worker_id}",
                url.trim_end_matches('/')
            ))
            .timeout(Duration::from_secs(5));
        let r = self
            .authed(hive_id, req)
            .send()
            .await
            .map_err(|e| HiveCallError::Unreachable(hive_id.to_owned(), e.to_string()))?;
        let status = r.status();
        if !status.is_success() {
            let body: Option<ErrorBody> = r.json().await.ok();
            let message = body.map_or_else(|| status.to_string(), |b| b.error.message);
            return Err(HiveCallError::Status(status.as_u16(), message));
        }
        r.json()
            .await
            .map_err(|e| HiveCallError::Body(hive_id.to_owned(), e.to_string()))
    }
}

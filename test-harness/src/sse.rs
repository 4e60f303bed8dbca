//! Reading SSE responses: each `data:` payload as JSON or `[DONE]`, and the token text and
//! `end` event of a worker's stream.

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::Value;

/// One SSE `data:` payload.
#[derive(Debug, Clone, PartialEq)]
pub enum SseData {
    Event(Value),
    Done,
}

/// Reads an SSE response incrementally.
pub struct SseReader {
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    buf: String,
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> Self {
        Self {
            stream: resp.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next `data:` payload, or None at the end of the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<SseData>> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let data: Vec<&str> = frame
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue; // comment or keep-alive
                }
                let payload = data.join("\n");
                if payload == "[DONE]" {
                    return Ok(Some(SseData::Done));
                }
                return Ok(Some(SseData::Event(
                    serde_json::from_str(&payload)
                        .with_context(|| format!("SSE data is not JSON: {payload}"))?,
                )));
            }
            match self.stream.next().await {
                Some(chunk) => self.buf.push_str(&String::from_utf8_lossy(&chunk?)),
                None => return Ok(None),
            }
        }
    }

    /// Everything until the stream ends.
    pub async fn collect(mut self) -> anyhow::Result<Vec<SseData>> {
        let mut out = Vec::new();
        while let Some(d) = self.next().await? {
            out.push(d);
        }
        Ok(out)
    }
}

/// The concatenated `text` of every `token` event.
pub fn joined_text(events: &[SseData]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            SseData::Event(v) if v["type"] == "token" => v["text"].as_str().map(str::to_owned),
            _ => None,
        })
        .collect()
}

/// The one `end` event, if any.
pub fn end_event(events: &[SseData]) -> Option<&Value> {
    events.iter().find_map(|e| match e {
        SseData::Event(v) if v["type"] == "end" => Some(v),
        _ => None,
    })
}

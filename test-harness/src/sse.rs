//! Reading SSE responses: each `data:` payload as JSON or `[DONE]`, and the token text and
//! `end` event of a worker's stream.

use std::collections::VecDeque;

use anyhow::Context;
use futures_util::StreamExt;
use rbee_api::SSE_DONE;
use rbee_api::sse::SseDecoder;
use serde_json::Value;

/// One SSE `data:` payload.
#[derive(Debug, Clone, PartialEq)]
pub enum SseData {
    Event(Value),
    Done,
}

/// Reads an SSE response incrementally, with the daemons' own decoder
/// ([`rbee_api::sse::SseDecoder`]), so tests read streams exactly as the queen does.
pub struct SseReader {
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    decoder: SseDecoder,
    ready: VecDeque<String>,
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> Self {
        Self {
            stream: resp.bytes_stream().boxed(),
            decoder: SseDecoder::default(),
            ready: VecDeque::new(),
        }
    }

    /// The next `data:` payload, or None at the end of the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<SseData>> {
        loop {
            if let Some(payload) = self.ready.pop_front() {
                if payload == SSE_DONE {
                    return Ok(Some(SseData::Done));
                }
                return Ok(Some(SseData::Event(
                    serde_json::from_str(&payload)
                        .with_context(|| format!("SSE data is not JSON: {payload}"))?,
                )));
            }
            match self.stream.next().await {
                Some(chunk) => self.ready.extend(self.decoder.push(&chunk?)),
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

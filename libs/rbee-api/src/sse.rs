//! The one server-sent-events codec: what a worker writes, what the hive watches as it passes
//! bytes through, and what the queen, the test harness and xtask read.
//!
//! A stream is `data: <json StreamEvent>\n\n` frames ending with `data: [DONE]\n\n`; comments
//! (`: keep-alive`) carry nothing. Frames may end with `\n\n` or `\r\n\r\n`.

use serde::Deserialize;

use crate::{ErrorCode, SSE_DONE, StreamEvent};

/// A comment frame a writer sends while it has nothing else to say; readers skip it.
pub const KEEP_ALIVE: &str = ": keep-alive\n\n";

/// One `data:` frame, encoded.
pub fn encode_data(data: &str) -> String {
    format!("data: {data}\n\n")
}

/// One event, encoded as its frame.
pub fn encode_event(event: &StreamEvent) -> String {
    // A StreamEvent holds only strings and numbers: serialising it cannot fail.
    encode_data(&serde_json::to_string(event).unwrap_or_default())
}

/// The frame that closes every stream.
pub fn encode_done() -> String {
    encode_data(SSE_DONE)
}

/// Incremental parser of an SSE byte stream into the `data:` payload of each event (several
/// `data:` lines of one event are joined with `\n`; comments and keep-alives yield nothing).
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
}

impl SseDecoder {
    /// Feeds bytes; returns the payloads of the events they complete.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = find_event_end(&self.buf) {
            let frame: Vec<u8> = self.buf.drain(..end.1).collect();
            let text = String::from_utf8_lossy(&frame[..end.0]);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                out.push(data.join("\n"));
            }
        }
        out
    }
}

/// (end of the event's text, end including the blank line) of the first complete event.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// How a worker's event stream ended, as far as a pass-through has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminal {
    End,
    Error(ErrorCode),
}

/// Watches a stream of worker events that is forwarded byte for byte, noting `started` and
/// the terminal `end`/`error` without decoding token events into values.
#[derive(Debug, Default)]
pub struct StreamObserver {
    decoder: SseDecoder,
    started: bool,
    terminal: Option<Terminal>,
    done: bool,
}

/// Just the fields of an event the observer needs.
#[derive(Deserialize)]
struct Tag {
    #[serde(rename = "type")]
    kind: Kind,
    #[serde(default)]
    code: Option<ErrorCode>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Started,
    Token,
    End,
    Error,
}

impl StreamObserver {
    pub fn observe(&mut self, chunk: &[u8]) {
        for data in self.decoder.push(chunk) {
            if data == SSE_DONE {
                self.done = true;
                continue;
            }
            // Token events are the bulk: skip them without a JSON parse.
            if data.starts_with(r#"{"type":"token""#) {
                continue;
            }
            match serde_json::from_str::<Tag>(&data).map(|t| (t.kind, t.code)) {
                Ok((Kind::Started, _)) => self.started = true,
                Ok((Kind::End, _)) => self.terminal = Some(Terminal::End),
                Ok((Kind::Error, code)) => {
                    self.terminal = Some(Terminal::Error(code.unwrap_or(ErrorCode::Internal)))
                }
                Ok((Kind::Token, _)) | Err(_) => {}
            }
        }
    }

    pub fn started(&self) -> bool {
        self.started
    }

    /// The `end` or `error` event, once seen.
    pub fn terminal(&self) -> Option<Terminal> {
        self.terminal
    }

    /// Whether `[DONE]` was seen.
    pub fn done(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{StopReason, Timings};

    #[test]
    fn events_split_across_chunks() {
        let mut p = SseDecoder::default();
        assert!(p.push(b"data: {\"a\"").is_empty());
        assert_eq!(
            p.push(b":1}\n\n: keep-alive\n\ndata: [DONE]\n\n"),
            vec!["{\"a\":1}", "[DONE]"]
        );
        assert_eq!(p.push(b"data: x\r\ndata: y\r\n\r\n"), vec!["x\ny"]);
        assert!(p.push(b"").is_empty());
    }

    #[test]
    fn what_is_encoded_decodes_and_is_observed() {
        let events = [
            StreamEvent::Started {
                request_id: "r".into(),
                model: "m".into(),
                prompt_tokens: 2,
            },
            StreamEvent::Token {
                index: 0,
                text: "hi\n\ndata: x".into(),
                choice: 0,
                logprobs: vec![],
            },
            StreamEvent::End {
                stop_reason: StopReason::Eos,
                prompt_tokens: 2,
                completion_tokens: 1,
                cached_tokens: 0,
                timings: Timings::default(),
            },
        ];
        let mut wire: String = events.iter().map(encode_event).collect();
        wire.push_str(&encode_done());
        let mut dec = SseDecoder::default();
        let mut obs = StreamObserver::default();
        let mut got = Vec::new();
        // Byte by byte: the worst split a network can make.
        for b in wire.as_bytes().chunks(1) {
            got.extend(dec.push(b));
            obs.observe(b);
            if got.len() == 1 {
                assert!(obs.started() && obs.terminal().is_none());
            }
        }
        let decoded: Vec<StreamEvent> = got[..3]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert_eq!(decoded, events);
        assert_eq!(got[3], SSE_DONE);
        assert_eq!(obs.terminal(), Some(Terminal::End));
        assert!(obs.done());
    }

    #[test]
    fn an_error_event_is_terminal_with_its_code() {
        let mut obs = StreamObserver::default();
        obs.observe(
            encode_event(&StreamEvent::Error {
                code: ErrorCode::DeadlineExceeded,
                message: "late".into(),
            })
            .as_bytes(),
        );
        assert_eq!(
            obs.terminal(),
            Some(Terminal::Error(ErrorCode::DeadlineExceeded))
        );
        assert!(!obs.started());
    }
}

//! Incremental detokenization: token bytes in, text out as soon as it is valid UTF-8.
//!
//! Byte-level BPE splits multi-byte characters across tokens (an emoji is often three tokens),
//! so bytes that end mid-character wait for the next token. At the end, anything left is
//! flushed with replacement characters rather than dropped.

#[derive(Debug, Default, Clone)]
pub struct Utf8Stream {
    buf: Vec<u8>,
}

impl Utf8Stream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token's bytes and returns the text that became complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.buf.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.buf) {
                Ok(s) => {
                    out.push_str(s);
                    self.buf.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Valid prefix is checked above, so this cannot fail; be lossy anyway.
                    out.push_str(&String::from_utf8_lossy(&self.buf[..valid]));
                    match e.error_len() {
                        // Invalid bytes (not just incomplete): replace them and carry on.
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.buf.drain(..valid + bad);
                        }
                        // Incomplete character at the end: wait for more bytes.
                        None => {
                            self.buf.drain(..valid);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: whatever is left becomes text, invalid bytes as U+FFFD.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_passes_straight_through() {
        let mut d = Utf8Stream::new();
        assert_eq!(d.push(b"Hello"), "Hello");
        assert_eq!(d.push(b" world"), " world");
        assert_eq!(d.flush(), "");
    }

    #[test]
    fn split_emoji_waits_for_its_last_byte() {
        let bee = "🐝".as_bytes();
        let mut d = Utf8Stream::new();
        assert_eq!(d.push(&bee[..1]), "");
        assert_eq!(d.push(&bee[1..3]), "");
        assert_eq!(d.push(&bee[3..]), "🐝");
    }

    #[test]
    fn text_before_an_incomplete_char_is_emitted() {
        let mut d = Utf8Stream::new();
        let mut bytes = b"ok ".to_vec();
        bytes.extend_from_slice(&"é".as_bytes()[..1]);
        assert_eq!(d.push(&bytes), "ok ");
        assert_eq!(d.push(&"é".as_bytes()[1..]), "é");
    }

    #[test]
    fn invalid_bytes_become_replacement_chars() {
        let mut d = Utf8Stream::new();
        assert_eq!(d.push(&[b'a', 0xFF, b'b']), "a\u{FFFD}b");
    }

    #[test]
    fn an_unfinished_char_is_flushed_lossily() {
        let mut d = Utf8Stream::new();
        assert_eq!(d.push(&"🐝".as_bytes()[..2]), "");
        assert_eq!(d.flush(), "\u{FFFD}");
    }
}

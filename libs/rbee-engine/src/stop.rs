//! Stop sequences matched on the generated text, across token boundaries.
//!
//! Text that could still turn into a stop sequence is held back; text that matches is never
//! emitted. The matcher sees only generated text, never the prompt.

#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text not yet released to the client.
    pending: String,
}

/// What feeding a piece of text produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopScan {
    /// Text that is safe to emit (may be empty while text is held back).
    Emit(String),
    /// A stop sequence matched: emit this text (the part before the match) and end.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopScan {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return StopScan::Emit(std::mem::take(&mut self.pending));
        }
        // Earliest match wins, so nothing after a stop sequence leaks out.
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let before = self.pending[..at].to_owned();
            self.pending.clear();
            return StopScan::Stopped(before);
        }
        let hold = self.held_suffix_len();
        let release = self.pending.len() - hold;
        let out = self.pending[..release].to_owned();
        self.pending.drain(..release);
        StopScan::Emit(out)
    }

    /// Releases whatever is held back (the generation ended for another reason).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of some stop sequence,
    /// cut on a char boundary.
    fn held_suffix_len(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            let max = stop.len().saturating_sub(1).min(self.pending.len());
            for len in (best + 1..=max).rev() {
                let start = self.pending.len() - len;
                if self.pending.is_char_boundary(start) && stop.starts_with(&self.pending[start..])
                {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopScan::Emit(t) => out.push_str(&t),
                StopScan::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn no_stops_passes_everything() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn match_inside_one_piece_cuts_before_it() {
        assert_eq!(run(&["STOP"], &["abcSTOPdef"]), ("abc".into(), true));
    }

    #[test]
    fn match_across_pieces() {
        assert_eq!(run(&["\n\n"], &["Hi", "\n", "\nmore"]), ("Hi".into(), true));
        assert_eq!(
            run(&["world"], &["hello wo", "r", "ld!"]),
            ("hello ".into(), true)
        );
    }

    #[test]
    fn partial_match_is_held_then_released() {
        let mut m = StopMatcher::new(vec!["world".into()]);
        assert_eq!(m.push("hello wor"), StopScan::Emit("hello ".into()));
        assert_eq!(m.push("k"), StopScan::Emit("work".into()));
    }

    #[test]
    fn held_text_is_flushed_at_the_end() {
        assert_eq!(run(&["world"], &["hello wor"]), ("hello wor".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["c", "ab"], &["xabc"]), ("x".into(), true));
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
        assert_eq!(run(&["🐝x"], &["a🐝", "y"]), ("a🐝y".into(), false));
    }
}

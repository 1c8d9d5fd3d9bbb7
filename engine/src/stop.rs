//! Stop strings over streamed text, including one split across tokens.
//!
//! Text that could be the beginning of a stop string is held back until the
//! next token decides: either the stop string completes (generation ends and
//! the text before it is the output's tail) or it cannot anymore (the held
//! text is released).

/// Result of feeding text to a [`StopMatcher`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopScan {
    /// No stop string yet: this text is final and may be sent.
    Emit(String),
    /// A stop string matched: this text precedes it; generation ends.
    Stopped(String),
}

/// Watches generated text for any of a request's stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    /// The matched stop string is part of the output (vLLM's
    /// `include_stop_str_in_output`).
    include: bool,
    /// The stop string that matched, once one has.
    matched: Option<String>,
}

impl StopMatcher {
    /// A matcher for these stop strings (empty strings are ignored); with
    /// `include`, the output keeps the stop string that ends it.
    pub fn new(stops: &[String], include: bool) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            include,
            matched: None,
        }
    }

    /// The stop string that ended the text, once one has.
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }

    /// Feeds newly decoded text.
    pub fn push(&mut self, text: &str) -> StopScan {
        self.held.push_str(text);
        // The earliest match; at one position, the first of the stop strings.
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s.len())))
            .min_by_key(|&(at, _)| at);
        if let Some((at, len)) = first_match {
            let end = if self.include { at + len } else { at };
            let out = self.held[..end].to_string();
            self.matched = Some(self.held[at..at + len].to_string());
            self.held.clear();
            return StopScan::Stopped(out);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let emit = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        StopScan::Emit(emit)
    }

    /// Releases the held text (generation ended for another reason).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> StopMatcher {
        StopMatcher::new(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>(), false)
    }

    #[test]
    fn stop_split_across_pushes() {
        let mut m = stops(&["END"]);
        assert_eq!(m.push("hello E"), StopScan::Emit("hello ".into()));
        assert_eq!(m.push("N"), StopScan::Emit("".into()));
        assert_eq!(m.matched(), None, "not yet");
        assert_eq!(m.push("D and more"), StopScan::Stopped("".into()));
        assert_eq!(m.matched(), Some("END"));
    }

    #[test]
    fn false_start_is_released() {
        let mut m = stops(&["END"]);
        assert_eq!(m.push("E"), StopScan::Emit("".into()));
        assert_eq!(m.push("Nx"), StopScan::Emit("ENx".into()));
        assert_eq!(m.push("EN"), StopScan::Emit("".into()));
        assert_eq!(m.flush(), "EN");
    }

    #[test]
    fn earliest_stop_wins_and_text_before_is_kept() {
        let mut m = stops(&["world", "lo w"]);
        assert_eq!(m.matched(), None);
        assert_eq!(m.push("hello world"), StopScan::Stopped("hel".into()));
        assert_eq!(m.matched(), Some("lo w"), "the stop string that matched");
    }

    #[test]
    fn multibyte_text_is_safe() {
        let mut m = stops(&["日本"]);
        assert_eq!(m.push("こんにちは日"), StopScan::Emit("こんにちは".into()));
        assert_eq!(m.push("本語"), StopScan::Stopped("".into()));
    }

    #[test]
    fn an_included_stop_string_ends_the_output() {
        let words = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut m = StopMatcher::new(&words(&["world", "lo w"]), true);
        assert_eq!(m.push("hello world"), StopScan::Stopped("hello w".into()));
        // Split across pushes, multi-byte: the held prefix and the rest of it.
        let mut m = StopMatcher::new(&words(&["日本"]), true);
        assert_eq!(m.push("こんにちは日"), StopScan::Emit("こんにちは".into()));
        assert_eq!(m.push("本語"), StopScan::Stopped("日本".into()));
    }

    #[test]
    fn no_stops_emits_everything() {
        let mut m = stops(&[]);
        assert_eq!(m.push("abc"), StopScan::Emit("abc".into()));
    }
}

//! Stop sequences: text is held back while it could still be the start of a stop string, so
//! a stop string is never emitted, not even in part, in a stream. All of a request's stop
//! strings are found in one pass (Aho-Corasick), and only the held-back text is searched:
//! the API bounds each stop string to 256 bytes, so the work per token is bounded too.

use aho_corasick::{AhoCorasick, MatchKind};

/// Watches a sequence's text for its stop strings.
pub struct StopMatcher {
    stops: Vec<String>,
    /// Every stop string in one automaton, leftmost match first; `None` without stops.
    finder: Option<AhoCorasick>,
    pending: String,
    /// The stop string that ended the generation, once one has.
    matched: Option<usize>,
}

/// What [`StopMatcher::push`] decided.
#[derive(Debug, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that is safe to emit now.
    pub emit: String,
    /// A stop string was found; `emit` ends just before it and generation must end.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        // Building fails only past the automaton's size limits, which bounded stop strings
        // cannot reach; without one, the naive search below still finds them.
        let finder = (!stops.is_empty())
            .then(|| {
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostFirst)
                    .build(&stops)
                    .ok()
            })
            .flatten();
        Self {
            stops,
            finder,
            pending: String::new(),
            matched: None,
        }
    }

    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome {
                emit: delta.to_string(),
                stopped: false,
            };
        }
        self.pending.push_str(delta);
        let first = match &self.finder {
            Some(ac) => ac
                .find(&self.pending)
                .map(|m| (m.start(), m.pattern().as_usize())),
            None => self
                .stops
                .iter()
                .enumerate()
                .filter_map(|(i, s)| self.pending.find(s.as_str()).map(|at| (at, i)))
                .min(),
        };
        if let Some((at, which)) = first {
            self.matched = Some(which);
            let emit = self.pending[..at].to_string();
            self.pending.clear();
            return StopOutcome {
                emit,
                stopped: true,
            };
        }
        let hold = self.longest_partial_stop();
        let cut = self.pending.len() - hold;
        let emit = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopOutcome {
            emit,
            stopped: false,
        }
    }

    /// The stop string that ended the generation, if one did.
    pub fn matched(&self) -> Option<&str> {
        self.matched.map(|i| self.stops[i].as_str())
    }

    /// What is still held back when the generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length in bytes of the longest suffix of `pending` that begins some stop string.
    fn longest_partial_stop(&self) -> usize {
        self.stops
            .iter()
            .flat_map(|stop| {
                stop.char_indices()
                    .skip(1)
                    .map(|(i, _)| i)
                    .chain(std::iter::once(stop.len()))
                    .filter(|&len| len < stop.len() + 1 && self.pending.ends_with(&stop[..len]))
                    .max()
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for d in deltas {
            let o = m.push(d);
            out += &o.emit;
            if o.stopped {
                return (out, true);
            }
        }
        out += &m.finish();
        (out, false)
    }

    #[test]
    fn stop_split_across_deltas_is_never_emitted() {
        assert_eq!(
            run(&["END"], &["abc E", "N", "D tail"]),
            ("abc ".into(), true)
        );
    }

    #[test]
    fn held_text_is_released_when_it_stops_matching() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("x EN").emit, "x ");
        assert_eq!(m.push("Y").emit, "ENY");
    }

    #[test]
    fn earliest_of_several_stops_wins_and_multibyte_text_is_safe() {
        assert_eq!(
            run(&["world", "é!"], &["hé", "llo é! world"]),
            ("héllo ".into(), true)
        );
        let mut m = StopMatcher::new(vec!["world".into(), "é!".into()]);
        assert!(m.push("héllo é! world").stopped);
        assert_eq!(m.matched(), Some("é!"), "the stop that ended it is named");
        assert_eq!(run(&["\n\n"], &["a\n", "b"]), ("a\nb".into(), false));
    }

    #[test]
    fn no_stops_passes_everything() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }
}

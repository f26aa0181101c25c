//! Stop strings on the decoded text of one generation. A stop string may span several tokens, so
//! text that could still turn out to be the start of one is held back from the stream until the
//! next tokens settle it; the stop string itself and anything after it never go out.

#[derive(Debug, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    /// Decoded text not sent yet: a tail that is the start of some stop string.
    held: String,
}

/// What one piece of decoded text lets out.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Released {
    /// Text that can go out now.
    pub(crate) text: String,
    /// A stop string matched: `text` ends where it began and the generation is over.
    pub(crate) stopped: bool,
}

impl StopMatcher {
    pub(crate) fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Takes the next decoded text of the generation.
    pub(crate) fn push(&mut self, text: &str) -> Released {
        if self.stops.is_empty() {
            return Released {
                text: text.to_string(),
                stopped: false,
            };
        }
        self.held.push_str(text);
        // The earliest match wins: whatever follows it, another stop string included, is cut.
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            let mut text = std::mem::take(&mut self.held);
            text.truncate(at);
            return Released {
                text,
                stopped: true,
            };
        }
        // Nothing matched, so no match can begin before the last (longest stop - 1) bytes; of
        // those, hold from the first position where the rest is the start of a stop string.
        let keep = self.held_from();
        let rest = self.held.split_off(keep);
        let text = std::mem::replace(&mut self.held, rest);
        Released {
            text,
            stopped: false,
        }
    }

    /// The generation ended for another reason: what was held back goes out.
    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Where the tail that may still become a stop string begins (`held.len()` when none does).
    fn held_from(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let earliest = self.held.len().saturating_sub(longest.saturating_sub(1));
        self.held
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= earliest)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
    }

    fn go(text: &str) -> Released {
        Released {
            text: text.to_string(),
            stopped: false,
        }
    }

    fn stop(text: &str) -> Released {
        Released {
            text: text.to_string(),
            stopped: true,
        }
    }

    /// Feeds `pieces` and returns what went out, and whether a stop string ended it.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = matcher(stops);
        let mut out = String::new();
        for piece in pieces {
            let r = m.push(piece);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn without_stop_strings_text_passes_at_once() {
        let mut m = matcher(&[]);
        assert_eq!(m.push("Hello"), go("Hello"));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn a_stop_string_inside_one_piece_cuts_it() {
        assert_eq!(run(&["END"], &["abc END def"]), ("abc ".to_string(), true));
    }

    #[test]
    fn a_stop_string_over_several_pieces_is_held_back_then_never_sent() {
        let mut m = matcher(&["\n\nUser:"]);
        assert_eq!(m.push("Sure."), go("Sure."));
        assert_eq!(m.push("\n"), go(""));
        assert_eq!(m.push("\nUs"), go(""));
        assert_eq!(m.push("er:"), stop(""));
    }

    #[test]
    fn held_text_that_turns_out_otherwise_goes_out() {
        let mut m = matcher(&["stop here"]);
        assert_eq!(m.push("a sto"), go("a "));
        assert_eq!(m.push("p h"), go(""));
        // "stop hx" can no longer become the stop string; neither can any tail of it.
        assert_eq!(m.push("x"), go("stop hx"));
        assert_eq!(m.push(" st"), go(" "));
        assert_eq!(m.finish(), "st");
    }

    #[test]
    fn a_later_start_is_kept_when_an_earlier_one_fails() {
        // "aab": the held "aa" fails as a start at 0 but "ab" starts at 1.
        assert_eq!(
            run(&["abc"], &["a", "a", "b", "c"]),
            ("a".to_string(), true)
        );
        assert_eq!(
            run(&["abc"], &["a", "a", "b", "d"]),
            ("aabd".to_string(), false)
        );
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        assert_eq!(
            run(&["world", "lo w"], &["hello world"]),
            ("hel".to_string(), true)
        );
        assert_eq!(
            run(&["B", "AAAA"], &["xAA", "A", "B"]),
            ("xAAA".to_string(), true)
        );
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        assert_eq!(run(&["é!"], &["café", "!", "x"]), ("caf".to_string(), true));
        assert_eq!(run(&["🦀🦀"], &["a🦀", "b"]), ("a🦀b".to_string(), false));
        let mut m = matcher(&["ñu"]);
        assert_eq!(m.push("año ñ"), go("año "));
        assert_eq!(m.finish(), "ñ");
    }

    #[test]
    fn nothing_is_held_that_cannot_start_a_stop_string() {
        let mut m = matcher(&["###"]);
        assert_eq!(m.push("a long line of text"), go("a long line of text"));
        assert_eq!(m.push(" #"), go(" "));
        assert_eq!(m.push("#"), go(""));
        assert_eq!(m.push("#"), stop(""));
    }
}

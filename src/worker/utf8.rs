//! Token pieces end mid-character now and then; this holds the bytes back until they form text.

#[derive(Debug, Default)]
pub(crate) struct Utf8Buffer {
    pending: Vec<u8>,
}

impl Utf8Buffer {
    /// Adds bytes and returns the text that is complete so far.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An incomplete character at the end: wait for the next piece.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Bytes that can never become text: replace them, go on.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// What is left when generation stops, made printable.
    pub(crate) fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_split_over_pieces_comes_out_whole() {
        let crab = "🦀".as_bytes();
        let mut b = Utf8Buffer::default();
        assert_eq!(b.push(b"a"), "a");
        assert_eq!(b.push(&crab[..1]), "");
        assert_eq!(b.push(&crab[1..3]), "");
        assert_eq!(b.push(&[crab[3], b'!']), "🦀!");
        assert_eq!(b.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut b = Utf8Buffer::default();
        assert_eq!(b.push(b"x\xffy"), "x\u{fffd}y");
        assert_eq!(b.push(&"é".as_bytes()[..1]), "");
        assert_eq!(b.finish(), "\u{fffd}");
    }
}

//! Splits the guest agent port's byte stream into requests the way
//! qemu-ga's streaming JSON parser does: a value ends where its last
//! bracket closes, whatever the line breaks; bare words and stray bytes
//! are errors of their own; 0xFF (the client's resync byte) drops any
//! half-read request.

/// The longest request kept; qemu-ga's lexer refuses tokens past 64 MiB.
pub const MAX_REQUEST: usize = 64 << 20;

/// One thing the stream said.
#[derive(Debug, PartialEq)]
pub enum Piece {
    /// A whole JSON value (object, array or string), unparsed.
    Value(Vec<u8>),
    /// A word outside any value (`this`, `42`, `true`).
    Word(Vec<u8>),
    /// A byte that cannot start anything.
    Stray(char),
    /// A value longer than [`MAX_REQUEST`] (its bytes were not kept).
    TooLong,
}

/// The splitter's state between reads.
#[derive(Default)]
pub struct Splitter {
    value: Vec<u8>,
    word: Vec<u8>,
    /// Inside a value: how deep, in a string, after a backslash.
    started: bool,
    depth: usize,
    in_str: bool,
    escaped: bool,
    /// Bytes of the value seen, kept or not.
    len: usize,
}

impl Splitter {
    /// Feeds `bytes`, handing every finished piece to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut impl FnMut(Piece)) {
        for &b in bytes {
            self.byte(b, out);
        }
    }

    fn byte(&mut self, b: u8, out: &mut impl FnMut(Piece)) {
        if b == 0xff {
            *self = Splitter::default();
            return out(Piece::Stray('\u{FFFD}'));
        }
        if self.started {
            return self.in_value(b, out);
        }
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => self.end_word(out),
            b'{' | b'[' | b'"' => {
                self.end_word(out);
                self.started = true;
                self.in_value(b, out);
            }
            b'}' | b']' => {
                self.end_word(out);
                out(Piece::Stray(b as char));
            }
            _ if self.word.len() < 256 => self.word.push(b),
            _ => {}
        }
    }

    fn in_value(&mut self, b: u8, out: &mut impl FnMut(Piece)) {
        self.len += 1;
        if self.len <= MAX_REQUEST {
            self.value.push(b);
        } else if !self.value.is_empty() {
            self.value = Vec::new();
        }
        let mut done = false;
        if self.in_str {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_str = false;
                done = self.depth == 0;
            }
        } else {
            match b {
                b'"' => self.in_str = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    done = self.depth == 0;
                }
                _ => {}
            }
        }
        if done {
            let piece = if self.len > MAX_REQUEST {
                Piece::TooLong
            } else {
                Piece::Value(std::mem::take(&mut self.value))
            };
            *self = Splitter::default();
            out(piece);
        }
    }

    fn end_word(&mut self, out: &mut impl FnMut(Piece)) {
        if !self.word.is_empty() {
            out(Piece::Word(std::mem::take(&mut self.word)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<Piece> {
        let mut s = Splitter::default();
        let mut got = Vec::new();
        for c in chunks {
            s.feed(c, &mut |p| got.push(p));
        }
        got
    }

    #[test]
    fn values_end_where_their_brackets_close() {
        let v = |s: &str| Piece::Value(s.as_bytes().to_vec());
        assert_eq!(split(&[b"{\"a\":1}"]), [v("{\"a\":1}")]);
        assert_eq!(
            split(&[b"{\"a\":", b"\n[1,{}]}{}"]),
            [v("{\"a\":\n[1,{}]}"), v("{}")]
        );
        assert_eq!(split(&[b"{\"}\\\"{\":1}"]), [v("{\"}\\\"{\":1}")]);
        assert_eq!(split(&[b" \"x\" "]), [v("\"x\"")]);
    }

    #[test]
    fn words_strays_and_resync() {
        let w = |s: &str| Piece::Word(s.as_bytes().to_vec());
        assert_eq!(split(&[b"not json\n"]), [w("not"), w("json")]);
        assert_eq!(split(&[b"} 42 "]), [Piece::Stray('}'), w("42")]);
        assert_eq!(
            split(&[b"{\"half\":", b"\xff{}"]),
            [Piece::Stray('\u{FFFD}'), Piece::Value(b"{}".to_vec())]
        );
    }

    #[test]
    fn a_huge_value_is_one_error_and_the_stream_goes_on() {
        let mut s = Splitter::default();
        let mut got = Vec::new();
        s.feed(b"{\"pad\":\"", &mut |p| got.push(p));
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..65 {
            s.feed(&chunk, &mut |p| got.push(p));
        }
        s.feed(b"\"}{}", &mut |p| got.push(p));
        assert_eq!(got, [Piece::TooLong, Piece::Value(b"{}".to_vec())]);
    }
}

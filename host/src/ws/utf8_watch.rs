//! Fails a text message at its first invalid UTF-8 byte while its frame is still arriving:
//! tungstenite checks a frame only once all of it is in, so a client could otherwise stream
//! the rest of a frame it has already spoiled (RFC 6455 §8.1 asks to fail fast).
//!
//! [`Utf8Watch`] follows the client's frames through the bytes read from the socket (it parses
//! headers and counts payloads; it never changes a byte). A text frame that arrives whole in one
//! read is left to tungstenite, which checks it at once anyway; only a text frame that spans
//! reads is checked here, as its bytes come. Compressed messages (RSV1) are checked by
//! tungstenite after inflating. What this misses tungstenite still finds: it is only ever
//! earlier, never stricter.

/// A frame header's most bytes: 2, 8 of extended length, 4 of mask.
const MAX_HEADER: usize = 14;

/// Where the client's frames are, and the UTF-8 state of a text frame that spans reads.
#[derive(Debug, Default)]
pub(crate) struct Utf8Watch {
    /// Payload bytes of the current frame still to come (0: the next byte starts a header).
    remaining: u64,
    /// A header split across reads: its bytes so far.
    head: [u8; MAX_HEADER],
    head_len: u8,
    mask: [u8; 4],
    /// Where in the mask the next payload byte is.
    mask_at: u8,
    /// The current data message is uncompressed text.
    text_message: bool,
    /// The current frame is being checked (a text frame that spans reads).
    watching: bool,
    /// The check of the current frame has begun (a continuation frame may start inside a
    /// character whose first bytes ended the previous frame: those bytes are skipped).
    started: bool,
    /// A character cut off by the end of a read, waiting for its other bytes.
    pending: [u8; 4],
    pending_len: u8,
    /// A fragmented data message has begun and its last frame has not (control frames may
    /// come between its fragments).
    in_message: bool,
    /// Continuation frames begun since the session last took the count (saturating): each
    /// counts against the message rate, so that a message cut into empty fragments costs a
    /// client what as many messages would. (Fits in the struct's padding.)
    fragments: u16,
}

/// A text frame holds invalid UTF-8.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Invalid {
    /// Where in the bytes just read that frame began (0 if it began in an earlier read): the
    /// bytes before it are whole frames the reader may still have.
    pub(crate) frame_start: usize,
}

/// A parsed header: its length, and the frame's facts.
struct Header {
    len: usize,
    fin_opcode: u8,
    payload: u64,
    mask: [u8; 4],
}

/// The header at the start of `b`, if all of it is there.
fn parse(b: &[u8]) -> Option<Header> {
    if b.len() < 2 {
        return None;
    }
    let masked = b[1] & 0x80 != 0;
    let (payload, at) = match b[1] & 0x7f {
        126 => (u64::from(u16::from_be_bytes([*b.get(2)?, *b.get(3)?])), 4),
        127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let (mask, len) = if masked {
        let m = b.get(at..at + 4)?;
        ([m[0], m[1], m[2], m[3]], at + 4)
    } else {
        ([0; 4], at)
    };
    Some(Header {
        len,
        fin_opcode: b[0],
        payload,
        mask,
    })
}

impl Utf8Watch {
    /// Follows `data`, bytes just read from the socket, in order.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Result<(), Invalid> {
        // Where the current frame began in `data` (0: in an earlier read).
        let mut frame_start = 0;
        let mut i = 0;
        while i < data.len() {
            if self.remaining > 0 {
                let n = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(data.len() - i);
                if self.watching && !self.check(&data[i..i + n]) {
                    return Err(Invalid { frame_start });
                }
                i += n;
                self.remaining -= n as u64;
                continue;
            }
            // A header: whole in `data`, or finished from bytes kept from earlier reads.
            let had = usize::from(self.head_len);
            frame_start = if had == 0 { i } else { 0 };
            let whole = if had == 0 { parse(&data[i..]) } else { None };
            let header = match whole {
                Some(h) => {
                    i += h.len;
                    h
                }
                None => {
                    // Keep what there is, up to a header's length, and try again with it.
                    let take = (MAX_HEADER - had).min(data.len() - i);
                    self.head[had..had + take].copy_from_slice(&data[i..i + take]);
                    let Some(h) = parse(&self.head[..had + take]) else {
                        self.head_len = (had + take) as u8;
                        i += take;
                        continue;
                    };
                    i += h.len - had;
                    self.head_len = 0;
                    h
                }
            };
            self.start_frame(&header);
            // A frame whole in this read is tungstenite's to check (it does so at once).
            if (data.len() - i) as u64 >= self.remaining {
                self.watching = false;
            }
        }
        Ok(())
    }

    fn start_frame(&mut self, h: &Header) {
        let opcode = h.fin_opcode & 0x0f;
        let rsv1 = h.fin_opcode & 0x40 != 0;
        let fin = h.fin_opcode & 0x80 != 0;
        match opcode {
            1 => self.text_message = !rsv1,
            2 => self.text_message = false,
            _ => {}
        }
        if opcode <= 2 {
            self.in_message = !fin;
        }
        if opcode == 0 {
            self.fragments = self.fragments.saturating_add(1);
        }
        self.watching = (opcode == 1 || opcode == 0) && self.text_message;
        // A continuation frame may begin inside a character.
        self.started = opcode == 1;
        self.remaining = h.payload;
        self.mask = h.mask;
        self.mask_at = 0;
        self.pending_len = 0;
    }

    /// The continuation frames begun since the count was last taken.
    pub(crate) fn fragments(&self) -> u16 {
        self.fragments
    }

    /// The continuation frames begun since the last call.
    pub(crate) fn take_fragments(&mut self) -> u16 {
        std::mem::take(&mut self.fragments)
    }

    /// Whether every byte so far ends a whole frame and no fragmented message is under way:
    /// a reader that has taken every whole frame holds nothing of the client's.
    pub(crate) fn at_rest(&self) -> bool {
        self.remaining == 0 && self.head_len == 0 && !self.in_message
    }

    /// Checks the next payload bytes of the watched frame; false at invalid UTF-8.
    fn check(&mut self, masked: &[u8]) -> bool {
        const PIECE: usize = 4096;
        let mut buf = [0u8; PIECE + 4];
        for piece in masked.chunks(PIECE) {
            let p = usize::from(self.pending_len);
            buf[..p].copy_from_slice(&self.pending[..p]);
            let at = usize::from(self.mask_at);
            unmask_into(&mut buf[p..p + piece.len()], piece, self.mask, at);
            self.mask_at = ((at + piece.len()) & 3) as u8;
            let mut s = &buf[..p + piece.len()];
            if !self.started {
                // Up to three bytes that end a character the previous frame began.
                let skip = s.iter().take(3).take_while(|b| *b & 0xc0 == 0x80).count();
                s = &s[skip..];
                self.started = true;
            }
            match std::str::from_utf8(s) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_some() => return false,
                Err(e) => {
                    let rest = &s[e.valid_up_to()..];
                    self.pending[..rest.len()].copy_from_slice(rest);
                    self.pending_len = rest.len() as u8;
                }
            }
        }
        true
    }
}

/// `out` = `masked` unmasked with `mask`, whose byte `at` applies to the first byte; eight bytes
/// at a time.
fn unmask_into(out: &mut [u8], masked: &[u8], mask: [u8; 4], at: usize) {
    let m: [u8; 4] = std::array::from_fn(|k| mask[(at + k) & 3]);
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut outs = out.chunks_exact_mut(8);
    let mut ins = masked.chunks_exact(8);
    for (o, i) in (&mut outs).zip(&mut ins) {
        let v = u64::from_ne_bytes(i.try_into().expect("8 bytes")) ^ word;
        o.copy_from_slice(&v.to_ne_bytes());
    }
    for (k, (o, i)) in outs
        .into_remainder()
        .iter_mut()
        .zip(ins.remainder())
        .enumerate()
    {
        *o = i ^ m[k & 3];
    }
}

#[cfg(test)]
mod tests_support {
    /// A client frame: FIN and opcode byte, masked payload.
    pub(super) fn frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![first];
        let n = payload.len();
        if n < 126 {
            out.push(0x80 | n as u8);
        } else if n <= 0xffff {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::frame;
    use super::*;

    const M: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// Feeds `bytes` in reads of the given sizes (the last takes the rest).
    fn feed_in(w: &mut Utf8Watch, bytes: &[u8], sizes: &[usize]) -> Result<(), Invalid> {
        let mut rest = bytes;
        for &n in sizes {
            let n = n.min(rest.len());
            w.feed(&rest[..n])?;
            rest = &rest[n..];
        }
        w.feed(rest)
    }

    #[test]
    fn invalid_bytes_in_the_middle_of_a_frame_fail_before_it_ends() {
        // Autobahn 6.4.3's shape: a valid start, the invalid bytes, a valid end, each read
        // separately.
        let payload = ["κόσμε".as_bytes(), &[0xf4, 0x90, 0x80, 0x80], b"edited"].concat();
        let bytes = frame(0x81, &payload, M);
        let mut w = Utf8Watch::default();
        let first = 2 + 4 + 11; // header and the valid start
        w.feed(&bytes[..first]).unwrap();
        assert_eq!(
            w.feed(&bytes[first..first + 4]),
            Err(Invalid { frame_start: 0 })
        );
    }

    #[test]
    fn the_frame_start_is_reported_when_it_began_in_the_same_read() {
        let ok = frame(0x81, b"fine", M);
        let bad = frame(0x81, &[b'a', 0xff, b'b', b'c', b'd', b'e'], M);
        let bytes = [ok.clone(), bad].concat();
        let mut w = Utf8Watch::default();
        // The bad frame's last bytes are still to come.
        assert_eq!(
            w.feed(&bytes[..bytes.len() - 2]),
            Err(Invalid {
                frame_start: ok.len()
            })
        );
    }

    #[test]
    fn continuation_frames_are_counted_whatever_the_reads() {
        let mut w = Utf8Watch::default();
        let bytes = [
            frame(0x01, b"a", M),
            frame(0x00, b"", M),
            frame(0x89, b"ping", M),
            frame(0x00, b"bc", M),
            frame(0x80, b"", M),
            frame(0x82, b"whole", M),
        ]
        .concat();
        feed_in(&mut w, &bytes, &[1, 2, 3, 5, 7, 11]).unwrap();
        assert_eq!(
            w.take_fragments(),
            3,
            "three continuation frames; the rest are not"
        );
        assert_eq!(w.take_fragments(), 0, "taken");
        let empty = frame(0x00, b"", M);
        for _ in 0..70_000 {
            w.feed(&empty).unwrap();
        }
        assert_eq!(w.take_fragments(), u16::MAX, "saturates");
    }

    #[test]
    fn at_rest_only_between_whole_frames_outside_a_fragmented_message() {
        let mut w = Utf8Watch::default();
        assert!(w.at_rest());
        // A header cut short, then the rest of its frame.
        let whole = frame(0x82, b"abcdef", M);
        w.feed(&whole[..1]).unwrap();
        assert!(!w.at_rest(), "inside a header");
        w.feed(&whole[1..8]).unwrap();
        assert!(!w.at_rest(), "inside a payload");
        w.feed(&whole[8..]).unwrap();
        assert!(w.at_rest());
        // A fragmented message, with a ping between its fragments.
        w.feed(&frame(0x01, b"part", M)).unwrap();
        assert!(!w.at_rest(), "first fragment in");
        w.feed(&frame(0x89, b"", M)).unwrap();
        assert!(!w.at_rest(), "a ping between fragments");
        w.feed(&frame(0x00, b"more", M)).unwrap();
        assert!(!w.at_rest(), "a middle fragment");
        w.feed(&frame(0x80, b"end", M)).unwrap();
        assert!(w.at_rest(), "the last fragment ends the message");
    }

    #[test]
    fn unmasking_eight_at_a_time_matches_byte_by_byte() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1003).collect();
        for at in 0..4 {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 1003] {
                let mut out = vec![0; len];
                unmask_into(&mut out, &data[..len], M, at);
                let want: Vec<u8> = data[..len]
                    .iter()
                    .enumerate()
                    .map(|(j, b)| b ^ M[(at + j) & 3])
                    .collect();
                assert_eq!(out, want, "at {at}, {len} bytes");
            }
        }
    }

    #[test]
    fn a_whole_frame_in_one_read_is_left_to_tungstenite() {
        let mut w = Utf8Watch::default();
        w.feed(&frame(0x81, &[0xff, 0xfe], M)).unwrap();
    }

    #[test]
    fn valid_text_split_anywhere_passes() {
        let text = "añ€😀 plain ascii 𝄞 and more ümlauts — ".repeat(40);
        let cut = text.len() / 3;
        // Three fragments whose borders fall inside characters, a ping between them.
        let (a, b, c) = (
            &text.as_bytes()[..cut + 1],
            &text.as_bytes()[cut + 1..2 * cut + 2],
            &text.as_bytes()[2 * cut + 2..],
        );
        let bytes = [
            frame(0x01, a, M),
            frame(0x89, b"ping", M),
            frame(0x00, b, [1, 2, 3, 4]),
            frame(0x80, c, [9, 8, 7, 6]),
            frame(0x81, text.as_bytes(), M),
        ]
        .concat();
        for read in [1, 2, 3, 5, 7, 13, 64, 1000] {
            let sizes = vec![read; bytes.len() / read + 1];
            let mut w = Utf8Watch::default();
            feed_in(&mut w, &bytes, &sizes).unwrap_or_else(|e| panic!("reads of {read}: {e:?}"));
        }
    }

    #[test]
    fn binary_compressed_and_control_frames_are_not_checked() {
        let junk = [0xffu8; 300];
        let bytes = [
            frame(0x82, &junk, M),
            frame(0xc1, &junk, M), // RSV1: compressed text
            frame(0x80, &junk, M), // its continuation
            frame(0x8a, &junk[..100], M),
        ]
        .concat();
        let mut w = Utf8Watch::default();
        feed_in(&mut w, &bytes, &[1; 2000]).unwrap();
    }

    #[test]
    fn a_continuation_of_a_text_message_is_checked_too() {
        let bytes = [
            frame(0x01, b"hello ", M),
            frame(
                0x80,
                &[b'x'; 200]
                    .iter()
                    .chain(&[0xc0, 0xaf])
                    .copied()
                    .collect::<Vec<_>>(),
                M,
            ),
        ]
        .concat();
        let mut w = Utf8Watch::default();
        assert!(feed_in(&mut w, &bytes, &[100; 3]).is_err());
    }

    #[test]
    fn headers_split_across_reads_are_followed() {
        let long = "é".repeat(40_000); // a 64-bit length
        let bytes = [
            frame(0x81, "a".repeat(300).as_bytes(), M), // a 16-bit length
            frame(0x81, long.as_bytes(), M),
            frame(
                0x81,
                &[b'z'; 50]
                    .iter()
                    .chain(&[0xed, 0xa0, 0x80])
                    .copied()
                    .collect::<Vec<_>>(),
                M,
            ),
        ]
        .concat();
        let mut w = Utf8Watch::default();
        // Reads of 3 cut every header; the last frame's surrogate is found.
        assert!(feed_in(&mut w, &bytes, &vec![3; bytes.len() / 3]).is_err());
        let mut w = Utf8Watch::default();
        feed_in(
            &mut w,
            &bytes[..bytes.len() - 60],
            &vec![3; bytes.len() / 3],
        )
        .unwrap();
    }
}

#[cfg(test)]
mod cost {
    //! What following the frames costs per read (`cargo test --release -p wshost --lib
    //! utf8_watch::cost -- --ignored --nocapture`); prints, asserts nothing about speed.
    use super::tests_support::frame;
    use super::*;

    fn per_read(label: &str, read: &[u8], frames: usize) {
        let mut w = Utf8Watch::default();
        let n = 2_000_000 / frames.max(1);
        let t = std::time::Instant::now();
        for _ in 0..n {
            w.feed(std::hint::black_box(read)).unwrap();
        }
        let ns = t.elapsed().as_nanos() as f64 / (n * frames) as f64;
        println!("{label}: {ns:.1} ns per frame");
    }

    #[test]
    #[ignore = "a measurement, run by hand"]
    fn cost_per_frame() {
        let m = [1, 2, 3, 4];
        let small = frame(0x81, &[b'x'; 32], m);
        per_read("32 B text, 8 frames per read", &small.repeat(8), 8);
        per_read("32 B text, 1 frame per read", &small, 1);
        let big = frame(0x81, &[b'x'; 16384], m);
        per_read("16 KiB text, whole in one read", &big, 1);
        // The same frame split in two reads: the second half is checked.
        let mut w = Utf8Watch::default();
        let (a, b) = big.split_at(big.len() / 2);
        let n = 20_000;
        let t = std::time::Instant::now();
        for _ in 0..n {
            w.feed(std::hint::black_box(a)).unwrap();
            w.feed(std::hint::black_box(b)).unwrap();
        }
        let ns = t.elapsed().as_nanos() as f64 / n as f64;
        println!("16 KiB text in two reads (half checked): {ns:.0} ns per frame");
    }
}

//! permessage-deflate (RFC 7692) below tungstenite, which has none: incoming compressed
//! messages are inflated (the message size limit applies to the inflated size: a zip bomb
//! stops at the limit) and handed to tungstenite as plain frames; outgoing data frames are
//! deflated and marked with RSV1. Both directions run without context takeover, so nothing
//! stays allocated between messages: the (de)compressors are per worker thread and reset for
//! every message. A connection that did not negotiate it pays one branch per read and write.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub(crate) const NAME: &str = "permessage-deflate";

/// What the server answers to an accepted offer with the largest window: neither side keeps a
/// context between messages.
pub(crate) const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The answer to an accepted offer that asked for a window of `bits` (9 to 15) for the server's
/// compression.
pub(crate) fn response(bits: u8) -> String {
    if bits == 15 {
        RESPONSE.to_owned()
    } else {
        format!("{RESPONSE}; server_max_window_bits={bits}")
    }
}

/// The first of the client's `Sec-WebSocket-Extensions` offers of permessage-deflate that can
/// be accepted: any offer whose parameters are known and valid; the window (in bits) this side
/// then compresses with. A `server_max_window_bits` of 8 is declined (raw deflate's smallest
/// window is 9 bits).
pub(crate) fn accepts(offers: &[String]) -> Option<u8> {
    offers
        .iter()
        .flat_map(|h| h.split(','))
        .find_map(|offer| acceptable(offer.trim()))
}

fn acceptable(offer: &str) -> Option<u8> {
    let mut parts = offer.split(';').map(str::trim);
    if parts
        .next()
        .is_none_or(|name| !name.eq_ignore_ascii_case(NAME))
    {
        return None;
    }
    let mut window = 15;
    let mut seen = Vec::new();
    for param in parts.filter(|p| !p.is_empty()) {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        let key = key.to_ascii_lowercase();
        if seen.contains(&key) {
            return None; // a parameter twice: an invalid offer
        }
        let bits = |v: Option<&str>| v.and_then(|v| v.parse::<u8>().ok());
        let ok = match key.as_str() {
            "server_no_context_takeover" | "client_no_context_takeover" => value.is_none(),
            "server_max_window_bits" => match bits(value) {
                Some(b @ 9..=15) => {
                    window = b;
                    true
                }
                _ => false,
            },
            // We inflate with the largest window: any the client uses fits.
            "client_max_window_bits" => {
                value.is_none() || bits(value).is_some_and(|b| (8..=15).contains(&b))
            }
            _ => false,
        };
        if !ok {
            return None;
        }
        seen.push(key);
    }
    Some(window)
}

/// Settings of a connection that negotiated the extension.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeflateConfig {
    /// Largest inflated message; past it the client gets 1009 (from tungstenite, which is
    /// handed a frame header that says so).
    pub(crate) max_message: usize,
    /// Largest frame handed to tungstenite (an inflated message is split into frames of it).
    pub(crate) max_frame: usize,
    /// Outgoing messages smaller than this are sent uncompressed.
    pub(crate) min_size: usize,
    /// The window this side compresses with, in bits (9 to 15).
    pub(crate) window_bits: u8,
}

/// The session's socket, with permessage-deflate when negotiated.
#[derive(Debug)]
pub(crate) struct Deflate<S> {
    inner: S,
    /// `None`: not negotiated (everything passes through).
    state: Option<Box<State>>,
}

#[derive(Debug)]
struct State {
    config: DeflateConfig,
    /// Bytes read from the socket, not yet a whole frame.
    raw_in: BytesMut,
    /// Frames for tungstenite.
    ready_in: BytesMut,
    /// A compressed message being received: its opcode and (unmasked) payload so far.
    message: Option<(u8, Vec<u8>)>,
    /// The socket has ended.
    eof: bool,
    /// Bytes tungstenite wrote, not yet a whole frame.
    raw_out: BytesMut,
    /// Frames for the socket.
    ready_out: BytesMut,
}

thread_local! {
    /// One compressor per window size (9 to 15 bits), made when first needed.
    static DEFLATERS: RefCell<[Option<Compress>; 7]> =
        const { RefCell::new([None, None, None, None, None, None, None]) };
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
    /// The last message this thread compressed, with its window and result: a channel publish
    /// goes to many connections of a thread one after another, and is compressed once.
    static LAST: RefCell<Remembered> = const { RefCell::new(Remembered {
        bits: 0,
        plain: Vec::new(),
        packed: Vec::new(),
    }) };
}

/// The message a thread compressed last, and what it compressed to; the buffers keep their
/// capacity, so compressing allocates nothing once a thread has seen its largest message.
struct Remembered {
    /// Its window (0: nothing yet).
    bits: u8,
    plain: Vec<u8>,
    packed: Vec<u8>,
}

#[cfg(test)]
thread_local! {
    /// Compressions this thread did, for the test that a repeated message is compressed once.
    static COMPRESSIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Runs `use_it` with `data` deflated with a window of `bits`; when this thread compressed the
/// same bytes with the same window last (the deliveries of one publish), with that result.
fn with_deflated<R>(data: &[u8], bits: u8, use_it: impl FnOnce(&[u8]) -> R) -> io::Result<R> {
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.bits != bits || last.plain != data {
            let r = &mut *last;
            deflate_into(data, bits, &mut r.packed)?;
            r.plain.clear();
            r.plain.extend_from_slice(data);
            r.bits = bits;
        }
        Ok(use_it(&last.packed))
    })
}

impl<S> Deflate<S> {
    /// `inner`, compressing as `config` says, or (`None`) passing everything through.
    pub(crate) fn new(inner: S, config: Option<DeflateConfig>) -> Self {
        Self {
            inner,
            state: config.map(|config| {
                Box::new(State {
                    config,
                    raw_in: BytesMut::new(),
                    ready_in: BytesMut::new(),
                    message: None,
                    eof: false,
                    raw_out: BytesMut::new(),
                    ready_out: BytesMut::new(),
                })
            }),
        }
    }

    /// The socket underneath.
    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }

    pub(crate) fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Whether no frame is half-read, half-written or waiting here.
    pub(crate) fn at_rest(&self) -> bool {
        self.state.as_deref().is_none_or(|s| {
            s.raw_in.is_empty()
                && s.ready_in.is_empty()
                && s.message.is_none()
                && !s.eof
                && s.raw_out.is_empty()
                && s.ready_out.is_empty()
        })
    }
}

/// A frame's header, parsed.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    /// Header length and payload length.
    header_len: usize,
    payload_len: usize,
}

/// The header at the start of `b`, if it is all there (`Err`: a length too large to be real).
fn parse_header(b: &[u8]) -> Result<Option<Header>, ()> {
    if b.len() < 2 {
        return Ok(None);
    }
    let (fin, rsv1, opcode) = (b[0] & 0x80 != 0, b[0] & 0x40 != 0, b[0] & 0x0f);
    let masked = b[1] & 0x80 != 0;
    let (len, mut at) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
        127 if b.len() >= 10 => (
            u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")),
            10,
        ),
        126 | 127 => return Ok(None),
        n => (u64::from(n), 2),
    };
    let payload_len = usize::try_from(len).map_err(|_| ())?;
    let mask = if masked {
        if b.len() < at + 4 {
            return Ok(None);
        }
        let m = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        rsv1,
        opcode,
        mask,
        header_len: at,
        payload_len,
    }))
}

/// Writes a frame header: FIN, RSV1, opcode, length, and (for frames to tungstenite, which
/// wants client frames masked) a zero mask, which leaves the payload as it is.
fn put_header(out: &mut BytesMut, fin: bool, rsv1: bool, opcode: u8, len: usize, mask: bool) {
    out.put_u8((u8::from(fin) << 7) | (u8::from(rsv1) << 6) | opcode);
    let m = if mask { 0x80 } else { 0 };
    if len < 126 {
        out.put_u8(m | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.put_u8(m | 126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(m | 127);
        out.put_u64(len as u64);
    }
    if mask {
        out.put_slice(&[0, 0, 0, 0]);
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Inflates one message; `None` as soon as it is larger than `max` (a zip bomb stops there).
fn inflate(data: &[u8], max: usize) -> io::Result<Option<Vec<u8>>> {
    let corrupt = || io::Error::new(io::ErrorKind::InvalidData, "permessage-deflate: bad data");
    INFLATER.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        let mut out = Vec::new();
        let mut chunk = [0u8; 16 << 10];
        let tail: &[u8] = &[0, 0, 0xff, 0xff];
        for (mut input, flush) in [(data, FlushDecompress::None), (tail, FlushDecompress::Sync)] {
            loop {
                let (before_in, before_out) = (d.total_in(), d.total_out());
                let status = d
                    .decompress(input, &mut chunk, flush)
                    .map_err(|_| corrupt())?;
                let used = (d.total_in() - before_in) as usize;
                let produced = (d.total_out() - before_out) as usize;
                out.extend_from_slice(&chunk[..produced]);
                if out.len() > max {
                    return Ok(None);
                }
                input = &input[used..];
                if status == Status::StreamEnd || (input.is_empty() && produced < chunk.len()) {
                    break;
                }
                if used == 0 && produced == 0 {
                    return Err(corrupt());
                }
            }
        }
        Ok(Some(out))
    })
}

/// Deflates one message with a window of `bits` into `out` (replacing what it held), without
/// the final empty block's `00 00 ff ff` (RFC 7692 §7.2.1).
fn deflate_into(data: &[u8], bits: u8, out: &mut Vec<u8>) -> io::Result<()> {
    #[cfg(test)]
    COMPRESSIONS.with(|n| n.set(n.get() + 1));
    let bits = bits.clamp(9, 15);
    out.clear();
    DEFLATERS.with(|all| {
        let mut all = all.borrow_mut();
        let c = all[usize::from(bits - 9)].get_or_insert_with(|| {
            Compress::new_with_window_bits(Compression::fast(), false, bits)
        });
        c.reset();
        out.reserve(data.len() / 2 + 1024);
        let mut input = data;
        loop {
            if out.capacity() - out.len() < 1024 {
                out.reserve(out.capacity().max(4096));
            }
            let before = c.total_in();
            c.compress_vec(input, out, FlushCompress::Sync)
                .map_err(|e| io::Error::other(e.to_string()))?;
            input = &input[(c.total_in() - before) as usize..];
            // The sync flush ends with an empty stored block (`00 00 ff ff`); with room left
            // after it, everything is out.
            if input.is_empty() && out.ends_with(&[0, 0, 0xff, 0xff]) && out.len() < out.capacity()
            {
                break;
            }
        }
        if out.ends_with(&[0, 0, 0xff, 0xff]) {
            out.truncate(out.len() - 4);
        }
        Ok(())
    })
}

/// [`deflate_into`] a new buffer.
#[cfg(test)]
fn deflate(data: &[u8], bits: u8) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    deflate_into(data, bits, &mut out)?;
    Ok(out)
}

impl State {
    /// Turns whole frames of `raw_in` into frames for tungstenite.
    fn process_in(&mut self) -> io::Result<()> {
        loop {
            let header = match parse_header(&self.raw_in) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(()),
                Err(()) => return Err(io::Error::new(io::ErrorKind::InvalidData, "bad frame")),
            };
            let control = header.opcode & 0x08 != 0;
            // An oversized frame or message is tungstenite's to refuse (1009): pass it on.
            let passing =
                control || (self.message.is_none() && !(header.rsv1 && header.opcode != 0));
            if passing {
                let total = header.header_len.saturating_add(header.payload_len);
                if header.payload_len > self.config.max_frame && !control {
                    // Let tungstenite see the header and refuse it; the rest never matters.
                    let n = header.header_len;
                    self.ready_in.extend_from_slice(&self.raw_in[..n]);
                    self.raw_in.advance(n);
                    continue;
                }
                if self.raw_in.len() < total {
                    return Ok(());
                }
                self.ready_in.extend_from_slice(&self.raw_in[..total]);
                self.raw_in.advance(total);
                continue;
            }
            // A compressed message's frame (its first, with RSV1, or a continuation).
            if header.opcode != 0 && self.message.is_some() {
                // A new data frame inside a fragmented message: tungstenite refuses it.
                return self.refuse_protocol();
            }
            if header.opcode == 0 && header.rsv1 {
                return self.refuse_protocol();
            }
            let collected = self.message.as_ref().map_or(0, |(_, p)| p.len());
            if collected.saturating_add(header.payload_len) > self.config.max_message {
                self.too_large(self.message.as_ref().map_or(header.opcode, |(op, _)| *op));
                return Ok(());
            }
            let total = header.header_len + header.payload_len;
            if self.raw_in.len() < total {
                return Ok(());
            }
            let mut payload = self.raw_in[header.header_len..total].to_vec();
            self.raw_in.advance(total);
            if let Some(mask) = header.mask {
                unmask(&mut payload, mask);
            }
            match &mut self.message {
                Some((_, p)) => p.extend_from_slice(&payload),
                None => self.message = Some((header.opcode, payload)),
            }
            if header.fin {
                let (opcode, data) = self.message.take().expect("set above");
                match inflate(&data, self.config.max_message)? {
                    Some(plain) => self.emit(opcode, &plain),
                    None => {
                        self.too_large(opcode);
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Hands tungstenite `data` as a message of `opcode`, in frames of at most `max_frame`.
    fn emit(&mut self, opcode: u8, data: &[u8]) {
        let max = self.config.max_frame.max(1);
        let mut chunks = data.chunks(max).peekable();
        if chunks.peek().is_none() {
            put_header(&mut self.ready_in, true, false, opcode, 0, true);
            return;
        }
        let mut first = true;
        while let Some(chunk) = chunks.next() {
            let fin = chunks.peek().is_none();
            put_header(
                &mut self.ready_in,
                fin,
                false,
                if first { opcode } else { 0 },
                chunk.len(),
                true,
            );
            self.ready_in.extend_from_slice(chunk);
            first = false;
        }
    }

    /// The message is over the limit: tungstenite gets a header saying so and closes with 1009;
    /// nothing more is read.
    fn too_large(&mut self, opcode: u8) {
        // Past the frame limit too: tungstenite refuses it from the header alone.
        let len = self
            .config
            .max_frame
            .max(self.config.max_message)
            .saturating_add(1);
        let op = if opcode == 0 { 2 } else { opcode };
        put_header(&mut self.ready_in, true, false, op, len, true);
        self.raw_in.clear();
        self.message = None;
        self.eof = true;
    }

    /// A frame that breaks the protocol: tungstenite gets an RSV1 frame it refuses (1002).
    fn refuse_protocol(&mut self) -> io::Result<()> {
        put_header(&mut self.ready_in, true, true, 0x0a, 0, true);
        self.raw_in.clear();
        self.message = None;
        self.eof = true;
        Ok(())
    }

    /// Turns whole frames of `raw_out` into frames for the socket, deflating data messages.
    fn process_out(&mut self) -> io::Result<()> {
        loop {
            let header = match parse_header(&self.raw_out) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(()),
                Err(()) => return Err(io::Error::other("tungstenite wrote a bad frame")),
            };
            let total = header.header_len + header.payload_len;
            if self.raw_out.len() < total {
                return Ok(());
            }
            let data = matches!(header.opcode, 1 | 2) && header.fin && !header.rsv1;
            if data && header.payload_len >= self.config.min_size {
                let payload = &self.raw_out[header.header_len..total];
                let out = &mut self.ready_out;
                with_deflated(payload, self.config.window_bits, |packed| {
                    put_header(out, true, true, header.opcode, packed.len(), false);
                    out.extend_from_slice(packed);
                })?;
            } else {
                // Control frames, fragments (a fragmented message goes uncompressed), small
                // messages.
                self.ready_out.extend_from_slice(&self.raw_out[..total]);
            }
            self.raw_out.advance(total);
        }
    }
}

/// Bytes of transformed output past which a write waits for the socket.
const OUT_HIGH: usize = 256 << 10;

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Deflate<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.state.is_none() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        // Output the socket did not take earlier goes out now.
        if let Poll::Ready(Err(e)) = this.drain_out(cx) {
            return Poll::Ready(Err(e));
        }
        let state = this.state.as_mut().expect("checked above");
        loop {
            if !state.ready_in.is_empty() {
                let n = state.ready_in.len().min(buf.remaining());
                buf.put_slice(&state.ready_in[..n]);
                state.ready_in.advance(n);
                // Nothing stays allocated between messages.
                if state.ready_in.is_empty() {
                    state.ready_in = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if state.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 << 10];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    state.eof = true;
                    // A frame cut short: what there is goes on, for tungstenite to refuse.
                    let rest = state.raw_in.split();
                    state.ready_in.extend_from_slice(&rest);
                }
                Poll::Ready(Ok(())) => {
                    state.raw_in.extend_from_slice(rb.filled());
                    state.process_in()?;
                    if state.raw_in.is_empty() {
                        state.raw_in = BytesMut::new();
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> Deflate<S> {
    /// Writes transformed frames to the socket until they are all out or it would block.
    fn drain_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(state) = self.state.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        while !state.ready_out.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &state.ready_out) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => state.ready_out.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if state.ready_out.capacity() > 0 {
            state.ready_out = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Deflate<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.state.is_none() {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        if this
            .state
            .as_ref()
            .is_some_and(|s| s.ready_out.len() >= OUT_HIGH)
        {
            match this.drain_out(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let state = this.state.as_mut().expect("checked above");
        state.raw_out.extend_from_slice(data);
        state.process_out()?;
        if state.raw_out.is_empty() {
            state.raw_out = BytesMut::new();
        }
        // Written through at once, as a plain socket would: tungstenite does not flush every
        // write (its answer to a close, for one). What the socket does not take now goes out
        // with the next write, flush or read.
        if let Poll::Ready(Err(e)) = this.drain_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.drain_out(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.drain_out(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    #[test]
    fn offers_are_accepted_or_declined() {
        let bits = |s: &str| accepts(&[s.to_owned()]);
        assert_eq!(bits("permessage-deflate"), Some(15));
        assert_eq!(bits("permessage-deflate; client_max_window_bits"), Some(15));
        assert_eq!(
            bits("permessage-deflate; client_max_window_bits=10; server_no_context_takeover"),
            Some(15)
        );
        assert_eq!(bits("x-webkit-deflate-frame, permessage-deflate"), Some(15));
        assert_eq!(
            bits("permessage-deflate; server_max_window_bits=10"),
            Some(10)
        );
        assert_eq!(bits("permessage-deflate; server_max_window_bits=8"), None);
        assert_eq!(
            bits("permessage-deflate; server_max_window_bits=8, permessage-deflate"),
            Some(15)
        );
        assert_eq!(bits("permessage-deflate; unknown_param"), None);
        assert_eq!(
            bits("permessage-deflate; client_no_context_takeover; client_no_context_takeover"),
            None
        );
        assert_eq!(bits("permessage-deflate; client_max_window_bits=16"), None);
        assert_eq!(bits("deflate-frame"), None);
        assert_eq!(
            response(10),
            format!("{RESPONSE}; server_max_window_bits=10")
        );
    }

    #[test]
    fn deflate_and_inflate_round_trip_and_the_limit_holds() {
        let text = b"{\"type\":\"chat\",\"text\":\"hello hello hello hello\"}".repeat(100);
        let packed = deflate(&text, 15).unwrap();
        assert!(packed.len() < text.len() / 5, "{} bytes", packed.len());
        assert_eq!(inflate(&packed, 1 << 20).unwrap().unwrap(), text);
        // A bomb: 10 MB of zeros in a few KB, against a 1 MB limit.
        let bomb = deflate(&vec![0u8; 10 << 20], 15).unwrap();
        assert!(bomb.len() < 128 << 10, "{}", bomb.len());
        assert_eq!(inflate(&bomb, 1 << 20).unwrap(), None);
        assert!(inflate(&[0xff, 0xff, 0xff], 1 << 20).is_err());
    }

    /// A client frame: masked, the payload deflated if `compressed`.
    fn client_frame(fin: bool, opcode: u8, rsv1: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_u8((u8::from(fin) << 7) | (u8::from(rsv1) << 6) | opcode);
        let len = payload.len();
        if len < 126 {
            out.put_u8(0x80 | len as u8);
        } else {
            out.put_u8(0x80 | 126);
            out.put_u16(len as u16);
        }
        let mask = [1, 2, 3, 4];
        out.put_slice(&mask);
        let mut p = payload.to_vec();
        unmask(&mut p, mask);
        out.put_slice(&p);
        out.to_vec()
    }

    async fn server(
        config: DeflateConfig,
    ) -> (
        tokio::io::DuplexStream,
        WebSocketStream<Deflate<tokio::io::DuplexStream>>,
    ) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(config.max_message))
            .max_frame_size(Some(config.max_frame));
        let ws = WebSocketStream::from_raw_socket(
            Deflate::new(server, Some(config)),
            Role::Server,
            Some(ws_config),
        )
        .await;
        (client, ws)
    }

    const CONFIG: DeflateConfig = DeflateConfig {
        max_message: 1 << 20,
        max_frame: 1 << 20,
        min_size: 16,
        window_bits: 15,
    };

    #[tokio::test]
    async fn compressed_messages_arrive_plain_even_across_fragments_and_controls() {
        let (mut client, mut ws) = server(CONFIG).await;
        let text = "a compressed hello, a compressed hello, a compressed hello";
        let packed = deflate(text.as_bytes(), 15).unwrap();
        let (a, b) = packed.split_at(packed.len() / 2);
        let mut wire = client_frame(false, 1, true, a);
        wire.extend(client_frame(true, 9, false, b"ping")); // a ping in between
        wire.extend(client_frame(true, 0, false, b));
        wire.extend(client_frame(true, 2, false, b"plain binary"));
        client.write_all(&wire).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Ping(b"ping".to_vec().into())
        );
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::binary(b"plain binary".to_vec())
        );
        ws.send(Message::text("an answer, an answer, an answer"))
            .await
            .unwrap();
        // Between messages nothing stays allocated.
        let state = ws.get_ref().state.as_ref().unwrap();
        assert_eq!(
            (
                state.raw_in.capacity(),
                state.ready_in.capacity(),
                state.raw_out.capacity(),
                state.ready_out.capacity()
            ),
            (0, 0, 0, 0)
        );
        assert!(state.message.is_none());
    }

    #[tokio::test]
    async fn outgoing_data_is_compressed_and_small_messages_are_not() {
        let (mut client, mut ws) = server(CONFIG).await;
        let big = "compress me ".repeat(50);
        ws.send(Message::text(big.clone())).await.unwrap();
        ws.send(Message::text("tiny")).await.unwrap();
        let mut got = vec![0u8; 4096];
        let mut n = 0;
        while n < 2 + 6 {
            n += client.read(&mut got[n..]).await.unwrap();
        }
        let h = parse_header(&got).unwrap().unwrap();
        assert!(h.rsv1 && h.fin && h.opcode == 1 && h.payload_len < big.len() / 4);
        while n < h.header_len + h.payload_len + 6 {
            n += client.read(&mut got[n..]).await.unwrap();
        }
        let payload = &got[h.header_len..h.header_len + h.payload_len];
        assert_eq!(inflate(payload, 1 << 20).unwrap().unwrap(), big.as_bytes());
        let tiny = parse_header(&got[h.header_len + h.payload_len..])
            .unwrap()
            .unwrap();
        assert!(!tiny.rsv1 && tiny.payload_len == 4);
    }

    #[tokio::test]
    async fn a_zip_bomb_closes_with_1009_without_inflating_further() {
        let (mut client, mut ws) = server(DeflateConfig {
            max_message: 64 << 10,
            ..CONFIG
        })
        .await;
        let bomb = deflate(&vec![b'x'; 4 << 20], 15).unwrap();
        assert!(bomb.len() < 60 << 10, "{}", bomb.len());
        client
            .write_all(&client_frame(true, 1, true, &bomb))
            .await
            .unwrap();
        let err = ws.next().await.unwrap().unwrap_err();
        assert!(
            matches!(err, tokio_tungstenite::tungstenite::Error::Capacity(_)),
            "{err}"
        );
    }
}

#[cfg(test)]
mod close_tests {
    use super::*;
    use futures_util::StreamExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    #[tokio::test]
    async fn a_close_is_answered_without_a_flush() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut ws = WebSocketStream::from_raw_socket(
            Deflate::new(
                server,
                Some(DeflateConfig {
                    max_message: 1 << 20,
                    max_frame: 1 << 20,
                    min_size: 16,
                    window_bits: 15,
                }),
            ),
            Role::Server,
            None,
        )
        .await;
        // A masked close frame, code 1000.
        client
            .write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8])
            .await
            .unwrap();
        let server = tokio::spawn(async move {
            assert!(matches!(ws.next().await, Some(Ok(Message::Close(_)))));
            assert!(ws.next().await.is_none());
        });
        let mut buf = [0u8; 16];
        let n = client.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &[0x88, 0x02, 0x03, 0xe8]);
        drop(client);
        server.await.unwrap();
    }
}

#[cfg(test)]
mod round_trips {
    use super::*;

    /// Deterministic pseudo-random bytes, some runs repeated (compressible in part).
    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 7 < 3 {
                    b'a' + (i % 5) as u8
                } else {
                    x as u8
                }
            })
            .collect()
    }

    #[test]
    fn another_inflater_reads_what_we_deflate() {
        use std::io::Write as _;
        let d = data(65535, 1);
        let packed = deflate(&d, 15).unwrap();
        let mut dec = flate2::write::DeflateDecoder::new(Vec::new());
        dec.write_all(&packed).unwrap();
        dec.write_all(&[0, 0, 0xff, 0xff]).unwrap();
        dec.flush().unwrap();
        let std_back = dec.get_ref().clone();
        assert_eq!(std_back.len(), d.len(), "our deflate, their inflate");
    }

    #[test]
    fn a_message_sent_again_is_compressed_once_per_thread() {
        let d = data(4096, 3);
        let packed = |bits: u8, d: &[u8]| with_deflated(d, bits, <[u8]>::to_vec).unwrap();
        let count = || COMPRESSIONS.with(std::cell::Cell::get);
        let before = count();
        let a = packed(15, &d);
        let b = packed(15, &d);
        assert_eq!(a, b);
        assert_eq!(inflate(&b, 1 << 20).unwrap().unwrap(), d);
        assert_eq!(
            count() - before,
            1,
            "the second send reused the first's result"
        );
        // Another window, or other bytes, are compressed afresh.
        let c = packed(10, &d);
        assert_eq!(inflate(&c, 1 << 20).unwrap().unwrap(), d);
        let mut other = d.clone();
        other[100] ^= 1;
        assert_eq!(
            inflate(&packed(10, &other), 1 << 20).unwrap().unwrap(),
            other
        );
        assert_eq!(count() - before, 3);
    }

    #[test]
    fn every_size_round_trips() {
        for n in [
            0,
            1,
            100,
            4095,
            4096,
            16384,
            16385,
            65535,
            65536,
            131072,
            1 << 20,
        ] {
            for seed in [1, 7, 99] {
                let d = data(n, seed);
                for bits in [9, 12, 15] {
                    let packed = deflate(&d, bits).unwrap();
                    let back = inflate(&packed, 16 << 20).unwrap().unwrap();
                    assert_eq!(back.len(), d.len(), "size {n} seed {seed} bits {bits}");
                    assert_eq!(back, d, "size {n} seed {seed} bits {bits}");
                }
            }
        }
    }
}

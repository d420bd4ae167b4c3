//! The messages between the host and a plugin's worker process: frames of
//! `[length u32][kind u8][id u64][body]` (little-endian; the length counts kind, id and body),
//! written into one buffer per direction and flushed by one writer, so a burst of events or
//! sends crosses in one write. Hot messages (text, binary, sends) carry raw bytes; rare ones
//! (requests, answers, identity) carry JSON.

use serde::{Deserialize, Serialize};

use super::super::RequestMap;
use crate::limits::ConnLimits;

/// Bytes before a frame's body: length, kind, id.
pub(crate) const HEADER: usize = 13;
/// The largest frame either side accepts (a message at the largest `--max-message-size` plus
/// room); a longer length prefix means the stream is corrupt.
pub(crate) const MAX_FRAME: usize = (1 << 30) + 4096;

// Host → worker.
/// Create the instance: JSON [`Create`].
pub(crate) const CREATE: u8 = 1;
/// Decide a request (id: the request): JSON [`RequestMap`].
pub(crate) const DECIDE: u8 = 2;
/// Bind an accepted handler to a connection (id: the connection): JSON [`Open`].
pub(crate) const OPEN: u8 = 3;
/// The host stopped waiting for decision `id`: drop its accepted handler, or tell a deferred
/// responder nobody waits.
pub(crate) const DISCARD: u8 = 4;
/// `on_connect` (id: the connection).
pub(crate) const CONNECT: u8 = 5;
/// `on_text`: the text.
pub(crate) const TEXT: u8 = 6;
/// `on_binary`: the data.
pub(crate) const BINARY: u8 = 7;
/// `on_ping`: the payload.
pub(crate) const PING: u8 = 8;
/// `on_pong`: the payload.
pub(crate) const PONG: u8 = 9;
/// `on_error`: the error's text.
pub(crate) const ERROR: u8 = 10;
/// `on_close`: code (u16) and reason; the connection's last event.
pub(crate) const CLOSE: u8 = 11;
/// Send-queue credit: bytes of the worker's sends written (u64), and whether `on_drain` runs
/// (u8).
pub(crate) const CREDIT: u8 = 12;
/// The answer to a call of the worker's (id: the call): u64.
pub(crate) const REPLY: u8 = 13;
/// Run the instance's `shutdown`, then exit.
pub(crate) const SHUTDOWN: u8 = 14;
/// A newer generation took over: run the instance's `replaced`.
pub(crate) const REPLACED: u8 = 15;
/// `on_timer`: the tag (u64).
pub(crate) const TIMER: u8 = 16;
/// `on_sent`: the tag (u64), written (u8).
pub(crate) const SENT: u8 = 18;
/// An event of a channel the plugin watches: kind (u8, `abi::channel_event`), channel length
/// (u16), channel, data.
pub(crate) const CHANNEL_EVENT: u8 = 17;

// Worker → host.
/// The library's identity: JSON [`Identity`].
pub(crate) const IDENTITY: u8 = 32;
/// The instance is created.
pub(crate) const READY: u8 = 33;
/// Loading or creating failed: the reason.
pub(crate) const FAILED: u8 = 34;
/// A decision (id: the request): JSON [`AnswerMsg`].
pub(crate) const ANSWER: u8 = 35;
/// `conn.send_text` (id: the connection): the text.
pub(crate) const SEND_TEXT: u8 = 36;
/// `conn.send_binary`: the data.
pub(crate) const SEND_BINARY: u8 = 37;
/// `conn.ping`: the payload.
pub(crate) const SEND_PING: u8 = 38;
/// `conn.close`: code (u16) and reason.
pub(crate) const SEND_CLOSE: u8 = 39;
/// A send was refused for lack of credit: run `on_drain` once the queue empties.
pub(crate) const WANT_DRAIN: u8 = 40;
/// `conn.pause`/`resume`: u8.
pub(crate) const PAUSE: u8 = 41;
/// `conn.set_idle_timeout`: milliseconds (u64).
pub(crate) const SET_IDLE: u8 = 49;
/// `conn.set_timer`: tag (u64), milliseconds (u64).
pub(crate) const SET_TIMER: u8 = 50;
/// `conn.cancel_timer`: tag (u64).
pub(crate) const CANCEL_TIMER: u8 = 51;
/// `conn.set_low_water`: bytes (u64).
pub(crate) const SET_LOW_WATER: u8 = 52;
/// `conn.set_label`: the label.
pub(crate) const SET_LABEL: u8 = 53;
/// `conn.send_text_tracked`: the tag (u64), the text.
pub(crate) const SEND_TEXT_TRACKED: u8 = 57;
/// `conn.send_binary_tracked`: the tag (u64), the data.
pub(crate) const SEND_BINARY_TRACKED: u8 = 58;
/// Sends the worker refused since its last report, which `/metrics` counts as the host's own
/// refusals are (id 0): queue full (u64), too large (u64).
pub(crate) const REFUSED: u8 = 59;
/// `host.members` (id: the call): the channel. Replied with the members as JSON.
pub(crate) const MEMBERS: u8 = 54;
/// `host.watch` (id: the call): the channel. Replied (1: newly watched).
pub(crate) const WATCH: u8 = 55;
/// `host.unwatch` (id: the call): the channel. Replied (1: was watched).
pub(crate) const UNWATCH: u8 = 56;
/// `conn.subscribe` (id: the call): connection (u64), channel. Replied.
pub(crate) const SUBSCRIBE: u8 = 42;
/// `conn.unsubscribe` (id: the call): connection (u64), channel. Replied.
pub(crate) const UNSUBSCRIBE: u8 = 43;
/// `host.publish_*` (id: the call): binary (u8), channel length (u16), channel, data. Replied.
pub(crate) const PUBLISH: u8 = 44;
/// `host.subscribers` (id: the call): channel. Replied.
pub(crate) const SUBSCRIBERS: u8 = 45;
/// `host.log` (id: the level): the message.
pub(crate) const LOG: u8 = 46;
/// A callback panicked (id: the connection): JSON [`Failed`].
pub(crate) const CALL_FAILED: u8 = 47;
/// `shutdown` returned: its panic message, or nothing.
pub(crate) const SHUT_DOWN: u8 = 48;

/// What the worker found in the library.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Identity {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) routes: Vec<String>,
    pub(crate) api_version: String,
}

/// How to create the instance.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Create {
    pub(crate) generation: u64,
    pub(crate) config: Vec<(String, String)>,
    /// The same table with its types, as JSON.
    pub(crate) config_json: String,
    /// The most verbose plugin log level the host shows (abi levels: 0 error … 4 trace).
    pub(crate) log_level: u8,
    /// A call running this long is logged (`--slow-callback`), in milliseconds.
    pub(crate) slow_ms: u64,
}

/// A handler's binding to its connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Open {
    pub(crate) token: u64,
    pub(crate) remote: String,
    pub(crate) max_send_queue: u64,
    pub(crate) facts: crate::plugin::ConnFacts,
}

/// A plugin's decision, as it crosses.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct AnswerMsg {
    /// `Some` if the plugin panicked (or dropped a deferred responder: `dropped`).
    pub(crate) panic: Option<String>,
    pub(crate) dropped: bool,
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    /// The handler's token if the plugin accepted with callbacks.
    pub(crate) handler: Option<u64>,
    pub(crate) limits: ConnLimits,
    #[serde(default)]
    pub(crate) kept_headers: Vec<String>,
}

/// A callback that panicked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Failed {
    pub(crate) callback: String,
    pub(crate) panic: String,
}

/// The request map as it crosses (the same fields).
pub(crate) type RequestMsg = RequestMap;

/// Appends one frame to `buf`.
pub(crate) fn put(buf: &mut Vec<u8>, kind: u8, id: u64, parts: &[&[u8]]) {
    let len: usize = 9 + parts.iter().map(|p| p.len()).sum::<usize>();
    buf.reserve(4 + len);
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(&id.to_le_bytes());
    for p in parts {
        buf.extend_from_slice(p);
    }
}

/// A frame's header: its kind, id and body length; `None` if the length is corrupt.
pub(crate) fn header(h: &[u8; HEADER]) -> Option<(u8, u64, usize)> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if !(9..=MAX_FRAME).contains(&len) {
        return None;
    }
    let id = u64::from_le_bytes(h[5..13].try_into().expect("8 bytes"));
    Some((h[4], id, len - 9))
}

/// A close frame's body: code, then reason.
pub(crate) fn close_body(code: u16, reason: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + reason.len());
    b.extend_from_slice(&code.to_le_bytes());
    b.extend_from_slice(reason.as_bytes());
    b
}

/// Reads a close frame's body.
pub(crate) fn read_close(body: &[u8]) -> (u16, String) {
    if body.len() < 2 {
        return (1005, String::new());
    }
    (
        u16::from_le_bytes([body[0], body[1]]),
        String::from_utf8_lossy(&body[2..]).into_owned(),
    )
}

/// The first 8 bytes of `body` as a u64 (0 if short), and the rest.
pub(crate) fn split_u64(body: &[u8]) -> (u64, &[u8]) {
    if body.len() < 8 {
        return (0, &[]);
    }
    (
        u64::from_le_bytes(body[..8].try_into().expect("8 bytes")),
        &body[8..],
    )
}

/// A publish's body.
pub(crate) fn publish_body(binary: bool, channel: &str, data: &[u8]) -> Vec<u8> {
    let channel = &channel.as_bytes()[..channel.len().min(u16::MAX as usize)];
    let mut b = Vec::with_capacity(3 + channel.len() + data.len());
    b.push(u8::from(binary));
    b.extend_from_slice(&(channel.len() as u16).to_le_bytes());
    b.extend_from_slice(channel);
    b.extend_from_slice(data);
    b
}

/// Reads a publish's body: binary, channel, offset of the data.
pub(crate) fn read_publish(body: &[u8]) -> Option<(bool, &str, usize)> {
    if body.len() < 3 {
        return None;
    }
    let n = u16::from_le_bytes([body[1], body[2]]) as usize;
    let channel = std::str::from_utf8(body.get(3..3 + n)?).ok()?;
    Some((body[0] == 1, channel, 3 + n))
}

/// A channel event's body: kind, channel (length-prefixed, as a publish's), data.
pub(crate) fn channel_event_body(kind: u8, channel: &str, data: &[u8]) -> Vec<u8> {
    let mut b = publish_body(false, channel, data);
    b[0] = kind;
    b
}

/// Reads a channel event's body: kind, channel, data.
pub(crate) fn read_channel_event(body: &bytes::Bytes) -> Option<(u8, String, bytes::Bytes)> {
    let (_, channel, at) = read_publish(body)?;
    Some((body[0], channel.to_owned(), body.slice(at..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_events_round_trip() {
        let body = bytes::Bytes::from(channel_event_body(2, "room", b"hi"));
        let (kind, channel, data) = read_channel_event(&body).unwrap();
        assert_eq!((kind, channel.as_str(), &data[..]), (2, "room", &b"hi"[..]));
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        put(&mut buf, TEXT, 7, &[b"hel", b"lo"]);
        put(&mut buf, CLOSE, 8, &[&close_body(1000, "bye")]);
        let h: [u8; HEADER] = buf[..HEADER].try_into().unwrap();
        assert_eq!(header(&h), Some((TEXT, 7, 5)));
        assert_eq!(&buf[HEADER..HEADER + 5], b"hello");
        let rest = &buf[HEADER + 5..];
        let h: [u8; HEADER] = rest[..HEADER].try_into().unwrap();
        let (kind, id, len) = header(&h).unwrap();
        assert_eq!((kind, id), (CLOSE, 8));
        assert_eq!(
            read_close(&rest[HEADER..HEADER + len]),
            (1000, "bye".into())
        );
        let p = publish_body(true, "room", b"xy");
        let (bin, ch, at) = read_publish(&p).unwrap();
        assert!(bin);
        assert_eq!(ch, "room");
        assert_eq!(&p[at..], b"xy");
    }

    #[test]
    fn corrupt_lengths_are_refused() {
        let mut h = [0u8; HEADER];
        h[..4].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(header(&h), None);
        h[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(header(&h), None);
    }
}

//! permessage-deflate (RFC 7692) against the real binary, with a client written here: the
//! offer and the answer, compressed messages both ways, the limit on the inflated size, and
//! every way to turn it off.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

use crate::harness::{Host, PATIENCE};

/// Opens a WebSocket on `path` offering permessage-deflate; the 101's extensions header.
pub(crate) fn handshake(addr: SocketAddr, path: &str, offer: &str) -> (TcpStream, Option<String>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Extensions: {offer}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let ext = head
        .lines()
        .find_map(|l| l.strip_prefix("sec-websocket-extensions: "))
        .map(str::to_owned);
    (s, ext)
}

pub(crate) fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

pub(crate) fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    out
}

/// Sends one masked, final frame.
pub(crate) fn send(s: &mut TcpStream, opcode: u8, rsv1: bool, payload: &[u8]) {
    s.write_all(&client_frame(true, rsv1, opcode, payload))
        .unwrap();
}

/// A masked frame as a client sends it, final or not.
pub(crate) fn client_frame(fin: bool, rsv1: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![(u8::from(fin) << 7) | (u8::from(rsv1) << 6) | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [7, 1, 9, 3];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one (unmasked) frame: RSV1, opcode, payload.
pub(crate) fn recv(s: &mut TcpStream) -> (bool, u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    (h[0] & 0x40 != 0, h[0] & 0x0f, payload)
}

pub(crate) const JSON: &str = r#"{"type":"update","items":[{"id":1,"name":"alpha","tags":["a","b"]},{"id":2,"name":"beta","tags":["a","b"]},{"id":3,"name":"gamma","tags":["a","b"]},{"id":4,"name":"delta","tags":["a","b"]}]}"#;

#[test]
fn deflate_is_negotiated_and_messages_are_compressed_both_ways() {
    let host = Host::builder().plugin("echo").start();
    let (mut s, ext) = handshake(
        host.addr,
        "/echo",
        "permessage-deflate; client_max_window_bits",
    );
    assert_eq!(
        ext.as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    send(&mut s, 1, true, &deflate(JSON.as_bytes()));
    let (rsv1, opcode, payload) = recv(&mut s);
    assert!(rsv1 && opcode == 1, "the echo comes back compressed");
    assert!(
        payload.len() < JSON.len(),
        "{} of {}",
        payload.len(),
        JSON.len()
    );
    assert_eq!(inflate(&payload), JSON.as_bytes());
    // Uncompressed messages are fine too, and small answers go uncompressed.
    send(&mut s, 1, false, b"hi");
    assert_eq!(recv(&mut s), (false, 1, b"hi".to_vec()));
    assert!(host.metric("wshost_websockets_compressed_total") >= Some(1.0));
}

#[test]
fn a_zip_bomb_closes_with_1009() {
    let host = Host::builder()
        .plugin("echo")
        .args(&["--max-message-size", "65536"])
        .start();
    let (mut s, ext) = handshake(host.addr, "/echo", "permessage-deflate");
    assert!(ext.is_some());
    // 16 MB of zeros, a few KB on the wire.
    let bomb = deflate(&vec![0u8; 16 << 20]);
    assert!(bomb.len() < 65536);
    send(&mut s, 2, true, &bomb);
    let (_, opcode, payload) = recv(&mut s);
    assert_eq!(opcode, 8);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1009);
}

#[test]
fn deflate_is_declined_where_it_is_turned_off_or_the_offer_cannot_be_met() {
    let host = Host::builder()
        .plugin("echo")
        .plugin("testkit")
        .config_file(
            "[plugin.echo]\nroutes = [\"/echo\", \"/raw\"]\n\
             [plugin.echo.route.\"/raw\"]\ncompression = \"off\"\n",
        )
        .start();
    let offer = "permessage-deflate";
    assert!(handshake(host.addr, "/echo", offer).1.is_some());
    // A route section turned it off.
    assert_eq!(handshake(host.addr, "/raw", offer).1, None);
    // The plugin refused it for this connection.
    assert!(handshake(host.addr, "/testkit", offer).1.is_some());
    assert_eq!(handshake(host.addr, "/testkit?nocompress=1", offer).1, None);
    // A smaller window for the host's compression is met and said so; one of 8 bits (below
    // raw deflate's smallest) is declined.
    assert_eq!(
        handshake(
            host.addr,
            "/echo",
            "permessage-deflate; server_max_window_bits=10"
        )
        .1
        .as_deref(),
        Some(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=10"
        )
    );
    assert_eq!(
        handshake(
            host.addr,
            "/echo",
            "permessage-deflate; server_max_window_bits=8"
        )
        .1,
        None
    );
    // Off for the whole host.
    let off = Host::builder()
        .plugin("echo")
        .args(&["--compression", "off"])
        .start();
    assert_eq!(handshake(off.addr, "/echo", offer).1, None);
}

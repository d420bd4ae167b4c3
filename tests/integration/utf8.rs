//! Invalid UTF-8 in a text frame fails as soon as it arrives (RFC 6455 §8.1), not when the
//! frame's last byte does; valid text cut anywhere by the network still passes.

use std::io::Write;

use crate::compression::{handshake, recv, send};
use crate::harness::{ask, connect, Host};
use test_support::eventually_async;

/// No extension: the frames below are plain.
const NO_OFFER: &str = "x-nothing";

#[tokio::test]
async fn invalid_utf8_closes_with_1007_before_its_frame_is_complete() {
    let host = Host::builder().plugin("echo").start();
    let mut bystander = connect(&host.url("/echo")).await;

    let (mut s, ext) = handshake(host.addr, "/echo", NO_OFFER);
    assert_eq!(ext, None);
    send(&mut s, 1, false, b"hello");
    assert_eq!(recv(&mut s), (false, 1, b"hello".to_vec()));

    // A text frame of 1,000 bytes: its valid start, then a code point past U+10FFFF; the
    // other 986 bytes are never sent.
    let mask = [3u8, 1, 4, 1];
    let mut f = vec![0x81, 0x80 | 126];
    f.extend_from_slice(&1000u16.to_be_bytes());
    f.extend_from_slice(&mask);
    let start = [&b"valid text"[..], &[0xf4, 0x90, 0x80, 0x80]].concat();
    f.extend(start.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&f).unwrap();

    let (_, opcode, payload) = recv(&mut s);
    assert_eq!(opcode, 8, "a close frame");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1007);
    eventually_async("the close is counted with 1007", || {
        host.metric("wshost_closes_total{code=\"1007\"}") == Some(1.0)
    })
    .await;

    // Nobody else noticed.
    assert_eq!(ask(&mut bystander, "still here").await, "still here");
}

#[tokio::test]
async fn valid_text_arriving_a_byte_at_a_time_is_delivered() {
    let host = Host::builder().plugin("echo").start();
    let (mut s, _) = handshake(host.addr, "/echo", NO_OFFER);
    s.set_nodelay(true).unwrap();
    let text = "añ€😀 𝄞 ümlaut — ".repeat(20);
    let first = &text.as_bytes()[..101];
    let rest = &text.as_bytes()[101..];
    // Two fragments whose border falls inside a character, written a byte at a time.
    let frames = [
        crate::compression::client_frame(false, false, 1, first),
        crate::compression::client_frame(true, false, 0, rest),
    ]
    .concat();
    for b in frames {
        s.write_all(&[b]).unwrap();
    }
    assert_eq!(recv(&mut s), (false, 1, text.as_bytes().to_vec()));
}

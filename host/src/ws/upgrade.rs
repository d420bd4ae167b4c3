//! The WebSocket handshake (RFC 6455 §4.2, and RFC 8441 over HTTP/2): checking the client's
//! request before any plugin is asked, and building the answer (101, or 200 on an HTTP/2
//! stream) from the plugin's response.

use base64::Engine as _;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode, Version};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// What a request is, as far as the WebSocket handshake goes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Handshake {
    /// Not an upgrade attempt: a plain request.
    Plain,
    /// An upgrade attempt that must be refused with this status and reason.
    Invalid(StatusCode, &'static str),
    /// A valid handshake with the client's key (none over HTTP/2), offered subprotocols, and
    /// the window the host would compress with if it accepts the client's permessage-deflate
    /// offer (`None`: none it can accept).
    Valid {
        key: Option<String>,
        subprotocols: Vec<String>,
        deflate: Option<u8>,
    },
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Classifies a request: a request with `Upgrade: websocket`, or an HTTP/2 `CONNECT` with
/// `:protocol` `websocket` (`protocol`), is a WebSocket handshake, which is either valid or
/// refused (400, or 426 for a version other than 13).
pub(crate) fn inspect(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
    protocol: Option<&str>,
) -> Handshake {
    if version == Version::HTTP_2 && method == Method::CONNECT {
        return match protocol {
            Some(p) if p.eq_ignore_ascii_case("websocket") => extended_connect(headers),
            Some(_) => Handshake::Invalid(
                StatusCode::BAD_REQUEST,
                "the only protocol this server connects is websocket",
            ),
            None => Handshake::Invalid(StatusCode::BAD_REQUEST, "CONNECT is not served here"),
        };
    }
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Handshake::Plain;
    }
    if version != Version::HTTP_11 {
        return Handshake::Invalid(
            StatusCode::BAD_REQUEST,
            "a WebSocket handshake needs HTTP/1.1",
        );
    }
    if method != Method::GET {
        return Handshake::Invalid(
            StatusCode::BAD_REQUEST,
            "a WebSocket handshake must be a GET",
        );
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Handshake::Invalid(
            StatusCode::BAD_REQUEST,
            "a WebSocket handshake needs `Connection: Upgrade`",
        );
    }
    let version = headers.get(header::SEC_WEBSOCKET_VERSION);
    if version.is_none_or(|v| v.as_bytes() != b"13") {
        return Handshake::Invalid(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported Sec-WebSocket-Version: this server speaks 13",
        );
    }
    if headers.get_all(header::SEC_WEBSOCKET_KEY).iter().count() > 1 {
        return Handshake::Invalid(
            StatusCode::BAD_REQUEST,
            "a WebSocket handshake has one Sec-WebSocket-Key",
        );
    }
    let key = match headers.get(header::SEC_WEBSOCKET_KEY).map(|k| k.to_str()) {
        Some(Ok(k)) if is_valid_key(k) => k.to_owned(),
        _ => {
            return Handshake::Invalid(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Key must be 16 random bytes in base64",
            )
        }
    };
    Handshake::Valid {
        key: Some(key),
        subprotocols: subprotocols(headers),
        deflate: deflate_offered(headers),
    }
}

/// An HTTP/2 extended CONNECT (RFC 8441 §5): no key, no Upgrade/Connection headers; the
/// version must still be 13.
fn extended_connect(headers: &HeaderMap) -> Handshake {
    let version = headers.get(header::SEC_WEBSOCKET_VERSION);
    if version.is_none_or(|v| v.as_bytes() != b"13") {
        return Handshake::Invalid(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported Sec-WebSocket-Version: this server speaks 13",
        );
    }
    Handshake::Valid {
        key: None,
        subprotocols: subprotocols(headers),
        deflate: deflate_offered(headers),
    }
}

/// The window of the client's first permessage-deflate offer the host can accept.
fn deflate_offered(headers: &HeaderMap) -> Option<u8> {
    let offers: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect();
    super::deflate::accepts(&offers)
}

fn subprotocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

fn is_valid_key(key: &str) -> bool {
    base64::engine::general_purpose::STANDARD
        .decode(key.trim())
        .is_ok_and(|k| k.len() == 16)
}

/// Headers a plugin may not set on a 101: the host owns the handshake and the extensions.
fn is_reserved(name: &str) -> bool {
    matches!(
        name,
        "upgrade"
            | "connection"
            | "sec-websocket-accept"
            | "sec-websocket-extensions"
            | "content-length"
            | "transfer-encoding"
    )
}

/// Why the host refuses a plugin's 101.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The plugin picked a subprotocol the client did not offer.
    UnofferedSubprotocol(String),
    /// The plugin set a header that is not valid HTTP.
    BadHeader(String),
}

/// The answer that opens the WebSocket, with the plugin's extra headers: 101 with the accept
/// key for `key`, or (`None`: an HTTP/2 stream) 200.
pub(crate) fn switching_protocols(
    key: Option<&str>,
    offered: &[String],
    extra: &[(String, String)],
    deflate: Option<u8>,
) -> Result<Response<Full<Bytes>>, Refusal> {
    let mut response = Response::new(Full::new(Bytes::new()));
    let headers = response.headers_mut();
    if let Some(bits) = deflate {
        headers.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_str(&super::deflate::response(bits))
                .expect("the extension answer is a valid header value"),
        );
    }
    if let Some(key) = key {
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        let accept = derive_accept_key(key.as_bytes());
        headers.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
        );
    }
    *response.status_mut() = if key.is_some() {
        StatusCode::SWITCHING_PROTOCOLS
    } else {
        StatusCode::OK
    };
    let headers = response.headers_mut();
    let mut chose_protocol = false;
    for (name, value) in extra {
        let lower = name.to_ascii_lowercase();
        if is_reserved(&lower) {
            tracing::warn!(header = %lower, "plugin set a header the host owns on a 101; ignored");
            continue;
        }
        if lower == "sec-websocket-protocol" {
            if chose_protocol || !offered.iter().any(|p| p == value) {
                return Err(Refusal::UnofferedSubprotocol(value.clone()));
            }
            chose_protocol = true;
        }
        let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(lower.as_bytes()),
            HeaderValue::from_str(value),
        ) else {
            return Err(Refusal::BadHeader(name.clone()));
        };
        headers.append(n, v);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const GOOD: &[(&str, &str)] = &[
        ("upgrade", "websocket"),
        ("connection", "keep-alive, Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-protocol", "chat, superchat"),
        ("sec-websocket-protocol", "v3"),
    ];

    #[test]
    fn valid_handshake_with_subprotocols() {
        let h = inspect(&Method::GET, Version::HTTP_11, &headers(GOOD), None);
        assert_eq!(
            h,
            Handshake::Valid {
                key: Some("dGhlIHNhbXBsZSBub25jZQ==".into()),
                subprotocols: vec!["chat".into(), "superchat".into(), "v3".into()],
                deflate: None,
            }
        );
    }

    #[test]
    fn plain_requests_are_not_handshakes() {
        assert_eq!(
            inspect(&Method::GET, Version::HTTP_11, &HeaderMap::new(), None),
            Handshake::Plain
        );
    }

    #[test]
    fn refused_handshakes() {
        let without = |name: &str| {
            let pairs: Vec<_> = GOOD.iter().copied().filter(|(k, _)| *k != name).collect();
            inspect(&Method::GET, Version::HTTP_11, &headers(&pairs), None)
        };
        assert!(matches!(
            inspect(&Method::POST, Version::HTTP_11, &headers(GOOD), None),
            Handshake::Invalid(StatusCode::BAD_REQUEST, _)
        ));
        assert!(matches!(
            without("connection"),
            Handshake::Invalid(StatusCode::BAD_REQUEST, _)
        ));
        assert!(matches!(
            without("sec-websocket-version"),
            Handshake::Invalid(StatusCode::UPGRADE_REQUIRED, _)
        ));
        assert!(matches!(
            without("sec-websocket-key"),
            Handshake::Invalid(StatusCode::BAD_REQUEST, _)
        ));
        let mut bad_key: Vec<_> = GOOD.to_vec();
        bad_key[3] = ("sec-websocket-key", "c2hvcnQ=");
        assert!(matches!(
            inspect(&Method::GET, Version::HTTP_11, &headers(&bad_key), None),
            Handshake::Invalid(StatusCode::BAD_REQUEST, _)
        ));
    }

    #[test]
    fn http2_extended_connect_is_a_handshake_without_a_key() {
        let h = headers(&[
            ("sec-websocket-version", "13"),
            ("sec-websocket-protocol", "chat"),
        ]);
        assert_eq!(
            inspect(&Method::CONNECT, Version::HTTP_2, &h, Some("websocket")),
            Handshake::Valid {
                key: None,
                subprotocols: vec!["chat".into()],
                deflate: None,
            }
        );
        assert!(matches!(
            inspect(&Method::CONNECT, Version::HTTP_2, &h, Some("webtransport")),
            Handshake::Invalid(StatusCode::BAD_REQUEST, _)
        ));
        assert!(matches!(
            inspect(&Method::CONNECT, Version::HTTP_2, &h, None),
            Handshake::Invalid(StatusCode::BAD_REQUEST, _)
        ));
        assert!(matches!(
            inspect(
                &Method::CONNECT,
                Version::HTTP_2,
                &HeaderMap::new(),
                Some("websocket")
            ),
            Handshake::Invalid(StatusCode::UPGRADE_REQUIRED, _)
        ));
        // Plain HTTP/2 requests are plain.
        assert_eq!(
            inspect(&Method::GET, Version::HTTP_2, &HeaderMap::new(), None),
            Handshake::Plain
        );
        let ok = switching_protocols(
            None,
            &["chat".into()],
            &[("sec-websocket-protocol".into(), "chat".into())],
            Some(15),
        )
        .unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        assert!(ok.headers().get(header::SEC_WEBSOCKET_ACCEPT).is_none());
        assert_eq!(ok.headers()[header::SEC_WEBSOCKET_PROTOCOL], "chat");
        assert_eq!(
            ok.headers()[header::SEC_WEBSOCKET_EXTENSIONS],
            crate::ws::deflate::RESPONSE
        );
    }

    #[test]
    fn refused_http10_and_repeated_keys() {
        assert!(matches!(
            inspect(&Method::GET, Version::HTTP_10, &headers(GOOD), None),
            Handshake::Invalid(StatusCode::BAD_REQUEST, _)
        ));
        let mut two_keys: Vec<_> = GOOD.to_vec();
        two_keys.push(("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(matches!(
            inspect(&Method::GET, Version::HTTP_11, &headers(&two_keys), None),
            Handshake::Invalid(StatusCode::BAD_REQUEST, _)
        ));
    }

    #[test]
    fn accept_key_is_rfc_example() {
        let r = switching_protocols(Some("dGhlIHNhbXBsZSBub25jZQ=="), &[], &[], None).unwrap();
        assert_eq!(
            r.headers()[header::SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn subprotocol_must_be_offered() {
        let offered = vec!["chat".to_owned()];
        let pick = |p: &str| vec![("Sec-WebSocket-Protocol".to_owned(), p.to_owned())];
        assert!(switching_protocols(
            Some("dGhlIHNhbXBsZSBub25jZQ=="),
            &offered,
            &pick("chat"),
            None
        )
        .is_ok());
        assert_eq!(
            switching_protocols(
                Some("dGhlIHNhbXBsZSBub25jZQ=="),
                &offered,
                &pick("other"),
                None
            )
            .err(),
            Some(Refusal::UnofferedSubprotocol("other".into()))
        );
    }

    #[test]
    fn plugin_cannot_negotiate_extensions() {
        let extra = vec![(
            "sec-websocket-extensions".to_owned(),
            "permessage-deflate".to_owned(),
        )];
        let r = switching_protocols(Some("dGhlIHNhbXBsZSBub25jZQ=="), &[], &extra, None).unwrap();
        assert!(r.headers().get(header::SEC_WEBSOCKET_EXTENSIONS).is_none());
    }
}

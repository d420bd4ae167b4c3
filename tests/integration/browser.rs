//! The chat demo in a real browser: two headless Chromium pages join a room through the page
//! that the chat plugin serves; one sends, the other shows it.

use std::path::Path;
use std::process::Command;

use crate::harness::{workspace_root, Host};

/// The browser test's folder, its npm package installed; Chromium must be there.
fn browser_dir() -> std::path::PathBuf {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: install Debian's chromium (`apt-get install chromium`; .ci/run \
         does) — this test must not be skipped"
    );
    let dir = workspace_root().join("tests/browser");
    if !dir.join("node_modules/playwright-core").exists() {
        let status = Command::new("npm")
            .args(["ci", "--silent", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm runs (Node.js is part of this machine kind)");
        assert!(status.success(), "npm ci in tests/browser failed");
    }
    dir
}

#[test]
fn two_browser_tabs_chat_through_the_demo_page() {
    let dir = browser_dir();
    let host = Host::builder().plugin("chat").start();
    let screenshot = std::env::var("WSHOST_SCREENSHOT").unwrap_or_else(|_| {
        Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("chat-demo.png")
            .display()
            .to_string()
    });
    let out = Command::new("node")
        .arg(dir.join("chat.mjs"))
        .arg(format!("http://{}", host.addr))
        .arg(&screenshot)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("browser chat ok"),
        "the browser test failed:\n{stdout}\n{}\nhost log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        host.log()
    );
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 1000);
    // Chromium offers permessage-deflate on every WebSocket: both tabs' were compressed.
    assert!(
        host.metric("wshost_websockets_compressed_total")
            .unwrap_or(0.0)
            >= 2.0,
        "{}",
        host.metrics()
    );
}

#[test]
fn over_https_the_browser_opens_its_websockets_over_http2() {
    let dir = browser_dir();
    let tmp = tempfile::tempdir().unwrap();
    let (_, cert_path, key_path) = crate::harness::self_signed(tmp.path());
    let host = Host::builder()
        .plugin("chat")
        .tls(&cert_path, &key_path)
        .start();
    let screenshot = tmp.path().join("chat-h2.png");
    let out = Command::new("node")
        .arg(dir.join("chat.mjs"))
        .arg(format!("https://localhost:{}", host.addr.port()))
        .arg(&screenshot)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("browser chat ok"),
        "the browser test failed:\n{stdout}\n{}\nhost log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        host.log()
    );
    // Both tabs' WebSockets were HTTP/2 streams (accepted with 200 over h2).
    let accepted = host
        .metric("wshost_upgrades_total{status=\"200\",protocol=\"h2\"}")
        .unwrap_or(0.0);
    assert!(accepted >= 2.0, "{}", host.metrics());
}

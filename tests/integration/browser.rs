//! The chat demo in a real browser: two headless Chromium pages join a room through the page
//! that the chat plugin serves; one sends, the other shows it.

use std::path::Path;
use std::process::Command;

use crate::harness::{workspace_root, Host};

#[test]
fn two_browser_tabs_chat_through_the_demo_page() {
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
}

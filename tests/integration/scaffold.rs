//! `wshost new`: a scaffolded plugin builds outside the repository, passes its own test, and
//! serves once dropped into a running host.

use std::process::Command;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{
    ask, connect, get, install, next, plugin_target_dir, text, workspace_root, Host,
};

/// Writes plugin `name` from `template` outside the repository, builds it and runs its own
/// tests there, and returns the built library.
fn scaffold(outside: &std::path::Path, name: &str, template: &str) -> std::path::PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_wshost"))
        .args(["new", name, "--template", template, "--path"])
        .arg(outside)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lib = name.replace('-', "_");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("lib{lib}.so")), "{said}");
    let crate_dir = outside.join(name);
    // Same dependency versions as the workspace, so the build reuses the harness's artifacts.
    std::fs::copy(
        workspace_root().join("Cargo.lock"),
        crate_dir.join("Cargo.lock"),
    )
    .unwrap();
    for step in ["build", "test"] {
        let status = Command::new(option_env!("CARGO").unwrap_or("cargo"))
            .arg(step)
            .arg("--target-dir")
            .arg(plugin_target_dir())
            .current_dir(&crate_dir)
            .env_remove("CARGO_TARGET_DIR")
            .status()
            .unwrap();
        assert!(
            status.success(),
            "cargo {step} of the scaffolded {template} plugin failed"
        );
    }
    plugin_target_dir().join(format!("debug/lib{lib}.so"))
}

#[tokio::test]
async fn scaffolded_plugins_build_and_serve_when_dropped_in() {
    let outside = tempfile::tempdir().unwrap();
    let host = Host::builder().plugin("echo").start();
    for (name, template) in [
        ("scaffolded", "echo"),
        ("new-chat", "chat"),
        ("new-stream", "stream"),
    ] {
        let built = scaffold(outside.path(), name, template);
        install(
            host.plugins_dir(),
            &format!("lib{}.so", name.replace('-', "_")),
            &std::fs::read(built).unwrap(),
        );
        host.wait_for_log(&[&format!("loaded plugin={name} ")]);
    }

    let mut ws = connect(&host.url("/scaffolded")).await;
    assert_eq!(
        ask(&mut ws, "hi from a new plugin").await,
        "hi from a new plugin"
    );
    let (status, _, body) = get(host.addr, "/scaffolded");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("scaffolded plugin"));

    // The chat template: two members of a room hear each other.
    let mut ann = connect(&host.url("/new-chat/lobby?name=ann")).await;
    assert_eq!(text(&mut ann).await, "* ann joined");
    let mut bob = connect(&host.url("/new-chat/lobby?name=bob")).await;
    assert_eq!(text(&mut bob).await, "* bob joined");
    assert_eq!(text(&mut ann).await, "* bob joined");
    ann.send(Message::text("hello")).await.unwrap();
    assert_eq!(text(&mut bob).await, "ann: hello");
    bob.send(Message::text("/who")).await.unwrap();
    assert_eq!(text(&mut bob).await, "* here: ann, bob");
    assert_eq!(get(host.addr, "/new-chat/lobby").0, 404, "WebSocket only");

    // The stream template: 1 MiB, paced, then `done`.
    let mut s = connect(&host.url("/new-stream")).await;
    s.send(Message::text("1048576")).await.unwrap();
    let mut bytes = 0;
    loop {
        match next(&mut s).await {
            Message::Binary(b) => bytes += b.len(),
            Message::Text(t) if t.as_str() == "done" => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(bytes, 1 << 20);
}

#[test]
fn new_refuses_bad_names_and_existing_folders() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        Command::new(env!("CARGO_BIN_EXE_wshost"))
            .args(["new", name, "--path"])
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let bad = run("Not/Valid");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a usable plugin name"));
    assert!(run("fine").status.success());
    let again = run("fine");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

//! `wshost new`: a scaffolded plugin builds outside the repository, passes its own test, and
//! serves once dropped into a running host.

use std::process::Command;

use crate::harness::{ask, connect, get, install, plugin_target_dir, workspace_root, Host};

#[tokio::test]
async fn a_scaffolded_plugin_builds_and_serves_when_dropped_in() {
    let outside = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wshost"))
        .args(["new", "scaffolded", "--path"])
        .arg(outside.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let crate_dir = outside.path().join("scaffolded");
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
            "cargo {step} of the scaffolded plugin failed"
        );
    }
    let built = plugin_target_dir().join("debug/libscaffolded.so");

    let host = Host::builder().plugin("echo").start();
    install(
        host.plugins_dir(),
        "libscaffolded.so",
        &std::fs::read(built).unwrap(),
    );
    host.wait_for_log(&["loaded plugin=scaffolded "]);
    let mut ws = connect(&host.url("/scaffolded")).await;
    assert_eq!(
        ask(&mut ws, "hi from a new plugin").await,
        "hi from a new plugin"
    );
    let (status, _, body) = get(host.addr, "/scaffolded");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("scaffolded plugin"));
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

//! The config file: every flag by name, per-plugin sections, precedence, and errors that name
//! the file, the line and the key.

use std::process::Command;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{ask, closed_with, connect, get, serve_refused, Host};

#[tokio::test]
async fn printed_defaults_are_a_valid_config() {
    let out = Command::new(env!("CARGO_BIN_EXE_wshost"))
        .args(["config", "--print-defaults"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let defaults = String::from_utf8(out.stdout).unwrap();
    for key in [
        "max_message_size = 1048576",
        "ping_interval = \"30s\"",
        "require_origin = false",
    ] {
        assert!(defaults.contains(key), "{key} missing:\n{defaults}");
    }
    // Every serve flag is in it.
    let help = Command::new(env!("CARGO_BIN_EXE_wshost"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for flag in help.split_whitespace().filter(|w| w.starts_with("--")) {
        let key = flag.trim_start_matches("--").replace('-', "_");
        let key = key.trim_end_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_');
        // --log-format is global (every command has it), lists are printed under their plural.
        let skip = [
            "help",
            "config",
            "allowed_origin",
            "trusted_proxy",
            "log_format",
        ];
        if skip.contains(&key) {
            continue;
        }
        assert!(defaults.contains(&format!("{key} = ")), "{key} missing");
    }
    // And the host runs on it (the command line overrides its address and plugins).
    let host = Host::builder()
        .plugin("echo")
        .config_file(&defaults)
        .start();
    let mut ws = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut ws, "defaults work").await, "defaults work");
}

#[tokio::test]
async fn file_settings_apply_and_flags_override_them() {
    let host = Host::builder()
        .plugin("echo")
        .config_file("max_message_size = 100\nmax_connections_per_ip = 1\n")
        .args(&["--max-connections-per-ip", "5"])
        .start();
    let mut a = connect(&host.url("/echo")).await;
    // The flag (5) beat the file (1): a second connection is fine.
    let mut b = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut b, "b").await, "b");
    // The file's message limit applies.
    a.send(Message::binary(vec![0u8; 500])).await.unwrap();
    assert_eq!(closed_with(&mut a).await.0, 1009);
}

#[tokio::test]
async fn plugin_sections_mount_limit_and_configure() {
    let host = Host::builder()
        .plugin("echo")
        .plugin("testkit")
        .config_file(
            "[plugin.echo]\nroutes = [\"/mounted\", \"/also\"]\nmax_message_size = 100\n\n\
             [plugin.echo.route.\"/also\"]\nmax_message_size = 1000\n\n\
             [plugin.testkit.config]\ngreeting = \"hi\"\nlimit = 7\n",
        )
        .start();
    assert_eq!(get(host.addr, "/echo").0, 404, "the mount replaces /echo");
    let mut ws = connect(&host.url("/mounted")).await;
    assert_eq!(ask(&mut ws, "x").await, "x");
    // /also has a limit of its own (1000): 500 bytes pass there, not on /mounted (100).
    let mut also = connect(&host.url("/also")).await;
    also.send(Message::binary(vec![0u8; 500])).await.unwrap();
    assert_eq!(
        crate::harness::next(&mut also).await,
        Message::binary(vec![0u8; 500])
    );
    ws.send(Message::binary(vec![0u8; 500])).await.unwrap();
    assert_eq!(closed_with(&mut ws).await.0, 1009);
    let mut kit = connect(&host.url("/testkit")).await;
    assert_eq!(ask(&mut kit, "config:greeting").await, "Some(\"hi\")");
    assert_eq!(ask(&mut kit, "config:limit").await, "Some(\"7\")");
    // Other plugins keep the host's limit.
    kit.send(Message::binary(vec![0u8; 500])).await.unwrap();
    assert_eq!(
        crate::harness::next(&mut kit).await,
        Message::binary(vec![0u8; 500])
    );
}

#[test]
fn a_bad_config_fails_fast_naming_file_line_and_key() {
    let err = serve_refused(
        &[],
        Some("listen = \"127.0.0.1:0\"\n\nmax_mesage_size = 5\n"),
    );
    assert!(err.contains("wshost.toml:3: `max_mesage_size`"), "{err}");
    let err = serve_refused(&[], Some("[plugin.echo]\nroutes = \"/x\"\n"));
    assert!(err.contains("wshost.toml:2: `plugin.echo.routes`"), "{err}");
    let err = serve_refused(&[], Some("max_message_size = \"big\"\n"));
    // Values are checked with the file, line and key too, not the flag they stand for.
    assert!(
        err.contains("wshost.toml:1: `max_message_size`: `big`: unknown unit"),
        "{err}"
    );
    let err = serve_refused(&[], Some("this is not toml\n"));
    assert!(
        err.contains("wshost.toml") && err.contains("line 1"),
        "{err}"
    );
}

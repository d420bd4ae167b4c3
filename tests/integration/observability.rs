//! Metrics, health endpoints and JSON logs.

use crate::harness::{ask, closed_with, connect, get, Host};

#[tokio::test]
async fn metrics_count_upgrades_messages_closes_and_connections() {
    let host = Host::builder().plugin("echo").start();
    let mut ws = connect(&host.url("/echo")).await;
    for i in 0..10 {
        assert_eq!(ask(&mut ws, &format!("m{i}")).await, format!("m{i}"));
    }
    let _ = tokio_tungstenite::connect_async(host.url("/nothing")).await;
    let (status, _, body) = get(host.admin, "/metrics");
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    for line in [
        "wshost_upgrades_total{status=\"101\",protocol=\"http/1.1\"} 1",
        "wshost_upgrades_total{status=\"404\",protocol=\"http/1.1\"} 1",
        "wshost_connections_open{plugin=\"echo\",generation=\"1\"} 1",
        "wshost_plugins 1",
        "wshost_mapped_libraries 1",
        "wshost_plugin_loads_total{result=\"ok\"} 1",
        "wshost_callback_duration_seconds_count",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    ws.close(None).await.unwrap();
    let _ = closed_with(&mut ws).await;
    // Counts are added when a connection ends (or every 1,024 messages).
    let deadline = std::time::Instant::now() + crate::harness::PATIENCE;
    let text = loop {
        let (_, _, body) = get(host.admin, "/metrics");
        let text = String::from_utf8(body).unwrap();
        if text.contains("wshost_closes_total{code=\"1005\"} 1") {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no close counted:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert!(text.contains("wshost_messages_received_total 10"), "{text}");
    assert!(text.contains("wshost_messages_sent_total 10"), "{text}");
    assert!(text.contains("wshost_bytes_received_total 20"), "{text}");
}

#[tokio::test]
async fn health_and_readiness() {
    let host = Host::builder().plugin("echo").start();
    assert_eq!(get(host.admin, "/healthz").0, 200);
    assert_eq!(get(host.admin, "/readyz").0, 200);
    let empty = Host::builder().start();
    assert_eq!(get(empty.admin, "/healthz").0, 200);
    assert_eq!(get(empty.admin, "/readyz").0, 503);
}

#[test]
fn logs_can_be_json() {
    let host = Host::builder()
        .plugin("echo")
        .arg("--log-format")
        .arg("json")
        .start();
    let line = host.wait_for_log(&["\"plugin loaded\""]);
    let parsed: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(parsed["fields"]["plugin"], "echo");
    assert_eq!(parsed["level"], "INFO");
}

#[test]
fn version_names_the_host_and_the_plugin_interface() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wshost"))
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert_eq!(
        text.trim(),
        format!(
            "wshost {} (plugin-api {})",
            env!("CARGO_PKG_VERSION"),
            crate::harness::plugin_api_version()
        )
    );
}

//! What plugin authors got in plugin-api 1.3, against the real binary, inline and in a worker
//! process: connection timers, kept request headers, the send queue's low-water mark.

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{ask, event, observer, text, Host, Ws, PATIENCE};

fn hosts() -> [(&'static str, Host); 2] {
    [
        ("inline", Host::builder().plugin("testkit").start()),
        (
            "process",
            Host::builder()
                .plugin("testkit")
                .args(&["--isolation", "process"])
                .start(),
        ),
    ]
}

/// Connects to `url` sending `headers` with the upgrade.
async fn connect_with(url: &str, headers: &[(&'static str, &str)]) -> Ws {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect in time")
        .expect("the upgrade succeeds");
    ws
}

#[tokio::test]
async fn timers_fire_in_the_connection_s_order_and_can_be_moved_and_cancelled() {
    for (mode, host) in hosts() {
        let mut ws = connect_with(&host.url("/testkit"), &[]).await;
        assert_eq!(ask(&mut ws, "timer:1:300000").await, "Ok(())", "{mode}");
        // Moved to fire soon, and a second one that fires first.
        assert_eq!(ask(&mut ws, "timer:1:200").await, "Ok(())", "{mode}");
        assert_eq!(ask(&mut ws, "timer:2:50").await, "Ok(())", "{mode}");
        assert_eq!(ask(&mut ws, "timer:3:100").await, "Ok(())", "{mode}");
        assert_eq!(ask(&mut ws, "cancel:3").await, "true", "{mode}");
        assert_eq!(ask(&mut ws, "cancel:3").await, "false", "{mode}");
        assert_eq!(text(&mut ws).await, "timer 2", "{mode}");
        assert_eq!(text(&mut ws).await, "timer 1", "{mode}");
        // Timer 1 fired: it is no longer armed, and fires once.
        assert_eq!(ask(&mut ws, "cancel:1").await, "false", "{mode}");
        // Past 64 armed timers the plugin is refused.
        for tag in 100..164 {
            assert_eq!(ask(&mut ws, &format!("timer:{tag}:600000")).await, "Ok(())");
        }
        assert_eq!(ask(&mut ws, "timer:999:1").await, "Err(Limit)", "{mode}");
        ws.close(None).await.unwrap();
    }
}

#[tokio::test]
async fn a_plugin_reads_the_request_headers_it_kept() {
    for (mode, host) in hosts() {
        let url = host.url("/testkit?keep=X-User");
        let mut ws = connect_with(&url, &[("x-user", "alice"), ("x-other", "bob")]).await;
        assert_eq!(
            ask(&mut ws, "header:x-user").await,
            "Some(\"alice\")",
            "{mode}"
        );
        assert_eq!(ask(&mut ws, "header:X-USER").await, "Some(\"alice\")");
        // Only what it kept: an idle connection holds no more than it asked for.
        assert_eq!(ask(&mut ws, "header:x-other").await, "None", "{mode}");
        ws.close(None).await.unwrap();
    }
}

#[tokio::test]
async fn with_a_low_water_mark_on_drain_runs_without_a_refusal() {
    for (mode, host) in hosts() {
        let mut events = observer(&host).await;
        let mut ws = connect_with(&host.url("/testkit"), &[]).await;
        assert_eq!(ask(&mut ws, "lowwater:1000").await, "true", "{mode}");
        // 512 KiB, half the queue: nothing is refused, the queue rises above the mark and
        // falls back to it as the host writes.
        ws.send(Message::text("flood:8:65536")).await.unwrap();
        let flood = event(&mut events, "flood").await;
        assert!(flood.contains("error=None"), "{mode}: {flood}");
        let drain = event(&mut events, "drain").await;
        assert!(drain.starts_with("drain "), "{mode}: {drain}");
        ws.close(None).await.unwrap();
    }
}

#[tokio::test]
async fn a_plugin_sees_a_channel_s_members_joins_leaves_and_messages() {
    for (mode, host) in hosts() {
        let mut events = observer(&host).await;
        let mut ctl = connect_with(&host.url("/testkit"), &[]).await;
        assert_eq!(ask(&mut ctl, "watch:room").await, "true", "{mode}");
        let mut ann = connect_with(&host.url("/testkit"), &[]).await;
        assert_eq!(ask(&mut ann, "label:ann").await, "true", "{mode}");
        assert_eq!(ask(&mut ann, "sub:room").await, "Ok(())", "{mode}");
        event(&mut events, "watch room joined ann").await;
        let mut bob = connect_with(&host.url("/testkit"), &[]).await;
        assert_eq!(ask(&mut bob, "label:bob").await, "true");
        assert_eq!(ask(&mut bob, "sub:room").await, "Ok(())");
        event(&mut events, "watch room joined bob").await;
        let members = ask(&mut ctl, "members:room").await;
        assert!(
            members.starts_with("members ") && members.contains("=ann") && members.contains("=bob"),
            "{mode}: {members}"
        );
        // Messages published to the channel reach the plugin too.
        ann.send(Message::text("pub:room:hello")).await.unwrap();
        event(&mut events, "watch room text hello").await;
        // A closing member leaves.
        bob.close(None).await.unwrap();
        event(&mut events, "watch room left bob").await;
        assert_eq!(ask(&mut ctl, "unwatch:room").await, "true", "{mode}");
        assert_eq!(ask(&mut ctl, "unwatch:room").await, "false", "{mode}");
        ann.close(None).await.unwrap();
    }
}

#[tokio::test]
async fn plugin_timers_fire_without_a_connection() {
    for (mode, host) in hosts() {
        let mut events = observer(&host).await;
        let mut ctl = connect_with(&host.url("/testkit"), &[]).await;
        assert_eq!(ask(&mut ctl, "ptimer:5:600000").await, "true", "{mode}");
        // Moved: fires soon; a second fires first.
        assert_eq!(ask(&mut ctl, "ptimer:5:200").await, "true", "{mode}");
        assert_eq!(ask(&mut ctl, "ptimer:6:50").await, "true", "{mode}");
        ctl.close(None).await.unwrap();
        assert_eq!(event(&mut events, "ptimer").await, "ptimer 6", "{mode}");
        assert_eq!(event(&mut events, "ptimer").await, "ptimer 5", "{mode}");
    }
}

#[tokio::test]
async fn a_tracked_send_is_reported_once_written() {
    for (mode, host) in hosts() {
        let mut ws = connect_with(&host.url("/testkit"), &[]).await;
        ws.send(Message::text("tsend:7:hello")).await.unwrap();
        assert_eq!(text(&mut ws).await, "hello", "{mode}");
        assert_eq!(text(&mut ws).await, "Ok(())", "{mode}");
        assert_eq!(text(&mut ws).await, "sent 7 true", "{mode}");
        ws.close(None).await.unwrap();
    }
}

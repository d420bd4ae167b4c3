//! Hot reload: add, replace (as a new generation), remove; SIGHUP and `wshost reload`;
//! `wshost status`; and the corpus of bad files that must never take the host down.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{
    ask, c_library, connect, get, install, plugin, plugin_api_version, text, variant,
    variant_panic_abort, Host, Ws,
};

fn tagged(key: &str, name: &str, route: &str, tag: &str) -> Vec<u8> {
    let path = variant(
        key,
        &plugin_api_version(),
        &[
            ("WSHOST_VARIANT_NAME", name),
            ("WSHOST_VARIANT_ROUTE", route),
            ("WSHOST_VARIANT_TAG", tag),
        ],
    );
    std::fs::read(path).unwrap()
}

/// The log line of generation `g` of `plugin` being loaded or reloaded.
fn wait_generation(host: &Host, plugin: &str, g: u64) -> String {
    host.wait_for_log(&[
        &format!("plugin={plugin} "),
        &format!("generation={g} "),
        "loaded plugin=",
    ])
}

#[tokio::test]
async fn reload_under_load_keeps_every_connection_on_its_generation() {
    let a = tagged("swap-a", "swapper", "/swap", "A");
    let b = tagged("swap-b", "swapper", "/swap", "B");
    let host = Host::builder().file("libswapper.so", a.clone()).start();
    let dir = host.plugins_dir().to_owned();

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let exchanged = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let spawn_client = |mut ws: Ws, tag: &'static str, id: usize| {
        let (stop, failures, exchanged) = (
            Arc::clone(&stop),
            Arc::clone(&failures),
            Arc::clone(&exchanged),
        );
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let msg = format!("{id}-{n}");
                let ok = ws.send(Message::text(msg.clone())).await.is_ok()
                    && text(&mut ws).await == format!("{tag}:{msg}");
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                    return ws;
                }
                exchanged.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            ws
        })
    };
    for id in 0..50 {
        let ws = connect(&host.url("/swap")).await;
        tasks.push((spawn_client(ws, "A", id), "A"));
    }
    for swap in 1..=20u64 {
        let (bytes, tag) = if swap % 2 == 1 { (&b, "B") } else { (&a, "A") };
        install(&dir, "libswapper.so", bytes);
        wait_generation(&host, "swapper", swap + 1);
        // From the swap on, new connections are served by the new build.
        let mut fresh = connect(&host.url("/swap")).await;
        assert_eq!(
            ask(&mut fresh, "new").await,
            format!("{tag}:new"),
            "swap {swap}"
        );
        tasks.push((spawn_client(fresh, tag, 100 + swap as usize), tag));
    }
    stop.store(true, Ordering::Relaxed);
    for (task, tag) in tasks {
        let mut ws = task.await.unwrap();
        // Still open, still on the generation it connected to.
        assert_eq!(ask(&mut ws, "last").await, format!("{tag}:last"));
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0, "failed exchanges");
    assert!(exchanged.load(Ordering::Relaxed) > 0);
    let (ok, status) = host.admin_cmd(&["status"]);
    assert!(ok, "{status}");
    assert!(status.contains("generation 21 (current)"), "{status}");
}

#[tokio::test]
async fn a_chat_room_spans_two_generations() {
    let chat = std::fs::read(plugin("chat")).unwrap();
    let host = Host::builder().file("libchat.so", chat.clone()).start();
    let mut ann = connect(&host.url("/chat/gen?name=Ann")).await;
    assert_eq!(text(&mut ann).await, "* Ann joined");
    install(host.plugins_dir(), "libchat.so", &chat);
    wait_generation(&host, "chat", 2);
    let mut bob = connect(&host.url("/chat/gen?name=Bob")).await;
    // Bob is on generation 2 (a fresh history), Ann on generation 1: both see each other.
    assert_eq!(text(&mut bob).await, "* Bob joined");
    assert_eq!(text(&mut ann).await, "* Bob joined");
    ann.send(Message::text("from gen 1")).await.unwrap();
    assert_eq!(text(&mut bob).await, "Ann: from gen 1");
    bob.send(Message::text("from gen 2")).await.unwrap();
    assert_eq!(text(&mut ann).await, "Ann: from gen 1");
    assert_eq!(text(&mut ann).await, "Bob: from gen 2");
    let (_, status) = host.admin_cmd(&["status"]);
    assert!(
        status.contains("generation 1 version") && status.contains("generation 2 (current)"),
        "{status}"
    );
}

#[tokio::test]
async fn add_remove_replace_and_failed_replacements() {
    let v1 = tagged("life-1", "life", "/life", "one");
    let v2 = tagged("life-2", "life", "/life", "two");
    let panics = std::fs::read(variant(
        "life-panic",
        &plugin_api_version(),
        &[
            ("WSHOST_VARIANT_NAME", "life"),
            ("WSHOST_VARIANT_ROUTE", "/life"),
            ("WSHOST_VARIANT_NEW", "panic"),
        ],
    ))
    .unwrap();
    let host = Host::builder().plugin("echo").start();
    let dir = host.plugins_dir().to_owned();
    // Add.
    install(&dir, "liblife.so", &v1);
    wait_generation(&host, "life", 1);
    let mut old = connect(&host.url("/life")).await;
    assert_eq!(ask(&mut old, "x").await, "one:x");
    // Remove: unrouted for new connections; the open one keeps working.
    std::fs::remove_file(dir.join("liblife.so")).unwrap();
    host.wait_for_log(&["plugin unrouted", "plugin=life "]);
    assert_eq!(get(host.addr, "/life").0, 404);
    assert_eq!(ask(&mut old, "y").await, "one:y");
    // Add again, then replace with bad builds: each is refused and generation 2 keeps serving.
    install(&dir, "liblife.so", &v1);
    wait_generation(&host, "life", 2);
    let truncated = &v2[..v2.len() / 3];
    let bad: [(&str, &[u8], &str); 3] = [
        ("garbage", b"not a library at all", "not an ELF file"),
        ("truncated", truncated, "truncated"),
        (
            "panicking constructor",
            &panics,
            "the constructor panics on purpose",
        ),
    ];
    for (what, bytes, reason) in bad {
        install(&dir, "liblife.so", bytes);
        host.wait_for_log(&["plugin refused", "liblife.so", reason]);
        let mut ws = connect(&host.url("/life")).await;
        assert_eq!(ask(&mut ws, "still").await, "one:still", "after {what}");
    }
    // A good build again: generation 3.
    install(&dir, "liblife.so", &v2);
    wait_generation(&host, "life", 3);
    let mut new = connect(&host.url("/life")).await;
    assert_eq!(ask(&mut new, "z").await, "two:z");
    assert_eq!(ask(&mut old, "z").await, "one:z");
}

#[tokio::test]
async fn bad_files_are_refused_while_the_host_keeps_serving() {
    let good = std::fs::read(plugin("echo")).unwrap();
    let not_a_plugin = c_library("not_a_plugin", "int answer(void) { return 42; }\n");
    let bad_root = c_library(
        "bad_root",
        "unsigned char _1as_0lib_1header_0root_bmodule_bloader[256] = {0};\n",
    );
    let api2 = variant("bad-api2", "2.0.0", &[("WSHOST_VARIANT_NAME", "api2")]);
    let panics = variant(
        "bad-panic-new",
        &plugin_api_version(),
        &[
            ("WSHOST_VARIANT_NAME", "panicky"),
            ("WSHOST_VARIANT_ROUTE", "/panicky"),
            ("WSHOST_VARIANT_NEW", "panic"),
        ],
    );
    let aborts = variant(
        "bad-abort-new",
        &plugin_api_version(),
        &[
            ("WSHOST_VARIANT_NAME", "aborts"),
            ("WSHOST_VARIANT_ROUTE", "/aborts"),
            ("WSHOST_VARIANT_NEW", "abort"),
        ],
    );
    let panic_abort = variant_panic_abort("bad-panic-abort");
    let host = Host::builder().plugin("echo").start();
    let dir = host.plugins_dir().to_owned();
    let mut ws = connect(&host.url("/echo")).await;

    let mut corpus: Vec<(String, Vec<u8>, &str)> = vec![
        ("garbage.so".into(), b"garbage".to_vec(), "not an ELF file"),
        ("empty.so".into(), Vec::new(), "not an ELF file"),
        (
            "not-a-plugin.so".into(),
            std::fs::read(&not_a_plugin).unwrap(),
            "exports no plugin root module",
        ),
        (
            "bad-root.so".into(),
            std::fs::read(&bad_root).unwrap(),
            "does not match this host",
        ),
        (
            "api2.so".into(),
            std::fs::read(&api2).unwrap(),
            "built against plugin-api 2.0.0",
        ),
        (
            "panicky.so".into(),
            std::fs::read(&panics).unwrap(),
            "the constructor panics on purpose",
        ),
        (
            "aborts.so".into(),
            std::fs::read(&aborts).unwrap(),
            "in the probe process",
        ),
        (
            "panic-abort.so".into(),
            std::fs::read(&panic_abort).unwrap(),
            "panic = \"abort\"",
        ),
    ];
    for cut in [16, 64, 4096, good.len() / 2, good.len() - 1] {
        corpus.push((
            format!("cut-{cut}.so"),
            good[..cut].to_vec(),
            "plugin refused",
        ));
    }
    // Each bad file arrives twice: as a new plugin file, and as a replacement of the echo
    // plugin that is serving. Both are refused; echo keeps serving, on generation 1.
    let mut refusals = 0;
    for (name, bytes, reason) in &corpus {
        for target in [name.as_str(), "libecho.so"] {
            install(&dir, target, bytes);
            refusals += 1;
            host.wait_for_count("plugin refused", refusals);
            host.wait_for_log(&["plugin refused", target, reason]);
            assert_eq!(
                ask(&mut ws, name).await,
                *name,
                "serving after {name} as {target}"
            );
        }
    }
    let mut fresh = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut fresh, "gen 1").await, "gen 1");
    assert!(
        !host.log().contains("generation=2 "),
        "no bad file became a generation"
    );
    // A copy in progress: the first part is refused, the whole file then loads.
    let ticker = std::fs::read(plugin("ticker")).unwrap();
    std::fs::write(dir.join("growing.so"), &ticker[..ticker.len() / 3]).unwrap();
    host.wait_for_log(&["plugin refused", "growing.so", "truncated"]);
    std::fs::write(dir.join("growing.so"), &ticker).unwrap();
    wait_generation(&host, "ticker", 1);
    let mut t = connect(&host.url("/ticker")).await;
    assert!(text(&mut t).await.starts_with("tick "));

    let mut host = host;
    assert!(host.is_running());
    let (_, status) = host.admin_cmd(&["status", "--json"]);
    for refused in ["api2", "panicky", "aborts", "aborter"] {
        assert!(
            !status.contains(&format!("\"name\": \"{refused}\"")),
            "{status}"
        );
    }
}

#[tokio::test]
async fn overwriting_a_loaded_file_in_place_is_safe() {
    let a = tagged("inplace-a", "inplace", "/inplace", "A");
    let b = tagged("inplace-b", "inplace", "/inplace", "B");
    let host = Host::builder().file("libinplace.so", a).start();
    let mut old = connect(&host.url("/inplace")).await;
    assert_eq!(ask(&mut old, "1").await, "A:1");
    // What `cp` does: truncate, then write, into the file the host loaded.
    std::fs::write(host.plugins_dir().join("libinplace.so"), &b).unwrap();
    wait_generation(&host, "inplace", 2);
    let mut new = connect(&host.url("/inplace")).await;
    assert_eq!(ask(&mut new, "2").await, "B:2");
    assert_eq!(ask(&mut old, "3").await, "A:3");
}

#[tokio::test]
async fn sighup_and_wshost_reload_rescan_when_watching_is_off() {
    let host = Host::builder().plugin("echo").arg("--no-watch").start();
    let dir = host.plugins_dir().to_owned();
    let (ok, out) = host.admin_cmd(&["reload"]);
    assert!(ok && out.contains("no changes"), "{out}");
    crate::harness::redeploy(&dir, "ticker");
    host.signal("HUP");
    wait_generation(&host, "ticker", 1);
    crate::harness::redeploy(&dir, "chat");
    let (ok, out) = host.admin_cmd(&["reload"]);
    assert!(ok && out.contains("loaded chat generation 1"), "{out}");
    std::fs::write(dir.join("broken.so"), "nope").unwrap();
    let (ok, out) = host.admin_cmd(&["reload"]);
    assert!(
        !ok && out.contains("refused") && out.contains("broken.so"),
        "{out}"
    );
    let (ok, status) = host.admin_cmd(&["status"]);
    assert!(ok, "{status}");
    for name in ["echo", "ticker", "chat"] {
        assert!(status.contains(&format!("\n{name} ")), "{status}");
    }
}

#[tokio::test]
async fn status_counts_connections_per_generation_and_mapped_libraries() {
    let host = Host::builder().plugin("echo").start();
    // An echo proves each session is running (connect returns at the 101, before it starts).
    let mut a = connect(&host.url("/echo")).await;
    let mut b = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut a, "a").await, "a");
    assert_eq!(ask(&mut b, "b").await, "b");
    let (ok, out) = host.admin_cmd(&["status", "--json"]);
    assert!(ok, "{out}");
    assert!(out.contains("\"open_connections\": 2"), "{out}");
    assert!(out.contains("\"mapped_libraries\": 1"), "{out}");
    crate::harness::redeploy(host.plugins_dir(), "echo");
    wait_generation(&host, "echo", 2);
    let (_, out) = host.admin_cmd(&["status"]);
    assert!(
        out.contains("2 libraries mapped, 1 old generation(s) serving"),
        "{out}"
    );
    assert!(out.contains("generation 1 version"), "{out}");
    assert!(out.contains("2 open connection(s)"), "{out}");
}

#[tokio::test]
async fn an_old_generation_shuts_down_when_its_last_connection_closes() {
    let echo = std::fs::read(plugin("echo")).unwrap();
    let host = Host::builder().file("libecho.so", echo.clone()).start();
    let mut ws = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut ws, "before").await, "before");
    install(host.plugins_dir(), "libecho.so", &echo);
    wait_generation(&host, "echo", 2);
    assert_eq!(ask(&mut ws, "after").await, "after");
    let gone = "plugin=echo generation=1";
    assert!(
        !host
            .log()
            .lines()
            .any(|l| l.contains("generation shut down") && l.contains(gone)),
        "generation 1 shut down while a connection was open on it"
    );
    ws.close(None).await.unwrap();
    host.wait_for_log(&["generation shut down", gone]);
}

/// Reloads testkit in a host started with `args` while a connection is open on it: the old
/// generation is told (`Plugin::replaced`), and once `--replaced-grace` passes its connection is
/// closed with 1012 while a connection to the new one stays open.
async fn replaced_generation_hands_over(args: &[&str]) {
    let host = Host::builder().plugin("testkit").args(args).start();
    let mut old = crate::harness::connect(&host.url("/testkit")).await;
    assert_eq!(crate::harness::ask(&mut old, "log:before").await, "logged");
    crate::harness::redeploy(host.plugins_dir(), "testkit");
    wait_generation(&host, "testkit", 2);
    host.wait_for_log(&["testkit replaced", "generation=1"]);
    let mut new = crate::harness::connect(&host.url("/testkit")).await;
    assert_eq!(
        crate::harness::closed_with(&mut old).await,
        (1012, "service restart".into())
    );
    host.wait_for_log(&["grace passed", "generation=1"]);
    // The new generation's connection is untouched.
    assert_eq!(crate::harness::ask(&mut new, "log:after").await, "logged");
}

#[tokio::test]
async fn a_replaced_generation_is_told_and_its_connections_move_after_the_grace() {
    replaced_generation_hands_over(&["--replaced-grace", "300ms"]).await;
}

#[tokio::test]
async fn a_replaced_process_isolated_generation_is_told_and_hands_over_too() {
    replaced_generation_hands_over(&["--replaced-grace", "300ms", "--isolation", "process"]).await;
}

#[tokio::test]
async fn without_a_grace_the_old_generation_keeps_its_connections() {
    let host = Host::builder().plugin("testkit").start();
    let mut old = crate::harness::connect(&host.url("/testkit")).await;
    crate::harness::redeploy(host.plugins_dir(), "testkit");
    wait_generation(&host, "testkit", 2);
    host.wait_for_log(&["testkit replaced", "generation=1"]);
    // Told, but not closed: it still answers (on generation 1).
    for i in 0..20 {
        assert_eq!(
            crate::harness::ask(&mut old, &format!("log:{i}")).await,
            "logged"
        );
    }
    host.wait_for_log(&["testkit says 19", "generation=1"]);
}

//! Loading plugins: files that are not plugins, interface versions, conflicts, `wshost check`.

use std::process::Command;

use crate::harness::{ask, connect, get, install, plugin, plugin_api_version, variant, Host};

fn check(files: &[&std::path::Path]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wshost"))
        .arg("check")
        .args(files)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn files_that_are_not_plugins_are_skipped_and_logged() {
    let host = Host::builder()
        .plugin("echo")
        .file("garbage.so", "this is not an ELF file")
        .file("empty.so", "")
        .file(".hidden.so", "ignored: starts with a dot")
        .file("README.txt", "ignored: not .so")
        .start();
    host.wait_for_log(&["plugin refused", "garbage.so", "not a wshost plugin"]);
    host.wait_for_log(&["plugin refused", "empty.so", "not a wshost plugin"]);
    let log = host.log();
    assert!(!log.contains(".hidden.so"), "{log}");
    assert!(!log.contains("README.txt"), "{log}");
    let mut ws = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut ws, "echo works").await, "echo works");
}

#[tokio::test]
async fn check_reports_good_and_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.so");
    std::fs::write(&bad, "nope").unwrap();
    let echo = plugin("echo");
    let chat = plugin("chat");

    let (ok, out) = check(&[&echo, &chat]);
    assert!(ok, "{out}");
    assert!(
        out.contains("plugin `echo`") && out.contains("routes /echo"),
        "{out}"
    );
    assert!(
        out.contains(&format!("plugin-api {}", plugin_api_version())),
        "{out}"
    );
    assert!(out.contains("plugin `chat`"), "{out}");

    let (ok, out) = check(&[&echo, &bad]);
    assert!(!ok, "a refused file must fail the check: {out}");
    assert!(out.contains("refused") && out.contains("bad.so"), "{out}");
}

#[tokio::test]
async fn a_plugin_built_against_another_major_interface_is_refused_with_what_to_do() {
    let v2 = variant(
        "api2",
        "2.0.0",
        &[("WSHOST_VARIANT_NAME", "from-the-future")],
    );
    let (ok, out) = check(&[&v2]);
    assert!(!ok, "{out}");
    let major = plugin_api_version().split('.').next().unwrap().to_owned();
    assert!(
        out.contains("built against plugin-api 2.0.0")
            && out.contains(&format!("rebuild it against plugin-api {major}.x")),
        "{out}"
    );
    assert_eq!(out.trim().lines().count(), 1, "one line per refusal: {out}");
    let host = Host::builder()
        .plugin("echo")
        .plugin_file(&v2, "libfuture.so")
        .start();
    host.wait_for_log(&[
        "plugin refused",
        "libfuture.so",
        "built against plugin-api 2.0.0",
    ]);
    connect(&host.url("/echo")).await;
}

#[tokio::test]
async fn a_plugin_built_against_a_newer_minor_interface_is_accepted() {
    let newer = variant(
        "api1-9",
        "1.9.0",
        &[
            ("WSHOST_VARIANT_NAME", "newer"),
            ("WSHOST_VARIANT_ROUTE", "/newer"),
        ],
    );
    let (ok, out) = check(&[&newer]);
    assert!(ok, "{out}");
    assert!(out.contains("plugin-api 1.9.0"), "{out}");
    let host = Host::builder().plugin_file(&newer, "libnewer.so").start();
    let mut ws = connect(&host.url("/newer")).await;
    assert_eq!(ask(&mut ws, "hi").await, "v:hi");
}

/// A plugin built against each release of the interface kept in `tests/compat` (the released
/// sources, not copies of today's): `check` accepts it, and it serves inline and in a worker
/// process, through a reload (the host tells the replaced generation, a callback these releases
/// predate) and a shutdown.
#[tokio::test]
async fn plugins_built_against_earlier_releases_keep_working() {
    for release in ["1.0.0", "1.2.0"] {
        let build = |tag: &str| {
            variant(
                &format!("api{}-{tag}", release.replace('.', "-")),
                release,
                &[
                    ("WSHOST_VARIANT_NAME", "old"),
                    ("WSHOST_VARIANT_ROUTE", "/old"),
                    ("WSHOST_VARIANT_TAG", tag),
                ],
            )
        };
        let (a, b) = (build("a"), build("b"));
        let (ok, out) = check(&[&a]);
        assert!(ok, "plugin-api {release}: {out}");
        assert!(out.contains(&format!("plugin-api {release}")), "{out}");
        for isolation in ["inline", "process"] {
            let mut host = Host::builder()
                .args(&["--isolation", isolation])
                .plugin_file(&a, "libold.so")
                .start();
            let mut ws = connect(&host.url("/old")).await;
            assert_eq!(ask(&mut ws, "hi").await, "a:hi", "{release} {isolation}");
            let (status, _, body) = get(host.addr, "/old");
            assert_eq!((status, &body[..]), (200, &b"a"[..]));

            install(host.plugins_dir(), "libold.so", &std::fs::read(&b).unwrap());
            host.wait_for_log(&["loaded plugin=old ", "generation=2 "]);
            let mut fresh = connect(&host.url("/old")).await;
            assert_eq!(ask(&mut fresh, "hi").await, "b:hi", "{release} {isolation}");
            assert_eq!(
                ask(&mut ws, "still").await,
                "a:still",
                "{release} {isolation}"
            );
            drop((ws, fresh));
            let status = host.terminate();
            assert!(status.success(), "{release} {isolation}: {status}");
            let log = host.log();
            assert!(!log.contains("panicked"), "{release} {isolation}: {log}");
        }
    }
}

#[tokio::test]
async fn conflicting_routes_go_to_the_first_file_by_name() {
    let a = variant(
        "claim-a",
        &plugin_api_version(),
        &[
            ("WSHOST_VARIANT_NAME", "claimant-a"),
            ("WSHOST_VARIANT_ROUTE", "/shared"),
            ("WSHOST_VARIANT_TAG", "A"),
        ],
    );
    let b = variant(
        "claim-b",
        &plugin_api_version(),
        &[
            ("WSHOST_VARIANT_NAME", "claimant-b"),
            ("WSHOST_VARIANT_ROUTE", "/shared"),
            ("WSHOST_VARIANT_TAG", "B"),
        ],
    );
    // File names decide: `1-…` loads before `2-…`, whichever plugin each holds.
    let host = Host::builder()
        .plugin_file(&b, "1-b.so")
        .plugin_file(&a, "2-a.so")
        .start();
    host.wait_for_log(&[
        "plugin refused",
        "claimant-a",
        "route `/shared` is already served",
    ]);
    let mut ws = connect(&host.url("/shared")).await;
    assert_eq!(ask(&mut ws, "who").await, "B:who");
    assert_eq!(get(host.addr, "/shared").2, b"B");
}

#[tokio::test]
async fn two_files_of_the_same_plugin_load_once() {
    let echo = plugin("echo");
    let host = Host::builder()
        .plugin_file(&echo, "a-echo.so")
        .plugin_file(&echo, "b-echo.so")
        .start();
    host.wait_for_log(&["plugin refused", "b-echo.so", "already loaded from"]);
    let mut ws = connect(&host.url("/echo")).await;
    assert_eq!(ask(&mut ws, "once").await, "once");
}

#[tokio::test]
async fn the_longest_route_prefix_wins() {
    let deep = variant(
        "deep",
        &plugin_api_version(),
        &[
            ("WSHOST_VARIANT_NAME", "deep"),
            ("WSHOST_VARIANT_ROUTE", "/echo/deep"),
            ("WSHOST_VARIANT_TAG", "deep"),
        ],
    );
    let host = Host::builder()
        .plugin("echo")
        .plugin_file(&deep, "libdeep.so")
        .start();
    let mut shallow = connect(&host.url("/echo/other")).await;
    assert_eq!(ask(&mut shallow, "x").await, "x");
    let mut d = connect(&host.url("/echo/deep/er")).await;
    assert_eq!(ask(&mut d, "x").await, "deep:x");
}

//! RFC 6455 and RFC 7692 conformance: the Autobahn|Testsuite fuzzing client against the echo
//! plugin.

use std::process::Command;

use crate::harness::{workspace_root, Host};

/// Cases 1-10, and 12 and 13 (permessage-deflate: every message size, fragmentation and
/// offer, window sizes 9 to 15 bits included).
const CASES: &str = "1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*,10.*,12.*,13.*";

#[test]
fn autobahn_cases_1_to_13_have_no_failures() {
    // The project's own runner: it installs the suite itself (from the package registries).
    let script = workspace_root().join("tests/conformance/autobahn.sh");
    assert!(
        script.exists(),
        "{} is missing: the conformance suite cannot run (it must not be skipped)",
        script.display()
    );
    // Cases 9.* send messages of up to 16 MiB; the rate limit would cut the 9.* floods short.
    let host = Host::builder()
        .plugin("echo")
        .arg("--max-message-size")
        .arg("16777216")
        .arg("--max-frame-size")
        .arg("16777216")
        // The echo sends the 16 MiB messages back: they must fit in one send queue.
        .arg("--max-send-queue")
        .arg("16777216")
        .arg("--max-message-rate")
        .arg("0")
        .start();
    let report = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(&script)
        .arg(host.url("/echo"))
        .arg(CASES)
        .env("AUTOBAHN_OUTDIR", report.path())
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.starts_with("autobahn"))
        .collect::<Vec<_>>()
        .join("\n");
    println!("{summary}");
    assert!(
        out.status.success(),
        "Autobahn found failures or could not run:\n{stdout}\n{stderr}"
    );
    assert!(summary.contains(" 0 failed"), "{summary}");
    // Nothing is left unimplemented: permessage-deflate included.
    assert!(summary.contains(" 0 UNIMPLEMENTED"), "{summary}");
    // Invalid UTF-8 fails as soon as it arrives, not only at the end of its frame (6.4.3,
    // 6.4.4): no case is passed only non-strictly.
    assert!(summary.contains("strictness: 0 NON-STRICT"), "{summary}");
}

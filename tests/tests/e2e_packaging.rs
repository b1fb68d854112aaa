//! Packaging checks: `systemd-analyze verify` accepts `packaging/kvfetcher.service` (with
//! `ExecStart` pointed at the freshly built binary, since `/usr/bin/kvfetcher` is not installed
//! here), the unit keeps the settings operations rely on, and the example config is one the
//! daemon accepts (it exits with a config error only for a bad file).

mod e2e_support;

use std::process::Command;

use e2e_support::*;
use kvfetcher_testkit::{skip, Missing};

#[test]
fn systemd_accepts_the_unit() {
    let unit = std::fs::read_to_string(repo_root().join("packaging/kvfetcher.service")).unwrap();
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "RuntimeDirectory=kvfetcher",
        "User=kvfetcher",
        "Group=kvfetcher",
        "ExecStart=/usr/bin/kvfetcher daemon --config /etc/kvfetcher/kvfetcher.toml",
    ] {
        assert!(unit.contains(needed), "unit lacks {needed}");
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        skip(Missing::Tool, "systemd-analyze is not installed");
        return;
    }
    let bin = kvfetcher_bin();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvfetcher.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/kvfetcher", bin.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify: {text}"
    );
    // The check itself must be able to fail: a broken unit is reported.
    std::fs::write(
        &path,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace("Type=notify", "Type=notifyy"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).trim().is_empty(),
        "a bad Type= went unnoticed"
    );
}

#[test]
fn daemon_rejects_a_bad_config_and_reads_the_example() {
    let bin = kvfetcher_bin();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "metrics_addr = \"0.0.0.0:9464\"\n").unwrap();
    let out = Command::new(&bin)
        .arg("daemon")
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(78),
        "a bad config exits with EX_CONFIG"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a loopback address"), "{err}");
    // The example config parses; the daemon then fails only on the absent TLS directory.
    let example = repo_root().join("packaging/kvfetcher.toml");
    let out = Command::new(&bin)
        .arg("daemon")
        .arg("--config")
        .arg(&example)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/etc/kvfetcher/tls"), "{err}");
}

//! The CUDA IPC proof and the codec-section NVDEC checks, end to end through the binary, on hosts
//! with an NVIDIA driver (skipped elsewhere with a printed reason).

use kvfetcher_testkit::{skip, Missing};
use std::process::Command;

#[test]
fn ipc_check_passes_across_processes() {
    if let Err(e) = kvfetcher::gpu::Cuda::open(0) {
        skip(Missing::Gpu, format!("no CUDA driver ({e})"));
        return;
    }
    let kv = kvfetcher_testkit::data_file("codelm-kv-a.safetensors");
    let out = Command::new(env!("CARGO_BIN_EXE_kvfetcher-bench"))
        .args(["gpu", "ipc-check", "--kv"])
        .arg(&kv)
        .output()
        .expect("run kvfetcher");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("3 checks, 0 failed"), "{text}");
}

#[test]
fn ipc_child_rejects_a_bad_header() {
    // The header is read before the driver is touched: this runs on every host.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvfetcher-bench"))
        .args([
            "gpu",
            "ipc-child",
            "--kv",
            "/nonexistent",
            "--mode",
            "verify",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"not a header\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad header"));
}

//! End to end with real processes and the C ABI: `kvfetcher store` + `kvfetcher daemon`, KV
//! saved through the Rust client, then fetched by a C program (`tests/tests/e2e_support/e2e_fetch.c`, built
//! with `cc` against `include/kvfetcher.h` and `libkvfetcher.so`) in several layouts; every
//! value the C program got is compared with the saved (quantized) values.

mod e2e_support;

use std::path::PathBuf;
use std::process::Command;

use e2e_support::*;
use kvfetcher_client::{Client, DType, MemoryKind, Paging, TargetLayout, TokenOrder};
use kvfetcher_testkit::{skip, Missing};

const MODEL: &str = "codelm-107m-c";

/// Builds libkvfetcher.so and the C program; `None` (printed) when there is no C compiler.
fn build_c_program(out_dir: &std::path::Path) -> Option<PathBuf> {
    // The committed header (include/kvfetcher.h), or KVFETCHER_INCLUDE_DIR.
    let header_dir = std::env::var_os("KVFETCHER_INCLUDE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("include"));
    assert!(
        header_dir.join("kvfetcher.h").exists(),
        "no kvfetcher.h in {}",
        header_dir.display()
    );
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    if Command::new(&cc).arg("--version").output().is_err() {
        skip(Missing::Tool, format!("no C compiler ({cc})"));
        return None;
    }
    cargo_build();
    let lib_dir = kvfetcher_bin().parent().unwrap().to_path_buf();
    let exe = out_dir.join("e2e_fetch");
    let st = Command::new(&cc)
        .arg("-std=c11")
        .arg("-Wall")
        .arg("-Werror")
        .arg("-I")
        .arg(&header_dir)
        .arg(repo_root().join("tests/tests/e2e_support/e2e_fetch.c"))
        .arg("-L")
        .arg(&lib_dir)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-lkvfetcher")
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "compiling tests/tests/e2e_support/e2e_fetch.c failed"
    );
    Some(exe)
}

#[test]
fn c_client_fetches_what_the_rust_client_saved() {
    let cache = codelm(300);
    let work = tempfile::tempdir().unwrap();
    let Some(prog) = build_c_program(work.path()) else {
        return;
    };
    let stack = start_stack();
    let ids = token_ids(300, 3);
    let layout = TargetLayout::host(DType::F16, TokenOrder::Nhd);
    let client = Client::connect(&stack.socket).unwrap();
    let chunks = client
        .save(MODEL, &ids, &layout, &shape_of(&cache), &nhd_bytes(&cache))
        .unwrap();
    assert_eq!(chunks, 2);
    let tokens_file = work.path().join("tokens.bin");
    std::fs::write(
        &tokens_file,
        ids.iter()
            .flat_map(|t| t.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let want = expected(&cache, MODEL, &ids);
    let cases = [
        (DType::F16, 0, TokenOrder::Nhd, 0, 0),
        (DType::BF16, 1, TokenOrder::Hnd, 1, 16),
        (DType::F32, 2, TokenOrder::Nhd, 0, 64),
    ];
    for (dtype, dcode, order, ocode, block) in cases {
        let out = work.path().join("fetched.bin");
        let o = Command::new(&prog)
            .arg(&stack.socket)
            .arg(MODEL)
            .arg(&tokens_file)
            .arg(dcode.to_string())
            .arg(ocode.to_string())
            .arg(block.to_string())
            .arg(&out)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "e2e_fetch failed: {stdout} {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(stdout.trim(), "tokens=300 lookup=300 layers=8");
        let paging = if block == 0 {
            Paging::Contiguous
        } else {
            Paging::Paged {
                block_tokens: block,
            }
        };
        let layout = TargetLayout {
            dtype,
            order,
            paging,
            memory: MemoryKind::Host,
        };
        let buf = std::fs::read(&out).unwrap();
        assert_eq!(buf.len(), layout.buffer_len(&shape_of(&want)));
        let n = assert_buffer(&buf, &layout, &want);
        assert_eq!(n, 8 * 2 * 300 * 256);
    }
    // Unknown tokens: the C program reports the daemon's NotFound (KVF_ERR_NOT_FOUND = 301).
    std::fs::write(&tokens_file, [1u8, 0, 0, 0, 2, 0, 0, 0]).unwrap();
    let o = Command::new(&prog)
        .arg(&stack.socket)
        .arg(MODEL)
        .arg(&tokens_file)
        .args(["0", "0", "0"])
        .arg(work.path().join("none.bin"))
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(301 & 0xff),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

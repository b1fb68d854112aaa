//! Writes a seed corpus for `rans_stream`: small valid rANS value streams in that target's input
//! format (n_values u16 LE, a context count byte, the contexts, the stream), from synthetic
//! values: a few sizes, block sizes and context lists, with and without escapes.
//!
//! Usage: `make_rans_seeds OUT_DIR`.

use std::path::PathBuf;
use std::process::ExitCode;

use kvfetcher_codec::rans::encode_tensor;

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: make_rans_seeds OUT_DIR");
        return ExitCode::from(2);
    };
    let mut n = 0;
    let result = (|| -> Result<(), Box<dyn std::error::Error>> {
        std::fs::create_dir_all(&out)?;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for (n_values, column_ctx, block_values, spread) in [
            (0usize, &[0u8][..], 32usize, 1i64),
            (1, &[0], 32, 3),
            (40, &[0, 1], 32, 3),
            (100, &[0, 1, 2], 64, 20),
            (300, &[1, 0, 0, 1], 96, 400),
            (1000, &[0, 1, 2, 3, 2, 1, 0, 3], 256, 5),
        ] {
            // Small values, with one in 64 far out (escaped) when spread allows.
            let values: Vec<i32> = (0..n_values)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let v = (seed % (2 * spread as u64 + 1)) as i64 - spread;
                    if seed % 64 == 0 {
                        (v * 97).clamp(-32768, 32767) as i32
                    } else {
                        v as i32
                    }
                })
                .collect();
            let n_ctx = usize::from(*column_ctx.iter().max().unwrap_or(&0)) + 1;
            let stream = encode_tensor(&values, column_ctx, n_ctx, block_values)?;
            let mut input = (n_values as u16).to_le_bytes().to_vec();
            input.push(column_ctx.len() as u8);
            input.extend_from_slice(column_ctx);
            input.extend_from_slice(&stream);
            std::fs::write(out.join(format!("rans-{n_values}-{block_values}.bin")), input)?;
            n += 1;
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            eprintln!("wrote {n} seeds to {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("make_rans_seeds: {e}");
            ExitCode::FAILURE
        }
    }
}

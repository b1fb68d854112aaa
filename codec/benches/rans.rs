//! Encode and decode throughput of rANS value streams: 4 M values (a 32768-token x 128-channel
//! tensor) drawn from discretized Laplace distributions of four scales (four contexts,
//! assigned by channel), about 3 bits per value. One thread (per-core speed) and all threads.
//! Run: `cargo bench -p kvfetcher-codec --bench rans`.

#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvfetcher_codec::rans::{
    decode_values, encode_tensor, encode_values, entropy_bits, histogram, FreqTable,
    DEFAULT_BLOCK_VALUES,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const N: usize = 4 << 20;
const CHANNELS: usize = 128;

fn values(column_ctx: &[u8]) -> Vec<i32> {
    let scales = [0.8, 1.5, 3.0, 5.0];
    let mut rng = StdRng::seed_from_u64(7);
    (0..N)
        .map(|i| {
            let b = scales[usize::from(column_ctx[i % CHANNELS])];
            let u: f64 = rng.gen_range(-0.5..0.5);
            let x = -b * u.signum() * (1.0 - 2.0 * u.abs()).max(1e-300).ln();
            x.round().clamp(-32768.0, 32767.0) as i32
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let column_ctx: Vec<u8> = (0..CHANNELS).map(|c| (c % 4) as u8).collect();
    let vals = values(&column_ctx);
    let stream = encode_tensor(&vals, &column_ctx, 4, DEFAULT_BLOCK_VALUES).expect("encodes");
    let h = entropy_bits(&vals, &column_ctx, 4).expect("in range");
    eprintln!(
        "rans: {:.3} bits/value (entropy {:.3}, +{:.2}%), {:.2}x smaller than fp16",
        8.0 * stream.len() as f64 / N as f64,
        h / N as f64,
        100.0 * (8.0 * stream.len() as f64 / h - 1.0),
        (2 * N) as f64 / stream.len() as f64
    );
    let tables: Vec<FreqTable> = histogram(&vals, &column_ctx, 4)
        .expect("in range")
        .iter()
        .map(FreqTable::from_counts)
        .collect();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    cpu_time_rates(&one, &vals, &column_ctx, &tables, &stream);
    let mut g = c.benchmark_group("rans");
    g.throughput(Throughput::Elements(N as u64));
    g.sample_size(10);
    let hist = histogram(&vals, &column_ctx, 4).expect("in range");
    g.bench_function("histogram/1thread", |b| {
        b.iter(|| one.install(|| histogram(&vals, &column_ctx, 4).expect("in range")))
    });
    g.throughput(Throughput::Elements(4));
    g.bench_function("from_counts/4tables", |b| {
        b.iter(|| hist.iter().map(FreqTable::from_counts).collect::<Vec<_>>())
    });
    g.throughput(Throughput::Elements(N as u64));
    let mut out = vec![0i32; N];
    for (name, pool) in [("1thread", Some(&one)), ("all", None)] {
        let run = |f: &mut (dyn FnMut() + Send)| match pool {
            Some(p) => p.install(f),
            None => f(),
        };
        g.bench_function(format!("encode_tensor/{name}"), |b| {
            b.iter(|| {
                run(&mut || {
                    encode_tensor(&vals, &column_ctx, 4, DEFAULT_BLOCK_VALUES).expect("encodes");
                })
            })
        });
        g.bench_function(format!("encode_values/{name}"), |b| {
            b.iter(|| {
                run(&mut || {
                    encode_values(&vals, &column_ctx, &tables, DEFAULT_BLOCK_VALUES)
                        .expect("encodes");
                })
            })
        });
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| run(&mut || decode_values(&stream, &column_ctx, &mut out).expect("decodes")))
        });
    }
    g.finish();
}

/// This thread's user + system CPU time in seconds (Linux: /proc/thread-self/stat, clock
/// ticks of 10 ms); None elsewhere.
fn thread_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // Fields after the parenthesized command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Values per CPU-second of one thread: on a shared machine the wall-clock rates criterion
/// reports fall with the load, CPU-time rates much less so.
fn cpu_time_rates(
    one: &rayon::ThreadPool,
    vals: &[i32],
    column_ctx: &[u8],
    tables: &[FreqTable],
    stream: &[u8],
) {
    let rate = |name: &str, f: &mut (dyn FnMut() + Send)| {
        let r = one.install(|| {
            let t0 = thread_cpu_seconds()?;
            let mut runs = 0;
            while thread_cpu_seconds()? - t0 < 2.0 {
                f();
                runs += 1;
            }
            Some((runs * N) as f64 / (thread_cpu_seconds()? - t0))
        });
        if let Some(r) = r {
            eprintln!(
                "rans {name}: {:.0} M values per CPU-second ({:.0} MB/s of fp16)",
                r / 1e6,
                2.0 * r / 1e6
            );
        }
    };
    rate("encode_tensor", &mut || {
        encode_tensor(vals, column_ctx, 4, DEFAULT_BLOCK_VALUES).expect("encodes");
    });
    rate("encode_values", &mut || {
        encode_values(vals, column_ctx, tables, DEFAULT_BLOCK_VALUES).expect("encodes");
    });
    let mut out = vec![0i32; N];
    rate("decode_values", &mut || {
        decode_values(stream, column_ctx, &mut out).expect("decodes")
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

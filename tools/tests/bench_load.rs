//! `kvfetcher-bench load` on a small scale: two clients for one second against an in-process
//! store and daemon; every fetch must verify and none may fail.

use kvfetcher_tools::cli::bench_load::{measure, BenchLoadArgs};

#[test]
fn two_clients_for_a_second_fetch_and_verify_every_time() {
    let report = measure(&BenchLoadArgs {
        clients: 2,
        seconds: 1.0,
        tokens: 256,
        json: false,
    })
    .unwrap();
    assert_eq!(report.failed, 0, "first error: {:?}", report.first_error);
    // At least one fetch per client, however slow the machine: each loop starts one before
    // looking at the clock.
    assert!(report.fetches >= 2, "{report:?}");
    assert!(
        report.rss_mib > 0.0 && report.peak_rss_mib >= report.rss_mib,
        "{report:?}"
    );
}

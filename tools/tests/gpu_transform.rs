//! The GPU transform route's check inputs on real KV (CPU: every section parses into a GPU
//! plan and is accepted by `kernels_apply` for every layout), and the whole transform check
//! on a GPU (skipped without a CUDA driver).

use std::sync::Arc;

use kvfetcher::gpu::kernels_apply;
use kvfetcher::gpu::RansPlan;
use kvfetcher::gpu::{Cuda, GpuError};
use kvfetcher_codec::ChunkView;
use kvfetcher_protocol::{DType, MemoryKind, Paging, TargetLayout, TokenOrder};
use kvfetcher_testkit::{data_file, skip, Missing};
use kvfetcher_tools::gpu::transform_check::{
    run_transform_checks, transform_chunks, transform_inputs,
};

#[test]
fn transform_sections_plan_and_are_accepted_by_the_kernels() {
    let path = data_file("codelm-kv-a.safetensors");
    let (cache, profile) = transform_inputs(&path, 4).unwrap();
    let profile = Arc::new(profile);
    let (_, objects) = transform_chunks(&cache, &profile, 0.1, 128, 2).unwrap();
    assert_eq!(objects.len(), 2);
    for object in &objects {
        let view = ChunkView::parse(object).unwrap();
        let header = view.header();
        for (i, s) in header.sections.iter().enumerate() {
            let plan = RansPlan::parse(s.shape, &s.params, view.section_bytes(i)).unwrap();
            assert_eq!(plan.sink_rows + plan.rows, s.shape.rows);
            assert!(!plan.blocks.is_empty());
            for dtype in [DType::F16, DType::BF16, DType::F32] {
                for order in [TokenOrder::Nhd, TokenOrder::Hnd] {
                    let layout = TargetLayout {
                        dtype,
                        order,
                        paging: Paging::Paged { block_tokens: 16 },
                        memory: MemoryKind::Gpu(0),
                    };
                    kernels_apply(header, i, &layout).unwrap();
                }
            }
        }
    }
}

#[test]
fn gpu_transform_route_matches_the_cpu_restore() {
    let path = data_file("codelm-kv-a.safetensors");
    let cuda = match Cuda::open(0) {
        Ok(c) => c,
        Err(e @ (GpuError::NoDriver(_) | GpuError::NoDevice { .. })) => {
            skip(Missing::Gpu, format!("no CUDA driver ({e})"));
            return;
        }
        Err(e) => panic!("cuda: {e}"),
    };
    let rows = run_transform_checks(&cuda, &path).unwrap();
    let failed: Vec<_> = rows.iter().filter(|r| !r.exact).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:#?}",
        failed.len(),
        rows.len()
    );
}

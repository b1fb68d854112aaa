//! Restore on real KV: the CPU reference agrees with the codec's dequantizer to the bit, and the
//! GPU kernels agree with the CPU reference (skipped without a CUDA driver).

use half::{bf16, f16};
use kvfetcher::gpu::{restore_cpu, Cuda, DeviceBuffer, DeviceTarget, GpuError, RestoreKernels};
use kvfetcher_codec::pack_codes;
use kvfetcher_codec::{dequantize, GroupParams, Grouping};
use kvfetcher_protocol::DType;
use kvfetcher_testkit::{data_file, skip, Missing};
use kvfetcher_tools::gpu::check::{target_name, targets};
use kvfetcher_tools::gpu::fixture::kv_codes;

#[test]
fn cpu_restore_matches_codec_dequantize_on_real_kv() {
    let path = data_file("codelm-kv-a.safetensors");
    let codes = kv_codes(&path, 6).unwrap();
    let g = codes.geometry;
    // NHD contiguous f16, NHD paged f32, HND contiguous bf16, HND paged bf16: every axis once.
    let all = targets(&codes);
    for target in [0, 5, 7, 10].map(|i| &all[i]) {
        let mut outs = vec![Vec::new(); g.tensors];
        restore_cpu(g, &codes.codes, &codes.dequant, target, &mut outs).unwrap();
        for t in [0, g.tensors - 1] {
            let n = g.rows * g.cols;
            let params = GroupParams {
                min: codes.dequant.mins[t * g.cols..(t + 1) * g.cols].to_vec(),
                scale: codes.dequant.scales[t * g.cols..(t + 1) * g.cols].to_vec(),
            };
            let mut want = Vec::new();
            dequantize(
                &codes.codes[t * n..(t + 1) * n],
                g.rows,
                g.cols,
                Grouping::PerChannel,
                &params,
                &mut want,
            )
            .unwrap();
            for (i, w) in want.iter().enumerate().step_by(97) {
                let (row, col) = (i / g.cols, i % g.cols);
                let at = target.offset(row, col) * target.dtype.size();
                let b = &outs[t][at..at + target.dtype.size()];
                let ok = match target.dtype {
                    DType::F16 => f16::from_le_bytes([b[0], b[1]]) == f16::from_f32(*w),
                    DType::BF16 => bf16::from_le_bytes([b[0], b[1]]) == bf16::from_f32(*w),
                    DType::F32 => {
                        f32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_bits() == w.to_bits()
                    }
                };
                assert!(ok, "{} tensor {t} code {i}", target_name(target));
            }
        }
    }
}

#[test]
fn gpu_restore_matches_cpu_on_real_kv() {
    let path = data_file("codelm-kv-a.safetensors");
    let cuda = match Cuda::open(0) {
        Ok(c) => c,
        Err(e @ (GpuError::NoDriver(_) | GpuError::NoDevice { .. })) => {
            skip(Missing::Gpu, format!("no CUDA driver ({e})"));
            return;
        }
        Err(e) => panic!("cuda: {e}"),
    };
    let kernels = RestoreKernels::load(&cuda).unwrap();
    let stream = cuda.stream().unwrap();
    let codes = kv_codes(&path, 5).unwrap();
    let g = codes.geometry;
    let dcodes = cuda.upload(&codes.codes).unwrap();
    let dpacked = cuda.upload(&pack_codes(&codes.codes, 5)).unwrap();
    for target in targets(&codes) {
        let bytes = target.elements() * target.dtype.size();
        for packed in [false, true] {
            let outs: Vec<DeviceBuffer> =
                (0..g.tensors).map(|_| cuda.alloc(bytes).unwrap()).collect();
            outs.iter().for_each(|o| o.fill(0x5a).unwrap());
            let refs: Vec<&DeviceBuffer> = outs.iter().collect();
            let dt = DeviceTarget::new(&cuda, g, &codes.dequant, &target, &refs).unwrap();
            if packed {
                kernels.restore_packed(&dpacked, 5, &dt, &stream).unwrap();
            } else {
                kernels.restore_codes(&dcodes, &dt, &stream).unwrap();
            }
            stream.synchronize().unwrap();
            let mut want = vec![vec![0x5a; bytes]; g.tensors];
            restore_cpu(g, &codes.codes, &codes.dequant, &target, &mut want).unwrap();
            let mut got = vec![0u8; bytes];
            for (t, o) in outs.iter().enumerate() {
                o.read(&mut got).unwrap();
                assert!(
                    got == want[t],
                    "{} packed={packed} tensor {t}",
                    target_name(&target)
                );
            }
        }
    }
}

//! NVDEC against real KV: a lossless x265 stream of quantized codelm KV decodes to exactly the
//! codes (skipped without a CUDA driver, NVDEC or the x265 tool).

use kvfetcher_codec::Chroma;

use kvfetcher::gpu::{Cuda, GpuError, Nvdec};
use kvfetcher_testkit::{skip, Missing};
use kvfetcher_tools::gpu::fixture::{encode_raster, fixture_format, frames_for, kv_codes};

#[test]
fn nvdec_decodes_real_kv_bit_exactly() {
    let kv = kvfetcher_testkit::data_file("codelm-kv-a.safetensors");
    let cuda = match Cuda::open(0) {
        Ok(c) => c,
        Err(e @ (GpuError::NoDriver(_) | GpuError::NoDevice { .. })) => {
            skip(Missing::Gpu, format!("no CUDA driver ({e})"));
            return;
        }
        Err(e) => panic!("cuda: {e}"),
    };
    let nvdec = match Nvdec::open(cuda) {
        Ok(n) => n,
        Err(e) => {
            skip(Missing::Gpu, &e);
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    for (chroma, bits) in [(Chroma::Yuv444, 10), (Chroma::Yuv420, 8)] {
        let codes = kv_codes(&kv, bits).unwrap();
        let fmt = fixture_format(chroma, bits);
        let path = dir.path().join("s.hevc");
        // One frame's worth of codes keeps the test fast.
        let n = fmt.samples_per_frame();
        if let Err(e) = encode_raster(&codes.codes[..n], fmt, &path) {
            skip(Missing::Tool, &e);
            return;
        }
        let stream = std::fs::read(&path).unwrap();
        let frames = nvdec.session().unwrap().decode_to_host(&stream).unwrap();
        assert_eq!(frames.format, fmt);
        assert_eq!(frames.frames, frames_for(fmt, n));
        assert!(
            frames.samples == codes.codes[..n],
            "{} {bits}-bit differs",
            chroma.name()
        );
    }
}

//! The HEVC section decoder this host picks (NVDEC, else software) returns a real-KV section
//! encoded by the codec's HEVC variant bit-exactly (skipped without x265 / libde265).

use kvfetcher::gpu::{hevc_section_decoder, CodecHevcLayout};
use kvfetcher_codec::{CodePlane, HevcDecoder, HevcEncoder, PlaneShape, SectionEncoder};
use kvfetcher_testkit::{skip, Missing};
use kvfetcher_tools::gpu::fixture::kv_codes;

#[test]
fn chosen_hevc_decoder_round_trips_real_kv() {
    let kv = kvfetcher_testkit::data_file("codelm-kv-a.safetensors");
    let (enc, soft) = match (HevcEncoder::new(None), HevcDecoder::new()) {
        (Ok(e), Ok(d)) => (e, d),
        (Err(e), _) | (_, Err(e)) => {
            skip(Missing::Tool, &e);
            return;
        }
    };
    let codes = kv_codes(&kv, 8).unwrap();
    // Two tensors (layer 0 K and V), first 256 tokens: one chunk's layer group.
    let g = codes.geometry;
    let rows = 256;
    let mut plane = Vec::new();
    for t in 0..2 {
        plane.extend_from_slice(&codes.codes[t * g.rows * g.cols..][..rows * g.cols]);
    }
    let plane = CodePlane {
        shape: PlaneShape {
            bits: 8,
            tensors: 2,
            rows,
            cols: g.cols,
        },
        codes: plane,
    };
    let section = enc.encode(&plane).unwrap();
    let dec = hevc_section_decoder(0, CodecHevcLayout, Box::new(soft));
    let got = dec
        .decode(plane.shape, &section.params, &section.payload)
        .unwrap();
    assert_eq!(got, plane);
}

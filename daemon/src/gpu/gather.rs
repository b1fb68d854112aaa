//! The gather table of the HEVC surface restore: for each code, the decoded sample it lies in,
//! derived from the codec's own `HevcGeometry::codes_from_frame` (fed with sample indices), so
//! this module holds no layout math; uploaded once per geometry in its most compact form.

use std::sync::Arc;

use kvfetcher_codec::{Frame, HevcGeometry};

use super::cuda::Cuda;
use super::restore::DeviceGather;
use super::GpuError;

fn invalid(e: impl std::fmt::Display) -> GpuError {
    GpuError::InvalidArgument(e.to_string())
}

/// The code-index -> planar-sample-index table of a geometry (samples numbered as in
/// `HostFrames`: frame by frame, Y then U then V). Built by feeding
/// [`HevcGeometry::codes_from_frame`] frames whose samples carry their own index, `bits` bits at
/// a time, so the mapping is the codec's own.
pub fn gather_table(g: &HevcGeometry) -> Result<Vec<u32>, GpuError> {
    let bits = u32::from(g.shape.bits);
    let spf = g.samples_per_frame();
    let total = g.frames * spf;
    let digits = (usize::BITS - total.leading_zeros()).div_ceil(bits).max(1);
    let mask = (1usize << bits) - 1;
    let sizes: Vec<usize> = (0..3)
        .map(|c| {
            let (w, h) = g.plane_size(c);
            w * h
        })
        .collect();
    let mut table = vec![0u32; g.shape.len()];
    let mut seen = vec![false; g.shape.len()];
    let mut tmp = vec![u16::MAX; g.shape.len()];
    for f in 0..g.frames {
        for d in 0..digits {
            let shift = d * bits;
            let mut next = f * spf;
            let planes = [0, 1, 2].map(|c| {
                (0..sizes[c])
                    .map(|_| {
                        let v = ((next >> shift) & mask) as u16;
                        next += 1;
                        v
                    })
                    .collect::<Vec<u16>>()
            });
            tmp.fill(u16::MAX);
            g.codes_from_frame(f, &Frame { planes }, &mut tmp)
                .map_err(invalid)?;
            for (i, &v) in tmp.iter().enumerate() {
                if v != u16::MAX {
                    table[i] |= u32::from(v) << shift;
                    seen[i] = true;
                }
            }
        }
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(invalid(format!("code {i} lies in no frame")));
    }
    Ok(table)
}

/// The run form of a gather `table`: the first sample index of each aligned run of `run` codes
/// (a multiple of 8), when every run's samples are consecutive. The codec's layouts keep each
/// row of codes in one piece, so a table per row (`run` = columns) is 1/cols of the per-code
/// one: the threads of a row share one cached entry and read their samples with one load per 8.
pub fn run_gather(table: &[u32], run: usize) -> Option<Vec<u32>> {
    if run == 0 || !run.is_multiple_of(8) || !table.len().is_multiple_of(run) {
        return None;
    }
    let consecutive = |c: &[u32]| (1..run).all(|j| c[0].checked_add(j as u32) == Some(c[j]));
    table
        .chunks_exact(run)
        .map(|c| consecutive(c).then_some(c[0]))
        .collect()
}

/// The codec's gather table for `g` on the device: per row of codes, per group of 8 codes, or
/// per code, the first form the layout allows.
pub(crate) fn device_gather(cuda: &Arc<Cuda>, g: &HevcGeometry) -> Result<DeviceGather, GpuError> {
    let table = gather_table(g)?;
    for run in [g.shape.cols, 8] {
        if let Some(runs) = run_gather(&table, run) {
            return DeviceGather::upload(cuda, &runs, run);
        }
    }
    DeviceGather::upload(cuda, &table, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfetcher_codec::{CodePlane, LayoutSpec, PlaneShape};

    /// The codec's HEVC layouts.
    const LAYOUTS: [&str; 4] = ["rows", "rows420", "frames", "frames420"];

    /// The gather table picks, for every code, the sample the codec's own frames put it in.
    /// A section's geometry in `layout`: 4 tensors of 128 x 256 codes of `bits` bits.
    fn geometry(layout: &str, bits: u8) -> HevcGeometry {
        let shape = PlaneShape {
            tensors: 4,
            rows: 128,
            cols: 256,
            bits,
        };
        let spec: LayoutSpec = layout.parse().expect("layout");
        HevcGeometry::new(shape, &spec).expect("geometry")
    }

    #[test]
    fn gather_table_inverts_the_codec_layout() {
        for layout in LAYOUTS {
            let g = geometry(layout, 4);
            let shape = g.shape;
            let codes: Vec<u16> = (0..shape.len()).map(|i| ((i * 7) % 16) as u16).collect();
            let plane = CodePlane { shape, codes };
            let samples: Vec<u16> = g
                .frames_from_codes(&plane)
                .expect("frames")
                .into_iter()
                .flat_map(|f| f.planes.into_iter().flatten())
                .collect();
            let table = gather_table(&g).expect("table");
            for (i, &s) in table.iter().enumerate() {
                assert_eq!(samples[s as usize], plane.codes[i], "{layout} code {i}");
            }
        }
    }

    /// The codec's layouts keep each row of codes in consecutive samples, so the daemon reads
    /// one table entry per row; a table that breaks a run falls back to a finer form.
    #[test]
    fn codec_layouts_gather_per_row_and_per_group() {
        for layout in LAYOUTS {
            let g = geometry(layout, 8);
            let table = gather_table(&g).expect("table");
            for run in [8, g.shape.cols] {
                let runs =
                    run_gather(&table, run).unwrap_or_else(|| panic!("{layout}: no runs of {run}"));
                assert_eq!(runs.len() * run, table.len());
                for (i, &s) in table.iter().enumerate() {
                    assert_eq!(runs[i / run] + (i % run) as u32, s, "{layout} code {i}");
                }
            }
        }
        let identity: Vec<u32> = (0..64).collect();
        assert_eq!(
            run_gather(&identity, 8),
            Some((0..8).map(|g| 8 * g).collect())
        );
        assert_eq!(run_gather(&identity, 32), Some(vec![0, 32]));
        let mut broken = identity.clone();
        broken.swap(9, 10);
        assert_eq!(run_gather(&broken, 8), None);
        assert_eq!(run_gather(&broken, 64), None);
        let mut seam = identity.clone();
        seam[32..].iter_mut().for_each(|s| *s += 100);
        assert_eq!(run_gather(&seam, 32), Some(vec![0, 132]));
        assert_eq!(run_gather(&seam, 64), None, "a run that jumps");
        assert_eq!(run_gather(&identity[..12], 8), None, "not whole runs");
        assert_eq!(
            run_gather(&identity, 12),
            None,
            "runs are whole groups of 8"
        );
        assert_eq!(run_gather(&identity, 0), None);
        assert_eq!(
            run_gather(&[u32::MAX - 3; 8], 8),
            None,
            "overflow is no run"
        );
    }
}

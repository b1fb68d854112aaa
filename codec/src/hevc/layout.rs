//! Names of the HEVC layouts and their chroma formats, as chosen on the command line.
//!
//! Pure data: no geometry here (see `geometry`), no FFI.

use std::fmt;
use std::str::FromStr;

use crate::CodecError;

/// How codes are arranged in frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HevcLayout {
    /// Tokens as rows: each tensor is a `tokens x channels` tile; tiles fill every plane of a
    /// frame (Y, then U, then V), so intra prediction runs along tokens and channels.
    Rows,
    /// Tokens along frames: frame `f` holds tokens `f*g .. (f+1)*g` of every tensor, each
    /// tensor at the same place in every frame, so inter prediction can run across tokens.
    Frames,
}

impl HevcLayout {
    /// The code stored in a section's parameters.
    pub fn code(self) -> u8 {
        match self {
            HevcLayout::Rows => 1,
            HevcLayout::Frames => 2,
        }
    }

    /// Parses a stored code.
    pub fn from_code(code: u8) -> Option<HevcLayout> {
        match code {
            1 => Some(HevcLayout::Rows),
            2 => Some(HevcLayout::Frames),
            _ => None,
        }
    }

    /// The layout's name.
    pub fn name(self) -> &'static str {
        match self {
            HevcLayout::Rows => "rows",
            HevcLayout::Frames => "frames",
        }
    }
}

/// Chroma format of the frames: the two NVDEC decodes (it has no 4:0:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Chroma {
    /// Chroma planes at half width and half height.
    Yuv420,
    /// Three full-size planes.
    Yuv444,
}

impl Chroma {
    /// The code stored in a section's parameters (the HEVC `chroma_format_idc`).
    pub fn code(self) -> u8 {
        match self {
            Chroma::Yuv420 => 1,
            Chroma::Yuv444 => 3,
        }
    }

    /// The short name used in reports and fixture names ("420", "444").
    pub fn name(self) -> &'static str {
        match self {
            Chroma::Yuv420 => "420",
            Chroma::Yuv444 => "444",
        }
    }

    /// Parses a stored code.
    pub fn from_code(code: u8) -> Option<Chroma> {
        match code {
            1 => Some(Chroma::Yuv420),
            3 => Some(Chroma::Yuv444),
            _ => None,
        }
    }

    /// How many luma samples one chroma sample spans in each direction (2 or 1).
    pub fn subsampling(self) -> usize {
        match self {
            Chroma::Yuv420 => 2,
            Chroma::Yuv444 => 1,
        }
    }
}

/// A layout as named on the command line: `rows`, `rows420`, `frames`, `frames420`, optionally
/// followed by `:N` for the tokens per frame of a `frames` layout (`frames:16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayoutSpec {
    /// The arrangement.
    pub layout: HevcLayout,
    /// The chroma format.
    pub chroma: Chroma,
    /// Tokens per frame for [`HevcLayout::Frames`]; `None` picks the fewest that fill a frame.
    pub tokens_per_frame: Option<usize>,
}

impl LayoutSpec {
    /// The default layout, chosen by measurement (docs/LAYOUT.md): tokens along frames in
    /// 4:4:4, which with x265's `medium` preset is the smallest on codelm-kv-a (1.13x smaller
    /// than packed 4-bit codes, against 1.11x for tokens as rows).
    pub const DEFAULT: LayoutSpec = LayoutSpec {
        layout: HevcLayout::Frames,
        chroma: Chroma::Yuv444,
        tokens_per_frame: None,
    };

    /// Every layout name accepted by [`LayoutSpec::from_str`] without a `:N` suffix.
    pub const NAMES: [&'static str; 4] = ["rows", "rows420", "frames", "frames420"];
}

impl Default for LayoutSpec {
    fn default() -> Self {
        LayoutSpec::DEFAULT
    }
}

impl FromStr for LayoutSpec {
    type Err = CodecError;

    fn from_str(s: &str) -> Result<Self, CodecError> {
        let bad = |reason: String| CodecError::Unsupported {
            variant: "hevc",
            reason,
        };
        let (name, tokens) = match s.split_once(':') {
            Some((name, n)) => {
                let n: usize = n
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad(format!("bad tokens per frame in layout {s:?}")))?;
                (name, Some(n))
            }
            None => (s, None),
        };
        let (layout, chroma) = match name {
            "rows" | "rows444" => (HevcLayout::Rows, Chroma::Yuv444),
            "rows420" => (HevcLayout::Rows, Chroma::Yuv420),
            "frames" | "frames444" => (HevcLayout::Frames, Chroma::Yuv444),
            "frames420" => (HevcLayout::Frames, Chroma::Yuv420),
            _ => {
                return Err(bad(format!(
                    "unknown layout {s:?} (known: {})",
                    LayoutSpec::NAMES.join(", ")
                )))
            }
        };
        if tokens.is_some() && layout != HevcLayout::Frames {
            return Err(bad(format!("layout {name:?} takes no tokens per frame")));
        }
        Ok(LayoutSpec {
            layout,
            chroma,
            tokens_per_frame: tokens,
        })
    }
}

impl fmt::Display for LayoutSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.layout.name())?;
        if self.chroma == Chroma::Yuv420 {
            f.write_str("420")?;
        }
        if let Some(n) = self.tokens_per_frame {
            write!(f, ":{n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in [
            "rows",
            "rows420",
            "frames",
            "frames420",
            "frames:16",
            "frames420:8",
        ] {
            let spec: LayoutSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
        assert!("rows:4".parse::<LayoutSpec>().is_err());
        assert!("frames:0".parse::<LayoutSpec>().is_err());
        assert!("cols".parse::<LayoutSpec>().is_err());
    }
}

//! Which encoder and decoder serve each [`VariantKind`], injected into every encode and decode.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::{
    CodecError, CodecProfile, FormatError, ModelFingerprint, PackedCodec, ProfileId,
    SectionDecoder, SectionEncoder, VariantKind, ZstdCodec,
};

/// The encoders and decoders available to this process, by variant.
///
/// [`CodecRegistry::default`] holds `packed`, `zstd` and, when its libraries load, `hevc`;
/// [`CodecRegistry::software`] holds only `packed` and `zstd`. Add or replace backends (an NVDEC
/// decoder, a different zstd level) with [`CodecRegistry::with`] and
/// [`CodecRegistry::with_decoder`].
#[derive(Clone)]
pub struct CodecRegistry {
    encoders: HashMap<VariantKind, Arc<dyn SectionEncoder>>,
    decoders: HashMap<VariantKind, Arc<dyn SectionDecoder>>,
    /// Why a variant could not be set up, for the error when it is asked for.
    missing: HashMap<VariantKind, String>,
    /// Codec profiles transform-coded chunks may name, by id.
    profiles: HashMap<ProfileId, Arc<CodecProfile>>,
}

impl Default for CodecRegistry {
    /// [`CodecRegistry::standard`]: packed, zstd and (when its libraries load) hevc.
    fn default() -> Self {
        CodecRegistry::standard()
    }
}

impl fmt::Debug for CodecRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut enc: Vec<_> = self.encoders.keys().map(|k| k.name()).collect();
        let mut dec: Vec<_> = self.decoders.keys().map(|k| k.name()).collect();
        enc.sort_unstable();
        dec.sort_unstable();
        f.debug_struct("CodecRegistry")
            .field("encoders", &enc)
            .field("decoders", &dec)
            .field("missing", &self.missing)
            .field("profiles", &self.profiles.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl CodecRegistry {
    /// A registry with nothing in it.
    pub fn empty() -> CodecRegistry {
        CodecRegistry {
            encoders: HashMap::new(),
            decoders: HashMap::new(),
            missing: HashMap::new(),
            profiles: HashMap::new(),
        }
    }

    /// `packed` and `zstd` (default level), encoders and decoders: no libraries needed.
    pub fn software() -> CodecRegistry {
        CodecRegistry::empty()
            .with(VariantKind::Packed, Arc::new(PackedCodec))
            .with_decoder(VariantKind::Packed, Arc::new(PackedCodec))
            .with(VariantKind::Zstd, Arc::new(ZstdCodec::default()))
            .with_decoder(VariantKind::Zstd, Arc::new(ZstdCodec::default()))
            .with_decoder(VariantKind::Rans, Arc::new(crate::RansCodec))
    }

    /// [`CodecRegistry::software`] plus `hevc` when x265 / libde265 load.
    pub fn standard() -> CodecRegistry {
        let mut reg = CodecRegistry::software();
        match hevc_encoder(None, None) {
            Ok(e) => reg = reg.with(VariantKind::Hevc, e),
            Err(e) => {
                reg.missing.insert(VariantKind::Hevc, e.to_string());
            }
        }
        match hevc_decoder() {
            Ok(d) => reg = reg.with_decoder(VariantKind::Hevc, d),
            Err(e) => {
                reg.missing
                    .entry(VariantKind::Hevc)
                    .or_insert_with(|| e.to_string());
            }
        }
        reg
    }

    /// Registers `encoder` for `kind` (replacing any other).
    pub fn with(mut self, kind: VariantKind, encoder: Arc<dyn SectionEncoder>) -> CodecRegistry {
        self.encoders.insert(kind, encoder);
        self
    }

    /// Registers `decoder` for `kind` (replacing any other).
    pub fn with_decoder(
        mut self,
        kind: VariantKind,
        decoder: Arc<dyn SectionDecoder>,
    ) -> CodecRegistry {
        self.decoders.insert(kind, decoder);
        self
    }

    /// The encoder of `kind`, or [`CodecError::Unavailable`] saying why there is none.
    pub fn encoder(&self, kind: VariantKind) -> Result<&dyn SectionEncoder, CodecError> {
        self.encoders
            .get(&kind)
            .map(|e| e.as_ref())
            .ok_or_else(|| self.unavailable(kind, "encoder"))
    }

    /// The decoder of `kind`, or [`CodecError::Unavailable`] saying why there is none.
    pub fn decoder(&self, kind: VariantKind) -> Result<&dyn SectionDecoder, CodecError> {
        self.decoders
            .get(&kind)
            .map(|d| d.as_ref())
            .ok_or_else(|| self.unavailable(kind, "decoder"))
    }

    /// Adds a codec profile (chunks that name its id can then be restored).
    pub fn with_profile(mut self, profile: Arc<CodecProfile>) -> CodecRegistry {
        self.profiles.insert(profile.id(), profile);
        self
    }

    /// The profile with `id`, or [`FormatError::ProfileMissing`].
    pub fn profile(&self, id: &ProfileId) -> Result<&CodecProfile, FormatError> {
        self.profiles
            .get(id)
            .map(|p| p.as_ref())
            .ok_or(FormatError::ProfileMissing(*id))
    }

    /// A profile calibrated for `model`, if one is registered (the lowest id when several are).
    pub fn profile_for_model(&self, model: &ModelFingerprint) -> Option<Arc<CodecProfile>> {
        self.profiles
            .iter()
            .filter(|(_, p)| p.model == *model)
            .min_by_key(|(id, _)| **id)
            .map(|(_, p)| p.clone())
    }

    /// The id `profile` was registered under, if this very profile (not a copy) is registered:
    /// saves then need not hash it again.
    pub fn registered_id(&self, profile: &Arc<CodecProfile>) -> Option<ProfileId> {
        self.profiles
            .iter()
            .find(|(_, p)| Arc::ptr_eq(p, profile))
            .map(|(id, _)| *id)
    }

    /// The variants this registry can decode.
    pub fn decodable(&self) -> Vec<VariantKind> {
        let mut v: Vec<_> = self.decoders.keys().copied().collect();
        v.sort_by_key(|k| *k as u8);
        v
    }

    fn unavailable(&self, kind: VariantKind, role: &'static str) -> CodecError {
        CodecError::Unavailable {
            variant: kind.name(),
            role,
            reason: self
                .missing
                .get(&kind)
                .cloned()
                .unwrap_or_else(|| "not registered".into()),
        }
    }
}

/// An HEVC encoder with `layout` (None: the encoder's default layout) and `stream_frames`
/// frames per stream (None: one stream per section); fails when x265 cannot be loaded or the
/// layout is unknown.
pub fn hevc_encoder(
    layout: Option<&str>,
    stream_frames: Option<usize>,
) -> Result<Arc<dyn SectionEncoder>, CodecError> {
    Ok(Arc::new(
        crate::HevcEncoder::new(layout)?.with_stream_frames(stream_frames),
    ))
}

/// A software HEVC decoder; fails when libde265 cannot be loaded.
fn hevc_decoder() -> Result<Arc<dyn SectionDecoder>, CodecError> {
    Ok(Arc::new(crate::HevcDecoder::new()?))
}

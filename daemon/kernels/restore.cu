// KVFetcher restore kernels: quantized codes -> dequantized KV in the engine's layout.
//
// Compiled to PTX by scripts/gen-ptx.sh (nvcc -arch=sm_90 -ptx) and committed as restore.ptx;
// the daemon JIT-loads the PTX with cuModuleLoadData. The Rust mirror of every formula here is
// daemon/src/gpu/restore.rs (restore_cpu, target_offset): keep them identical.
//
// Codes are laid out [tensors][rows][cols] (tensor t = 2*layer + {0: K, 1: V}, rows = tokens,
// cols = kv_heads * head_dim). Dequantization is fmaf((float)code, scale, min) rounded to the
// target dtype with round-to-nearest-even, exactly as the CPU's (code as f32).mul_add(scale, min).
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

// Division by a divisor fixed for a launch: a multiply-high, an add and a shift instead of a
// ~20-instruction integer division (Granlund-Montgomery; the host's FastDiv::new computes
// `mul` and `shift`, and its tests check the quotient against `/`). Valid for every 32-bit n.
struct FastDiv {
    unsigned int d, mul, shift, pad_;
};

__device__ __forceinline__ unsigned fdiv(const FastDiv& f, unsigned n) {
    unsigned t = __umulhi(n, f.mul);
    return (unsigned)(((unsigned long long)t + n) >> f.shift);
}

// Where and how to write. Must match RestoreTargetArgs in restore.rs field for field.
struct RestoreTarget {
    const unsigned long long* out_ptrs;  // [tensors] base address of each tensor's target
    const float* scales;                 // [tensors][groups]
    const float* mins;                   // [tensors][groups]
    const int* block_table;              // paged: logical block -> physical block; null: contiguous
    unsigned int tensors, rows, cols;
    unsigned int heads, head_dim;
    unsigned int token_offset;   // target token of row 0
    unsigned int target_tokens;  // token capacity of a contiguous HND target
    unsigned int block_size;     // paged: tokens per block
    unsigned int layout;         // 0: NHD, 1: HND
    unsigned int dtype;          // 0: f16, 1: bf16, 2: f32
    unsigned int grouping;       // 0: per channel (groups = cols), 1: per token (groups = rows)
    unsigned int pad_;
    FastDiv per_row;             // by cols / 8 (column groups per row)
    FastDiv by_head_dim;         // by head_dim
    FastDiv by_block;            // by block_size (paged; else by 1)
};

// Where the decoded surfaces are. Must match FrameSourceArgs in restore.rs. Sample indices
// fit 32 bits (the host checks frames x samples per frame).
struct FrameSource {
    const unsigned int* gather;  // code index -> planar sample index; null: identity
    unsigned int width, height;
    unsigned int chroma444;      // 1: 4:4:4 planar; 0: 4:2:0 with interleaved UV
    unsigned int bytes_per_sample;
    unsigned int shift;          // 16 - bit_depth for 2-byte samples (MSB-aligned), else 0
    unsigned int gather_groups;  // 0: gather holds one index per code; k: one per run of k groups
                                 // of 8 codes (8k consecutive samples, e.g. a row of codes)
    unsigned int gather_direct;  // 1: runs, 4:4:4, 16-byte aligned surfaces and every entry a
                                 // multiple of 8 (host-checked): one aligned load per group
    unsigned int pad_[3];
    FastDiv per_entry;           // by gather_groups
    FastDiv per_frame;           // by samples per frame
    FastDiv per_chroma;          // by samples per chroma plane
};

// Element offset of (row, col) in a tensor's target, with col = head * head_dim + d.
__device__ __forceinline__ unsigned long long target_offset(const RestoreTarget& t, unsigned row,
                                                            unsigned head, unsigned d) {
    unsigned token = t.token_offset + row;
    if (t.block_table) {
        unsigned blk = fdiv(t.by_block, token), slot = token - blk * t.block_size;
        unsigned long long phys = (unsigned long long)(unsigned)t.block_table[blk];
        if (t.layout == 0) return ((phys * t.block_size + slot) * t.heads + head) * t.head_dim + d;
        return ((phys * t.heads + head) * t.block_size + slot) * t.head_dim + d;
    }
    if (t.layout == 0) return ((unsigned long long)token * t.heads + head) * t.head_dim + d;
    return ((unsigned long long)head * t.target_tokens + token) * t.head_dim + d;
}

// The 8 bytes of v as 8 codes, lowest byte first.
__device__ __forceinline__ void unpack_bytes(uint2 v, unsigned (&code)[8]) {
#pragma unroll
    for (int j = 0; j < 4; j++) {
        code[j] = (v.x >> (8 * j)) & 0xff;
        code[j + 4] = (v.y >> (8 * j)) & 0xff;
    }
}

// The 8 16-bit halves of v as 8 codes, lowest first, each shifted right by `shift`.
__device__ __forceinline__ void unpack_halves(uint4 v, unsigned shift, unsigned (&code)[8]) {
    unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 8; i++) code[i] = ((w[i / 2] >> (16 * (i % 2))) & 0xffff) >> shift;
}

// The scales and mins of columns col..col+7 of `tensor` (per-channel grouping).
__device__ __forceinline__ void channel_params(const RestoreTarget& t, unsigned tensor, unsigned col,
                                               float (&s)[8], float (&m)[8]) {
    const float4* s4 = reinterpret_cast<const float4*>(t.scales + (size_t)tensor * t.cols + col);
    const float4* m4 = reinterpret_cast<const float4*>(t.mins + (size_t)tensor * t.cols + col);
    float4 s0 = __ldg(s4), s1 = __ldg(s4 + 1), m0 = __ldg(m4), m1 = __ldg(m4 + 1);
    s[0] = s0.x; s[1] = s0.y; s[2] = s0.z; s[3] = s0.w; s[4] = s1.x; s[5] = s1.y; s[6] = s1.z; s[7] = s1.w;
    m[0] = m0.x; m[1] = m0.y; m[2] = m0.z; m[3] = m0.w; m[4] = m1.x; m[5] = m1.y; m[6] = m1.z; m[7] = m1.w;
}

// Dequantizes 8 codes of one row, columns col..col+7 (col % 8 == 0, head_dim % 8 == 0), with
// the per-channel `s`/`m` (or the row's own scale and min for per-token grouping), and stores
// them at element `off` of `base` with one or two 16-byte stores.
__device__ __forceinline__ void store8(const RestoreTarget& t, char* base, unsigned long long off,
                                       unsigned tensor, unsigned row, const unsigned (&code)[8],
                                       const float (&s)[8], const float (&m)[8]) {
    float v[8];
    if (t.grouping == 0) {
#pragma unroll
        for (int j = 0; j < 8; j++) v[j] = fmaf((float)code[j], s[j], m[j]);
    } else {
        float st = __ldg(t.scales + (size_t)tensor * t.rows + row);
        float mt = __ldg(t.mins + (size_t)tensor * t.rows + row);
#pragma unroll
        for (int j = 0; j < 8; j++) v[j] = fmaf((float)code[j], st, mt);
    }
    if (t.dtype == 2) {
        float4* o = reinterpret_cast<float4*>(base + off * 4);
        o[0] = make_float4(v[0], v[1], v[2], v[3]);
        o[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        union { uint4 u; unsigned short h[8]; } pk;
        if (t.dtype == 0) {
#pragma unroll
            for (int j = 0; j < 8; j++) pk.h[j] = __half_as_ushort(__float2half_rn(v[j]));
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++) pk.h[j] = __bfloat16_as_ushort(__float2bfloat16_rn(v[j]));
        }
        *reinterpret_cast<uint4*>(base + off * 2) = pk.u;
    }
}

// The loop every kernel shares. Launched with gridDim.y = tensors: block row y restores tensor
// y. A work unit is 8 columns of ROWS consecutive rows; consecutive threads take consecutive
// column groups of the same rows, so loads and stores stay coalesced. With several rows, the
// loads of all of them are in flight at once and a per-channel tensor's 8 scales and mins are
// loaded once for all. `load(g, code)` fills the 8 codes of group g = (tensor * rows + row) *
// cols / 8 + col / 8. Index math is 32-bit (the host checks that tensors * rows * cols fits).
// The host's RestoreKernels::grid must use the same ROWS as the kernel it launches.
template <int ROWS_PER_THREAD, typename Load>
__device__ __forceinline__ void restore_rows(const RestoreTarget& t, Load load) {
    unsigned tensor = blockIdx.y;
    unsigned per_row = t.per_row.d;
    unsigned row_blocks = (t.rows + ROWS_PER_THREAD - 1) / ROWS_PER_THREAD;
    unsigned units = row_blocks * per_row;
    char* base = reinterpret_cast<char*>(t.out_ptrs[tensor]);
    unsigned first_group = tensor * t.rows * per_row;
    for (unsigned u = blockIdx.x * blockDim.x + threadIdx.x; u < units; u += gridDim.x * blockDim.x) {
        unsigned rb = fdiv(t.per_row, u);
        unsigned cg = u - rb * per_row;
        unsigned col = cg * 8;
        unsigned head = fdiv(t.by_head_dim, col), d = col - head * t.head_dim;
        unsigned row0 = rb * ROWS_PER_THREAD;
        float s[8], m[8];
        if (t.grouping == 0) channel_params(t, tensor, col, s, m);
        unsigned code[ROWS_PER_THREAD][8];
#pragma unroll
        for (int r = 0; r < ROWS_PER_THREAD; r++) {
            if (row0 + r < t.rows) load(first_group + (row0 + r) * per_row + cg, code[r]);
        }
#pragma unroll
        for (int r = 0; r < ROWS_PER_THREAD; r++) {
            unsigned row = row0 + r;
            if (row < t.rows) store8(t, base, target_offset(t, row, head, d), tensor, row, code[r], s, m);
        }
    }
}

// Rows per thread for codes and packed codes: two for 16-bit outputs, one for f32, which
// writes twice the bytes per code (on an H200, one row is 10-20% slower for bf16 and 15-25%
// faster for f32). Surfaces read through a gather table take two rows for both (one row is no
// faster, four are slower); 4:4:4 surfaces without one are read like codes.
template <typename Load>
__device__ __forceinline__ void restore_groups(const RestoreTarget& t, Load load) {
    if (t.dtype == 2) {
        restore_rows<1>(t, load);
    } else {
        restore_rows<2>(t, load);
    }
}

// Codes already in device memory as u16 [tensors][rows][cols].
extern "C" __global__ void __launch_bounds__(256) kvf_restore_codes(const uint16_t* __restrict__ codes,
                                                                    RestoreTarget t) {
    restore_groups(t, [&](unsigned g, unsigned (&code)[8]) {
        unpack_halves(__ldg(reinterpret_cast<const uint4*>(codes) + g), 0, code);
    });
}

// Codes bit-packed LSB-first (the `packed` variant), straight from a host-to-device copy. The
// common widths have kernels of their own: one aligned load per group and constant shifts, and
// none of the general path's registers (the host picks them when the buffer is aligned).
extern "C" __global__ void __launch_bounds__(256) kvf_restore_packed8(const uint8_t* __restrict__ packed,
                                                                      unsigned long long packed_len,
                                                                      unsigned bits, RestoreTarget t) {
    restore_groups(t, [&](unsigned g, unsigned (&code)[8]) {
        unpack_bytes(__ldg(reinterpret_cast<const uint2*>(packed) + g), code);
    });
}

extern "C" __global__ void __launch_bounds__(256) kvf_restore_packed4(const uint8_t* __restrict__ packed,
                                                                      unsigned long long packed_len,
                                                                      unsigned bits, RestoreTarget t) {
    restore_groups(t, [&](unsigned g, unsigned (&code)[8]) {
        unsigned v = __ldg(reinterpret_cast<const unsigned*>(packed) + g);
#pragma unroll
        for (int j = 0; j < 8; j++) code[j] = (v >> (4 * j)) & 0xf;
    });
}

// Any width 1..16: assembles up to 128 bits with shifts by run-time amounts.
extern "C" __global__ void __launch_bounds__(256) kvf_restore_packed(const uint8_t* __restrict__ packed,
                                                                     unsigned long long packed_len,
                                                                     unsigned bits, RestoreTarget t) {
    unsigned mask = (1u << bits) - 1;
    unsigned words = (bits + 3) / 4;
    restore_groups(t, [&](unsigned g, unsigned (&code)[8]) {
        // 8 codes of `bits` bits start at a byte boundary: g * bits bytes.
        unsigned long long byte0 = (unsigned long long)g * bits;
        unsigned long long acc_lo = 0, acc_hi = 0;  // up to 128 bits
        if ((byte0 & 3) == 0 && byte0 + 4 * words <= packed_len) {
            const unsigned* w = reinterpret_cast<const unsigned*>(packed + byte0);
#pragma unroll
            for (unsigned b = 0; b < 4; b++) {
                if (b < words) {
                    unsigned long long v = __ldg(w + b);
                    if (b < 2) acc_lo |= v << (32 * b); else acc_hi |= v << (32 * (b - 2));
                }
            }
        } else {
#pragma unroll
            for (unsigned b = 0; b < 16; b++) {
                if (b < bits) {
                    unsigned long long at = byte0 + b;
                    unsigned long long v = at < packed_len ? __ldg(packed + at) : 0;
                    if (b < 8) acc_lo |= v << (8 * b); else acc_hi |= v << (8 * (b - 8));
                }
            }
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            unsigned sh = j * bits;
            unsigned long long w;
            if (sh >= 64) w = acc_hi >> (sh - 64);
            else if (sh == 0) w = acc_lo;
            else w = (acc_lo >> sh) | (acc_hi << (64 - sh));
            code[j] = (unsigned)w & mask;
        }
    });
}

// Sample p of the decoded surfaces (planar index: Y, U, V planes per frame, as in HostFrames).
__device__ __forceinline__ unsigned frame_sample(const uint8_t* __restrict__ surf, const FrameSource& f,
                                                 unsigned p) {
    unsigned luma = f.width * f.height;
    unsigned spf = f.per_frame.d, cn = f.per_chroma.d;
    unsigned frame = fdiv(f.per_frame, p), q = p - frame * spf, off;
    if (q < luma || f.chroma444) {
        off = p;
    } else {
        unsigned k = q - luma;
        unsigned plane = fdiv(f.per_chroma, k), j = k - plane * cn;
        off = frame * spf + luma + 2 * j + plane;
    }
    if (f.bytes_per_sample == 1) return __ldg(surf + off);
    return (unsigned)__ldg(reinterpret_cast<const uint16_t*>(surf) + off) >> f.shift;
}

// The 8 samples of a plane from sample offset `off` of the surfaces (off % 8 == 0, surfaces
// 16-byte aligned), BYTES bytes each, with one load.
template <int BYTES>
__device__ __forceinline__ void plane_samples8(const uint8_t* __restrict__ surf, const FrameSource& f,
                                               unsigned off, unsigned (&code)[8]) {
    if (BYTES == 1) {
        unpack_bytes(__ldg(reinterpret_cast<const uint2*>(surf + off)), code);
    } else {
        unpack_halves(__ldg(reinterpret_cast<const uint4*>(surf + (size_t)off * 2)), f.shift, code);
    }
}

__device__ __forceinline__ void plane_samples8(const uint8_t* __restrict__ surf, const FrameSource& f,
                                               unsigned off, unsigned (&code)[8]) {
    if (f.bytes_per_sample == 1) {
        plane_samples8<1>(surf, f, off, code);
    } else {
        plane_samples8<2>(surf, f, off, code);
    }
}

// Reads 8 consecutive codes starting at planar sample p (p % 8 == 0) with wide loads where the
// surface layout allows it; false when it does not (plane edge, misalignment).
__device__ __forceinline__ bool frame_samples8(const uint8_t* __restrict__ surf, const FrameSource& f,
                                               unsigned p, unsigned (&code)[8]) {
    unsigned luma = f.width * f.height;
    unsigned spf = f.per_frame.d, cn = f.per_chroma.d;
    unsigned frame = fdiv(f.per_frame, p), q = p - frame * spf;
    unsigned base = frame * spf;
    bool planar = f.chroma444 || q < luma;
    unsigned off;
    if (planar) {
        unsigned plane_end = q < luma ? luma : (q < luma + cn ? luma + cn : spf);
        if (q + 8 > plane_end) return false;
        off = base + q;
    } else {
        unsigned k = q - luma, plane = fdiv(f.per_chroma, k), j = k - plane * cn;
        if (j + 8 > cn) return false;
        off = base + luma + 2 * j;  // 16 interleaved samples U V U V ...; take every other
        if (f.bytes_per_sample == 1) {
            if (off % 16) return false;
            uint4 v = __ldg(reinterpret_cast<const uint4*>(surf + off));
            unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int i = 0; i < 8; i++) code[i] = (w[i / 2] >> (16 * (i % 2) + 8 * plane)) & 0xff;
        } else {
            if ((off * 2) % 16) return false;
            const uint4* s4 = reinterpret_cast<const uint4*>(surf + (size_t)off * 2);
            uint4 a = __ldg(s4), b = __ldg(s4 + 1);
            unsigned w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 8; i++) code[i] = ((w[i] >> (16 * plane)) & 0xffff) >> f.shift;
        }
        return true;
    }
    if (off % 8) return false;
    plane_samples8(surf, f, off, code);
    return true;
}

// The planar sample of group g's first code through a table of runs: group g's codes are 8
// consecutive samples, 8 * (g % k) on from the entry of its run of k groups (a run's threads
// share one cached entry). In 4:4:4 planes planar sample p sits at p (see frame_sample).
__device__ __forceinline__ unsigned run_sample(const FrameSource& f, unsigned g) {
    unsigned e = fdiv(f.per_entry, g);
    return __ldg(f.gather + e) + 8 * (g - e * f.per_entry.d);
}

// Codes read from NVDEC's decoded surfaces (packed without pitch, see nvdec.rs DeviceFrames).
extern "C" __global__ void __launch_bounds__(256) kvf_restore_frames(const uint8_t* __restrict__ surf,
                                                                     FrameSource f, RestoreTarget t) {
    // 4:4:4 planes without a gather hold the codes in order (planar sample p is code p, see
    // frame_sample): one aligned load per 8 codes, none of the frame arithmetic below.
    if (!f.gather && f.chroma444 && reinterpret_cast<size_t>(surf) % 16 == 0) {
        // Specialised per sample size: a branch inside the loop costs this path ~10%.
        if (f.bytes_per_sample == 1) {
            restore_groups(t, [&](unsigned g, unsigned (&code)[8]) { plane_samples8<1>(surf, f, 8 * g, code); });
        } else {
            restore_groups(t, [&](unsigned g, unsigned (&code)[8]) { plane_samples8<2>(surf, f, 8 * g, code); });
        }
        return;
    }
    if (f.gather_direct) {
        // Specialised per sample size, like the path without a table.
        if (f.bytes_per_sample == 1) {
            restore_rows<2>(t, [&](unsigned g, unsigned (&code)[8]) { plane_samples8<1>(surf, f, run_sample(f, g), code); });
        } else {
            restore_rows<2>(t, [&](unsigned g, unsigned (&code)[8]) { plane_samples8<2>(surf, f, run_sample(f, g), code); });
        }
        return;
    }
    if (f.gather_groups) {
        bool direct = f.chroma444 && reinterpret_cast<size_t>(surf) % 16 == 0;
        restore_rows<2>(t, [&](unsigned g, unsigned (&code)[8]) {
            unsigned p = run_sample(f, g);
            if (direct && p % 8 == 0) {
                plane_samples8(surf, f, p, code);
            } else if (!frame_samples8(surf, f, p, code)) {
#pragma unroll
                for (int j = 0; j < 8; j++) code[j] = frame_sample(surf, f, p + j);
            }
        });
        return;
    }
    restore_rows<2>(t, [&](unsigned g, unsigned (&code)[8]) {
        unsigned first = g * 8;
        if (f.gather || !frame_samples8(surf, f, first, code)) {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                unsigned i = first + j;
                unsigned p = f.gather ? __ldg(f.gather + i) : i;
                code[j] = frame_sample(surf, f, p);
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Transform-coded (format v2, `rans` variant) sections: entropy decoding and the inverse
// transform. The Rust host side is daemon/src/gpu/rans.rs; the CPU reference is the codec's
// rans::decode_values (stream format in docs/FORMAT.md, "rANS value streams") and
// transform::inverse. Three steps per section, all on the section's stream:
//   kvf_rans_build_luts     frequency tables -> 4096-entry slot -> symbol tables (bytes)
//   kvf_rans_decode         one warp per rANS block -> int16 levels in scratch, error flag
//   (host: the error flag is read back; only a clean decode goes on to write the engine's buffer)
//   kvf_inverse_transform   levels -> y = level * step -> mean + sum_k basis[k] y_k -> RoPE
//   kvf_restore_sinks       the sink rows' raw 16-bit values, converted to the target type
// ---------------------------------------------------------------------------------------------

#define KVF_RANS_L (1u << 16)
#define KVF_PROB_BITS 12
#define KVF_PROB_SCALE (1u << KVF_PROB_BITS)
#define KVF_ESCAPE 255u

// Error bits of RansDecode::err[0] (err[1] is the first failing block, atomicMin).
#define KVF_RANS_EXHAUSTED 1u     // a lane needed a word past the block's words
#define KVF_RANS_BAD_ESCAPE 2u    // an escaped value below 255
#define KVF_RANS_FINAL_STATE 4u   // a final state is not 2^16
#define KVF_RANS_WORDS_LEFT 8u    // words left over

// Builds the decoder's slot -> symbol table of every table: `freq_cum[t][s]` is freq | cum << 16
// (host validated: frequencies sum to 4096). The symbol owning each slot is the low byte of the
// CPU's FreqTable::dec_entries (its Rust mirror is rans.rs `lut_entries`); the decoder reads the
// symbol's freq and cum from freq_cum, so a table is 5 KB and a tensor's tables stay in L1.
extern "C" __global__ void __launch_bounds__(256) kvf_rans_build_luts(const unsigned* __restrict__ freq_cum,
                                                                      uint8_t* __restrict__ luts,
                                                                      unsigned n_tables) {
    __shared__ unsigned fc[256];
    for (unsigned tb = blockIdx.x; tb < n_tables; tb += gridDim.x) {
        __syncthreads();
        fc[threadIdx.x] = freq_cum[(size_t)tb * 256 + threadIdx.x];
        __syncthreads();
        for (unsigned slot = threadIdx.x; slot < KVF_PROB_SCALE; slot += blockDim.x) {
            // The last symbol whose cum is <= slot is the one owning the slot (cum[0] = 0;
            // symbols of frequency 0 share the cum of the next symbol with a nonzero one).
            unsigned lo = 0, hi = 255;
            while (lo < hi) {
                unsigned mid = (lo + hi + 1) / 2;
                if ((fc[mid] >> 16) <= slot) lo = mid; else hi = mid - 1;
            }
            luts[(size_t)tb * KVF_PROB_SCALE + slot] = (uint8_t)lo;
        }
    }
}

// One rANS block as the decoder sees it. Must match RansBlockArgs in rans.rs field for field.
struct RansBlock {
    unsigned long long words;  // byte offset of the block's first word in `words`
    unsigned long long out;    // element index of its first value in `levels`
    unsigned n_words, n_values;
    unsigned lut;              // slot index of its tensor's table 0 in `luts` (table * 4096)
    unsigned ctx;              // index of its tensor's column 0 in `contexts`
    unsigned first_col;        // column of its first value
    unsigned pad_;
};

// Must match RansDecodeArgs in rans.rs.
struct RansDecode {
    const RansBlock* blocks;
    const unsigned* states;    // [blocks][32] initial states
    const uint8_t* luts;       // [tables][4096] symbol of each slot
    const unsigned* freq_cum;  // [tables][256] freq | cum << 16 of each symbol
    const uint8_t* contexts;   // [tensors][cols] coder context of each column
    const uint8_t* words;      // the section payload (words at any byte offset)
    short* levels;             // [tensors][non-sink rows][cols] decoded levels
    unsigned* err;             // [0]: error bits, [1]: first failing block (host sets ~0)
    unsigned n_blocks, cols;
};

__device__ __forceinline__ unsigned rans_word(const uint8_t* __restrict__ w, unsigned long long i) {
    return (unsigned)__ldg(w + 2 * i) | ((unsigned)__ldg(w + 2 * i + 1) << 8);
}

// Slides the word window by 32 once the warp has consumed that many (pos is warp-uniform, so
// every lane slides together); words past the block's end read as 0 and are never consumed
// (the decoder checks pos against n_words before it takes any).
__device__ __forceinline__ void rans_slide(const uint8_t* __restrict__ w, unsigned n_words,
                                           unsigned lane, unsigned pos, unsigned& base,
                                           unsigned& cur, unsigned& nxt) {
    if (pos - base >= 32) {
        cur = nxt;
        base += 32;
        unsigned i = base + 32 + lane;
        nxt = i < n_words ? rans_word(w, i) : 0u;
    }
}

__device__ __forceinline__ void rans_fail(const RansDecode& a, unsigned block, unsigned why) {
    atomicOr(a.err, why);
    atomicMin(a.err + 1, block);
}

// One warp per block, lane l = the block's interleaved state l. Per step of 32 values (the last
// may be partial: only its first lanes take part): every lane decodes its symbol and updates its
// state; lanes below 2^16 take one word each in lane order; then escaped lanes take one raw word
// each in lane order. Word ranks come from ballots, so the warp reads words in exactly the
// CPU decoder's order. The words come from a window of 64 held in registers (word base + l in
// `cur`, base + 32 + l in `nxt`) and are passed between lanes by shuffles; the window slides by
// 32 once that many are consumed, loading the next 32 words coalesced, steps before they are
// needed, so no memory read sits on the states' dependency chain. Integrity: a lane never reads past the block's words, and at the end
// every state is 2^16 and every word was consumed; any failure sets the error flag (the levels
// are then garbage, and the host never lets them reach the engine's buffer).
extern "C" __global__ void __launch_bounds__(256) kvf_rans_decode(RansDecode a) {
    unsigned lane = threadIdx.x & 31;
    unsigned warps = (gridDim.x * blockDim.x) >> 5;
    unsigned lt = (1u << lane) - 1;
    for (unsigned b = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; b < a.n_blocks; b += warps) {
        RansBlock blk = a.blocks[b];
        const uint8_t* __restrict__ w = a.words + blk.words;
        const uint8_t* __restrict__ ctxs = a.contexts + blk.ctx;
        const uint8_t* __restrict__ lut = a.luts + blk.lut;
        const unsigned* __restrict__ fcum = a.freq_cum + blk.lut / KVF_PROB_SCALE * 256;
        short* out = a.levels + blk.out;
        unsigned x = a.states[(size_t)b * 32 + lane];
        unsigned col = blk.first_col + lane;
        while (col >= a.cols) col -= a.cols;
        unsigned pos = 0;  // words consumed (the same in every lane)
        bool bad = false;  // warp-uniform
        unsigned wbase = 0;  // the window's first word (a multiple of 32, wbase <= pos < wbase + 32)
        unsigned cur = lane < blk.n_words ? rans_word(w, lane) : 0u;
        unsigned nxt = 32 + lane < blk.n_words ? rans_word(w, 32 + lane) : 0u;
        // The lane's context is loaded a step ahead: off the state's dependency chain.
        unsigned ctx = __ldg(ctxs + col);
        for (unsigned base = 0; base < blk.n_values && !bad; base += 32) {
            unsigned idx = base + lane;
            bool active = idx < blk.n_values;
            unsigned sym = 0;
            if (active) {
                unsigned slot = x & (KVF_PROB_SCALE - 1);
                sym = __ldg(lut + (ctx << KVF_PROB_BITS) + slot);
                unsigned fc = __ldg(fcum + (ctx << 8) + sym);
                x = (fc & 0xffff) * (x >> KVF_PROB_BITS) + slot - (fc >> 16);
            }
            bool need = active && x < KVF_RANS_L;
            unsigned m = __ballot_sync(0xffffffffu, need);
            unsigned n = __popc(m);
            if (pos + n > blk.n_words) {
                if (lane == 0) rans_fail(a, b, KVF_RANS_EXHAUSTED);
                bad = true;
                break;
            }
            unsigned r = pos + __popc(m & lt) - wbase;  // < 64 (pos - wbase < 32, rank < 32)
            unsigned lo = __shfl_sync(0xffffffffu, cur, r & 31);
            unsigned hi = __shfl_sync(0xffffffffu, nxt, r & 31);
            if (need) x = (x << 16) | (r < 32 ? lo : hi);
            pos += n;
            rans_slide(w, blk.n_words, lane, pos, wbase, cur, nxt);
            bool esc = active && sym == KVF_ESCAPE;
            m = __ballot_sync(0xffffffffu, esc);
            n = __popc(m);
            if (pos + n > blk.n_words) {
                if (lane == 0) rans_fail(a, b, KVF_RANS_EXHAUSTED);
                bad = true;
                break;
            }
            unsigned z = sym;
            r = pos + __popc(m & lt) - wbase;
            lo = __shfl_sync(0xffffffffu, cur, r & 31);
            hi = __shfl_sync(0xffffffffu, nxt, r & 31);
            if (esc) z = r < 32 ? lo : hi;
            pos += n;
            rans_slide(w, blk.n_words, lane, pos, wbase, cur, nxt);
            if (__any_sync(0xffffffffu, esc && z < KVF_ESCAPE)) {
                if (lane == 0) rans_fail(a, b, KVF_RANS_BAD_ESCAPE);
                bad = true;
                break;
            }
            // Unzigzag: 0, 1, 2, 3, ... -> 0, -1, 1, -2, ...
            int q = (int)(z >> 1) ^ -(int)(z & 1);
            if (active) out[idx] = (short)q;
            col += 32;
            while (col >= a.cols) col -= a.cols;
            ctx = __ldg(ctxs + col);
        }
        if (bad) continue;
        if (!__all_sync(0xffffffffu, x == KVF_RANS_L)) {
            if (lane == 0) rans_fail(a, b, KVF_RANS_FINAL_STATE);
        } else if (pos != blk.n_words) {
            if (lane == 0) rans_fail(a, b, KVF_RANS_WORDS_LEFT);
        }
    }
}

// Must match TransformArgs in rans.rs.
struct TransformArgs {
    const short* levels;       // [tensors][rows][cols] (non-sink rows only)
    const float* steps;        // [tensors] quantizer step of each section tensor
    const float* bases;        // profile: [layers * 2][heads][head_dim][head_dim], row k = component k
    const float* means;        // profile: [layers * 2][heads][head_dim]
    const float* cos_table;    // [positions][pairs]: level row r at position rope_first + r
    const float* sin_table;
    const unsigned* err;       // the decoder's error flag: set, and nothing is written
    unsigned rows;             // non-sink rows
    unsigned sink_rows;        // target row of level row 0
    unsigned cols, heads, head_dim;
    unsigned tensor0;          // profile tensor (2 * layer + kv) of section tensor 0
    unsigned rope_style;       // 0: none, 1: adjacent pairs (2i, 2i+1), 2: halves (i, i + dims/2)
    unsigned rope_dims;        // rotated channels per head (even)
    unsigned chunk_dtype;      // 0: f16, 1: bf16 (the CPU rounds to it before any conversion)
    unsigned tile_rows;        // rows per thread block: 4 * (256 / (head_dim / 4))
    unsigned rope_first;       // table row of level row 0
    unsigned pad_;
};

// The value the CPU path leaves in the engine's buffer: rounded (RNE) to the chunk's dtype,
// then converted (RNE) to the target's; target == chunk dtype, or f32, rounds once.
__device__ __forceinline__ float round_to_chunk(float v, unsigned chunk_dtype) {
    return chunk_dtype == 0 ? __half2float(__float2half_rn(v)) : __bfloat162float(__float2bfloat16_rn(v));
}

// Stores 4 consecutive elements (element offset `off`, a multiple of 4) in the target dtype.
__device__ __forceinline__ void store4(const RestoreTarget& t, char* base, unsigned long long off,
                                       const float (&v)[4]) {
    if (t.dtype == 2) {
        *reinterpret_cast<float4*>(base + off * 4) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
        union { uint2 u; unsigned short h[4]; } pk;
        if (t.dtype == 0) {
#pragma unroll
            for (int j = 0; j < 4; j++) pk.h[j] = __half_as_ushort(__float2half_rn(v[j]));
        } else {
#pragma unroll
            for (int j = 0; j < 4; j++) pk.h[j] = __bfloat16_as_ushort(__float2bfloat16_rn(v[j]));
        }
        *reinterpret_cast<uint2*>(base + off * 2) = pk.u;
    }
}

// Largest shared tile: head_dim x (tile_rows + 4) floats, at most 8192 for head_dim <= 1024.
#define KVF_TILE_FLOATS 8192

// The inverse transform of one (tensor, head, tile of rows): the tile's coefficients y =
// (float)level * step go to shared memory (transposed: [k][row]); thread (rg, cg) computes rows
// 4rg..4rg+3 x channels 4cg..4cg+3 as mean[j], then x + basis[k][j] * y_k (product rounded,
// then the sum: __fmul_rn/__fadd_rn, never fused) for k ascending, skipping y_k == 0 exactly as
// transform::inverse does (adding a +0 product would turn a -0 mean into +0); K then gets RoPE redone from the host's f32 cos/sin table with the
// CPU's operation order (Rope::rotate). Launch: grid (row tiles * heads, tensors), 256 threads.
extern "C" __global__ void __launch_bounds__(256) kvf_inverse_transform(TransformArgs a, RestoreTarget t) {
    __shared__ __align__(16) float sh[KVF_TILE_FLOATS];
    // The decode ran before on this stream: a flagged section writes nothing.
    if (*(volatile const unsigned*)a.err != 0) return;
    unsigned tensor = blockIdx.y;
    unsigned head = blockIdx.x % a.heads, tile = blockIdx.x / a.heads;
    unsigned d = a.head_dim, cgs = d / 4, tm = a.tile_rows, ld = tm + 4;
    unsigned row0 = tile * tm;
    unsigned tid = threadIdx.x;
    unsigned cg = tid % cgs, rg = tid / cgs;
    bool active = rg * 4 < tm;
    float step = a.steps[tensor];
    const short* lv = a.levels + (size_t)tensor * a.rows * a.cols + head * d;
    for (unsigned i = tid; i < tm * d; i += blockDim.x) {
        unsigned r = i / d, k = i - r * d, row = row0 + r;
        short q = row < a.rows ? lv[(size_t)row * a.cols + k] : (short)0;
        sh[k * ld + r] = __fmul_rn((float)q, step);
    }
    __syncthreads();
    unsigned ptensor = a.tensor0 + tensor;
    size_t hb = (size_t)ptensor * a.heads + head;
    unsigned c0 = cg * 4;
    float acc[4][4];
    if (active) {
        float4 m = __ldg(reinterpret_cast<const float4*>(a.means + hb * d + c0));
#pragma unroll
        for (int r = 0; r < 4; r++) {
            acc[r][0] = m.x; acc[r][1] = m.y; acc[r][2] = m.z; acc[r][3] = m.w;
        }
        const float* B = a.bases + hb * d * d + c0;
#pragma unroll 4
        for (unsigned k = 0; k < d; k++) {
            float4 b = __ldg(reinterpret_cast<const float4*>(B + (size_t)k * d));
            float4 y4 = *reinterpret_cast<const float4*>(&sh[k * ld + rg * 4]);
            float y[4] = {y4.x, y4.y, y4.z, y4.w};
#pragma unroll
            for (int r = 0; r < 4; r++) {
                if (y[r] != 0.0f) {
                    acc[r][0] = __fadd_rn(acc[r][0], __fmul_rn(b.x, y[r]));
                    acc[r][1] = __fadd_rn(acc[r][1], __fmul_rn(b.y, y[r]));
                    acc[r][2] = __fadd_rn(acc[r][2], __fmul_rn(b.z, y[r]));
                    acc[r][3] = __fadd_rn(acc[r][3], __fmul_rn(b.w, y[r]));
                }
            }
        }
    }
    bool rope = (tensor % 2 == 0) && a.rope_style != 0;
    if (rope) {
        // Every thread's x to shared ([row][channel]), then each output reads its pair partner.
        __syncthreads();
        if (active) {
#pragma unroll
            for (int r = 0; r < 4; r++) {
                *reinterpret_cast<float4*>(&sh[(rg * 4 + r) * d + c0]) =
                    make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
            }
        }
        __syncthreads();
        if (active) {
            unsigned pairs = a.rope_dims / 2;
#pragma unroll
            for (int r = 0; r < 4; r++) {
                unsigned row = row0 + rg * 4 + r;
                if (row >= a.rows) break;
                const float* xr = &sh[(rg * 4 + r) * d];
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    unsigned j = c0 + c;
                    if (j >= a.rope_dims) continue;
                    unsigned i, pa, pb;
                    if (a.rope_style == 2) {
                        i = j < pairs ? j : j - pairs;
                        pa = i;
                        pb = i + pairs;
                    } else {
                        i = j / 2;
                        pa = 2 * i;
                        pb = 2 * i + 1;
                    }
                    size_t at = (size_t)(a.rope_first + row) * pairs + i;
                    float cs = __ldg(a.cos_table + at), sn = __ldg(a.sin_table + at);
                    float xa = xr[pa], xb = xr[pb];
                    // Rope::rotate: a = x * c - y * s; b = y * c + x * s (no fused ops)
                    acc[r][c] = j == pa ? __fsub_rn(__fmul_rn(xa, cs), __fmul_rn(xb, sn))
                                        : __fadd_rn(__fmul_rn(xb, cs), __fmul_rn(xa, sn));
                }
            }
        }
    }
    if (!active) return;
    char* base = reinterpret_cast<char*>(t.out_ptrs[tensor]);
#pragma unroll
    for (int r = 0; r < 4; r++) {
        unsigned row = row0 + rg * 4 + r;
        if (row >= a.rows) break;
        float v[4];
#pragma unroll
        for (int c = 0; c < 4; c++) v[c] = round_to_chunk(acc[r][c], a.chunk_dtype);
        store4(t, base, target_offset(t, a.sink_rows + row, head, c0), v);
    }
}

// The sink rows: raw 16-bit values of the chunk's dtype ([tensors][sink_rows][cols], the first
// bytes of the payload), converted to the target dtype; nothing when the decoder flagged the
// section (a corrupt section leaves the engine's buffer as it was). Grid-stride over groups of 4 columns;
// launch with gridDim.y = tensors.
extern "C" __global__ void __launch_bounds__(256) kvf_restore_sinks(const uint16_t* __restrict__ raw,
                                                                    unsigned sink_rows,
                                                                    unsigned chunk_dtype,
                                                                    const unsigned* err,
                                                                    RestoreTarget t) {
    if (*(volatile const unsigned*)err != 0) return;
    unsigned tensor = blockIdx.y;
    unsigned per_row = t.cols / 4;
    unsigned groups = sink_rows * per_row;
    char* base = reinterpret_cast<char*>(t.out_ptrs[tensor]);
    const uint2* src = reinterpret_cast<const uint2*>(raw + (size_t)tensor * sink_rows * t.cols);
    for (unsigned g = blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += gridDim.x * blockDim.x) {
        unsigned row = g / per_row, col = (g - row * per_row) * 4;
        unsigned head = fdiv(t.by_head_dim, col), d = col - head * t.head_dim;
        uint2 w = __ldg(src + g);
        unsigned short h[4] = {(unsigned short)(w.x & 0xffff), (unsigned short)(w.x >> 16),
                               (unsigned short)(w.y & 0xffff), (unsigned short)(w.y >> 16)};
        float v[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            v[j] = chunk_dtype == 0 ? __half2float(__ushort_as_half(h[j]))
                                    : __bfloat162float(__ushort_as_bfloat16(h[j]));
        }
        store4(t, base, target_offset(t, row, head, d), v);
    }
}

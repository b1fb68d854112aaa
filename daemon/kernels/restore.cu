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

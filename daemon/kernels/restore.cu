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
};

// Where the decoded surfaces are. Must match FrameSourceArgs in restore.rs.
struct FrameSource {
    const unsigned int* gather;  // code index -> planar sample index; null: identity
    unsigned int width, height;
    unsigned int chroma444;      // 1: 4:4:4 planar; 0: 4:2:0 with interleaved UV
    unsigned int bytes_per_sample;
    unsigned int shift;          // 16 - bit_depth for 2-byte samples (MSB-aligned), else 0
    unsigned int pad_;
};

__device__ __forceinline__ unsigned long long target_offset(const RestoreTarget& t, unsigned row,
                                                            unsigned col) {
    unsigned token = t.token_offset + row;
    unsigned head = col / t.head_dim, d = col - head * t.head_dim;
    if (t.block_table) {
        unsigned blk = token / t.block_size, slot = token - blk * t.block_size;
        unsigned long long phys = (unsigned long long)(unsigned)t.block_table[blk];
        if (t.layout == 0) return ((phys * t.block_size + slot) * t.heads + head) * t.head_dim + d;
        return ((phys * t.heads + head) * t.block_size + slot) * t.head_dim + d;
    }
    if (t.layout == 0) return ((unsigned long long)token * t.heads + head) * t.head_dim + d;
    return ((unsigned long long)head * t.target_tokens + token) * t.head_dim + d;
}

// Dequantizes 8 codes of one row, columns col..col+7 (col % 8 == 0, head_dim % 8 == 0), and
// stores them with one or two 16-byte stores.
__device__ __forceinline__ void store8(const RestoreTarget& t, unsigned tensor, unsigned row,
                                       unsigned col, const unsigned (&code)[8]) {
    float v[8];
    if (t.grouping == 0) {
        const float4* s4 = reinterpret_cast<const float4*>(t.scales + (size_t)tensor * t.cols + col);
        const float4* m4 = reinterpret_cast<const float4*>(t.mins + (size_t)tensor * t.cols + col);
        float4 s0 = __ldg(s4), s1 = __ldg(s4 + 1), m0 = __ldg(m4), m1 = __ldg(m4 + 1);
        float s[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
        float m[8] = {m0.x, m0.y, m0.z, m0.w, m1.x, m1.y, m1.z, m1.w};
#pragma unroll
        for (int j = 0; j < 8; j++) v[j] = fmaf((float)code[j], s[j], m[j]);
    } else {
        float s = __ldg(t.scales + (size_t)tensor * t.rows + row);
        float m = __ldg(t.mins + (size_t)tensor * t.rows + row);
#pragma unroll
        for (int j = 0; j < 8; j++) v[j] = fmaf((float)code[j], s, m);
    }
    unsigned long long off = target_offset(t, row, col);
    char* base = reinterpret_cast<char*>(t.out_ptrs[tensor]);
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

// Splits the index of group g (8 codes) into tensor, row and first column, in 32-bit math
// (the host checks that tensors * rows * cols / 8 fits 32 bits).
__device__ __forceinline__ void split(const RestoreTarget& t, unsigned g, unsigned& tensor,
                                      unsigned& row, unsigned& col) {
    unsigned per_row = t.cols / 8;
    unsigned r = g / per_row;
    col = (g - r * per_row) * 8;
    tensor = r / t.rows;
    row = r - tensor * t.rows;
}

// Codes already in device memory as u16 [tensors][rows][cols].
extern "C" __global__ void __launch_bounds__(256) kvf_restore_codes(const uint16_t* __restrict__ codes,
                                                                    RestoreTarget t) {
    unsigned long long groups = (unsigned long long)t.tensors * t.rows * t.cols / 8;
    for (unsigned long long g = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; g < groups;
         g += (unsigned long long)gridDim.x * blockDim.x) {
        uint4 raw = __ldg(reinterpret_cast<const uint4*>(codes) + g);
        unsigned code[8] = {raw.x & 0xffff, raw.x >> 16, raw.y & 0xffff, raw.y >> 16,
                            raw.z & 0xffff, raw.z >> 16, raw.w & 0xffff, raw.w >> 16};
        unsigned tensor, row, col;
        split(t, (unsigned)g, tensor, row, col);
        store8(t, tensor, row, col, code);
    }
}

// Codes bit-packed LSB-first at `bits` (the `packed` variant), straight from a host-to-device copy.
extern "C" __global__ void __launch_bounds__(256) kvf_restore_packed(const uint8_t* __restrict__ packed,
                                                                     unsigned long long packed_len,
                                                                     unsigned bits, RestoreTarget t) {
    unsigned long long groups = (unsigned long long)t.tensors * t.rows * t.cols / 8;
    unsigned mask = (1u << bits) - 1;
    for (unsigned long long g = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; g < groups;
         g += (unsigned long long)gridDim.x * blockDim.x) {
        // 8 codes of `bits` bits start at a byte boundary: g * bits bytes.
        unsigned long long byte0 = g * bits;
        unsigned long long acc_lo = 0, acc_hi = 0;  // up to 128 bits
        unsigned words = (bits + 3) / 4;
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
        unsigned code[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            unsigned s = j * bits;
            unsigned long long w;
            if (s >= 64) w = acc_hi >> (s - 64);
            else if (s == 0) w = acc_lo;
            else w = (acc_lo >> s) | (acc_hi << (64 - s));
            code[j] = (unsigned)w & mask;
        }
        unsigned tensor, row, col;
        split(t, (unsigned)g, tensor, row, col);
        store8(t, tensor, row, col, code);
    }
}

__device__ __forceinline__ unsigned frame_sample(const uint8_t* __restrict__ surf, const FrameSource& f,
                                                 unsigned long long p) {
    unsigned long long luma = (unsigned long long)f.width * f.height;
    unsigned long long cn = f.chroma444 ? luma : luma / 4;
    unsigned long long spf = luma + 2 * cn;
    unsigned long long frame = p / spf, q = p % spf, off;
    if (q < luma || f.chroma444) {
        off = frame * spf + q;
    } else {
        unsigned long long k = q - luma;
        unsigned long long plane = k / cn, j = k % cn;
        off = frame * spf + luma + 2 * j + plane;
    }
    if (f.bytes_per_sample == 1) return __ldg(surf + off);
    return (unsigned)__ldg(reinterpret_cast<const uint16_t*>(surf) + off) >> f.shift;
}

// Reads 8 consecutive codes starting at planar sample p (p % 8 == 0) with wide loads where the
// surface layout allows it; false when it does not (plane edge, misalignment).
__device__ __forceinline__ bool frame_samples8(const uint8_t* __restrict__ surf, const FrameSource& f,
                                               unsigned long long p, unsigned (&code)[8]) {
    unsigned long long luma = (unsigned long long)f.width * f.height;
    unsigned long long cn = f.chroma444 ? luma : luma / 4;
    unsigned long long spf = luma + 2 * cn;
    unsigned long long frame = p / spf, q = p - frame * spf;
    unsigned long long base = frame * spf;
    bool planar = f.chroma444 || q < luma;
    unsigned long long off;
    if (planar) {
        unsigned long long plane_end = q < luma ? luma : (q < luma + cn ? luma + cn : spf);
        if (q + 8 > plane_end) return false;
        off = base + q;
    } else {
        unsigned long long k = q - luma, plane = k / cn, j = k - plane * cn;
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
            const uint4* s4 = reinterpret_cast<const uint4*>(surf + off * 2);
            uint4 a = __ldg(s4), b = __ldg(s4 + 1);
            unsigned w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 8; i++) code[i] = ((w[i] >> (16 * plane)) & 0xffff) >> f.shift;
        }
        return true;
    }
    if (f.bytes_per_sample == 1) {
        if (off % 8) return false;
        uint2 v = __ldg(reinterpret_cast<const uint2*>(surf + off));
#pragma unroll
        for (int i = 0; i < 4; i++) {
            code[i] = (v.x >> (8 * i)) & 0xff;
            code[i + 4] = (v.y >> (8 * i)) & 0xff;
        }
    } else {
        if ((off * 2) % 16) return false;
        uint4 v = __ldg(reinterpret_cast<const uint4*>(surf + off * 2));
        unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 8; i++) code[i] = ((w[i / 2] >> (16 * (i % 2))) & 0xffff) >> f.shift;
    }
    return true;
}

// Codes read from NVDEC's decoded surfaces (packed without pitch, see nvdec.rs DeviceFrames).
extern "C" __global__ void __launch_bounds__(256) kvf_restore_frames(const uint8_t* __restrict__ surf,
                                                                     FrameSource f, RestoreTarget t) {
    unsigned long long groups = (unsigned long long)t.tensors * t.rows * t.cols / 8;
    for (unsigned long long g = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; g < groups;
         g += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned code[8];
        if (f.gather || !frame_samples8(surf, f, g * 8, code)) {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                unsigned long long i = g * 8 + j;
                unsigned long long p = f.gather ? f.gather[i] : i;
                code[j] = frame_sample(surf, f, p);
            }
        }
        unsigned tensor, row, col;
        split(t, (unsigned)g, tensor, row, col);
        store8(t, tensor, row, col, code);
    }
}

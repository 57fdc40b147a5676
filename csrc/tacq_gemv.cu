// CUDA decode GEMV for format-v1 layers, M = 1..8: y = x @ (dequant(D) + S)^T + bias.
// docs/cuda.md explains the algorithm; tacq_decode.cuh the decode; tacq_gemv.h the interface.
//
// Three launches per call (plus one per further segment):
//   prep      x -> fp16, permuted into each segment's order, zero-padded to 32-row chunks and
//             laid out in pair order (x[t], x[t+8]); per chunk the sum of those fp16 values;
//             and x in fp32, original order, for the CSR part.
//   segment   per segment: block (column tile of 128, K split s) streams its chunks of plane
//             words, 4 columns per thread (one 128-bit load per plane word row), decodes two
//             codes per LOP3 + HFMA2 into the fp16 pair q - c (centred; bf16 x at M = 1: SHF +
//             LOP3 into 2^b + q) and multiplies with one HFMA2 per pair,
//             flushes the fp16x2 sums to fp32 once per 32-row chunk, applies scale and zero per
//             group (or once at the end for one group per row), adds its share of the CSR
//             entries, reduces its 4 warps in shared memory and adds to the fp32 output.
//   finalize  out = out32 + bias, cast to x's dtype.
// No torch headers: this file compiles on its own (the compile-matrix test builds it for
// sm_80, 86, 89 and 90).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "tacq_decode.cuh"
#include "tacq_gemv.h"

namespace tacq {

namespace {

constexpr int kThreads = 32 * kWarps;
constexpr int kCols = 4;  // consecutive output columns per thread: one uint4 per plane word row

enum Mode { kOneGroup = 0, kGrouped = 1, kGeneric = 2 };

// half2 bits of the centred decode's register scales (tacq_decode.cuh), read once before the
// chunk loop: written as immediates, ptxas rebuilt them inside the loop on every iteration (MOV +
// PRMT, 0.03-0.1 instructions per weight). Row b - 2: 2 and 4 bits, the low-plane scales 2^-p
// (their HFMA2 takes the offset as its immediate); 3 bits, the q1 scales 4 2^-t (the low-plane
// scale is the immediate there, the HFMA2's addend being a register).
#define TACQ_SCALES(b) \
  { reg_scale_bits(b, 0), reg_scale_bits(b, 1), reg_scale_bits(b, 2), reg_scale_bits(b, 3), \
    reg_scale_bits(b, 4), reg_scale_bits(b, 5), reg_scale_bits(b, 6), reg_scale_bits(b, 7) }
__constant__ uint32_t kDecodeScale[3][8] = {TACQ_SCALES(2), TACQ_SCALES(3), TACQ_SCALES(4)};
#undef TACQ_SCALES

struct PrepSegs {
  int n;
  int start[kMaxSegments], k[kMaxSegments], bits[kMaxSegments], chunk_offset[kMaxSegments];
};

__device__ __forceinline__ __half2 as_half2(uint32_t v) {
  __half2 r;
  memcpy(&r, &v, 4);
  return r;
}

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ uint32_t lane_of(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

__device__ __forceinline__ float half_at(const uint16_t* p, long i) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p) + i)));
}

// grid (chunks_total, MT), block 32: thread i writes position i of chunk blockIdx.x of row blockIdx.y.
template <typename T>
__global__ void __launch_bounds__(32) prep_kernel(const T* __restrict__ x, int64_t ldx, const int32_t* __restrict__ perm,
                                                  PrepSegs segs, int m, int k_total, int chunks_total,
                                                  __half* __restrict__ xp, float* __restrict__ xsum,
                                                  float* __restrict__ xf) {
  const int c = blockIdx.x, r = blockIdx.y, i = threadIdx.x;
  int s = 0;
  while (s + 1 < segs.n && c >= segs.chunk_offset[s + 1]) ++s;
  const int row = (c - segs.chunk_offset[s]) * 32 + xprep_row(segs.bits[s], i);
  float v = 0.0f;
  if (r < m) {
    if (row < segs.k[s]) {
      int col = segs.start[s] + row;
      if (perm != nullptr) col = __ldg(perm + col);
      v = to_float(x[r * ldx + col]);
    }
    const int kk = c * 32 + i;
    if (kk < k_total) xf[(int64_t)r * k_total + kk] = to_float(x[r * ldx + kk]);
  }
  const __half h = __float2half_rn(v);
  xp[(int64_t)r * chunks_total * 32 + c * 32 + i] = h;
  float f = __half2float(h);
#pragma unroll
  for (int o = 16; o; o >>= 1) f += __shfl_xor_sync(0xffffffffu, f, o);
  if (i == 0) xsum[(int64_t)r * chunks_total + c] = f;
}

// CENTRED: the pairs are q - c (tacq_decode.cuh, the centred decode); fp16 partial sums then stay
// small (5-7e-4 relative error at K = 4096). Uncentred (pairs 2^b + q, the offset removed with the
// sums of x at the end) is 0.06-0.3 instructions per weight cheaper but its error is 2.4-3.4e-3:
// launched only for bf16 x at M = 1, where bf16's own rounding (3.9e-3) is larger.
template <int BITS, int MODE, int MT, bool CENTRED>
__global__ void __launch_bounds__(kThreads, 1) gemv_kernel(GemvArgs a, Segment s, int with_sparse) {
  constexpr int WORDS = BITS == 4 ? 4 : 2;         // low-plane word rows per 32-row chunk
  constexpr int R = rows_per_word(BITS);           // K rows per word
  constexpr int P = pairs_per_word(BITS);          // fp16 pairs per word
  constexpr float CEN = CENTRED ? decode_center(BITS) : -magic_value(BITS);  // the pairs hold q - CEN
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int N = a.n;
  const int n0 = blockIdx.x * kBlockN + lane * kCols;
  const bool live = n0 < N;  // N % 4 == 0: a thread's 4 columns are all in or all out
  const int nchunks = (s.k + 31) >> 5;
  const int per = (nchunks + gridDim.y - 1) / gridDim.y;
  const int c_begin = blockIdx.y * per;
  const int c_end = min(c_begin + per, nchunks);
  const int64_t xstride = (int64_t)a.chunks_total * 32;
  const __half* __restrict__ xp = reinterpret_cast<const __half*>(a.xp) + (int64_t)s.chunk_offset * 32;
  const float* __restrict__ xsum = a.xsum + s.chunk_offset;

  float acc[MT][kCols];
  float xs[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    xs[m] = 0.0f;
#pragma unroll
    for (int j = 0; j < kCols; ++j) acc[m][j] = 0.0f;
  }

  uint32_t dscale[P];  // the register scales of the centred decode (kDecodeScale)
#pragma unroll
  for (int t = 0; t < P; ++t) dscale[t] = CENTRED ? kDecodeScale[BITS - 2][t] : 0u;

  if (live) {
    // Pointers bumped once per chunk (no 64-bit address arithmetic per load in the loop).
    const int c_first = c_begin + warp;
    const int64_t lo_step = (int64_t)WORDS * N / 4, hi_step = (int64_t)kWarps * N / 4;  // in uint4
    const uint4* plo = reinterpret_cast<const uint4*>(s.q_lo + (int64_t)c_first * WORDS * N + n0);
    const uint4* phi = reinterpret_cast<const uint4*>((BITS == 3 ? s.q_hi : s.q_lo) + (int64_t)c_first * N + n0);
    const uint4* px = reinterpret_cast<const uint4*>(xp + (int64_t)c_first * 32);  // 4 uint4 per chunk
    const float* pxs = xsum + c_first;
    for (int c = c_first; c < c_end;
         c += kWarps, plo += kWarps * lo_step, phi += hi_step, px += 4 * kWarps, pxs += kWarps) {
      uint4 w[WORDS];
#pragma unroll
      for (int i = 0; i < WORDS; ++i)
        if (MODE != kGeneric) w[i] = __ldg(plo + i * (N / 4));
      uint4 hw = make_uint4(0, 0, 0, 0);
      if (BITS == 3) hw = __ldg(phi);

      if (MODE != kGeneric) {
        __half2 h[MT][kCols];
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int j = 0; j < kCols; ++j) h[m][j] = __float2half2_rn(0.0f);
#pragma unroll
        for (int wi = 0; wi < WORDS; ++wi) {
          __half2 dc[P][kCols];  // centred: q - c (docs/cuda.md); uncentred: 2^b + q. Shared by the M rows.
#pragma unroll
          for (int j = 0; j < kCols; ++j) {
            const uint32_t lo = lane_of(w[wi], j);
            const uint32_t u1 = BITS == 3 ? spread_q1(lane_of(hw, j), wi) : 0u;
            if constexpr (CENTRED) {  // one LOP3 + one HFMA2 per pair (3 bits: two of each)
              const uint32_t src[2] = {lo_src0(BITS, lo), lo_src1(BITS, lo)};
#pragma unroll
              for (int t = 0; t < P; ++t) {
                const __half2 raw = as_half2(lo_raw(BITS, src[lo_source(BITS, t)], t));
                if constexpr (BITS == 3) {
                  const __half2 e = __hfma2(as_half2(q1_raw(u1, t)), as_half2(dscale[t]),
                                            __float2half2_rn(q1_offset(t)));
                  dc[t][j] = __hfma2(raw, __float2half2_rn(lo_scale(BITS, t)), e);
                } else {
                  dc[t][j] = __hfma2(raw, as_half2(dscale[t]), __float2half2_rn(lo_offset(BITS, t)));
                }
              }
            } else {
#pragma unroll
              for (int t = 0; t < P; ++t)
                dc[t][j] = as_half2(BITS == 2 ? pair2(lo, t) : BITS == 3 ? pair3(lo, u1, t) : pair4(lo, t));
            }
          }
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            const uint4* xq = px + m * (xstride / 8) + wi * (R / 8);
            uint4 xv[R / 8];
#pragma unroll
            for (int i = 0; i < R / 8; ++i) xv[i] = __ldg(xq + i);
#pragma unroll
            for (int t = 0; t < P; ++t) {
              const __half2 xt = as_half2(lane_of(xv[t >> 2], t & 3));
#pragma unroll
              for (int j = 0; j < kCols; ++j) h[m][j] = __hfma2(dc[t][j], xt, h[m][j]);
            }
          }
        }
        // Flush the chunk's fp16x2 partial sums (16 products per half) to fp32.
        if (MODE == kOneGroup) {
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            xs[m] += __ldg(pxs + m * a.chunks_total);
#pragma unroll
            for (int j = 0; j < kCols; ++j) acc[m][j] += __low2float(h[m][j]) + __high2float(h[m][j]);
          }
        } else {  // kGrouped: group_size % 32 == 0, so the chunk lies in one group
          const int64_t g = (int64_t)(c * 32 / s.group_size) * N + n0;
          const uint2 sv = __ldg(reinterpret_cast<const uint2*>(s.scale + g));
          const uint2 zv = __ldg(reinterpret_cast<const uint2*>(s.zero + g));
          float sc[kCols], szm[kCols];
#pragma unroll
          for (int j = 0; j < kCols; ++j) {
            const uint32_t sw = j < 2 ? sv.x : sv.y, zw = j < 2 ? zv.x : zv.y;
            const float2 s2 = __half22float2(as_half2(sw)), z2 = __half22float2(as_half2(zw));
            sc[j] = (j & 1) ? s2.y : s2.x;
            szm[j] = sc[j] * (((j & 1) ? z2.y : z2.x) - CEN);
          }
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            const float xc = __ldg(pxs + m * a.chunks_total);
#pragma unroll
            for (int j = 0; j < kCols; ++j)
              acc[m][j] = fmaf(-szm[j], xc, fmaf(sc[j], __low2float(h[m][j]) + __high2float(h[m][j]), acc[m][j]));
          }
        }
      } else {
        // Generic: one code at a time in fp32 (LUT segments; groups not a multiple of 32).
        // A plain loop over the chunk's rows, re-reading the (L1-resident) words: the slow
        // path, kept small.
        const int rows = min(32, s.k - c * 32);
#pragma unroll 1
        for (int row = 0; row < rows; ++row) {
          const int krow = c * 32 + row;
          const uint4 lo4 = __ldg(reinterpret_cast<const uint4*>(s.q_lo + (int64_t)(c * WORDS + row / R) * N + n0));
          float xv[MT];
#pragma unroll
          for (int m = 0; m < MT; ++m) xv[m] = __half2float(xp[m * xstride + c * 32 + xprep_pos(BITS, row)]);
          const int64_t g = s.is_lut ? 0 : (int64_t)(krow / s.group_size) * N + n0;
#pragma unroll
          for (int j = 0; j < kCols; ++j) {
            const uint32_t q = code_at(BITS, lane_of(lo4, j), lane_of(hw, j), row);
            const float wv = s.is_lut ? half_at(s.lut, (int64_t)krow * (1 << BITS) + q)
                                      : affine(q, half_at(s.scale, g + j), half_at(s.zero, g + j));
#pragma unroll
            for (int m = 0; m < MT; ++m) acc[m][j] = fmaf(wv, xv[m], acc[m][j]);
          }
        }
      }
    }

    if (MODE == kOneGroup) {  // y = s * (sum (q - c) x - (z - c) * sum x)
      const uint2 sv = __ldg(reinterpret_cast<const uint2*>(s.scale + n0));
      const uint2 zv = __ldg(reinterpret_cast<const uint2*>(s.zero + n0));
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const float2 s2 = __half22float2(as_half2(j < 2 ? sv.x : sv.y));
        const float2 z2 = __half22float2(as_half2(j < 2 ? zv.x : zv.y));
        const float sc = (j & 1) ? s2.y : s2.x, zm = ((j & 1) ? z2.y : z2.x) - CEN;
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m][j] = sc * fmaf(-zm, xs[m], acc[m][j]);
      }
    }

    if (with_sparse) {  // this block's share of the CSR entries of its columns
      const int part = blockIdx.y * kWarps + warp, parts = gridDim.y * kWarps;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int e_end = __ldg(a.row_ptr + n0 + j + 1);
        for (int e = __ldg(a.row_ptr + n0 + j) + part; e < e_end; e += parts) {
          const int col = a.col_int32 ? __ldg(reinterpret_cast<const int32_t*>(a.col) + e)
                                      : (int)__ldg(reinterpret_cast<const int16_t*>(a.col) + e);
          const float v = half_at(a.val, e);
#pragma unroll
          for (int m = 0; m < MT; ++m)
            if (m < a.m) acc[m][j] = fmaf(v, __ldg(a.xf + (int64_t)m * a.k_total + col), acc[m][j]);
        }
      }
    }
  }

  __shared__ float red[kWarps][MT][kBlockN];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < kCols; ++j) red[warp][m][lane * kCols + j] = acc[m][j];
  __syncthreads();
  const int col = blockIdx.x * kBlockN + threadIdx.x;
  if (col < N) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < a.m) {
        float v = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) v += red[w][m][threadIdx.x];
        atomicAdd(a.out32 + (int64_t)m * N + col, v);
      }
    }
  }
}

template <typename T>
__global__ void finalize_kernel(const float* __restrict__ out32, const uint16_t* __restrict__ bias, T* __restrict__ out,
                                int total, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < total) {
    float v = out32[i];
    if (bias != nullptr) v += half_at(bias, i % n);
    store(out + i, v);
  }
}

template <int BITS, int MODE>
cudaError_t launch_mt(const GemvArgs& a, const Segment& s, dim3 grid, int with_sparse, cudaStream_t stream) {
  switch (rows_bucket(a.m)) {
    case 1:
      if constexpr (MODE != kGeneric) {  // the generic path has no pairs to centre
        if (a.x_bf16) {
          gemv_kernel<BITS, MODE, 1, false><<<grid, kThreads, 0, stream>>>(a, s, with_sparse);
          break;
        }
      }
      gemv_kernel<BITS, MODE, 1, true><<<grid, kThreads, 0, stream>>>(a, s, with_sparse);
      break;
    case 2: gemv_kernel<BITS, MODE, 2, true><<<grid, kThreads, 0, stream>>>(a, s, with_sparse); break;
    case 4: gemv_kernel<BITS, MODE, 4, true><<<grid, kThreads, 0, stream>>>(a, s, with_sparse); break;
    case 8: gemv_kernel<BITS, MODE, 8, true><<<grid, kThreads, 0, stream>>>(a, s, with_sparse); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <int BITS>
cudaError_t launch_bits(const GemvArgs& a, const Segment& s, dim3 grid, int with_sparse, cudaStream_t stream) {
  switch (segment_mode(s)) {
    case kOneGroup: return launch_mt<BITS, kOneGroup>(a, s, grid, with_sparse, stream);
    case kGrouped: return launch_mt<BITS, kGrouped>(a, s, grid, with_sparse, stream);
    default: return launch_mt<BITS, kGeneric>(a, s, grid, with_sparse, stream);
  }
}

}  // namespace

int rows_bucket(int m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : m <= 8 ? 8 : 0; }

int choose_split(int n, int k, int sms) {
  const int tiles = (n + kBlockN - 1) / kBlockN;
  const int chunks = (k + 31) / 32;
  int split = (2 * sms + tiles - 1) / tiles;
  const int most = chunks / (2 * kWarps);  // every warp at least two chunks
  if (split > most) split = most;
  return split < 1 ? 1 : split;
}

int segment_mode(const Segment& s) {
  if (s.is_lut) return kGeneric;
  if (s.group_size >= s.k) return kOneGroup;
  return s.group_size % 32 == 0 ? kGrouped : kGeneric;
}

cudaError_t prep(int x_bf16, const void* x, int64_t ldx, const int32_t* perm, const Segment* segs, int nseg, int m,
                 int k_total, int chunks_total, uint16_t* xp, float* xsum, float* xf, cudaStream_t stream) {
  if (nseg < 1 || nseg > kMaxSegments || rows_bucket(m) == 0) return cudaErrorInvalidValue;
  PrepSegs p;
  p.n = nseg;
  for (int i = 0; i < nseg; ++i) {
    p.start[i] = segs[i].start;
    p.k[i] = segs[i].k;
    p.bits[i] = segs[i].bits;
    p.chunk_offset[i] = segs[i].chunk_offset;
  }
  const dim3 grid(chunks_total, rows_bucket(m));
  __half* xph = reinterpret_cast<__half*>(xp);
  if (x_bf16)
    prep_kernel<<<grid, 32, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), ldx, perm, p, m, k_total, chunks_total,
                                         xph, xsum, xf);
  else
    prep_kernel<<<grid, 32, 0, stream>>>(static_cast<const __half*>(x), ldx, perm, p, m, k_total, chunks_total, xph,
                                         xsum, xf);
  return cudaGetLastError();
}

cudaError_t segment(const GemvArgs& a, const Segment& s, int split, int with_sparse, cudaStream_t stream) {
  if (a.n % 4 != 0 || split < 1) return cudaErrorInvalidValue;
  const dim3 grid((a.n + kBlockN - 1) / kBlockN, split);
  switch (s.bits) {
    case 2: return launch_bits<2>(a, s, grid, with_sparse, stream);
    case 3: return launch_bits<3>(a, s, grid, with_sparse, stream);
    case 4: return launch_bits<4>(a, s, grid, with_sparse, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t finalize(int out_bf16, const float* out32, const uint16_t* bias, void* out, int m, int n,
                     cudaStream_t stream) {
  const int total = m * n, threads = 256;
  const int blocks = (total + threads - 1) / threads;
  if (out_bf16)
    finalize_kernel<<<blocks, threads, 0, stream>>>(out32, bias, static_cast<__nv_bfloat16*>(out), total, n);
  else
    finalize_kernel<<<blocks, threads, 0, stream>>>(out32, bias, static_cast<__half*>(out), total, n);
  return cudaGetLastError();
}

}  // namespace tacq

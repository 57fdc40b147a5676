// Host interface of the CUDA decode GEMV (tacq_gemv.cu); docs/cuda.md describes the algorithm.
// Plain C++ with the CUDA runtime types only, so that the torch binding (tacq_ops.cpp) and the
// kernel file compile separately (the kernel file needs no torch headers).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace tacq {

constexpr int kMaxSegments = 16;  // per layer; more fall back to the Triton path
constexpr int kBlockN = 128;      // output columns per thread block (32 lanes x 4 columns)
constexpr int kWarps = 4;         // warps per block, splitting the block's K range

// One column segment of a format-v1 layer (docs/format.md), device pointers. fp16 tensors are
// passed as uint16_t bit patterns.
struct Segment {
  const int32_t* q_lo = nullptr;   // q2 (2/3-bit) or q4 (4-bit) plane [K_pad*w/32, N]
  const int32_t* q_hi = nullptr;   // q1 plane [K_pad/32, N] (3-bit)
  const uint16_t* scale = nullptr; // affine: fp16 [G, N]
  const uint16_t* zero = nullptr;  // affine: fp16 [G, N]
  const uint16_t* lut = nullptr;   // lut: fp16 [k, 2^bits]
  int start = 0;         // first (permuted) column
  int k = 0;             // columns in the segment
  int bits = 2;          // 2, 3 or 4
  int is_lut = 0;
  int group_size = 0;    // affine
  int chunk_offset = 0;  // 32-row chunks of the earlier segments (its place in the prepared x)
};

struct GemvArgs {
  const uint16_t* xp = nullptr;  // fp16 [MT, chunks_total*32]: x permuted, pair-ordered, zero-padded
  const float* xsum = nullptr;   // fp32 [MT, chunks_total]: sum of each chunk's fp16 x values
  const float* xf = nullptr;     // fp32 [m, k_total]: x in the original column order (CSR)
  int m = 1, n = 0, k_total = 0, chunks_total = 0;
  int x_bf16 = 0;  // x was bf16: M = 1 runs the uncentred kernel (tacq_gemv.cu)
  const int32_t* row_ptr = nullptr;  // CSR [N+1]
  const void* col = nullptr;         // CSR columns, int16 or int32 [nnz]
  int col_int32 = 0;
  const uint16_t* val = nullptr;     // CSR values, fp16 [nnz]
  float* out32 = nullptr;            // fp32 [m, N], zeroed; every block adds its partial sums
};

// M rows are computed by the kernel instantiated for MT = the next power of two (1, 2, 4, 8).
int rows_bucket(int m);
// Split-K count for a segment: about two blocks per SM, each warp at least two chunks.
int choose_split(int n, int k, int sms);
// The kernel mode a segment runs: 0 one group per row, 1 groups a multiple of 32, 2 generic
// (LUT, other group sizes: one code at a time in fp32).
int segment_mode(const Segment& s);

// x [m, ldx] (fp16 if !x_bf16, else bf16) -> xp, xsum (MT rows, zero beyond m) and xf.
cudaError_t prep(int x_bf16, const void* x, int64_t ldx, const int32_t* perm, const Segment* segs, int nseg, int m,
                 int k_total, int chunks_total, uint16_t* xp, float* xsum, float* xf, cudaStream_t stream);
// One segment's contribution (and, if with_sparse, the CSR correction) added to a.out32.
cudaError_t segment(const GemvArgs& a, const Segment& s, int split, int with_sparse, cudaStream_t stream);
// out [m, N] (fp16 or bf16) = out32 + bias (bias may be null).
cudaError_t finalize(int out_bf16, const float* out32, const uint16_t* bias, void* out, int m, int n,
                     cudaStream_t stream);

}  // namespace tacq

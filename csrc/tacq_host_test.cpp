// Host test library: the decode of tacq_decode.cuh run on the CPU (tests/test_cuda_ext.py loads
// it with ctypes and compares with tacq_kernels.reference). Built by the tests with nvcc
// (-x cu, so the functions are compiled as __host__ __device__) or, without nvcc, with c++.
//
// tacq_host_gemv re-states the kernel's loop (tacq_gemv.cu) on the host with the same decode
// functions and the same algebra: x prepared in pair order per 32-row chunk, pairs q - c from the
// centred decode (lo_raw / q1_raw and their HFMA2 constants; spread_q1 for the 1-bit plane), the
// centre and the zero removed with the chunk sums of x, groups per chunk or once per row, the generic path one code at a time, the CSR
// part. Only the arithmetic differs: fp32 products here, fp16x2 HFMA2 in the kernel (the tests
// measure that difference separately).

#include <stdint.h>
#include <string.h>

#include <vector>

#include "tacq_decode.cuh"

using namespace tacq;

extern "C" {

int tacq_xprep_row(int bits, int i) { return xprep_row(bits, i); }
int tacq_xprep_pos(int bits, int row) { return xprep_pos(bits, row); }
uint32_t tacq_code_at(int bits, uint32_t lo, uint32_t hi, int row) { return code_at(bits, lo, hi, row); }
uint32_t tacq_spread_q1(uint32_t q1, int h) { return spread_q1(q1, h); }
float tacq_half_to_float(uint32_t h) { return half_bits_to_float(h); }

// The fast decode of one low-plane word (q2 or q4; u1 = spread 1-bit word for 3 bits) into the
// fp16 values 2^b + q, written in row order: out[rows_per_word(bits)].
void tacq_decode_word(int bits, uint32_t lo, uint32_t u1, float* out) {
  const int S = pair_stride(bits);
  for (int t = 0; t < pairs_per_word(bits); ++t) {
    const uint32_t d = bits == 2 ? pair2(lo, t) : bits == 3 ? pair3(lo, u1, t) : pair4(lo, t);
    out[t] = half_bits_to_float(d & 0xFFFFu);
    out[t + S] = half_bits_to_float(d >> 16);
  }
}

// The centred decode of one low-plane word into q - c, row order: out[rows_per_word(bits)]. The
// HFMA2 steps are computed in double (exact: every operand is an fp16 number and so is every
// result, which tests/test_cuda_ext.py checks through tacq_decode_constants).
void tacq_decode_word_centred(int bits, uint32_t lo, uint32_t u1, float* out) {
  const int S = pair_stride(bits);
  const uint32_t src[2] = {lo_src0(bits, lo), lo_src1(bits, lo)};
  for (int t = 0; t < pairs_per_word(bits); ++t) {
    const uint32_t raw = lo_raw(bits, src[lo_source(bits, t)], t), raw1 = bits == 3 ? q1_raw(u1, t) : 0u;
    for (int half = 0; half < 2; ++half) {
      const double r = half_bits_to_float((raw >> (16 * half)) & 0xFFFFu);
      double v;
      if (bits == 3) {
        const double e = half_bits_to_float((raw1 >> (16 * half)) & 0xFFFFu) * (double)q1_scale(t) + (double)q1_offset(t);
        v = r * (double)lo_scale(bits, t) + e;
      } else {
        v = r * (double)lo_scale(bits, t) + (double)lo_offset(bits, t);
      }
      out[t + half * S] = (float)v;
    }
  }
}

// The centred decode's constants for pair t: lo_scale, lo_offset, q1_scale, q1_offset, the
// register scale (reg_scale_bits, as a float), the raw of code q (low plane) in each half, and
// the centre; the tests check that they are fp16 numbers and that the HFMA2s stay exact.
void tacq_decode_constants(int bits, int t, float* out) {
  out[0] = lo_scale(bits, t);
  out[1] = lo_offset(bits, t);
  out[2] = bits == 3 ? q1_scale(t) : 0.0f;
  out[3] = bits == 3 ? q1_offset(t) : 0.0f;
  const uint32_t reg = reg_scale_bits(bits, t);
  out[4] = (reg & 0xFFFFu) == (reg >> 16) ? half_bits_to_float(reg & 0xFFFFu) : -1.0f;
  out[5] = (float)lo_pos(bits, t);
  out[6] = decode_center(bits);
}

float tacq_decode_center(int bits) { return decode_center(bits); }

// y [m, n] (fp32) = x [m, k_total] @ (dequant(D) + S)^T, following the kernel. Segment i: start,
// k, bits, is_lut, group_size in seg_ints[5i..5i+4]; its planes, scales, zeros, table in the
// pointer arrays (null where absent). fp16 data as uint16 bit patterns.
void tacq_host_gemv(int m, int n, int k_total, const float* x, const int32_t* perm, int nseg, const int* seg_ints,
                    const int32_t* const* q_lo, const int32_t* const* q_hi, const uint16_t* const* scale,
                    const uint16_t* const* zero, const uint16_t* const* lut, const int32_t* row_ptr,
                    const int32_t* col, const uint16_t* val, float* y) {
  memset(y, 0, sizeof(float) * m * n);
  for (int si = 0; si < nseg; ++si) {
    const int start = seg_ints[5 * si], k = seg_ints[5 * si + 1], bits = seg_ints[5 * si + 2];
    const int is_lut = seg_ints[5 * si + 3], group = seg_ints[5 * si + 4];
    const int chunks = (k + 31) / 32, words = bits == 4 ? 4 : 2, R = rows_per_word(bits);
    const float cen = decode_center(bits);
    const int mode = is_lut ? 2 : group >= k ? 0 : group % 32 == 0 ? 1 : 2;
    for (int r = 0; r < m; ++r) {
      // prep: the fp32 x values in pair order, and the chunk sums
      std::vector<float> xp(chunks * 32, 0.0f), xsum(chunks, 0.0f);
      for (int c = 0; c < chunks; ++c)
        for (int i = 0; i < 32; ++i) {
          const int row = c * 32 + xprep_row(bits, i);
          if (row < k) {
            const int cidx = perm ? perm[start + row] : start + row;
            xp[c * 32 + i] = x[(int64_t)r * k_total + cidx];
            xsum[c] += xp[c * 32 + i];
          }
        }
      for (int col_n = 0; col_n < n; ++col_n) {
        float acc = 0.0f, xs = 0.0f;
        for (int c = 0; c < chunks; ++c) {
          const uint32_t hi = bits == 3 ? (uint32_t)q_hi[si][(int64_t)c * n + col_n] : 0u;
          if (mode != 2) {
            float f = 0.0f;
            for (int wi = 0; wi < words; ++wi) {
              const uint32_t lo = (uint32_t)q_lo[si][(int64_t)(c * words + wi) * n + col_n];
              float d[16];
              tacq_decode_word_centred(bits, lo, bits == 3 ? spread_q1(hi, wi) : 0u, d);
              for (int t = 0; t < pairs_per_word(bits); ++t)  // pair t = positions 2t, 2t+1 of the word
                f += d[t] * xp[c * 32 + wi * R + 2 * t] + d[t + pair_stride(bits)] * xp[c * 32 + wi * R + 2 * t + 1];
            }
            if (mode == 0) {
              acc += f;
              xs += xsum[c];
            } else {
              const int64_t g = (int64_t)(c * 32 / group) * n + col_n;
              const float sc = half_bits_to_float(scale[si][g]), z = half_bits_to_float(zero[si][g]);
              acc += sc * f - sc * (z - cen) * xsum[c];
            }
          } else {
            for (int wi = 0; wi < words; ++wi) {
              const uint32_t lo = (uint32_t)q_lo[si][(int64_t)(c * words + wi) * n + col_n];
              for (int rr = 0; rr < R; ++rr) {
                const int row = wi * R + rr, krow = c * 32 + row;
                if (krow >= k) break;
                const uint32_t q = code_at(bits, lo, hi, row);
                float wv;
                if (is_lut) {
                  wv = half_bits_to_float(lut[si][(int64_t)krow * (1 << bits) + q]);
                } else {
                  const int64_t g = (int64_t)(krow / group) * n + col_n;
                  wv = affine(q, half_bits_to_float(scale[si][g]), half_bits_to_float(zero[si][g]));
                }
                acc += wv * xp[c * 32 + xprep_pos(bits, row)];
              }
            }
          }
        }
        if (mode == 0)
          acc = half_bits_to_float(scale[si][col_n]) * (acc - (half_bits_to_float(zero[si][col_n]) - cen) * xs);
        y[(int64_t)r * n + col_n] += acc;
      }
    }
  }
  for (int r = 0; r < m; ++r)
    for (int col_n = 0; col_n < n; ++col_n)
      for (int e = row_ptr[col_n]; e < row_ptr[col_n + 1]; ++e)
        y[(int64_t)r * n + col_n] += half_bits_to_float(val[e]) * x[(int64_t)r * k_total + col[e]];
}

}  // extern "C"

// torch binding of the CUDA decode GEMV: the op tacq_cuda::gemv (TORCH_LIBRARY), CUDA kernel
// registered here, fake (meta) implementation registered from Python
// (tacq_kernels/cuda_ext.py, torch.library.register_fake), so torch.compile and CUDA graphs
// trace through it. Arguments as tacq_kernels::quant_linear (tacq_kernels/ops.py):
//   x [M <= 8, K] fp16 or bf16, unit stride in K; tensors in LayerSpec.tensor_specs() order;
//   spec_ints = ops.spec_to_ints(spec): K, N, has_perm, has_bias, nnz, n_segments, then per
//   segment start, end, bits, decoder id (0 affine, 1 lut), group size.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "tacq_gemv.h"

namespace {

constexpr int kHeader = 6, kPerSegment = 5;

bool aligned(const at::Tensor& t, int bytes) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0; }

const uint16_t* half_ptr(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }

void gemv_into(const at::Tensor& x, at::TensorList tensors, at::IntArrayRef spec, const at::Tensor& out) {
  TORCH_CHECK(spec.size() >= kHeader, "tacq_cuda::gemv: spec_ints too short");
  const int64_t K = spec[0], N = spec[1], nseg = spec[5];
  const bool has_perm = spec[2] != 0, has_bias = spec[3] != 0;
  const int64_t nnz = spec[4];
  TORCH_CHECK((int64_t)spec.size() == kHeader + kPerSegment * nseg, "tacq_cuda::gemv: spec_ints has the wrong length");
  TORCH_CHECK(nseg >= 1 && nseg <= tacq::kMaxSegments, "tacq_cuda::gemv: 1..", tacq::kMaxSegments, " segments");
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.size(1) == K && x.stride(1) == 1,
              "tacq_cuda::gemv: x must be a CUDA [M, K] tensor with unit stride in K");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "tacq_cuda::gemv: x must be fp16 or bf16");
  const int64_t M = x.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "tacq_cuda::gemv: M must be 1..8, got ", M);
  TORCH_CHECK(N % 4 == 0, "tacq_cuda::gemv: N must be a multiple of 4");
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();

  size_t ti = 0;
  auto next = [&](const char* what) -> const at::Tensor& {
    TORCH_CHECK(ti < tensors.size(), "tacq_cuda::gemv: too few tensors (", what, ")");
    const at::Tensor& t = tensors[ti++];
    TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.device() == x.device(), "tacq_cuda::gemv: ", what,
                " must be a contiguous tensor on x's device");
    return t;
  };
  const int32_t* perm = has_perm ? next("perm").data_ptr<int32_t>() : nullptr;
  std::vector<tacq::Segment> segs(nseg);
  int chunks = 0;
  for (int64_t i = 0; i < nseg; ++i) {
    const int64_t* si = spec.data() + kHeader + kPerSegment * i;
    tacq::Segment& s = segs[i];
    s.start = (int)si[0];
    s.k = (int)(si[1] - si[0]);
    s.bits = (int)si[2];
    s.is_lut = (int)si[3];
    s.group_size = (int)si[4];
    s.chunk_offset = chunks;
    chunks += (s.k + 31) / 32;
    TORCH_CHECK(s.bits >= 2 && s.bits <= 4, "tacq_cuda::gemv: bits must be 2, 3 or 4");
    const at::Tensor& lo = next(s.bits == 4 ? "q4" : "q2");
    TORCH_CHECK(aligned(lo, 16), "tacq_cuda::gemv: planes must be 16-byte aligned");
    s.q_lo = lo.data_ptr<int32_t>();
    if (s.bits == 3) {
      const at::Tensor& hi = next("q1");
      TORCH_CHECK(aligned(hi, 16), "tacq_cuda::gemv: planes must be 16-byte aligned");
      s.q_hi = hi.data_ptr<int32_t>();
    }
    if (s.is_lut) {
      s.lut = half_ptr(next("lut"));
    } else {
      const at::Tensor& sc = next("scale");
      const at::Tensor& z = next("zero");
      TORCH_CHECK(aligned(sc, 8) && aligned(z, 8), "tacq_cuda::gemv: scales and zeros must be 8-byte aligned");
      TORCH_CHECK(s.group_size >= 1, "tacq_cuda::gemv: group size must be positive");
      s.scale = half_ptr(sc);
      s.zero = half_ptr(z);
    }
  }
  const at::Tensor& row_ptr = next("sparse_row_ptr");
  const at::Tensor& col = next("sparse_col");
  const at::Tensor& val = next("sparse_val");
  const uint16_t* bias = has_bias ? half_ptr(next("bias")) : nullptr;
  TORCH_CHECK(ti == tensors.size(), "tacq_cuda::gemv: too many tensors");

  const int mt = tacq::rows_bucket((int)M);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor xp = at::empty({mt, (int64_t)chunks * 32}, x.options().dtype(at::kHalf));
  at::Tensor xsum = at::empty({mt, (int64_t)chunks}, f32);
  at::Tensor xf = at::empty({M, K}, f32);
  at::Tensor out32 = at::zeros({M, N}, f32);
  TORCH_CHECK(out.is_cuda() && out.device() == x.device() && out.scalar_type() == x.scalar_type() && out.dim() == 2 &&
                  out.size(0) == M && out.size(1) == N && out.is_contiguous(),
              "tacq_cuda::gemv: out must be a contiguous [M, N] tensor of x's dtype on x's device");

  const bool bf16 = x.scalar_type() == at::kBFloat16;
  C10_CUDA_CHECK(tacq::prep(bf16, x.data_ptr(), x.stride(0), perm, segs.data(), (int)nseg, (int)M, (int)K, chunks,
                            reinterpret_cast<uint16_t*>(xp.data_ptr()), xsum.data_ptr<float>(), xf.data_ptr<float>(),
                            stream));
  tacq::GemvArgs a;
  a.xp = reinterpret_cast<const uint16_t*>(xp.data_ptr());
  a.xsum = xsum.data_ptr<float>();
  a.xf = xf.data_ptr<float>();
  a.m = (int)M;
  a.n = (int)N;
  a.k_total = (int)K;
  a.chunks_total = chunks;
  a.x_bf16 = bf16;
  a.row_ptr = row_ptr.data_ptr<int32_t>();
  a.col = col.data_ptr();
  a.col_int32 = col.scalar_type() == at::kInt;
  a.val = half_ptr(val);
  a.out32 = out32.data_ptr<float>();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  for (int64_t i = 0; i < nseg; ++i) {
    const int split = tacq::choose_split((int)N, segs[i].k, sms);
    C10_CUDA_CHECK(tacq::segment(a, segs[i], split, i == 0 && nnz > 0, stream));
  }
  C10_CUDA_CHECK(tacq::finalize(bf16, out32.data_ptr<float>(), bias, out.data_ptr(), (int)M, (int)N, stream));
}

at::Tensor gemv(const at::Tensor& x, at::TensorList tensors, at::IntArrayRef spec) {
  TORCH_CHECK(x.dim() == 2 && spec.size() >= 2, "tacq_cuda::gemv: x must be [M, K]");
  at::Tensor out = at::empty({x.size(0), spec[1]}, x.options());
  gemv_into(x, tensors, spec, out);
  return out;
}

void gemv_out(const at::Tensor& x, at::TensorList tensors, at::IntArrayRef spec, const at::Tensor& out) {
  gemv_into(x, tensors, spec, out);
}

}  // namespace

TORCH_LIBRARY(tacq_cuda, m) {
  m.def("gemv(Tensor x, Tensor[] tensors, int[] spec_ints) -> Tensor");
  // writes every element of out (the GPU test poisons it with NaN first)
  m.def("gemv_out(Tensor x, Tensor[] tensors, int[] spec_ints, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(tacq_cuda, CUDA, m) {
  m.impl("gemv", &gemv);
  m.impl("gemv_out", &gemv_out);
}

// setup.py builds this file into the Python extension module tacq_kernels._cuda; importing it
// runs the registrations above.
#ifdef TORCH_EXTENSION_NAME
#include <Python.h>
#define TACQ_CAT2(a, b) a##b
#define TACQ_CAT(a, b) TACQ_CAT2(a, b)
#define TACQ_STR2(a) #a
#define TACQ_STR(a) TACQ_STR2(a)
static PyModuleDef tacq_cuda_module = {PyModuleDef_HEAD_INIT, TACQ_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
PyMODINIT_FUNC TACQ_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&tacq_cuda_module); }
#endif

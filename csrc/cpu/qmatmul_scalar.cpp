// The scalar reference: always compiled with the baseline flags, the oracle every fast
// variant is tested against (and itself tested against numpy float64 in tests/).
// Plain loops over format.h's element functions, float32 accumulation.
#include <algorithm>
#include <cstring>
#include <vector>

#include "act_quant.h"
#include "bitswitch/format.h"
#include "convert.h"
#include "kernels.h"
#include "scratch.h"
#include "thread_pool.h"

namespace bitswitch {
namespace cpu {

namespace fmt = bitswitch::format;

Status qmatmul_scalar(const QMatmulArgs& a, ThreadPool& pool) {
  const int64_t M = a.m, N = a.n, K = a.k, G = a.group_size;
  const int64_t words = fmt::words_per_row(K), groups = fmt::groups_per_row(K, int(G));

  // x as float32 once, shared read-only by every task.
  float* xf = static_cast<float*>(thread_scratch(kScratchX, size_t(M * K) * sizeof(float)));
  if (!xf) return Status::kOutOfMemory;
  for (int64_t i = 0; i < M * K; ++i) xf[i] = load_f32(a.x, a.x_dtype, i);
  if (a.act_bits == kActBitsInt8)
    for (int64_t m = 0; m < M; ++m) fake_quantize_int8(xf + m * K, K, a.group_size);

  constexpr int64_t kRowsPerTask = 16;
  bool oom = false;
  pool.parallel_for((N + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task, int) {
    float* w = static_cast<float*>(thread_scratch(kScratchPanel, size_t(K) * sizeof(float)));
    if (!w) {
      oom = true;
      return;
    }
    const int64_t n_end = std::min(N, (task + 1) * kRowsPerTask);
    for (int64_t n = task * kRowsPerTask; n < n_end; ++n) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t word = n * words + k / fmt::kValuesPerWord;
        const int slot = int(k % fmt::kValuesPerWord);
        const float s = load_f32(a.scales, a.scale_dtype, n * groups + k / G);
        const float b = load_f32(a.biases, a.scale_dtype, n * groups + k / G);
        const uint32_t q = fmt::unpack_code(a.plane0[word], slot);
        if (a.bits == fmt::kInt8Bits) {
          w[k] = fmt::dequant_int8(q, fmt::unpack_code(a.plane1[word], slot), s, b);
        } else {
          w[k] = fmt::dequant_int4(q, s, b);
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xf + m * K;
        float acc = 0.0f;
        for (int64_t k = 0; k < K; ++k) acc += xr[k] * w[k];
        store_f32(a.y, a.x_dtype, m * N + n, acc);
      }
    }
  });
  return oom ? Status::kOutOfMemory : Status::kOk;
}

double read_stream(const void* data, size_t bytes, ThreadPool& pool) {
  const int T = pool.num_threads();
  const size_t words = bytes / sizeof(uint64_t);
  const uint64_t* p = static_cast<const uint64_t*>(data);
  std::vector<uint64_t> sums(size_t(T) * 8, 0);  // one cache line per thread
  pool.parallel_for(T, [&](int64_t t, int) {
    const size_t lo = words * size_t(t) / size_t(T), hi = words * size_t(t + 1) / size_t(T);
    uint64_t acc[8] = {};
    size_t i = lo;
    for (; i + 8 <= hi; i += 8)
      for (int j = 0; j < 8; ++j) acc[j] ^= p[i + j];
    for (; i < hi; ++i) acc[0] ^= p[i];
    for (int j = 1; j < 8; ++j) acc[0] ^= acc[j];
    sums[size_t(t) * 8] = acc[0];
  });
  uint64_t x = 0;
  for (int t = 0; t < T; ++t) x ^= sums[size_t(t) * 8];
  return double(x & 0xFFFF);
}

}  // namespace cpu
}  // namespace bitswitch

// Products of a few rows with a large f32 weight on CPUs: out[M, N] = x[M, K] @ W, M <= 8.
//
// Why: a decode step, and a speculative verification of gamma + 1 tokens, read every weight once
// and do almost no arithmetic per byte. XLA's CPU backend runs a 1-row product as its own
// matrix-vector kernel, but 2-8 rows as a GEMM that packs the weight on every call, so a 5-row
// forward cost 1.5 one-row forwards where reading the weights should make it about 1. These
// kernels stream each weight once for all M rows (register-blocked over the rows, software
// prefetch ahead of the stream) and split the output columns between the threads of XLA's
// intra-op pool.
//
// Every output element is summed in the same order whatever M and the thread count, so row m of
// a several-row product is bitwise the one-row product of row m.
//
// Built on first use by amd135m/cpu_kernels.py (g++ -O3 -march=native, cached per CPU).
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 16 floats; unaligned loads are allowed (aligned(4)). -march=native makes it one AVX-512 register
// where the CPU has them, two AVX2 registers otherwise.
typedef float v16 __attribute__((vector_size(64), aligned(4)));

constexpr int kMaxRows = 8;

// out[:, n0:n1] = x @ W[:, n0:n1] for W stored [K, N] (the model's Linear kernels). The output
// block is accumulated KB weight rows at a time: one load of each 16 weights serves all M rows.
template <int M>
void MatmulNN(const float* __restrict x, const float* __restrict w, float* __restrict out,
              int64_t K, int64_t N, int64_t n0, int64_t n1) {
  constexpr int KB = 8;
  for (int m = 0; m < M; ++m) std::fill(out + m * N + n0, out + m * N + n1, 0.f);
  int64_t k = 0;
  for (; k + KB <= K; k += KB) {
    const float* wk = w + k * N;
    float a[M][KB];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < KB; ++j) a[m][j] = x[m * K + k + j];
    int64_t n = n0;
    for (; n + 16 <= n1; n += 16) {
      v16 acc[M];
      for (int m = 0; m < M; ++m) acc[m] = *reinterpret_cast<const v16*>(out + m * N + n);
      for (int j = 0; j < KB; ++j) {
        // The next block's rows: the hardware prefetchers miss this strided pattern (a 5-row
        // product ran 1.3x faster with it).
        if (k + 2 * KB <= K) __builtin_prefetch(wk + (KB + j) * N + n);
        v16 wv = *reinterpret_cast<const v16*>(wk + j * N + n);
        for (int m = 0; m < M; ++m) acc[m] += a[m][j] * wv;
      }
      for (int m = 0; m < M; ++m) *reinterpret_cast<v16*>(out + m * N + n) = acc[m];
    }
    for (; n < n1; ++n)
      for (int m = 0; m < M; ++m) {
        float s = out[m * N + n];
        for (int j = 0; j < KB; ++j) s += a[m][j] * wk[j * N + n];
        out[m * N + n] = s;
      }
  }
  for (; k < K; ++k)
    for (int m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) out[m * N + n] += x[m * K + k] * w[k * N + n];
}

// out[:, v0:v1] = x @ E[v0:v1, :]^T for E stored [V, K] (the tied embedding as output head): VB
// weight rows at a time, each a contiguous dot product with every one of the M rows.
template <int M>
void MatmulNT(const float* __restrict x, const float* __restrict e, float* __restrict out,
              int64_t K, int64_t V, int64_t v0, int64_t v1) {
  constexpr int VB = 4;
  const int64_t k16 = K / 16 * 16;
  int64_t v = v0;
  for (; v + VB <= v1; v += VB) {
    v16 acc[M][VB] = {};
    for (int64_t d = 0; d < k16; d += 16) {
      v16 ev[VB];
      for (int j = 0; j < VB; ++j) {
        if (v + 2 * VB <= v1) __builtin_prefetch(e + (v + VB + j) * K + d);
        ev[j] = *reinterpret_cast<const v16*>(e + (v + j) * K + d);
      }
      for (int m = 0; m < M; ++m) {
        v16 xv = *reinterpret_cast<const v16*>(x + m * K + d);
        for (int j = 0; j < VB; ++j) acc[m][j] += xv * ev[j];
      }
    }
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < VB; ++j) {
        float s = 0.f;
        for (int i = 0; i < 16; ++i) s += acc[m][j][i];
        for (int64_t d = k16; d < K; ++d) s += x[m * K + d] * e[(v + j) * K + d];
        out[m * V + v + j] = s;
      }
  }
  for (; v < v1; ++v)
    for (int m = 0; m < M; ++m) {
      // The same order as the blocked rows: 16 lane sums, then the tail.
      float lanes[16] = {};
      for (int64_t d = 0; d < k16; d += 16)
        for (int i = 0; i < 16; ++i) lanes[i] += x[m * K + d + i] * e[v * K + d + i];
      float s = 0.f;
      for (int i = 0; i < 16; ++i) s += lanes[i];
      for (int64_t d = k16; d < K; ++d) s += x[m * K + d] * e[v * K + d];
      out[m * V + v] = s;
    }
}

// Runs body(0..chunks-1) on the calling thread and on helpers scheduled on XLA's pool. Chunks are
// claimed from a counter, so a helper that starts late (or never) only means the caller does
// more; the caller waits only for chunks a helper has claimed, which are already running.
struct Job {
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  int chunks = 0;
  std::function<void(int)> body;

  void Work() {
    for (int i; (i = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      body(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void RunChunks(ffi::ThreadPool& pool, int chunks, std::function<void(int)> body) {
  auto job = std::make_shared<Job>();
  job->chunks = chunks;
  job->body = std::move(body);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < chunks) __builtin_ia32_pause();
}

using Kernel = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);

template <int M>
Kernel NNFor() { return &MatmulNN<M>; }
template <int M>
Kernel NTFor() { return &MatmulNT<M>; }

Kernel Select(bool transposed, int64_t rows) {
  static const Kernel nn[kMaxRows] = {NNFor<1>(), NNFor<2>(), NNFor<3>(), NNFor<4>(),
                                      NNFor<5>(), NNFor<6>(), NNFor<7>(), NNFor<8>()};
  static const Kernel nt[kMaxRows] = {NTFor<1>(), NTFor<2>(), NTFor<3>(), NTFor<4>(),
                                      NTFor<5>(), NTFor<6>(), NTFor<7>(), NTFor<8>()};
  return (transposed ? nt : nn)[rows - 1];
}

ffi::Error SmallMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> out, bool transposed) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2)
    return ffi::Error::InvalidArgument("small_matmul takes a 2-D x and a 2-D weight");
  const int64_t rows = xd[0], k = xd[1];
  const int64_t n = transposed ? wd[0] : wd[1];
  if ((transposed ? wd[1] : wd[0]) != k)
    return ffi::Error::InvalidArgument("small_matmul: x and the weight disagree on K");
  if (rows < 1 || rows > kMaxRows)
    return ffi::Error::InvalidArgument("small_matmul takes 1 to 8 rows");
  Kernel kernel = Select(transposed, rows);
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  // Column chunks (row chunks of a transposed weight) in multiples of the kernels' blocks, a few
  // per thread so that a helper starting late still finds work.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t block = transposed ? 4 : 16;
  const int64_t per = std::max<int64_t>(block, (n / (4 * threads) + block - 1) / block * block);
  const int chunks = static_cast<int>((n + per - 1) / per);
  RunChunks(pool, chunks, [=](int i) {
    kernel(xp, wp, op, k, n, i * per, std::min<int64_t>(n, (i + 1) * per));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Amd135mSmallMatmul, SmallMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));

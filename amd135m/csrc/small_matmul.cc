// CPU kernels for decode steps and speculative verifications: products of a few rows with a
// large f32, bf16, int8 or 4-bit weight (out[M, N] = x[M, K] @ W, M <= 8), and cached attention
// for a few new tokens.
//
// Why: a decode step, and a speculative verification of gamma + 1 tokens, read every weight once
// and do almost no arithmetic per byte. XLA's CPU backend runs a 1-row product as its own
// matrix-vector kernel, but 2-8 rows as a GEMM that packs the weight on every call, so a 5-row
// forward cost 1.5 one-row forwards where reading the weights should make it about 1. These
// kernels stream each weight once for all M rows (register-blocked over the rows, software
// prefetch ahead of the stream) and split the output columns between the calling thread and
// helper threads of their own.
//
// Every output element is summed in the same order whatever M and the thread count, so row m of
// a several-row product is bitwise the one-row product of row m.
//
// Built on first use by amd135m/cpu_kernels.py (g++ -O3 -march=native, cached per CPU).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The native vector: 16 floats (one register) where the CPU has AVX-512, else 8 (one AVX2
// register). Unaligned loads are allowed (aligned(4)). Every kernel below keeps its accumulators
// within the 16 (AVX2) or 32 (AVX-512) registers: a v16 per row on an AVX2 machine took two
// registers each, and 8 rows' accumulators spilled to the stack (an 8-row product of SmolLM2
// cost 5 one-row products on a Zen 1 EPYC).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vec __attribute__((vector_size(kLanes * 4), aligned(4)));

constexpr int kMaxRows = 8;
constexpr int kMaxWideRows = 16;  // the row-major kernel (SmallMatmul; cpu_kernels.wide_rows)

inline vec Load(const float* p) { return *reinterpret_cast<const vec*>(p); }
inline void Store(float* p, vec v) { *reinterpret_cast<vec*>(p) = v; }

// Weights are f32, or bf16 (stored as uint16_t: the top half of an f32) widened in registers:
// a zero-extension and a shift, exact, so a bf16 product is bitwise the f32 product of the
// weights widened (and reads half the bytes).
// (Intrinsics: GCC lowers a generic vector conversion to 128-bit halves and an insert, five
// instructions where these are two, and the bf16 kernel ran at half the f32 one's bytes/s.)
inline vec LoadW(const float* p) { return Load(p); }
inline vec LoadW(const uint16_t* p) {
#if defined(__AVX512F__)
  const __m512i bits = _mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#else
  const __m256i bits = _mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#endif
  vec v;
  __builtin_memcpy(&v, &bits, sizeof(v));
  return v;
}
// Scalar tails as explicit fused multiply-adds, as the vector loops do (contraction of `s += a *
// b` is the compiler's choice, and it chose differently for the two weight types).
inline float Fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline float ToFloat(float w) { return w; }
inline float ToFloat(uint16_t w) {
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float v;
  __builtin_memcpy(&v, &bits, sizeof(v));
  return v;
}

// Independent accumulators so that a few rows still fill the FMA pipes (a chain of FMAs waits on
// each one's latency; two pipes of 4-5 cycles want 8-10 chains): CB vectors of columns per row,
// M * CB accumulator registers, at most 14 of AVX2's 16 and 24 of AVX-512's 32.
// Rows past a group of RG share the block's weight vectors from L1 (8 rows' 16 accumulators
// would not fit AVX2's registers; 13-16 rows' 26-32 would not fit AVX-512's: two groups of up to
// 8, which on a Zen 4 ran a SmolLM2 forward's 16-row products in 39-42 ms against 43-45 with one
// group of 16 rows x 1 vector and 47-49 through XLA's GEMM).
template <int M>
constexpr int ColumnVectors() {
  constexpr int avx2[kMaxWideRows + 1] = {0, 8, 4, 3, 2, 2, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2};
  constexpr int avx512[kMaxWideRows + 1] = {0, 8, 4, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2};
  return kLanes == 16 ? avx512[M] : avx2[M];
}

template <int M>
constexpr int RowGroup() {
  constexpr int avx2[kMaxWideRows + 1] = {0, 1, 2, 3, 4, 5, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4};
  return kLanes == 16 ? (M > 12 ? 8 : M) : avx2[M];
}

// Weight rows per visit of an output block: 8, or 16 for 5-8 rows on AVX-512, where each visit's
// accumulator loads and stores and prefetch loop cost more per weight byte (two Zen 4 threads,
// a 576 x 1536 weight streamed from DRAM: 8 rows 162 -> 135 us, 6 rows 141 -> 126 us; 1-4 rows
// were 3-7% slower with 16). The sums are the same either way (in order over k).
template <int M>
constexpr int KBlock() {
  return kLanes == 16 && M >= 5 ? 16 : 8;
}

// out[:, n0:n1] = x @ W[:, n0:n1] for W stored [K, N] (the model's Linear kernels). The output
// block is accumulated KB weight rows at a time: one load of each weight vector serves all M rows.
// Each output element is the sum over k in order, whatever M, the blocking or the thread split.
// x[m, k] as a whole vector, loaded inside the loop that uses it: the barrier keeps the compiler
// from hoisting all M * KB of them out of the column loop, where they no longer fit the
// registers and every FMA would read one back from the stack.
// One load-and-broadcast instruction (vbroadcastss from memory, a load): `vec{} + *p`, the
// generic-vector spelling, compiled to a scalar add of +0.0 (not foldable: -0.0 + 0.0 is +0.0)
// and a register broadcast, two more floating-point operations for every row and weight row.
inline vec Broadcast(const float* p) {
#if defined(__AVX512F__)
  __m512 b = _mm512_set1_ps(*p);
  asm volatile("" : "+v"(b));
#else
  __m256 b = _mm256_set1_ps(*p);
  asm volatile("" : "+x"(b));
#endif
  vec v;
  __builtin_memcpy(&v, &b, sizeof(v));
  return v;
}

template <int M, int CB, typename W>
int64_t MatmulNNColumns(const float* __restrict x, const W* __restrict w,
                        float* __restrict out, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  constexpr int KB = KBlock<M>();
  constexpr int RG = RowGroup<M>();
  constexpr int64_t width = CB * kLanes;
  const int64_t end = n0 + (n1 - n0) / width * width;
  for (int64_t k = 0; k + KB <= K; k += KB) {
    const W* wk = w + k * N;
    for (int64_t n = n0; n < end; n += width) {
      // The next block's rows: the hardware prefetchers miss this strided pattern (a 5-row
      // product ran 1.3x faster with it); every 64-byte line of the block, into L2 (prefetcht1):
      // fetched into L1 (prefetcht0) the lines competed with the block being summed, and a
      // SmolLM2 forward of 1 or 4 tokens took 10% longer on a Zen 4.
      if (k + 2 * KB <= K)
        for (int j = 0; j < KB; ++j)
          for (int64_t c = 0; c < width; c += 64 / sizeof(W))
            __builtin_prefetch(wk + (KB + j) * N + n + c, 0, 2);
      // And, for several rows, the next column block's current rows (already in L2) into L1:
      // four rows do four times the arithmetic per line and wait on L2 otherwise (a 4-token
      // SmolLM2 forward 2% faster; one row, memory-bound, gained nothing and skips it).
      if (M > 1 && n + 2 * width <= end)
        for (int j = 0; j < KB; ++j)
          for (int64_t c = 0; c < width; c += 64 / sizeof(W))
            __builtin_prefetch(wk + j * N + n + width + c, 0, 3);
      for (int m0 = 0; m0 < M; m0 += RG) {
        constexpr int G = RG;
        vec acc[G][CB];
        for (int g = 0; g < G && m0 + g < M; ++g)
          for (int c = 0; c < CB; ++c) acc[g][c] = Load(out + (m0 + g) * N + n + c * kLanes);
        for (int j = 0; j < KB; ++j) {
          vec wv[CB];
          for (int c = 0; c < CB; ++c) wv[c] = LoadW(wk + j * N + n + c * kLanes);
          for (int g = 0; g < G && m0 + g < M; ++g) {
            const vec a = Broadcast(x + (m0 + g) * K + k + j);
            for (int c = 0; c < CB; ++c) acc[g][c] += a * wv[c];
          }
        }
        for (int g = 0; g < G && m0 + g < M; ++g)
          for (int c = 0; c < CB; ++c) Store(out + (m0 + g) * N + n + c * kLanes, acc[g][c]);
      }
    }
  }
  return end;
}

#if !defined(__AVX512F__)
// One row times a bf16 weight [K, N] on AVX2, 64 columns at a time: 16 weights loaded at once and
// widened by unpacking with zeros (one instruction per 8, where zero-extend and shift are two),
// which leaves columns 0-3 and 8-11 in one vector, 4-7 and 12-15 in the other. The accumulators
// keep that order and are permuted on their way from and to `out`; each element is still the
// same FMAs in the same order, so the result is bitwise the generic path's.
int64_t MatmulNNBf16Row(const float* __restrict x, const uint16_t* __restrict w,
                        float* __restrict out, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  constexpr int KB = 8;
  constexpr int P = 4;                // pairs of vectors: 64 columns
  constexpr int64_t width = P * 16;
  const int64_t end = n0 + (n1 - n0) / width * width;
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t k = 0; k + KB <= K; k += KB) {
    const uint16_t* wk = w + k * N;
    for (int64_t n = n0; n < end; n += width) {
      if (k + 2 * KB <= K)
        for (int j = 0; j < KB; ++j)
          for (int64_t c = 0; c < width; c += 32) __builtin_prefetch(wk + (KB + j) * N + n + c);
      __m256 lo[P], hi[P];
      for (int p = 0; p < P; ++p) {
        const __m256 a = _mm256_loadu_ps(out + n + 16 * p);
        const __m256 b = _mm256_loadu_ps(out + n + 16 * p + 8);
        lo[p] = _mm256_permute2f128_ps(a, b, 0x20);
        hi[p] = _mm256_permute2f128_ps(a, b, 0x31);
      }
      for (int j = 0; j < KB; ++j) {
        const vec b = Broadcast(x + k + j);
        __m256 xv;
        __builtin_memcpy(&xv, &b, sizeof(xv));
        for (int p = 0; p < P; ++p) {
          const __m256i raw =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + j * N + n + 16 * p));
          const __m256 w_lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
          const __m256 w_hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
          lo[p] = _mm256_fmadd_ps(xv, w_lo, lo[p]);
          hi[p] = _mm256_fmadd_ps(xv, w_hi, hi[p]);
        }
      }
      for (int p = 0; p < P; ++p) {
        _mm256_storeu_ps(out + n + 16 * p, _mm256_permute2f128_ps(lo[p], hi[p], 0x20));
        _mm256_storeu_ps(out + n + 16 * p + 8, _mm256_permute2f128_ps(lo[p], hi[p], 0x31));
      }
    }
  }
  return end;
}
#endif

// Column tiles of MatmulNN where a thread's M rows of output exceed kOutTileBytes (only the
// output head, among SmolLM2's products): 3072 columns is a multiple of every block width
// (16-128 columns with AVX-512, 8-64 with AVX2).
constexpr int64_t kColumnTile = 3072;
constexpr int64_t kOutTileBytes = 32 << 10;

template <int M, typename W>
void MatmulNN(const float* __restrict x, const W* __restrict w, float* __restrict out,
              int64_t K, int64_t N, int64_t n0, int64_t n1) {
  constexpr int KB = KBlock<M>();
  for (int m = 0; m < M; ++m) std::fill(out + m * N + n0, out + m * N + n1, 0.f);
  const int64_t k_end = K / KB * KB;
  // Wide products in tiles of columns, each summed over all of K before the next: the sweep
  // over a thread's columns for each KB weight rows re-reads its M rows of `out`, and where they
  // and the weight rows streamed between two visits outgrow the caches (SmolLM2's 49152-column
  // head: 96 KB of `out` a thread for one row, 786 KB for eight, and 0.8-1.5 MB of weights a
  // sweep) every visit went to L3. On a 2-core Intel Xeon (family 6 model 207), the head: one
  // row 4.0 -> 3.0 ms, four 4.0 -> 3.2, eight 6.6 -> 4.2-4.5; whole forwards of 1 and 8 tokens
  // 4-10% and 9% faster. A tile is a multiple of every block width below, so only the last has
  // narrower blocks; each output element is still summed over k in the same order.
  const int64_t tile = int64_t{M} * (n1 - n0) * 4 > kOutTileBytes ? kColumnTile : n1 - n0;
  int64_t n = n0;
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t t1 = std::min(n1, t0 + tile);
    n = t0;
#if !defined(__AVX512F__)
    if constexpr (M == 1 && std::is_same_v<W, uint16_t>)
      n = MatmulNNBf16Row(x, w, out, K, N, n, t1);
#endif
    // A thread's share is whole vectors of columns, not whole blocks (see SmallMatmul): what is
    // left after the widest blocks goes through narrower ones, each with its own accumulators.
    constexpr int CB = ColumnVectors<M>();
    n = MatmulNNColumns<M, CB, W>(x, w, out, K, N, n, t1);
    if constexpr (CB > 4) n = MatmulNNColumns<M, 4, W>(x, w, out, K, N, n, t1);
    if constexpr (CB > 2) n = MatmulNNColumns<M, 2, W>(x, w, out, K, N, n, t1);
    if constexpr (CB > 1) n = MatmulNNColumns<M, 1, W>(x, w, out, K, N, n, t1);
  }
  for (; n < n1; ++n)  // the last columns, one at a time, in the same order over k
    for (int64_t k = 0; k < k_end; k += KB)
      for (int m = 0; m < M; ++m) {
        float s = out[m * N + n];
        for (int j = 0; j < KB; ++j) s = Fma(x[m * K + k + j], ToFloat(w[(k + j) * N + n]), s);
        out[m * N + n] = s;
      }
  for (int64_t k = k_end; k < K; ++k)
    for (int m = 0; m < M; ++m)
      for (int64_t c = n0; c < n1; ++c)
        out[m * N + c] = Fma(x[m * K + k], ToFloat(w[k * N + c]), out[m * N + c]);
}

// The sum of a vector's lanes as a tree (lane i + lane i + half, ...): independent sums overlap,
// where a chain of scalar adds waits on each one.
inline float Sum(vec x) {
  float lanes[kLanes];
  __builtin_memcpy(lanes, &x, sizeof(x));
  for (int half = kLanes / 2; half > 0; half /= 2)
    for (int i = 0; i < half; ++i) lanes[i] += lanes[i + half];
  return lanes[0];
}

#if defined(__AVX512F__)
// Sum() of 16 vectors at once, as one vector of 16 sums: 15 vector adds and 30 shuffles where 16
// Sum()s are 16 stores and 240 scalar adds. Each level adds lane i and lane i + half of every
// partial, as Sum() does, so each sum is bitwise Sum() of its vector; kSumOrder.lane[v] is the
// lane that holds vector v's sum.
inline vec Sum16(const vec* v) {
  __m512 l1[8], l2[4], l3[2];
  for (int i = 0; i < 8; ++i) {  // half 8: [a lo + a hi | b lo + b hi]
    const __m512 a = reinterpret_cast<__m512>(v[2 * i]);
    const __m512 b = reinterpret_cast<__m512>(v[2 * i + 1]);
    l1[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // half 4 within each 8-lane partial
    const __m512 a = l1[2 * i], b = l1[2 * i + 1];
    l2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }
  for (int i = 0; i < 2; ++i) {  // half 2 within each 4-lane partial (a 128-bit lane)
    const __m512 a = l2[2 * i], b = l2[2 * i + 1];
    l3[i] = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
  }
  // half 1 within each 2-lane partial
  return reinterpret_cast<vec>(_mm512_add_ps(_mm512_shuffle_ps(l3[0], l3[1], 0x88),
                                             _mm512_shuffle_ps(l3[0], l3[1], 0xDD)));
}

// Where Sum16 leaves vector v's sum, found once by summing indicator vectors (exact).
struct SumOrder {
  int lane[16];
  SumOrder() {
    vec v[16];
    for (int i = 0; i < 16; ++i) {
      v[i] = vec{};
      v[i][0] = static_cast<float>(i + 1);
    }
    const vec sums = Sum16(v);
    for (int l = 0; l < 16; ++l) lane[static_cast<int>(sums[l]) - 1] = l;
  }
};
const SumOrder kSumOrder;
#endif

// out[:, v0:v1] = x @ E[v0:v1, :]^T for E stored [V, K] (the tied embedding as output head): VB
// weight rows at a time, each a contiguous dot product with every one of the M rows, taken RG
// rows at a time so that RG * VB accumulators and the VB weight vectors fit the registers (the
// VB weight rows, a few KB, are read again from L1 for each group).
template <int M, typename W>
void MatmulNT(const float* __restrict x, const W* __restrict e, float* __restrict out,
              int64_t K, int64_t V, int64_t v0, int64_t v1) {
  constexpr int VB = 4;
  constexpr int RG = kLanes == 16 ? 4 : 2;
  const int64_t kv = K / kLanes * kLanes;
  // One element, in the blocked path's order: lane sums over whole vectors, then the tail.
  auto dot = [&](int m, int64_t v) {
    vec acc = {};
    for (int64_t d = 0; d < kv; d += kLanes) acc += Load(x + m * K + d) * LoadW(e + v * K + d);
    float s = Sum(acc);
    for (int64_t d = kv; d < K; ++d) s = Fma(x[m * K + d], ToFloat(e[v * K + d]), s);
    return s;
  };
  int64_t v = v0;
  for (; v + VB <= v1; v += VB) {
    for (int j = 0; j < VB; ++j)
      if (v + 2 * VB <= v1) __builtin_prefetch(e + (v + VB + j) * K);
    for (int m0 = 0; m0 < M; m0 += RG) {
      constexpr int G = RG;
      const int rows = std::min(G, M - m0);
      vec acc[G][VB] = {};
      for (int64_t d = 0; d < kv; d += kLanes) {
        vec ev[VB];
        for (int j = 0; j < VB; ++j) ev[j] = LoadW(e + (v + j) * K + d);
        for (int g = 0; g < G; ++g) {
          if (g >= rows) break;
          const vec xv = Load(x + (m0 + g) * K + d);
          for (int j = 0; j < VB; ++j) acc[g][j] += xv * ev[j];
        }
      }
#if defined(__AVX512F__)
      static_assert(G * VB == 16, "Sum16 sums a block's 16 accumulators");
      const vec tree = Sum16(&acc[0][0]);
      auto sum = [&](int g, int j) { return tree[kSumOrder.lane[g * VB + j]]; };
#else
      auto sum = [&](int g, int j) { return Sum(acc[g][j]); };
#endif
      for (int g = 0; g < rows; ++g)
        for (int j = 0; j < VB; ++j) {
          float s = sum(g, j);
          for (int64_t d = kv; d < K; ++d)
            s = Fma(x[(m0 + g) * K + d], ToFloat(e[(v + j) * K + d]), s);
          out[(m0 + g) * V + v + j] = s;
        }
    }
  }
  for (; v < v1; ++v)
    for (int m = 0; m < M; ++m) out[m * V + v] = dot(m, v);
}

// The threads a product is split over: the cores, at most 8, or AMD135M_KERNEL_THREADS.
int KernelThreads() {
  static const int threads = [] {
    const char* env = std::getenv("AMD135M_KERNEL_THREADS");
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    const int wanted = env != nullptr ? std::atoi(env) : cores;
    return std::max(1, std::min(8, wanted > 0 ? wanted : cores));
  }();
  return threads;
}

// A job split into chunks that threads claim from a counter: whoever comes (the caller, a worker
// that wakes late, or no worker at all) takes the next chunk, and the caller waits only for chunks
// already claimed, which are running.
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

// Helper threads that spin briefly between jobs: a SmolLM2 forward calls these kernels some 240
// times, tens of microseconds apart (the smallest, a 576 x 192 product, takes about 30 us), so a
// helper should be running when a call arrives rather than be woken for it. After 200 us without
// a job a worker sleeps, so an idle process leaves the cores alone.
class Workers {
 public:
  static Workers& Get() {
    static Workers* workers = new Workers();  // never destroyed: detached threads outlive main
    return *workers;
  }

  void Run(int chunks, std::function<void(int)> body) {
    auto job = std::make_shared<Job>();
    job->chunks = chunks;
    job->body = std::move(body);
    // One job at a time: a caller that finds the workers busy (another device's forward) works
    // alone rather than waiting, and so does a forked child, which has none of the threads (and
    // maybe a mutex locked at the fork).
    const bool helped = chunks > 1 && !threads_.empty() && getpid() == pid_;
    std::unique_lock<std::mutex> dispatch(dispatch_, std::defer_lock);
    if (helped && dispatch.try_lock()) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        job_ = job;
        generation_.fetch_add(1, std::memory_order_release);
      }
      if (sleeping_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    }
    job->Work();
    while (job->done.load(std::memory_order_acquire) < chunks) __builtin_ia32_pause();
  }

 private:
  Workers() : pid_(getpid()) {
    for (int i = 0; i + 1 < KernelThreads(); ++i)
      threads_.emplace_back([this] { Loop(); }).detach();
  }

  void Loop() {
    pthread_setname_np(pthread_self(), "amd135m-kernels");  // for top -H and /proc/*/task
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        __builtin_ia32_pause();
        // Let a runnable thread have the core now and then: XLA splits its larger ops (a
        // speculative round's argmax and one-hot over 4 x 49152 logits) over its own threads,
        // and on 2 cores a part waited for this spin (0.73 against 1.08 ms between a round's
        // forwards). sched_yield returns at once when nothing else wants the core.
        if ((spins & 15) == 15) sched_yield();
        if ((spins & 255) == 255 && std::chrono::steady_clock::now() > deadline) {
          std::unique_lock<std::mutex> lock(mutex_);
          sleeping_.fetch_add(1, std::memory_order_acq_rel);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_acq_rel);
        }
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        seen = generation_.load(std::memory_order_acquire);
        job = job_;
      }
      job->Work();
    }
  }

  const pid_t pid_;
  std::mutex dispatch_;
  std::mutex mutex_;  // guards job_ and the sleep/wake handshake
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleeping_{0};
  std::shared_ptr<Job> job_;
  std::vector<std::thread> threads_;
};

void RunChunks(int chunks, std::function<void(int)> body) {
  Workers::Get().Run(chunks, std::move(body));
}

// The same on XLA's own intra-op threads, for products that come milliseconds apart (a prompt's):
// between them XLA runs its ops, the helpers above fall asleep, and a woken helper was often
// queued behind the caller, which then did the product alone (a quarter to half of a 512-token
// prompt's products ran at one thread's pace; docs/RESULTS.md). XLA's threads are the ones that
// were just running its ops. A task that starts after the caller took every chunk does nothing.
void RunChunksOn(ffi::ThreadPool& pool, int chunks, std::function<void(int)> body) {
  auto job = std::make_shared<Job>();
  job->chunks = chunks;
  job->body = std::move(body);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < chunks) __builtin_ia32_pause();
}

template <typename W>
using Kernel = void (*)(const float*, const W*, float*, int64_t, int64_t, int64_t, int64_t);

// The rows a product of weight type W takes: 1-16 for f32 weights (cpu_kernels.wide_rows), 1-8
// for bf16 ones, which cpu_kernels never sends more (their 9-16-row copies took 4 s of the build).
template <typename W>
constexpr int MaxRows() {
  return std::is_same_v<W, float> ? kMaxWideRows : kMaxRows;
}

template <typename W>
Kernel<W> Select(bool transposed, int64_t rows) {
  if constexpr (MaxRows<W>() == kMaxWideRows) {
    static const Kernel<W> nn[kMaxWideRows] = {
        &MatmulNN<1, W>, &MatmulNN<2, W>, &MatmulNN<3, W>, &MatmulNN<4, W>,
        &MatmulNN<5, W>, &MatmulNN<6, W>, &MatmulNN<7, W>, &MatmulNN<8, W>,
        &MatmulNN<9, W>, &MatmulNN<10, W>, &MatmulNN<11, W>, &MatmulNN<12, W>,
        &MatmulNN<13, W>, &MatmulNN<14, W>, &MatmulNN<15, W>, &MatmulNN<16, W>};
    static const Kernel<W> nt[kMaxWideRows] = {
        &MatmulNT<1, W>, &MatmulNT<2, W>, &MatmulNT<3, W>, &MatmulNT<4, W>,
        &MatmulNT<5, W>, &MatmulNT<6, W>, &MatmulNT<7, W>, &MatmulNT<8, W>,
        &MatmulNT<9, W>, &MatmulNT<10, W>, &MatmulNT<11, W>, &MatmulNT<12, W>,
        &MatmulNT<13, W>, &MatmulNT<14, W>, &MatmulNT<15, W>, &MatmulNT<16, W>};
    return (transposed ? nt : nn)[rows - 1];
  } else {
    static const Kernel<W> nn[kMaxRows] = {
        &MatmulNN<1, W>, &MatmulNN<2, W>, &MatmulNN<3, W>, &MatmulNN<4, W>,
        &MatmulNN<5, W>, &MatmulNN<6, W>, &MatmulNN<7, W>, &MatmulNN<8, W>};
    static const Kernel<W> nt[kMaxRows] = {
        &MatmulNT<1, W>, &MatmulNT<2, W>, &MatmulNT<3, W>, &MatmulNT<4, W>,
        &MatmulNT<5, W>, &MatmulNT<6, W>, &MatmulNT<7, W>, &MatmulNT<8, W>};
    return (transposed ? nt : nn)[rows - 1];
  }
}

template <ffi::DataType D>
ffi::Error SmallMatmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<D> w,
                       ffi::ResultBuffer<ffi::F32> out, bool transposed) {
  using W = ffi::NativeType<D>;
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2)
    return ffi::Error::InvalidArgument("small_matmul takes a 2-D x and a 2-D weight");
  const int64_t rows = xd[0], k = xd[1];
  const int64_t n = transposed ? wd[0] : wd[1];
  if ((transposed ? wd[1] : wd[0]) != k)
    return ffi::Error::InvalidArgument("small_matmul: x and the weight disagree on K");
  if (rows < 1 || rows > MaxRows<W>())
    return ffi::Error::InvalidArgument(MaxRows<W>() == kMaxWideRows
                                           ? "small_matmul takes 1 to 16 rows of f32 weights"
                                           : "small_matmul takes 1 to 8 rows of bf16 weights");
  Kernel<W> kernel = Select<W>(transposed, rows);
  const float* xp = x.typed_data();
  const W* wp = w.typed_data();
  float* op = out->typed_data();
  // One chunk of columns per thread, in whole vectors (rows of a transposed weight, in fours):
  // each thread streams the widest contiguous runs of every weight row. Chunks of whole 8-vector
  // blocks split a 576-column product (SmolLM2's q, o and down) 384 / 192, at the pace of the
  // larger share. (Four chunks per thread, so that a helper starting late would still find work,
  // made a SmolLM2 step 5% and a 5-token forward 10% slower; a helper that has not started when
  // the caller's chunk is done leaves its chunk to the caller.)
  const int64_t threads = KernelThreads();
  const int64_t block = transposed ? 4 : kLanes;
  const int64_t blocks_per_thread = (n + threads * block - 1) / (threads * block);
  const int64_t per = std::max<int64_t>(block, blocks_per_thread * block);
  const int chunks = static_cast<int>((n + per - 1) / per);
  RunChunks(chunks, [=](int i) {
    kernel(xp, wp, op, k, n, i * per, std::min<int64_t>(n, (i + 1) * per));
  });
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------------------------
// A few rows over S weight panels at once ([N / P][K][P], f32 or bf16), spaced a thread's share
// / S apart: S streams from memory where the one-panel kernels below read one. Each core's own
// stream was bound by its outstanding misses (two threads reading 1 GiB on the Intel Xeon of
// 2026-12-08: 23.2 GB/s as one stream each, 26.7 as two, 28.3 as four, 28.1 as eight; a SmolLM2
// decode step's f32 products 25.5 -> 21.5 ms). Each output is the sum over k in order from zero,
// as in the one-panel kernels: bitwise their result.
template <int M, int S, int P, typename W>
void PanelStreamsOf(const float* __restrict x, const W* __restrict w, float* __restrict out,
                    int64_t K, int64_t N, int64_t p0, int64_t span) {
  constexpr int CB = P / kLanes;
  constexpr int64_t kRowBytes = P * sizeof(W);
  for (int64_t i = 0; i < span; ++i) {
    const W* panel[S];
    for (int s = 0; s < S; ++s) panel[s] = w + (p0 + s * span + i) * K * P;
    vec acc[M][S][CB];
    for (int g = 0; g < M; ++g)
      for (int s = 0; s < S; ++s)
        for (int c = 0; c < CB; ++c) acc[g][s][c] = vec{};
    for (int64_t k = 0; k < K; ++k) {
      vec wv[S][CB];
      for (int s = 0; s < S; ++s) {
        const char* ahead = reinterpret_cast<const char*>(panel[s] + (k + 16) * P);
        for (int64_t b = 0; b < kRowBytes; b += 64) __builtin_prefetch(ahead + b, 0, 3);
        for (int c = 0; c < CB; ++c) wv[s][c] = LoadW(panel[s] + k * P + c * kLanes);
      }
      for (int g = 0; g < M; ++g) {
        const vec a = Broadcast(x + g * K + k);
        for (int s = 0; s < S; ++s)
          for (int c = 0; c < CB; ++c) acc[g][s][c] += a * wv[s][c];
      }
    }
    for (int s = 0; s < S; ++s) {
      const int64_t n0 = (p0 + s * span + i) * P;
      const int64_t columns = std::min<int64_t>(P, N - n0);
      for (int g = 0; g < M; ++g) {
        float lanes[P];
        __builtin_memcpy(lanes, acc[g][s], sizeof(lanes));
        std::copy_n(lanes, columns, out + g * N + n0);
      }
    }
  }
}

// Panels p0..p1 in up to S streams (fewer where there are fewer panels: a 192-wide f32 product's
// 6 panels are 3 a thread); returns the first panel left over for a one-stream kernel.
template <int M, int S, int P, typename W>
int64_t PanelStreams(const float* x, const W* w, float* out, int64_t K, int64_t N, int64_t p0,
                     int64_t p1) {
  const int64_t count = p1 - p0;
  if constexpr (S >= 4) {
    if (count >= 4) {
      PanelStreamsOf<M, 4, P, W>(x, w, out, K, N, p0, count / 4);
      return p0 + count / 4 * 4;
    }
  }
  if constexpr (S >= 3) {
    if (count >= 3) {
      PanelStreamsOf<M, 3, P, W>(x, w, out, K, N, p0, count / 3);
      return p0 + count / 3 * 3;
    }
  }
  if constexpr (S >= 2) {
    if (count >= 2) {
      PanelStreamsOf<M, 2, P, W>(x, w, out, K, N, p0, count / 2);
      return p0 + count / 2 * 2;
    }
  }
  return p0;
}

// Streams for M rows: 2 (f32) or 4 (bf16) accumulators a row and stream; up to 24 in all (one
// stream on AVX2 hosts, whose 16 registers hold one panel's).
constexpr int kF32StreamedRows = 6;
template <int M>
constexpr int F32PanelStreams() {
  return kLanes != 16 ? 1 : M <= 2 ? 4 : M <= 6 ? 2 : 1;
}
template <int M>
constexpr int Bf16PanelStreams() {
  return kLanes != 16 ? 1 : M == 1 ? 4 : M <= 3 ? 2 : 1;
}


// ---------------------------------------------------------------------------------------------
// bf16 weights stored as panels of 64 output columns, each panel contiguous over the inputs
// ([N / 64][K][64], quantize.Bf16Weight): a thread's share of the weight is one stream (a few
// for 1-3 rows: PanelStreams), where the model's row-major [K, N] is read as many short ones
// (each k row's slice of a column block, 128 bytes); two Zen 4 threads streamed panels 1.2-1.6x
// faster (tools/bf16_panel_bench.cc).
// Each output is the sum over k in order, as MatmulNN sums it, so the result is bitwise that of
// the row-major kernel on the same weights.
constexpr int64_t kPanel = 64;

template <int M>
void PanelRows(const float* __restrict x, const uint16_t* __restrict w, float* __restrict out,
               int64_t K, int64_t N, int64_t p0, int64_t p1) {
  constexpr int CB = kPanel / kLanes;          // accumulators per row: 4 (AVX-512), 8 (AVX2)
  constexpr int RG = kLanes == 16 ? 4 : 1;     // rows sharing each weight vector
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* panel = w + p * K * kPanel;
    const int64_t n0 = p * kPanel, columns = std::min<int64_t>(kPanel, N - n0);
    for (int m0 = 0; m0 < M; m0 += RG) {
      const int rows = std::min(RG, M - m0);
      vec acc[RG][CB];
      for (int g = 0; g < RG; ++g)
        for (int c = 0; c < CB; ++c) acc[g][c] = vec{};
      for (int64_t k = 0; k < K; ++k) {
        __builtin_prefetch(panel + (k + 16) * kPanel);
        __builtin_prefetch(panel + (k + 16) * kPanel + 32);
        vec wv[CB];
        for (int c = 0; c < CB; ++c) wv[c] = LoadW(panel + k * kPanel + c * kLanes);
        for (int g = 0; g < RG; ++g) {
          if (g >= rows) break;
          const vec a = Broadcast(x + (m0 + g) * K + k);
          for (int c = 0; c < CB; ++c) acc[g][c] += a * wv[c];
        }
      }
      for (int g = 0; g < rows; ++g) {
        float lanes[kPanel];
        __builtin_memcpy(lanes, acc[g], sizeof(lanes));
        std::copy_n(lanes, columns, out + (m0 + g) * N + n0);
      }
    }
  }
}

template <int M>
void PanelRowsStreamed(const float* __restrict x, const uint16_t* __restrict w,
                       float* __restrict out, int64_t K, int64_t N, int64_t p0, int64_t p1) {
  p0 = PanelStreams<M, Bf16PanelStreams<M>(), kPanel>(x, w, out, K, N, p0, p1);
  PanelRows<M>(x, w, out, K, N, p0, p1);  // the panels left over, one stream
}

using PanelKernel = void (*)(const float*, const uint16_t*, float*, int64_t, int64_t, int64_t,
                             int64_t);

ffi::Error SmallMatmulBf16Panels(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                                 ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel || od.size() != 2)
    return ffi::Error::InvalidArgument("small_matmul_bf16_panels takes x [M, K], w [P, K, 64]");
  const int64_t rows = xd[0], k = xd[1], panels = wd[0], n = od[1];
  if (wd[1] != k || (n + kPanel - 1) / kPanel != panels)
    return ffi::Error::InvalidArgument("small_matmul_bf16_panels: x, panels and out disagree");
  if (rows < 1 || rows > kMaxRows)
    return ffi::Error::InvalidArgument("small_matmul_bf16_panels takes 1 to 8 rows");
  static const PanelKernel kernels[kMaxRows] = {
      &PanelRowsStreamed<1>, &PanelRowsStreamed<2>, &PanelRowsStreamed<3>, &PanelRows<4>,
      &PanelRows<5>, &PanelRows<6>, &PanelRows<7>, &PanelRows<8>};
  PanelKernel kernel = kernels[rows - 1];
  const float* xp = x.typed_data();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* op = out->typed_data();
  const int64_t threads = KernelThreads();
  const int64_t per = std::max<int64_t>(1, (panels + threads - 1) / threads);
  const int chunks = static_cast<int>((panels + per - 1) / per);
  RunChunks(chunks, [=](int i) {
    kernel(xp, wp, op, k, n, i * per, std::min<int64_t>(panels, (i + 1) * per));
  });
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------------------------
// f32 weights stored as panels of 32 output columns ([N / 32][K][32], quantize.F32Panels, the
// decode layout of f32 params): each panel one contiguous stream, summed over all of K with its
// rows' accumulators in registers, where the row-major kernel reads each k row's slice of a
// column block (128 bytes, strided by N) and loads and stores the accumulators every KB rows.
// Two Zen 4 threads streamed SmolLM2's 30 layers (425 MB) for 12 rows in 18-21 ms as panels
// against 32-34 ms row-major, 4-8 rows 17-21 against 21-27, one row alike (16-21 ms;
// docs/RESULTS.md). Two vectors of columns a row (AVX-512; four on AVX2), up to 12 rows in one
// group (24 accumulators); 13-16 rows in two groups of 8, the second reading the panel from L2.
// Each output is the sum over k in order from zero, as MatmulNN sums it: bitwise the row-major
// kernel's result, and each row its one-row product.
constexpr int64_t kF32Panel = 32;

template <int M>
constexpr int F32PanelGroup() {
  return kLanes == 16 ? (M > 12 ? 8 : M) : std::min(M, 2);
}

template <int M>
void F32PanelRows(const float* __restrict x, const float* __restrict w, float* __restrict out,
                  int64_t K, int64_t N, int64_t p0, int64_t p1) {
  constexpr int CB = kF32Panel / kLanes;
  constexpr int RG = F32PanelGroup<M>();
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = w + p * K * kF32Panel;
    const int64_t n0 = p * kF32Panel, columns = std::min<int64_t>(kF32Panel, N - n0);
    for (int m0 = 0; m0 < M; m0 += RG) {
      vec acc[RG][CB];
      for (int g = 0; g < RG; ++g)
        for (int c = 0; c < CB; ++c) acc[g][c] = vec{};
      for (int64_t k = 0; k < K; ++k) {
        // 16 weight rows (2 KB) ahead, on the first group's pass (a later one reads L2).
        if (m0 == 0)
          for (int c = 0; c < CB; c += 16 / kLanes)
            __builtin_prefetch(panel + (k + 16) * kF32Panel + c * kLanes, 0, 3);
        vec wv[CB];
        for (int c = 0; c < CB; ++c) wv[c] = Load(panel + k * kF32Panel + c * kLanes);
        for (int g = 0; g < RG && m0 + g < M; ++g) {
          const vec a = Broadcast(x + (m0 + g) * K + k);
          for (int c = 0; c < CB; ++c) acc[g][c] += a * wv[c];
        }
      }
      for (int g = 0; g < RG && m0 + g < M; ++g) {
        float lanes[kF32Panel];
        __builtin_memcpy(lanes, acc[g], sizeof(lanes));
        std::copy_n(lanes, columns, out + (m0 + g) * N + n0);
      }
    }
  }
}

template <int M>
void F32PanelRowsStreamed(const float* __restrict x, const float* __restrict w,
                          float* __restrict out, int64_t K, int64_t N, int64_t p0, int64_t p1) {
  p0 = PanelStreams<M, F32PanelStreams<M>(), kF32Panel>(x, w, out, K, N, p0, p1);
  F32PanelRows<M>(x, w, out, K, N, p0, p1);  // the panels left over, one stream
}

// Any number of rows: blocks of kF32RowBlock rows (a block's rows stay in L2 while every panel
// streams past them once), each panel summed for the block 16 rows at a time while it is in L2.
// A prefill through the panels runs as fast as XLA's GEMM on the row-major weight or faster
// (XLA's product of the panels as they lie copied the weight on every call: a 24-token SmolLM2
// forward 93 -> 235 ms).
constexpr int64_t kF32RowBlock = 256;
constexpr int64_t kF32PoolRows = 64;

using F32PanelKernel = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t,
                                int64_t);

ffi::Error SmallMatmulF32Panels(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kF32Panel || od.size() != 2)
    return ffi::Error::InvalidArgument("small_matmul_f32_panels takes x [M, K], w [P, K, 32]");
  const int64_t rows = xd[0], k = xd[1], panels = wd[0], n = od[1];
  if (wd[1] != k || (n + kF32Panel - 1) / kF32Panel != panels || od[0] != rows)
    return ffi::Error::InvalidArgument("small_matmul_f32_panels: x, panels and out disagree");
  if (rows < 1) return ffi::Error::Success();
  static const F32PanelKernel kernels[kMaxWideRows] = {
      &F32PanelRows<1>, &F32PanelRows<2>, &F32PanelRows<3>, &F32PanelRows<4>,
      &F32PanelRows<5>, &F32PanelRows<6>, &F32PanelRows<7>, &F32PanelRows<8>,
      &F32PanelRows<9>, &F32PanelRows<10>, &F32PanelRows<11>, &F32PanelRows<12>,
      &F32PanelRows<13>, &F32PanelRows<14>, &F32PanelRows<15>, &F32PanelRows<16>};
  static const F32PanelKernel streamed[kF32StreamedRows] = {
      &F32PanelRowsStreamed<1>, &F32PanelRowsStreamed<2>, &F32PanelRowsStreamed<3>,
      &F32PanelRowsStreamed<4>, &F32PanelRowsStreamed<5>, &F32PanelRowsStreamed<6>};
  // Up to 16 rows in one call; more in groups of 12 on AVX-512 hosts (one pass each: 24
  // accumulators), 8 on AVX2 ones (16 registers: more rows, more passes).
  const int64_t group = kLanes == 16 ? (rows <= kMaxWideRows ? kMaxWideRows : 12) : kMaxRows;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  const int64_t threads = KernelThreads();
  const int64_t per = std::max<int64_t>(1, (panels + threads - 1) / threads);
  const int chunks = static_cast<int>((panels + per - 1) / per);
  // From 64 rows on (a prompt's), XLA's threads help (RunChunksOn): a 200-token forward 367-436
  // ms against 408-430 with the kernels' own helper, 4 x 125 tokens 868-940 against 971-1089
  // (XLA's GEMM on row-major weights 392-418 and 903-954). At 24-32 rows, products well under a
  // millisecond apart, the own helper, awake, is as fast or faster (1 x 24: 57-68 against 66-72).
  const bool prompt = rows >= kF32PoolRows;
  for (int64_t r0 = 0; r0 < rows; r0 += kF32RowBlock) {
    const int64_t r1 = std::min(rows, r0 + kF32RowBlock);
    std::function<void(int)> body = [=](int i) {
      const int64_t p1 = std::min<int64_t>(panels, (i + 1) * per);
      // One panel at a time past one group (it stays in L2 for the others), all of the
      // thread's panels at once for a single group (a few streams for 1-6 rows).
      const int64_t step = r1 - r0 > group ? 1 : p1 - i * per;
      for (int64_t p = i * per; p < p1; p += step)
        for (int64_t g = r0; g < r1; g += group) {
          const int64_t m = std::min(group, r1 - g);
          (m <= kF32StreamedRows && step > 1 ? streamed : kernels)[m - 1](
              xp + g * k, wp, op + g * n, k, n, p, std::min(p1, p + step));
        }
    };
    if (prompt) RunChunksOn(pool, chunks, std::move(body));
    else RunChunks(chunks, std::move(body));
  }
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------------------------
// Products with int8 weights: out[m, n] = scale[n] * sum_k xq(x)[m, k] * W[n, k], W int8 in row
// groups (below; one f32 scale per output row n), and the f32 rows x quantized on the fly to int8
// per block of 32 inputs (xq = sx[m, b] * q, sx = max |x| / 127 over the block, q rounded to
// nearest even), as llama.cpp's Q8_0 does. Each block's dot product is exact integer arithmetic
// (pairs of int8 products to int16, then int32: 32 products per handful of instructions, where
// widening every weight to f32 was bound by the conversions, about 4 GMAC/s on the Zen 1 EPYC);
// its sum is scaled by sx and accumulated in f32 in block order. The same for every M and thread
// split, so row m of a several-row product is bitwise its one-row product.

constexpr int64_t kBlock = 32;
constexpr int kGroup = 4;  // output rows of an int8 or int4 weight interleaved by block

// Rows of x quantized once per call: q and |q| (the unsigned operand of maddubs) per block,
// padded with zeros to whole blocks, and the blocks' scales.
struct QuantizedRows {
  std::vector<int8_t> q, abs_q;
  std::vector<float> scale;
  std::vector<float> total;  // scale * sum of q per block: what an int4 block's minimum multiplies
  int64_t blocks = 0;
};

QuantizedRows QuantizeRows(const float* x, int64_t M, int64_t K) {
  QuantizedRows r;
  r.blocks = (K + kBlock - 1) / kBlock;
  r.q.assign(M * r.blocks * kBlock, 0);
  r.abs_q.assign(M * r.blocks * kBlock, 0);
  r.scale.assign(M * r.blocks, 0.f);
  r.total.assign(M * r.blocks, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < r.blocks; ++b) {
      const int64_t k0 = b * kBlock, k1 = std::min(K, k0 + kBlock);
      float top = 0.f;
      for (int64_t k = k0; k < k1; ++k) top = std::max(top, std::fabs(x[m * K + k]));
      const float s = top / 127.f;
      r.scale[m * r.blocks + b] = s;
      if (s == 0.f) continue;  // an all-zero block: q stays 0
      int32_t sum = 0;
      for (int64_t k = k0; k < k1; ++k) {
        const float v = std::nearbyint(x[m * K + k] / s);
        const int8_t q = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
        r.q[(m * r.blocks + b) * kBlock + (k - k0)] = q;
        r.abs_q[(m * r.blocks + b) * kBlock + (k - k0)] = static_cast<int8_t>(q < 0 ? -q : q);
        sum += q;
      }
      r.total[m * r.blocks + b] = static_cast<float>(sum) * s;
    }
  return r;
}

// The 32-product integer dot of one block as 8 int32 lanes: |q| * (w with q's signs), pairwise
// to int16 (at most 2 * 127 * 127, no saturation), then pairs to int32; with AVX512-VNNI one
// instruction sums each 4 products straight to int32 (the same integers: nothing saturates).
inline __m256i BlockDot(__m256i abs_q, __m256i q, __m256i w) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), abs_q, _mm256_sign_epi8(w, q));
#else
  const __m256i products = _mm256_maddubs_epi16(abs_q, _mm256_sign_epi8(w, q));
  return _mm256_madd_epi16(products, _mm256_set1_epi16(1));
#endif
}

inline float Sum8(__m256 v) {
  float lanes[8];
  _mm256_storeu_ps(lanes, v);
  for (int half = 4; half > 0; half /= 2)
    for (int i = 0; i < half; ++i) lanes[i] += lanes[i + half];
  return lanes[0];
}

// Row groups g0..g1 of W for all M rows, RG rows of x at a time so that the RG * 4 accumulators
// fit the registers. W is stored in groups of kGroup output rows, interleaved by block
// ([G, blocks, kGroup, 32]: a group's block b of its rows 0..3, then block b + 1, ...), so a
// thread reads its share as one contiguous stream; with the rows as they lie ([N, K]) each
// group's four rows were four streams a K apart, and two threads streamed 15-19 GB/s where one
// stream runs 30-35 (docs/RESULTS.md). The blocks' sums are the same in the same order either
// way. Padding (K to whole blocks, N to whole groups) is zeros, so no tail code.
template <int M>
void Int8Rows(const QuantizedRows& x, const int8_t* __restrict w, const float* __restrict scale,
              float* __restrict out, int64_t N, int64_t g0, int64_t g1) {
  constexpr int RG = 2;
  const int64_t nb = x.blocks, group_bytes = nb * kBlock * kGroup;
  for (int64_t g = g0; g < g1; ++g) {
    const int8_t* wg = w + g * group_bytes;
    for (int m0 = 0; m0 < M; m0 += RG) {
      const int rows = std::min(RG, M - m0);
      __m256 acc[RG][kGroup];
      for (int r = 0; r < RG; ++r)
        for (int j = 0; j < kGroup; ++j) acc[r][j] = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        __m256i wv[kGroup];
        for (int j = 0; j < kGroup; ++j)
          wv[j] = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(wg + (b * kGroup + j) * kBlock));
        for (int r = 0; r < RG; ++r) {
          if (r >= rows) break;
          const int64_t at = ((m0 + r) * nb + b) * kBlock;
          const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&x.q[at]));
          const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&x.abs_q[at]));
          const __m256 s = _mm256_set1_ps(x.scale[(m0 + r) * nb + b]);
          for (int j = 0; j < kGroup; ++j)
            acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(BlockDot(a, q, wv[j])), s, acc[r][j]);
        }
      }
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < kGroup; ++j) {
          const int64_t n = g * kGroup + j;
          if (n < N) out[(m0 + r) * N + n] = Sum8(acc[r][j]) * scale[n];
        }
    }
  }
}

// Output rows 0..n of an int8 or int4 product split over the threads in whole 4-row blocks (the
// kernels' register blocking), one contiguous range each: fn(n0, n1).
template <typename Fn>
void RunRowBlocks(int64_t n, Fn fn) {
  const int64_t threads = KernelThreads();
  const int64_t block = 4;
  const int64_t blocks_per_thread = (n + threads * block - 1) / (threads * block);
  const int64_t per = std::max<int64_t>(block, blocks_per_thread * block);
  const int chunks = static_cast<int>((n + per - 1) / per);
  RunChunks(chunks, [=](int i) { fn(i * per, std::min<int64_t>(n, (i + 1) * per)); });
}

// Streams for one or two rows of an int8 or int4 weight: 16 accumulators (ymm) either way, which
// AVX-512 hosts hold in their 32 registers; AVX2 ones have 16 (two streams for one row, one for
// two).
template <int M>
constexpr int RowGroupStreams() {
  return kLanes == 16 ? (M == 1 ? 4 : 2) : (M == 1 ? 2 : 1);
}

// One or two rows over S row groups at once, spaced a thread's share / S apart: S streams from
// memory, as PanelStreamsOf does for f32 and bf16 panels. Same block order per output: bitwise
// Int8Rows' result.
template <int M, int S>
void Int8Streams(const QuantizedRows& x, const int8_t* __restrict w, const float* __restrict scale,
                 float* __restrict out, int64_t N, int64_t g0, int64_t span) {
  const int64_t nb = x.blocks, group_bytes = nb * kBlock * kGroup;
  for (int64_t i = 0; i < span; ++i) {
    const int8_t* wg[S];
    for (int s = 0; s < S; ++s) wg[s] = w + (g0 + s * span + i) * group_bytes;
    __m256 acc[M][S][kGroup];
    for (int r = 0; r < M; ++r)
      for (int s = 0; s < S; ++s)
        for (int j = 0; j < kGroup; ++j) acc[r][s][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m256i q[M], a[M];
      __m256 sx[M];
      for (int r = 0; r < M; ++r) {
        const int64_t at = (r * nb + b) * kBlock;
        q[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&x.q[at]));
        a[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&x.abs_q[at]));
        sx[r] = _mm256_set1_ps(x.scale[r * nb + b]);
      }
      for (int s = 0; s < S; ++s) {
        const int8_t* block = wg[s] + b * kBlock * kGroup;
        __builtin_prefetch(block + 16 * kBlock * kGroup, 0, 3);
        __builtin_prefetch(block + 16 * kBlock * kGroup + 64, 0, 3);
        for (int j = 0; j < kGroup; ++j) {
          const __m256i wv =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + j * kBlock));
          for (int r = 0; r < M; ++r)
            acc[r][s][j] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(BlockDot(a[r], q[r], wv)), sx[r], acc[r][s][j]);
        }
      }
    }
    for (int s = 0; s < S; ++s)
      for (int r = 0; r < M; ++r)
        for (int j = 0; j < kGroup; ++j) {
          const int64_t n = (g0 + s * span + i) * kGroup + j;
          if (n < N) out[r * N + n] = Sum8(acc[r][s][j]) * scale[n];
        }
  }
}

template <int M>
void Int8RowsStreamed(const QuantizedRows& x, const int8_t* __restrict w,
                      const float* __restrict scale, float* __restrict out, int64_t N, int64_t g0,
                      int64_t g1) {
  constexpr int S = RowGroupStreams<M>();
  const int64_t count = g1 - g0;
  if (S > 1 && count >= S) {
    Int8Streams<M, S>(x, w, scale, out, N, g0, count / S);
    g0 += count / S * S;
  }
  Int8Rows<M>(x, w, scale, out, N, g0, g1);  // the groups left over, one stream
}

using Int8Kernel = void (*)(const QuantizedRows&, const int8_t*, const float*, float*, int64_t,
                            int64_t, int64_t);

// x [M, K] f32, w [G, B, kGroup, 32] int8 (row groups, B = ceil(K / 32), G = ceil(N / kGroup)),
// scale [N] f32 -> out [M, N].
ffi::Error SmallMatmulInt8(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                           ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || sd.size() != 1)
    return ffi::Error::InvalidArgument(
        "small_matmul_int8 takes a 2-D x, a 4-D weight in row groups and a 1-D scale");
  const int64_t rows = xd[0], k = xd[1], n = sd[0], groups = (n + kGroup - 1) / kGroup;
  if (wd[0] != groups || wd[1] != (k + kBlock - 1) / kBlock || wd[2] != kGroup ||
      wd[3] != kBlock)
    return ffi::Error::InvalidArgument("small_matmul_int8: x, weight and scale disagree");
  if (rows < 1 || rows > kMaxRows)
    return ffi::Error::InvalidArgument("small_matmul_int8 takes 1 to 8 rows");
  static const Int8Kernel kernels[kMaxRows] = {
      &Int8RowsStreamed<1>, &Int8RowsStreamed<2>, &Int8Rows<3>, &Int8Rows<4>,
      &Int8Rows<5>, &Int8Rows<6>, &Int8Rows<7>, &Int8Rows<8>};
  Int8Kernel kernel = kernels[rows - 1];
  const QuantizedRows quantized = QuantizeRows(x.typed_data(), rows, k);
  const QuantizedRows* xq = &quantized;
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* op = out->typed_data();
  RunRowBlocks(groups * kGroup, [=](int64_t n0, int64_t n1) {
    kernel(*xq, wp, sp, op, n, n0 / kGroup, n1 / kGroup);
  });
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------------------------
// Products with 4-bit weights in GGUF's Q4_1 arithmetic: per output row n and block b of 32
// inputs, w = d[n, b] * u + m[n, b] with u in 0..15, stored as 16 bytes per block (byte i holds
// input 32b + i in its low nibble and 32b + 16 + i in its high one). With the rows of x quantized
// per block as for int8 (xq = sx * q), a block contributes d * sx * sum(u * q) + m * (sx * sum q):
// the first an exact integer dot (the nibbles are the unsigned operand of the same instructions,
// so no sign trick), the second a precomputed per-block total. A partial last block of x is
// padded with zeros, so padded nibbles meet zeros and no scalar tail is needed. The order of the
// sums is fixed per element, whatever M and the thread split, as for int8.

inline __m256i Nibbles(const uint8_t* p) {  // 16 bytes -> 32 unsigned 4-bit values in order
  // The 16 bytes in both halves (a load), the upper half shifted by 4, then the low nibbles:
  // two instructions where extract, shift, insert and mask were four.
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_broadcastsi128_si256(raw);
  return _mm256_and_si256(_mm256_srlv_epi64(both, _mm256_set_epi64x(4, 4, 0, 0)),
                          _mm256_set1_epi8(0x0F));
}

inline __m256i NibbleDot(__m256i u, __m256i q) {  // 8 int32 lanes of sum(u * q) over the block
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, q);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), _mm256_set1_epi16(1));  // <= 3810 a pair
#endif
}

// sum_b a[b] * b_[b] over n terms: 8 lanes of FMAs in block order, their tree sum, then the rest
// in order. The minimums' term of one output element (every element the same way).
inline float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float sum = Sum8(acc);
  for (; i < n; ++i) sum = __builtin_fmaf(a[i], b[i], sum);
  return sum;
}

// Row groups g0..g1 for all M rows. The nibbles are stored in groups of kGroup output rows
// interleaved by block as for int8 ([G, blocks, kGroup, 16]: one 64-byte line per block and
// group), one stream per thread; the scales and minimums stay [N, blocks] (a group's rows are
// adjacent there). Per (row of x, weight row), the blocks' scales d * sx are multiplied out before
// the block loop and the minimums' term is one Dot after it, so the loop itself is a load, a
// shift, a mask, the integer dot, a conversion and an FMA per block. Rows past N (the last
// group's padding) are neither read in d and mins nor written.
template <int M>
void Int4Rows(const QuantizedRows& x, const uint8_t* __restrict w, const float* __restrict d,
              const float* __restrict mins, float* __restrict out, int64_t N, int64_t g0,
              int64_t g1) {
  constexpr int RG = 2;
  const int64_t nb = x.blocks, group_bytes = nb * 16 * kGroup;
  thread_local std::vector<float> scratch;
  scratch.resize(RG * kGroup * nb);
  float* const scales = scratch.data();  // [RG][kGroup][nb]
  auto prepare = [&](int r, int j, int64_t m, int64_t n) {
    float* s = scales + (r * kGroup + j) * nb;
    if (n >= N) {
      std::fill(s, s + nb, 0.f);
      return;
    }
    for (int64_t b = 0; b < nb; ++b) s[b] = d[n * nb + b] * x.scale[m * nb + b];
  };
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* wg = w + g * group_bytes;
    const int64_t n = g * kGroup;
    if (g + 2 < g1) {  // the scales and minimums two groups ahead (the nibbles are one stream)
      for (int64_t c = 0; c < kGroup * nb; c += 16) {
        __builtin_prefetch(d + (n + 2 * kGroup) * nb + c);
        __builtin_prefetch(mins + (n + 2 * kGroup) * nb + c);
      }
    }
    for (int m0 = 0; m0 < M; m0 += RG) {
      const int rows = std::min(RG, M - m0);
      __m256 acc[RG][kGroup];
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < kGroup; ++j) acc[r][j] = _mm256_setzero_ps(), prepare(r, j, m0 + r, n + j);
      for (int64_t b = 0; b < nb; ++b) {
        __m256i u[kGroup];
        for (int j = 0; j < kGroup; ++j) u[j] = Nibbles(wg + (b * kGroup + j) * 16);
        for (int r = 0; r < RG; ++r) {
          if (r >= rows) break;
          const __m256i q = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(&x.q[((m0 + r) * nb + b) * kBlock]));
          for (int j = 0; j < kGroup; ++j)
            acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(NibbleDot(u[j], q)),
                                        _mm256_broadcast_ss(scales + (r * kGroup + j) * nb + b),
                                        acc[r][j]);
        }
      }
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < kGroup && n + j < N; ++j)  // every element ends alike
          out[(m0 + r) * N + n + j] =
              Sum8(acc[r][j]) + Dot(mins + (n + j) * nb, x.total.data() + (m0 + r) * nb, nb);
    }
  }
}

// One or two rows over S row groups at once, spaced a thread's share / S apart (S streams of
// nibbles, as Int8Streams); the same arithmetic in the same order as Int4Rows: bitwise its result.
template <int M, int S>
void Int4Streams(const QuantizedRows& x, const uint8_t* __restrict w, const float* __restrict d,
                 const float* __restrict mins, float* __restrict out, int64_t N, int64_t g0,
                 int64_t span) {
  const int64_t nb = x.blocks, group_bytes = nb * 16 * kGroup;
  thread_local std::vector<float> scratch;
  scratch.resize(M * S * kGroup * nb);
  float* const scales = scratch.data();  // [M][S][kGroup][nb]
  for (int64_t i = 0; i < span; ++i) {
    const uint8_t* wg[S];
    for (int s = 0; s < S; ++s) {
      const int64_t g = g0 + s * span + i;
      wg[s] = w + g * group_bytes;
      for (int r = 0; r < M; ++r)
        for (int j = 0; j < kGroup; ++j) {
          const int64_t n = g * kGroup + j;
          float* sc = scales + ((r * S + s) * kGroup + j) * nb;
          if (n >= N) std::fill(sc, sc + nb, 0.f);
          else for (int64_t b = 0; b < nb; ++b) sc[b] = d[n * nb + b] * x.scale[r * nb + b];
        }
    }
    __m256 acc[M][S][kGroup];
    for (int r = 0; r < M; ++r)
      for (int s = 0; s < S; ++s)
        for (int j = 0; j < kGroup; ++j) acc[r][s][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m256i q[M];
      for (int r = 0; r < M; ++r)
        q[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&x.q[(r * nb + b) * kBlock]));
      for (int s = 0; s < S; ++s) {
        __builtin_prefetch(wg[s] + (b + 16) * kGroup * 16, 0, 3);
        for (int j = 0; j < kGroup; ++j) {
          const __m256i u = Nibbles(wg[s] + (b * kGroup + j) * 16);
          for (int r = 0; r < M; ++r)
            acc[r][s][j] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(NibbleDot(u, q[r])),
                _mm256_broadcast_ss(scales + ((r * S + s) * kGroup + j) * nb + b), acc[r][s][j]);
        }
      }
    }
    for (int s = 0; s < S; ++s)
      for (int r = 0; r < M; ++r)
        for (int j = 0; j < kGroup; ++j) {
          const int64_t n = (g0 + s * span + i) * kGroup + j;
          if (n < N)
            out[r * N + n] = Sum8(acc[r][s][j]) + Dot(mins + n * nb, x.total.data() + r * nb, nb);
        }
  }
}

template <int M>
void Int4RowsStreamed(const QuantizedRows& x, const uint8_t* __restrict w,
                      const float* __restrict d, const float* __restrict mins,
                      float* __restrict out, int64_t N, int64_t g0, int64_t g1) {
  constexpr int S = RowGroupStreams<M>();
  const int64_t count = g1 - g0;
  if (S > 1 && count >= S) {
    Int4Streams<M, S>(x, w, d, mins, out, N, g0, count / S);
    g0 += count / S * S;
  }
  Int4Rows<M>(x, w, d, mins, out, N, g0, g1);  // the groups left over, one stream
}

using Int4Kernel = void (*)(const QuantizedRows&, const uint8_t*, const float*, const float*,
                            float*, int64_t, int64_t, int64_t);

// x [M, K] f32, nibbles [G, B, kGroup, 16] uint8 (row groups, B = ceil(K / 32), G = ceil(N /
// kGroup)), scales and minimums [N, B] f32 -> out [M, N].
ffi::Error SmallMatmulInt4(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                           ffi::Buffer<ffi::F32> d, ffi::Buffer<ffi::F32> mins,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions(), dd = d.dimensions(), md = mins.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || dd.size() != 2 || md.size() != 2)
    return ffi::Error::InvalidArgument(
        "small_matmul_int4 takes a 2-D x, 4-D nibbles in row groups, 2-D scales and minimums");
  const int64_t rows = xd[0], k = xd[1], n = dd[0], nb = (k + kBlock - 1) / kBlock;
  const int64_t groups = (n + kGroup - 1) / kGroup;
  if (wd[0] != groups || wd[1] != nb || wd[2] != kGroup || wd[3] != 16 || dd[1] != nb ||
      md[0] != n || md[1] != nb)
    return ffi::Error::InvalidArgument(
        "small_matmul_int4: x, nibbles, scales and minimums disagree");
  if (rows < 1 || rows > kMaxRows)
    return ffi::Error::InvalidArgument("small_matmul_int4 takes 1 to 8 rows");
  static const Int4Kernel kernels[kMaxRows] = {
      &Int4RowsStreamed<1>, &Int4RowsStreamed<2>, &Int4Rows<3>, &Int4Rows<4>,
      &Int4Rows<5>, &Int4Rows<6>, &Int4Rows<7>, &Int4Rows<8>};
  Int4Kernel kernel = kernels[rows - 1];
  const QuantizedRows quantized = QuantizeRows(x.typed_data(), rows, k);
  const QuantizedRows* xq = &quantized;
  const uint8_t* wp = w.typed_data();
  const float* dp = d.typed_data();
  const float* mp = mins.typed_data();
  float* op = out->typed_data();
  RunRowBlocks(groups * kGroup, [=](int64_t n0, int64_t n1) {
    kernel(*xq, wp, dp, mp, op, n, n0 / kGroup, n1 / kGroup);
  });
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------------------------
// Cached attention for a few new tokens per row (a decode step, a speculative verification).
//
// XLA runs it as a dozen small ops per layer (the one-hot cache write, scores over every cache
// slot, mask, softmax, the weighted sum), about 0.13 ms per SmolLM2 layer for one token where
// reading the keys and values takes 0.01 ms. Here one call per layer writes the T new keys and
// values into the cache (in place: the cache buffers are aliased to the outputs) and attends each
// query only to the slots up to its own position.

typedef int ivec __attribute__((vector_size(kLanes * 4), aligned(4)));

// exp for x <= 0 (scores minus their max), as Cephes' expf: 2^n * p(r), n = round(x / ln2),
// |r| <= ln2 / 2; below -87 (exp < 2^-125, nothing next to the max's 1) it returns 2^-126.
inline vec Exp(vec x) {
  const vec zero = {};
  x = x < zero - 87.0f ? zero - 87.0f : x;
  const ivec n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, ivec);  // x <= 0: rounds
  const vec nf = __builtin_convertvector(n, vec);
  const vec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vec p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const ivec bits = (n + 127) << 23;
  vec scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

ffi::Error CachedAttention(ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                           ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                           ffi::Buffer<ffi::S32> length, ffi::ResultBuffer<ffi::F32> out,
                           ffi::ResultBuffer<ffi::F32> k_cache, ffi::ResultBuffer<ffi::F32> v_cache) {
  // q [B, T, N, H], k_new/v_new [B, T, K, H], caches [B, S, K, H] (aliased to the results).
  auto qd = q.dimensions(), cd = k_cache->dimensions();
  const int64_t B = qd[0], T = qd[1], N = qd[2], H = qd[3], S = cd[1], K = cd[2];
  if (H % 16 != 0) return ffi::Error::InvalidArgument("cached_attention needs head_dim % 16 == 0");
  const int64_t G = N / K;
  float* kc = k_cache->typed_data();
  float* vc = v_cache->typed_data();
  const int32_t* len = length.typed_data();
  // The writes first, on this thread: every query may read any of the new slots.
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t slot = static_cast<int64_t>(len[b]) + t;
      if (slot < 0 || slot >= S) continue;  // as XLA's masked write: outside the cache is dropped
      std::copy_n(k_new.typed_data() + (b * T + t) * K * H, K * H, kc + (b * S + slot) * K * H);
      std::copy_n(v_new.typed_data() + (b * T + t) * K * H, K * H, vc + (b * S + slot) * K * H);
    }
  const float* qp = q.typed_data();
  float* op = out->typed_data();
  const float root = std::sqrt(static_cast<float>(H));
  // One chunk per (row, new token, query head): 9 chunks for SmolLM2's one-token step, where
  // one per kv head (3) left a thread two of them. With many rows (a batch's step or
  // verification, the collection's 32 rows) one chunk per (row, new token, kv head) instead: its
  // G query heads score each block of keys while it is in L1 and share each value vector, where
  // one head a chunk read every key and value G times. Every score and output is computed as
  // before, whatever the split.
  const int64_t heads = B * T * K >= 4 * KernelThreads() ? G : 1;  // query heads a chunk
  RunChunks(static_cast<int>(B * T * N / heads), [=](int i) {
    const int64_t first = (i * heads) % N, t = (i * heads / N) % T, b = i * heads / (N * T);
    const int64_t kh = first / G;
    const int64_t last = std::min<int64_t>(static_cast<int64_t>(len[b]) + t, S - 1);
    if (last < 0) return;
    const int64_t n_keys = last + 1, padded = (n_keys + kLanes - 1) / kLanes * kLanes;
    std::vector<float> scores(heads * padded);
    auto query = [&](int64_t g) { return qp + ((b * T + t) * N + first + g) * H; };
    auto score = [&](const float* q0, int64_t s) {  // q . key s over the head, as partial sums
      const float* key = kc + ((b * S + s) * K + kh) * H;
      vec acc = {};
      for (int64_t h = 0; h < H; h += kLanes)
        acc += *reinterpret_cast<const vec*>(q0 + h) * *reinterpret_cast<const vec*>(key + h);
      return acc;
    };
    int64_t scored = 0;  // keys whose scores are in
#if defined(__AVX512F__)
    // 16 keys' lane sums as one shuffle tree (Sum16: each bitwise its Sum()); one Sum() per key
    // was most of the kernel's time.
    for (; scored + 16 <= n_keys; scored += 16)
      for (int64_t g = 0; g < heads; ++g) {
        vec acc[16];
        for (int j = 0; j < 16; ++j) acc[j] = score(query(g), scored + j);
        const vec tree = Sum16(acc);
        for (int j = 0; j < 16; ++j) scores[g * padded + scored + j] = tree[kSumOrder.lane[j]];
      }
#endif
    for (; scored < n_keys; ++scored)
      for (int64_t g = 0; g < heads; ++g)
        scores[g * padded + scored] = Sum(score(query(g), scored));
    const vec zero = {};
    vec lanes;
    for (int l = 0; l < kLanes; ++l) lanes[l] = static_cast<float>(l);
    const float keys = static_cast<float>(n_keys);  // exact below 2^24 slots
    // As XLA's softmax of q.k / sqrt(H): the max, exp(x - max), their sum, each over it. The
    // padding's slots (s >= n_keys) are left out of the max and get probability 0.
    for (int64_t g = 0; g < heads; ++g) {
      float* row = scores.data() + g * padded;
      vec top = zero - INFINITY;
      for (int64_t s = 0; s < padded; s += kLanes) {
        vec x = *reinterpret_cast<vec*>(row + s) / root;
        *reinterpret_cast<vec*>(row + s) = x;
        top = (lanes + static_cast<float>(s) < keys && x > top) ? x : top;
      }
      float max = top[0];
      for (int l = 1; l < kLanes; ++l) max = std::max(max, top[l]);
      vec sum = zero;
      for (int64_t s = 0; s < padded; s += kLanes) {
        vec e = Exp(*reinterpret_cast<vec*>(row + s) - max);
        e = lanes + static_cast<float>(s) < keys ? e : zero;
        *reinterpret_cast<vec*>(row + s) = e;
        sum += e;
      }
      const float total = Sum(sum);
      for (int64_t s = 0; s < padded; s += kLanes) *reinterpret_cast<vec*>(row + s) /= total;
    }
    // The weighted sum of values, kAcc lane blocks of the head at a time with an accumulator
    // each (one chain of FMAs would wait on its own latency), for up to kHeads query heads at
    // once, each value vector loaded once for them. The blocks are a compile-time count: indices
    // computed per product (two integer divisions per FMA) made this loop most of a SmolLM2
    // decode step's attention, 0.15 ms a layer at 200 positions.
    constexpr int64_t kAcc = 4;
    constexpr int64_t kHeads = 3;
    const int64_t blocks = H / kLanes;
    for (int64_t g0 = 0; g0 < heads; g0 += kHeads) {
      const int64_t group = std::min(kHeads, heads - g0);
      const float* p = scores.data() + g0 * padded;
      float* o = op + ((b * T + t) * N + first + g0) * H;
      int64_t h0 = 0;
      for (; h0 + kAcc <= blocks; h0 += kAcc) {
        vec acc[kHeads][kAcc] = {};
        for (int64_t s = 0; s < n_keys; ++s) {
          const float* value = vc + ((b * S + s) * K + kh) * H + h0 * kLanes;
          vec v[kAcc];
          for (int64_t j = 0; j < kAcc; ++j) v[j] = *reinterpret_cast<const vec*>(value + j * kLanes);
          for (int64_t g = 0; g < kHeads; ++g) {
            if (g >= group) break;
            const vec weight = zero + p[g * padded + s];
            for (int64_t j = 0; j < kAcc; ++j) acc[g][j] += weight * v[j];
          }
        }
        for (int64_t g = 0; g < group; ++g)
          for (int64_t j = 0; j < kAcc; ++j)
            *reinterpret_cast<vec*>(o + g * H + (h0 + j) * kLanes) = acc[g][j];
      }
      for (; h0 < blocks; ++h0)
        for (int64_t g = 0; g < group; ++g) {
          vec acc = {};
          for (int64_t s = 0; s < n_keys; ++s)
            acc += (zero + p[g * padded + s]) *
                   *reinterpret_cast<const vec*>(vc + ((b * S + s) * K + kh) * H + h0 * kLanes);
          *reinterpret_cast<vec*>(o + g * H + h0 * kLanes) = acc;
        }
    }
  });
  return ffi::Error::Success();
}
// ---------------------------------------------------------------------------------------------
// Causal attention without a cache, forward and backward: a train step's, or a prompt's. q [B,
// T, N, H] and k, v [B, T, K, H] as the projections leave them, token-major. XLA's form (the
// queries in blocks, attention.py) transposed them to head-major and copied every block's key
// prefix, and its backward transposed and padded each block's gradients back: the attention of
// a 135M train step took 1.4 s of its 5.3 s op time on the Intel Xeon, where torch's fused CPU
// kernel took 0.35 s. Here blocks of 64 queries x 64 keys live in small local buffers: a block's
// scores, an online softmax (FlashAttention's running max and sum), the weighted values; the
// backward recomputes each block's probabilities from the forward's log-sum-exp
// (FlashAttention-2; from the rows' max and softmax sum, not their log-sum-exp, whose rounding
// at |lse| ~ 10-20 made the gradients' error 1.5-2x XLA's). Blocks above the diagonal are never
// computed. The queries are scaled by
// 1/sqrt(H) before the product (XLA's form divides the scores): the same to f32 rounding.

constexpr int64_t kAttnBlock = 64;

// c[64][n] (+)= a[64][depth] . b[depth][n] for CV-vector column strips from c0, all row-major and
// contiguous: R rows' strips of accumulators in registers (16 of AVX-512's 32, 8 of AVX2's 16).
template <bool kAccumulate, int CV>
void Block64Strips(const float* a, int64_t depth, const float* b, int64_t n, float* c,
                   int64_t c0, int64_t c1) {
  constexpr int R = 4;
  for (; c0 + CV * kLanes <= c1; c0 += CV * kLanes)
    for (int64_t r = 0; r < kAttnBlock; r += R) {
      vec acc[R][CV];
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < CV; ++j)
          acc[i][j] = kAccumulate ? Load(c + (r + i) * n + c0 + j * kLanes) : vec{};
      // Partial sums over runs of 16 of the depth, added to the running total after each: a
      // chain of 64 FMAs (a head's scores) doubled the error of XLA's form against float64.
      for (int64_t d0 = 0; d0 < depth; d0 += 16) {
        vec part[R][CV] = {};
        for (int64_t d = d0; d < std::min(depth, d0 + 16); ++d) {
          vec bv[CV];
          for (int j = 0; j < CV; ++j) bv[j] = Load(b + d * n + c0 + j * kLanes);
          for (int i = 0; i < R; ++i) {
            const vec av = vec{} + a[(r + i) * depth + d];
            for (int j = 0; j < CV; ++j) part[i][j] += av * bv[j];
          }
        }
        for (int i = 0; i < R; ++i)
          for (int j = 0; j < CV; ++j) acc[i][j] += part[i][j];
      }
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < CV; ++j) Store(c + (r + i) * n + c0 + j * kLanes, acc[i][j]);
    }
}

// c[64][n] (+)= a[64][depth] . b[depth][n]; n a multiple of kLanes.
template <bool kAccumulate>
void Block64(const float* a, int64_t depth, const float* b, int64_t n, float* c) {
  constexpr int CV = kLanes == 16 ? 4 : 2;
  const int64_t wide = n / (CV * kLanes) * (CV * kLanes);
  Block64Strips<kAccumulate, CV>(a, depth, b, n, c, 0, wide);
  Block64Strips<kAccumulate, 1>(a, depth, b, n, c, wide, n);
}

// dst[64][64] = src[64][64] transposed.
void Transpose64(const float* src, float* dst) {
  for (int64_t r = 0; r < kAttnBlock; r += 8)
    for (int64_t c = 0; c < kAttnBlock; ++c)
      for (int64_t i = 0; i < 8; ++i) dst[c * kAttnBlock + r + i] = src[(r + i) * kAttnBlock + c];
}

// The keys a query row of a block may see: those up to its own position, and before T.
inline int64_t VisibleKeys(int64_t i, int64_t j, int64_t r, int64_t T) {
  const int64_t own = i == j ? r + 1 : kAttnBlock;
  return std::min(own, T - j * kAttnBlock);
}

// Lane l of the vector at column col is visible where col + l < visible.
inline ivec Visible(int64_t col, int64_t visible) {
  ivec lanes;
  for (int l = 0; l < kLanes; ++l) lanes[l] = l;
  return lanes + static_cast<int>(col) < (ivec{} + static_cast<int>(visible));
}

// One (b, kv head)'s keys or values: rows [Tp][H] from x [B, T, K, H] (zero past T), and
// transposed by blocks [Tp / 64][H][64] where `transposed` is given.
void PackHead(const float* x, int64_t b, int64_t kh, int64_t T, int64_t K, int64_t H,
              int64_t blocks, float* rows, float* transposed) {
  std::fill_n(rows, blocks * kAttnBlock * H, 0.0f);
  for (int64_t t = 0; t < T; ++t) std::copy_n(x + ((b * T + t) * K + kh) * H, H, rows + t * H);
  if (transposed == nullptr) return;
  for (int64_t j = 0; j < blocks; ++j)
    for (int64_t c = 0; c < kAttnBlock; ++c)
      for (int64_t h = 0; h < H; ++h)
        transposed[(j * H + h) * kAttnBlock + c] = rows[(j * kAttnBlock + c) * H + h];
}

ffi::Error CheckAttentionShapes(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                                const ffi::Buffer<ffi::F32>& v) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || kd[0] != qd[0] || kd[1] != qd[1] ||
      kd[3] != qd[3] || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || vd[3] != kd[3] ||
      kd[2] < 1 || qd[2] % kd[2] != 0 || qd[3] % kLanes != 0)
    return ffi::Error::InvalidArgument(
        "causal_attention takes q [B, T, N, H], k and v [B, T, K, H], N % K == 0, H in vectors");
  return ffi::Error::Success();
}

// The sizes of q [B, T, N, H] and k [B, T, K, H]: G query heads a kv head, T in blocks of 64
// (padded to Tp), the scores' scale 1/sqrt(H).
struct AttentionShape {
  AttentionShape(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k)
      : B(q.dimensions()[0]), T(q.dimensions()[1]), N(q.dimensions()[2]), H(q.dimensions()[3]),
        K(k.dimensions()[2]), G(N / K), blocks((T + kAttnBlock - 1) / kAttnBlock),
        Tp(blocks * kAttnBlock), scale(1.0f / std::sqrt(static_cast<float>(H))) {}
  const int64_t B, T, N, H, K, G, blocks, Tp;
  const float scale;
};

ffi::Error CausalAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                           ffi::ResultBuffer<ffi::F32> stats) {
  if (auto error = CheckAttentionShapes(q, k, v); error.failure()) return error;
  const AttentionShape shape(q, k);
  const int64_t B = shape.B, T = shape.T, N = shape.N, H = shape.H, K = shape.K, G = shape.G,
                blocks = shape.blocks, Tp = shape.Tp;
  if (B * T == 0) return ffi::Error::Success();
  const float* qp = q.typed_data();
  float* op = out->typed_data();
  float* lp = stats->typed_data();
  // Each (b, kv head)'s keys transposed by block and values as rows, once: every query block
  // and every head of the group reads them.
  // Uninitialized: PackHead writes every element (zeros past T), on the threads that read them.
  std::unique_ptr<float[]> keys(new float[B * K * Tp * H]), values(new float[B * K * Tp * H]);
  RunChunksOn(pool, static_cast<int>(B * K), [&](int i) {
    std::vector<float> rows(Tp * H);
    PackHead(k.typed_data(), i / K, i % K, T, K, H, blocks, rows.data(), &keys[i * Tp * H]);
    PackHead(v.typed_data(), i / K, i % K, T, K, H, blocks, &values[i * Tp * H], nullptr);
  });
  // One chunk per (query block, b, kv head), the longest (last) blocks first; each does the
  // group's G query heads over the same keys.
  RunChunksOn(pool, static_cast<int>(blocks * B * K), [&](int c) {
    const int64_t i = blocks - 1 - c / (B * K), bk = c % (B * K), b = bk / K, kh = bk % K;
    std::vector<float> query(kAttnBlock * H), scores(kAttnBlock * kAttnBlock),
        acc(kAttnBlock * H), max(kAttnBlock), sum(kAttnBlock);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = kh * G + g;
      for (int64_t r = 0; r < kAttnBlock; ++r) {
        const int64_t t = i * kAttnBlock + r;
        for (int64_t h = 0; h < H; ++h)
          query[r * H + h] = t < T ? qp[((b * T + t) * N + n) * H + h] * shape.scale : 0.0f;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(max.begin(), max.end(), -INFINITY);
      std::fill(sum.begin(), sum.end(), 0.0f);
      for (int64_t j = 0; j <= i; ++j) {
        Block64<false>(query.data(), H, &keys[(bk * blocks + j) * H * kAttnBlock], kAttnBlock,
                       scores.data());
        for (int64_t r = 0; r < kAttnBlock; ++r) {
          float* s = &scores[r * kAttnBlock];
          const int64_t visible = VisibleKeys(i, j, r, T);
          const vec hidden = vec{} - INFINITY;
          vec tops = hidden;
          for (int64_t col = 0; col < kAttnBlock; col += kLanes) {
            const vec x = Visible(col, visible) ? Load(s + col) : hidden;
            tops = tops > x ? tops : x;
          }
          float top = max[r];
          for (int64_t lane = 0; lane < kLanes; ++lane) top = std::max(top, tops[lane]);
          const float shrink = std::exp(max[r] - top);  // 0 at the first block (max -inf)
          vec total = {};
          for (int64_t col = 0; col < kAttnBlock; col += kLanes) {
            const vec e = Visible(col, visible) ? Exp(Load(s + col) - top) : vec{};
            Store(s + col, e);
            total += e;
          }
          float row_sum = 0.0f;
          for (int64_t lane = 0; lane < kLanes; ++lane) row_sum += total[lane];
          sum[r] = sum[r] * shrink + row_sum;
          max[r] = top;
          if (shrink != 1.0f)
            for (int64_t h = 0; h < H; h += kLanes)
              Store(&acc[r * H + h], Load(&acc[r * H + h]) * shrink);
        }
        Block64<true>(scores.data(), kAttnBlock, &values[(bk * Tp + j * kAttnBlock) * H], H,
                      acc.data());
      }
      for (int64_t r = 0; r < kAttnBlock && i * kAttnBlock + r < T; ++r) {
        const int64_t t = i * kAttnBlock + r;
        const float inverse = 1.0f / sum[r];
        for (int64_t h = 0; h < H; ++h)
          op[((b * T + t) * N + n) * H + h] = acc[r * H + h] * inverse;
        lp[((b * N + n) * T + t) * 2] = max[r];
        lp[((b * N + n) * T + t) * 2 + 1] = inverse;
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error CausalAttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                   ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                   ffi::Buffer<ffi::F32> stats, ffi::Buffer<ffi::F32> dout,
                                   ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                                   ffi::ResultBuffer<ffi::F32> dv) {
  if (auto error = CheckAttentionShapes(q, k, v); error.failure()) return error;
  const AttentionShape shape(q, k);
  const int64_t B = shape.B, T = shape.T, N = shape.N, H = shape.H, K = shape.K, G = shape.G,
                blocks = shape.blocks, Tp = shape.Tp;
  if (B * T == 0) return ffi::Error::Success();
  const float *qp = q.typed_data(), *lp = stats.typed_data(), *gp = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  // One chunk per (b, kv head): it owns the gradients of its keys and values and of its group's
  // queries, summed over every block pair in a fixed order (the same result for any split).
  RunChunksOn(pool, static_cast<int>(B * K), [&](int c) {
    const int64_t b = c / K, kh = c % K;
    const int64_t block = kAttnBlock * kAttnBlock;
    std::vector<float> key_rows(Tp * H), keys_t(Tp * H), values_t(Tp * H), value_rows(Tp * H),
        dkeys(Tp * H, 0.0f), dvalues(Tp * H, 0.0f), query(Tp * H), grad(Tp * H), dquery(Tp * H),
        top(Tp), inverse(Tp), p(blocks * block), dp(blocks * block), flipped(block);
    PackHead(k.typed_data(), b, kh, T, K, H, blocks, key_rows.data(), keys_t.data());
    PackHead(v.typed_data(), b, kh, T, K, H, blocks, value_rows.data(), values_t.data());
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = kh * G + g;
      for (int64_t t = 0; t < Tp; ++t) {
        const int64_t at = ((b * T + t) * N + n) * H;
        for (int64_t h = 0; h < H; ++h) {
          query[t * H + h] = t < T ? qp[at + h] * shape.scale : 0.0f;
          grad[t * H + h] = t < T ? gp[at + h] : 0.0f;
        }
        top[t] = t < T ? lp[((b * N + n) * T + t) * 2] : 0.0f;
        inverse[t] = t < T ? lp[((b * N + n) * T + t) * 2 + 1] : 0.0f;
      }
      std::fill(dquery.begin(), dquery.end(), 0.0f);
      for (int64_t i = 0; i < blocks; ++i) {
        const float* qi = &query[i * kAttnBlock * H];
        const float* gi = &grad[i * kAttnBlock * H];
        // The block row's probabilities P and dP = dO V^T, kept for its second pass; the
        // softmax's backward needs each query's sum of P * dP over all its keys (taken from these
        // P and dP rather than from dO . O, whose rounding of O made dq's error 1.5x XLA's).
        vec sums[kAttnBlock] = {};
        for (int64_t j = 0; j <= i; ++j) {
          float* pj = &p[j * block];
          float* dpj = &dp[j * block];
          Block64<false>(qi, H, &keys_t[j * H * kAttnBlock], kAttnBlock, pj);
          Block64<false>(gi, H, &values_t[j * H * kAttnBlock], kAttnBlock, dpj);
          for (int64_t r = 0; r < kAttnBlock; ++r) {
            const int64_t t = i * kAttnBlock + r;
            const int64_t visible = t < T ? VisibleKeys(i, j, r, T) : 0;
            for (int64_t col = 0; col < kAttnBlock; col += kLanes) {
              float* at = pj + r * kAttnBlock + col;
              const vec e = Visible(col, visible) ? Exp(Load(at) - top[t]) * inverse[t] : vec{};
              Store(at, e);
              sums[r] += e * Load(dpj + r * kAttnBlock + col);
            }
          }
        }
        float delta[kAttnBlock];
        for (int64_t r = 0; r < kAttnBlock; ++r) {
          delta[r] = 0.0f;
          for (int64_t lane = 0; lane < kLanes; ++lane) delta[r] += sums[r][lane];
        }
        for (int64_t j = 0; j <= i; ++j) {
          float* pj = &p[j * block];
          float* dpj = &dp[j * block];
          for (int64_t r = 0; r < kAttnBlock; ++r)  // dS = P * (dP - delta), in dP's place
            for (int64_t col = 0; col < kAttnBlock; col += kLanes) {
              float* at = dpj + r * kAttnBlock + col;
              Store(at, Load(pj + r * kAttnBlock + col) * (Load(at) - delta[r]));
            }
          Transpose64(pj, flipped.data());
          Block64<true>(flipped.data(), kAttnBlock, gi, H, &dvalues[j * kAttnBlock * H]);
          Transpose64(dpj, flipped.data());
          Block64<true>(flipped.data(), kAttnBlock, qi, H, &dkeys[j * kAttnBlock * H]);
          Block64<true>(dpj, kAttnBlock, &key_rows[j * kAttnBlock * H], H,
                        &dquery[i * kAttnBlock * H]);
        }
      }
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h)
          dqp[((b * T + t) * N + n) * H + h] = dquery[t * H + h] * shape.scale;
    }
    for (int64_t t = 0; t < T; ++t) {
      std::copy_n(&dkeys[t * H], H, dkp + ((b * T + t) * K + kh) * H);
      std::copy_n(&dvalues[t * H], H, dvp + ((b * T + t) * K + kh) * H);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Amd135mSmallMatmul, SmallMatmul<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Amd135mSmallMatmulBf16, SmallMatmul<ffi::BF16>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Amd135mSmallMatmulBf16Panels, SmallMatmulBf16Panels,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Amd135mSmallMatmulF32Panels, SmallMatmulF32Panels,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Amd135mSmallMatmulInt8, SmallMatmulInt8,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Amd135mSmallMatmulInt4, SmallMatmulInt4,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::U8>>()    // nibbles [N, blocks * 16]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scales [N, blocks]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // minimums [N, blocks]
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Amd135mCachedAttention, CachedAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // new keys
                                  .Arg<ffi::Buffer<ffi::F32>>()   // new values
                                  .Arg<ffi::Buffer<ffi::F32>>()   // key cache (aliased)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // value cache (aliased)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // cache length per row
                                  .Ret<ffi::Buffer<ffi::F32>>()   // attention output
                                  .Ret<ffi::Buffer<ffi::F32>>()   // key cache
                                  .Ret<ffi::Buffer<ffi::F32>>());  // value cache

XLA_FFI_DEFINE_HANDLER_SYMBOL(Amd135mCausalAttention, CausalAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [B, T, N, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k [B, T, K, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v [B, T, K, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [B, T, N, H]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // max, 1 / sum [B, N, T, 2]

XLA_FFI_DEFINE_HANDLER_SYMBOL(Amd135mCausalAttentionBackward, CausalAttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::F32>>()   // max, 1 / sum
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d q
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d k
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d v

// CUDA kernels of the fused BSConv-U block (pointwise 1x1 -> optional activation -> depthwise KxK).
//
// Only CUDA headers and bsconv_params.h are included here (no torch headers): the host glue lives in
// bsconv_ops.cpp. Every tensor the kernels see is channels_last (NHWC-contiguous); the host makes copies
// for other layouts.
//
// Forward (fwd_kernel): one block = (32 or 16 output channels, one TH x TW output tile, one image). It computes
// pre = x . W^T for the (tile + halo) input pixels with tensor cores (WMMA: fp16/bf16, and fp32 as TF32 when
// ConvShape::tf32 says torch allows it) or fp32 FMA, in chunks of input channels staged in shared memory; then
// mid = act(pre + pw_bias), zero outside the image (padding applies to mid), kept in shared memory as fp32; then
// the depthwise KxK stage reads mid from shared memory and writes y. mid never touches global memory.
//
// Backward, one of two paths (choose_bwd_path: a traffic model, or forced by the call):
//   fused (C_in <= kFusedMaxCin): bwd_fused_kernel. Persistent blocks stride over flat tiles of 16-64 mid pixels,
//      keep x and the grad_x accumulator of all input channels in shared memory and loop over rounds of 32 output
//      channels (16 where that pads C_out less): recompute pre, gather grad_pre = grad_mid * act'(pre) from grad_y
//      through the transposed depthwise stencil, then grad_x += grad_pre . W and the block's fp32 slot of
//      grad_pw_weight partials += grad_pre^T . x, both MMAs reading grad_pre from shared memory (the slot too where it
//      fits there). Nothing of mid's size is written.
//   split: 1. bwd_tile_kernel: one block = (32 channels, a tile of up to 256 mid pixels, one image): recomputes pre,
//      gathers grad_mid from grad_y through the transposed depthwise stencil, writes gpre = grad_mid * act'(pre)
//      (input dtype, scratch of mid's size, lives only during backward) and per-block fp32 partial sums of
//      grad_dw_weight and grad_pw_bias.
//   2. gemm_kernel: grad_x = gpre . W (tensor cores, TF32 as above / FMA) and split-K partials of
//      grad_pw_weight = gpre^T . x.
// Both: colsum_kernel: per-row-block partials of grad_dw_bias = column sums of grad_y; reduce kernels sum the
// partials in a fixed order (deterministic, bitwise reproducible).
//
// The numbers behind the two paths (bytes through L2 beyond the byte floor, per mid pixel; R pixels per fused tile,
// bf16): the split path writes grad_pre and reads it in both GEMMs and reads x again, 3 * 2 * C_out + 2 * C_in.
// The fused path writes no grad_pre; its partials cost 8 * C_out * C_in / R where a block adds each tile into a
// grad_pw_weight slot in global memory, and 8 * C_out * C_in * blocks / pixels (nothing per tile) where the slot
// fits in shared memory beside the tile (C_out * C_in up to about 16 K at 64-pixel tiles). So the fused path wins
// on every layer whose slot stays on chip once the batch gives each block several tiles (32 -> 64 @ 112, N = 64:
// 69 MB against 385). The split path's two extra launches (its GEMMs) are charged kLaunchL2Bytes = 16 MiB each, so
// at batch 1 and 2, where the bytes differ by a few MB, the fused path takes most layers it can run (128 -> 128 @ 56,
// N = 1: a tile per block, 28 MiB against 5 + 32); the split path keeps the small batches of the widest (128 -> 256
// @ 56 s2, N = 1: 55 MiB against 9 + 32) and the large batches of the wide-ish (128 -> 128 @ 56, N = 64: 443 MiB
// against 232 + 32). Layers wider than kFusedMaxCin = 128 take the split path: the tile's x and grad_x of all
// C_in no longer fit in shared memory with tiles of MMA height (16 pixels x 1024 channels x 6 bytes = 96 KB before
// W), and keeping the slot off chip instead costs 8 * 1024 * 1024 / 16 = 512 KB per pixel against the split path's
// 6 KB. Neither count includes operands staged again from L2 (W per fused tile and per split tile block, the GEMMs'
// operands per block row or column).
// These are models: a GPU run measures both paths (scripts/gpu_check.sh) and decides. The first (an H200,
// BENCHMARKS.md) found the split path faster at batch 64 and 128 on every layer but 16 -> 16 @ 32's backward, the
// fused kernel alone 2.6x to 3.8x as long as the split backward where both were profiled, and this rule right on 9
// of 18 rows: it is still to be refitted.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "bsconv_params.h"

namespace bsconv {
namespace {

using namespace nvcuda;

constexpr int kThreads = 256;  // every kernel uses 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int CB = 32;         // output channels per block in the fused kernels (the forward's blocks and the fused
                               // backward's rounds also run 16: FwdTile, fused_channel_block)
// Leading dimension (floats) of the fp32 mid / pre tile of `cb` channels in shared memory. The forward's depthwise
// stage reads it with lanes over channels: a warp reads one pixel's 32 channels, or two neighbouring pixels' 16. With
// 16 channels and no padding the two pixels fall into opposite halves of the 32 banks at stride 1 (padded to 20 they
// collided 2-way; at stride 2 they collide 2-way either way).
__host__ __device__ constexpr int mid_ld(int cb) { return cb == 16 ? 16 : cb + 4; }
constexpr int LDM = mid_ld(CB);
constexpr int kBwdPix = 256;   // most mid pixels per backward tile block (choose_bwd_tile)

// ----------------------------------------------------------------------------------------------- type helpers
// The matrix stages are templated on a math type M: __half / __nv_bfloat16 (tensor cores), float (fp32 FMA) or
// Tf32 (fp32 data in memory and shared memory, TF32 tensor cores: what torch allows for fp32 convolutions when its
// TF32 switch is on). Elem<M> is the element type in memory.
struct Tf32 {};
template <typename M>
struct ElemOf {
  using type = M;
};
template <>
struct ElemOf<Tf32> {
  using type = float;
};
template <typename M>
using Elem = typename ElemOf<M>::type;

template <typename M>
struct Cfg {
  using T = Elem<M>;
  static constexpr bool kFloat = std::is_same<T, float>::value;  // fp32 data (FMA or TF32)
  static constexpr bool kTC = !std::is_same<M, float>::value;    // tensor cores for fp16 / bf16 / TF32
  static constexpr bool kTf32 = std::is_same<M, Tf32>::value;
  static constexpr int KC = kFloat ? 16 : 32;       // input channels per shared-memory chunk
  static constexpr int LDX = kFloat ? KC + 4 : KC + 8;  // 80 bytes per row either way (16B multiple)
  static constexpr int LDW = LDX;
  static constexpr int VEC = 16 / (int)sizeof(T);   // elements per 16-byte access
  // WMMA shape 16 x 16 x MMA_K and the element type of its A / B fragments (tensor-core path only)
  static constexpr int MMA_K = kTf32 ? 8 : 16;
  using MmaElem = typename std::conditional<kTf32, wmma::precision::tf32, T>::type;
};

// A / B fragments of TF32 WMMA are loaded as fp32 and must be rounded to TF32 before mma_sync.
template <typename M, typename Frag>
__device__ __forceinline__ void to_mma_precision(Frag& f) {
  if constexpr (Cfg<M>::kTf32) {
#pragma unroll
    for (int t = 0; t < f.num_elements; ++t) f.x[t] = wmma::__float_to_tf32(f.x[t]);
  }
}

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ T zero_val() { return from_f<T>(0.f); }

// Comparisons are written so that NaN is false in each and passes through, as torch's relu / relu6 propagate it
// (fmaxf(NaN, 0) would return 0).
__device__ __forceinline__ float act_fwd(float v, int act) {
  switch (act) {
    case (int)Act::ReLU: return v < 0.f ? 0.f : v;
    case (int)Act::ReLU6: return v < 0.f ? 0.f : (v > 6.f ? 6.f : v);
    case (int)Act::HardSwish:
    case (int)Act::HardSwishClosedBand: return v * (v < -3.f ? 0.f : (v > 3.f ? 6.f : v + 3.f)) / 6.f;
    case (int)Act::SiLU: return v / (1.f + expf(-v));
    default: return v;
  }
}

// grad_mid * d act / d v, with torch's conventions at the kinks (relu: 0 at 0; relu6: 0 at 0 and 6; hardswish:
// x/3 + 0.5 on (-3, 3), 0 at -3 and 1 at 3, or on [-3, 3] for HardSwishClosedBand) and at NaN: torch's *_backward
// select 0 only where their comparison holds (so the gradient passes through at NaN) and select, not multiply,
// elsewhere (so a NaN gradient does not leak where act' = 0).
__device__ __forceinline__ float act_grad(float grad_mid, float v, int act) {
  switch (act) {
    case (int)Act::ReLU: return v <= 0.f ? 0.f : grad_mid;
    case (int)Act::ReLU6: return (v <= 0.f || v >= 6.f) ? 0.f : grad_mid;
    case (int)Act::HardSwish: return v <= -3.f ? 0.f : (v < 3.f ? grad_mid * (v / 3.f + 0.5f) : grad_mid);
    case (int)Act::HardSwishClosedBand: return v < -3.f ? 0.f : (v <= 3.f ? grad_mid * (v / 3.f + 0.5f) : grad_mid);
    case (int)Act::SiLU: {
      const float sg = 1.f / (1.f + expf(-v));
      return grad_mid * (sg * (1.f + v * (1.f - sg)));
    }
    default: return grad_mid;
  }
}

__host__ __device__ __forceinline__ int round_up(int v, int m) { return (v + m - 1) / m * m; }
__host__ __device__ __forceinline__ int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------ pointwise stage (GEMM)
// Shared-memory layout while the GEMM runs (region 0, reused afterwards for the fp32 result):
//   xs  [region_rows][LDX] T : x of the region's pixels, KC input channels
//   ws  [CBT][LDW]   T : W rows c0..c0+CBT, KC input channels (== B = W^T in column-major order)
// After the GEMM (and a __syncthreads), region 0 holds
//   acc [region_rows][mid_ld(CBT)] float : pre-activation without bias, for pixel p (row) and channel c0 + c
//   (column).
// CBT: the block's output channels, CB (32) or 16 (the forward's narrow channel block).
template <typename M, int CBT = CB>
__host__ __device__ __forceinline__ int region0_bytes(int region_rows) {
  const int gemm = (region_rows * Cfg<M>::LDX + CBT * Cfg<M>::LDW) * (int)sizeof(Elem<M>);
  const int acc = region_rows * mid_ld(CBT) * (int)sizeof(float);
  return round_up(gemm > acc ? gemm : acc, 128);
}

// Region: pixels p in [0, region_pixels) are (r_h0 + p / RW, r_w0 + p % RW) of image n; rows
// region_pixels..region_rows-1 (padding to the MMA's 16-row step) and pixels outside the image read as zeros.
// `vec`: C_in % VEC == 0 and x is 16-byte aligned, so 16-byte loads are legal.
template <typename M, int CBT = CB>
__device__ __forceinline__ void pointwise_gemm(const Elem<M>* __restrict__ x, const Elem<M>* __restrict__ pw,
                                               const ConvShape& s, int n, int c0, int r_h0, int r_w0, int RW,
                                               int region_pixels, int region_rows, bool vec,
                                               unsigned char* region0) {
  using C = Cfg<M>;
  using T = Elem<M>;
  constexpr int KC = C::KC, LDX = C::LDX, LDW = C::LDW, VEC = C::VEC, LDA = mid_ld(CBT);
  static_assert(CBT == 32 || (CBT == 16 && C::kTC), "warp layouts below: 16 or 32 channels on tensor cores, 32 on FMA");
  T* xs = reinterpret_cast<T*>(region0);
  T* ws = xs + region_rows * LDX;
  float* acc_s = reinterpret_cast<float*>(region0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int H = (int)s.H, W = (int)s.W;
  const int64_t C_in = s.C_in, C_out = s.C_out;
  const int64_t img_pix = (int64_t)n * s.H * s.W;

  // tensor cores: warp w owns N-tile w % kNTiles and M-tiles w / kNTiles + kWarpsPerN j (CBT 32: 6 M-tiles per
  // warp, CBT 16: 3)
  constexpr int kNTiles = CBT / 16, kWarpsPerN = kWarps / kNTiles;
  constexpr int kMaxFrag = kMaxTilePixels / 16 / kWarpsPerN;
  // FMA: lane = channel, rows warp + 8 t (48 pixel rows per warp)
  constexpr int kMaxRows = kMaxTilePixels / kWarps;
  wmma::fragment<wmma::accumulator, 16, 16, C::MMA_K, float> frag[C::kTC ? kMaxFrag : 1];
  float facc[C::kTC ? 1 : kMaxRows];
  if constexpr (C::kTC) {
#pragma unroll
    for (int j = 0; j < kMaxFrag; ++j) wmma::fill_fragment(frag[j], 0.f);
  } else {
#pragma unroll
    for (int t = 0; t < kMaxRows; ++t) facc[t] = 0.f;
  }
  const int m_tiles = region_rows / 16;

  for (int64_t k0 = 0; k0 < C_in; k0 += KC) {
    // ---- stage x chunk
    if (vec) {
      constexpr int NV = KC / VEC;
      for (int v = tid; v < region_rows * NV; v += kThreads) {
        const int p = v / NV, kv = v - p * NV;
        const int64_t k = k0 + kv * VEC;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (p < region_pixels && k < C_in) {
          const int ih = r_h0 + p / RW, iw = r_w0 + p % RW;
          if (ih >= 0 && ih < H && iw >= 0 && iw < W)
            val = __ldg(reinterpret_cast<const uint4*>(x + ((img_pix + (int64_t)ih * W + iw) * C_in + k)));
        }
        *reinterpret_cast<uint4*>(xs + p * LDX + kv * VEC) = val;
      }
    } else {
      for (int e = tid; e < region_rows * KC; e += kThreads) {
        const int p = e / KC, kk = e - p * KC;
        const int64_t k = k0 + kk;
        T val = zero_val<T>();
        if (p < region_pixels && k < C_in) {
          const int ih = r_h0 + p / RW, iw = r_w0 + p % RW;
          if (ih >= 0 && ih < H && iw >= 0 && iw < W) val = x[(img_pix + (int64_t)ih * W + iw) * C_in + k];
        }
        xs[p * LDX + kk] = val;
      }
    }
    // ---- stage W chunk: ws[c][kk] = W[c0 + c][k0 + kk]
    for (int e = tid; e < CBT * KC; e += kThreads) {
      const int c = e / KC, kk = e - c * KC;
      const int64_t k = k0 + kk;
      T val = zero_val<T>();
      if (c0 + c < C_out && k < C_in) val = pw[(int64_t)(c0 + c) * C_in + k];
      ws[c * LDW + kk] = val;
    }
    __syncthreads();

    if constexpr (C::kTC) {
      const int nt = warp % kNTiles;
#pragma unroll
      for (int kk = 0; kk < KC; kk += C::MMA_K) {
        wmma::fragment<wmma::matrix_b, 16, 16, C::MMA_K, typename C::MmaElem, wmma::col_major> bf;
        wmma::load_matrix_sync(bf, ws + nt * 16 * LDW + kk, LDW);
        to_mma_precision<M>(bf);
#pragma unroll
        for (int j = 0; j < kMaxFrag; ++j) {
          const int mt = warp / kNTiles + kWarpsPerN * j;
          if (mt < m_tiles) {
            wmma::fragment<wmma::matrix_a, 16, 16, C::MMA_K, typename C::MmaElem, wmma::row_major> af;
            wmma::load_matrix_sync(af, xs + mt * 16 * LDX + kk, LDX);
            to_mma_precision<M>(af);
            wmma::mma_sync(frag[j], af, bf, frag[j]);
          }
        }
      }
    } else {
      float wr[KC];
#pragma unroll
      for (int kk = 0; kk < KC; ++kk) wr[kk] = to_f(ws[lane * LDW + kk]);
#pragma unroll
      for (int t = 0; t < kMaxRows; ++t) {
        const int p = warp + kWarps * t;
        if (p < region_rows) {
          float a = facc[t];
#pragma unroll
          for (int kk = 0; kk < KC; kk += 4) {
            const float4 xv = *reinterpret_cast<const float4*>(xs + p * LDX + kk);
            a = fmaf(to_f(xv.x), wr[kk], a);
            a = fmaf(to_f(xv.y), wr[kk + 1], a);
            a = fmaf(to_f(xv.z), wr[kk + 2], a);
            a = fmaf(to_f(xv.w), wr[kk + 3], a);
          }
          facc[t] = a;
        }
      }
    }
    __syncthreads();  // xs / ws are overwritten by the next chunk (or by acc below)
  }

  // ---- write the fp32 result over region 0
  if constexpr (C::kTC) {
    const int nt = warp % kNTiles;
#pragma unroll
    for (int j = 0; j < kMaxFrag; ++j) {
      const int mt = warp / kNTiles + kWarpsPerN * j;
      if (mt < m_tiles) wmma::store_matrix_sync(acc_s + mt * 16 * LDA + nt * 16, frag[j], LDA, wmma::mem_row_major);
    }
  } else {
#pragma unroll
    for (int t = 0; t < kMaxRows; ++t) {
      const int p = warp + kWarps * t;
      if (p < region_rows) acc_s[p * LDA + lane] = facc[t];
    }
  }
  __syncthreads();
}

// Kernel-size template parameter K: 1, 3, 5, 7 = square K x K known at compile time; 0 = any kh, kw <=
// kMaxKernelSize read from the shape at run time (loops bounded by kMaxKernelSize and guarded).
template <int K>
struct KSize {
  static constexpr int kMax = K > 0 ? K : kMaxKernelSize;
};

// Loads dw_weight[c0 .. c0+CBT) as fp32 [kh*kw][CBT] and the (optional) biases as fp32 [CBT] (0 beyond C_out).
template <typename T, int CBT = CB>
__device__ __forceinline__ void load_channel_params(const T* __restrict__ dw_weight, int KK, const T* __restrict__ b1,
                                                    const T* __restrict__ b2, int64_t C_out, int c0, float* dws,
                                                    float* b1s, float* b2s) {
  for (int e = threadIdx.x; e < KK * CBT; e += kThreads) {
    const int tap = e / CBT, c = e - tap * CBT;
    dws[e] = (c0 + c < C_out) ? to_f(dw_weight[(int64_t)(c0 + c) * KK + tap]) : 0.f;
  }
  for (int c = threadIdx.x; c < CBT; c += kThreads) {
    const bool ok = c0 + c < C_out;
    b1s[c] = (ok && b1 != nullptr) ? to_f(b1[c0 + c]) : 0.f;
    if (b2s != nullptr) b2s[c] = (ok && b2 != nullptr) ? to_f(b2[c0 + c]) : 0.f;
  }
}

// ------------------------------------------------------------------------------------------------- forward
struct FwdTile {
  int TH, TW, IH, IW, region_pixels, region_rows, tiles_w;
  int64_t tiles;
  int CB;  // output channels per block: 32, or 16 where the model prefers it (narrow layers, few pixels)
};
// The forward's channel blocks, in the model's order of preference. 16 runs on tensor cores only: the FMA path's
// 16-channel variant spilled (sm_90), and IEEE fp32 is the slow path anyway.
constexpr int kFwdChannelBlocks[] = {32, 16};
inline bool fwd_channel_block_runs(const ConvShape& s, int cb) {
  return cb == 32 || s.dtype != DType::Float32 || s.tf32;
}

template <typename MT, int K, int CBT>
__host__ __device__ __forceinline__ int fwd_smem_bytes(int region_rows) {
  return region0_bytes<MT, CBT>(region_rows) + (KSize<K>::kMax * KSize<K>::kMax + 2) * CBT * (int)sizeof(float);
}

// Launch bounds: 2 blocks per SM (registers capped at 128), so that one block's MMA stage overlaps another's
// depthwise stage and barriers (its shared memory, at most fwd_smem_bytes(kMaxTilePixels), fits twice on sm_80 and
// sm_90). Left to pick its own register target, ptxas spilled the 16-channel TF32 variant with run-time kernel sizes
// on sm_80, and chose more than 128 for the 32-channel ones. The 32-channel variant with run-time kernel sizes (K = 0)
// keeps 1: capped at 128 it spilled (fp16, sm_80).
template <typename MT, int K, int CBT>
__global__ void __launch_bounds__(kThreads, (CBT == 16 || K > 0) ? 2 : 1) fwd_kernel(FwdArgs a, FwdTile t, bool vec) {
  using T = Elem<MT>;
  extern __shared__ __align__(128) unsigned char smem[];
  const ConvShape& s = a.s;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  T* __restrict__ y = static_cast<T*>(a.y);
  const int tid = threadIdx.x;
  constexpr int LDA = mid_ld(CBT);
  const int c0 = blockIdx.x * CBT;
  const int n = blockIdx.z;
  const int tile = blockIdx.y;
  const int oh0 = (tile / t.tiles_w) * t.TH, ow0 = (tile % t.tiles_w) * t.TW;
  const int h0 = oh0 * s.stride_h - s.pad_top, w0 = ow0 * s.stride_w - s.pad_left;
  const int H = (int)s.H, W = (int)s.W;
  constexpr int KM = KSize<K>::kMax;
  const int KH = K > 0 ? K : s.KH, KW = K > 0 ? K : s.KW;

  float* acc_s = reinterpret_cast<float*>(smem);
  float* dws = reinterpret_cast<float*>(smem + region0_bytes<MT, CBT>(t.region_rows));
  float* pbs = dws + KM * KM * CBT;
  float* dbs = pbs + CBT;
  load_channel_params<T, CBT>(static_cast<const T*>(a.dw_w), KH * KW, static_cast<const T*>(a.pw_b),
                              static_cast<const T*>(a.dw_b), s.C_out, c0, dws, pbs, dbs);

  pointwise_gemm<MT, CBT>(x, static_cast<const T*>(a.pw_w), s, n, c0, h0, w0, t.IW, t.region_pixels, t.region_rows,
                          vec, smem);

  // mid = act(pre + b) inside the image, 0 in the padding (and in the unused rows)
  for (int e = tid; e < t.region_rows * CBT; e += kThreads) {
    const int p = e / CBT, c = e - p * CBT;
    const int ih = h0 + p / t.IW, iw = w0 + p % t.IW;
    const bool ok = p < t.region_pixels && ih >= 0 && ih < H && iw >= 0 && iw < W;
    float* slot = acc_s + p * LDA + c;
    *slot = ok ? act_fwd(*slot + pbs[c], (int)s.act) : 0.f;
  }
  __syncthreads();

  // depthwise stage: thread = (output pixel, channel); lanes run over channels (coalesced NHWC stores; shared-memory
  // reads conflict-free with 32 channels, see mid_ld for 16)
  const int64_t C_out = s.C_out;
  for (int e = tid; e < t.TH * t.TW * CBT; e += kThreads) {
    const int q = e / CBT, c = e - q * CBT;
    const int toh = q / t.TW, tow = q - toh * t.TW;
    const int oh = oh0 + toh, ow = ow0 + tow;
    if (oh < s.H_out && ow < s.W_out && c0 + c < C_out) {
      float sum = dbs[c];
      const float* mrow = acc_s + ((toh * s.stride_h) * t.IW + tow * s.stride_w) * LDA + c;
#pragma unroll
      for (int i = 0; i < KM; ++i) {
        if (K == 0 && i >= KH) break;
#pragma unroll
        for (int j = 0; j < KM; ++j) {
          if (K == 0 && j >= KW) break;
          sum = fmaf(mrow[(i * s.dilation_h * t.IW + j * s.dilation_w) * LDA], dws[(i * KW + j) * CBT + c], sum);
        }
      }
      y[(((int64_t)n * s.H_out + oh) * s.W_out + ow) * C_out + c0 + c] = from_f<T>(sum);
    }
  }
}

// Calls visit(th, tw, IH, IW, tiles) for every forward tile whose tile plus halo fits kMaxTilePixels and whose count
// fits the grid, TH ascending, then TW (bsconv_cuda.cuda_backend._fwd_tiles restates it); stops when visit returns
// false.
template <typename Visit>
void visit_fwd_tiles(const ConvShape& s, Visit&& visit) {
  const int64_t narrowest_IW = (int64_t)(s.KW - 1) * s.dilation_w + 1;
  for (int th = 1; th <= s.H_out; ++th) {
    const int IH = (th - 1) * s.stride_h + (s.KH - 1) * s.dilation_h + 1;
    if (IH * narrowest_IW > kMaxTilePixels) return;  // taller tiles only have more rows
    for (int tw = 1; tw <= s.W_out; ++tw) {
      const int IW = (tw - 1) * s.stride_w + (s.KW - 1) * s.dilation_w + 1;
      if ((int64_t)IH * IW > kMaxTilePixels) break;
      const int64_t tiles = ceil_div64(s.H_out, th) * ceil_div64(s.W_out, tw);
      if (tiles <= kMaxGridYZ && !visit(th, tw, IH, IW, tiles)) return;
    }
  }
}

// The forward's output tile (TH x TW) and channel block (CB 32 or 16): among the tiles of visit_fwd_tiles with
// either block, those within kFwdMaxMmaRatio pointwise stages of MMA work (or the least MMA work where none is), then
// the least modeled time: per block, its MMA rows x CB x C_in (padded to KC) plus kDepthwiseCost* x its depthwise
// FMAs, times the waves over kTargetSms x kBlocksPerSm blocks, counted fractionally. A full GPU thus gets the least
// work per image, and a batch too small to fill the GPU gets smaller tiles or 16-channel blocks (twice the blocks
// for the same MMA work, and no padding of a 16-channel layer to 32). At equal modeled time the candidate that
// occupies more SMs (blocks, up to kTargetSms) wins: the model counts MMA and depthwise work, not the loads and
// stores that more SMs issue side by side (16->16 @ 32, N = 1, TF32: 96 blocks of 2x6 pixels, not 88 of 3x4 with
// less padding). Then the least MMA work, the 32-channel block, and the wider tile (longer coalesced rows).
// bsconv_cuda.cuda_backend._fwd_tile restates it. Returns false when no tile fits. Up to a few thousand candidates
// per block (1x1 kernels on large maps): a few microseconds, once per forward launch.
bool choose_fwd_tile(const ConvShape& s, FwdTile* out) {
  const bool fp32 = s.dtype == DType::Float32;
  const int64_t k_chunk = fp32 ? Cfg<float>::KC : Cfg<__half>::KC;
  const double c_in_padded = (double)(ceil_div64(s.C_in, k_chunk) * k_chunk);
  const double depthwise_cost = !fp32 ? kDepthwiseCostHalf : (s.tf32 ? kDepthwiseCostTf32 : kDepthwiseCostFma);
  const double pointwise = (double)s.N * s.H * s.W * s.C_in * s.C_out;
  const double block_slots = (double)kTargetSms * kBlocksPerSm;
  bool found = false;
  std::tuple<double, double, double, double, int, int> best;  // (ratio, time, -SMs occupied, macs, -CB, -TW)
  for (const int cb : kFwdChannelBlocks) {
    if (!fwd_channel_block_runs(s, cb)) continue;
    const double blocks_per_tile = (double)s.N * ceil_div64(s.C_out, cb);
    visit_fwd_tiles(s, [&](int th, int tw, int IH, int IW, int64_t tiles) {
      const int region_rows = round_up(IH * IW, 16);
      const double blocks = blocks_per_tile * tiles;
      const double block_macs = (double)region_rows * cb * c_in_padded;
      const double macs = blocks * block_macs;
      const double ratio = macs / pointwise > kFwdMaxMmaRatio ? macs / pointwise : kFwdMaxMmaRatio;
      const double time = (block_macs + depthwise_cost * th * tw * s.KH * s.KW * cb) *
                          (blocks > block_slots ? blocks / block_slots : 1.0);
      const double sms = blocks < kTargetSms ? blocks : (double)kTargetSms;
      const auto key = std::make_tuple(ratio, time, -sms, macs, -cb, -tw);
      if (!found || key < best) {
        found = true;
        best = key;
        out->TH = th; out->TW = tw; out->IH = IH; out->IW = IW;
        out->region_pixels = IH * IW; out->region_rows = region_rows;
        out->tiles_w = (int)ceil_div64(s.W_out, tw);
        out->tiles = tiles;
        out->CB = cb;
      }
      return true;
    });
  }
  return found;
}

// A failed runtime call is reported through our return code: clear it from the thread's last error too, so that the
// check for errors left pending by earlier work (take_pending_error) does not find it again.
int reported(cudaError_t e) {
  if (e != cudaSuccess) (void)cudaGetLastError();
  return (int)e;
}

constexpr int kDefaultSmemLimit = 48 * 1024;  // dynamic shared memory every kernel may use without opting in

// One kernel's dynamic shared-memory limit, raised once per device to the most that any launch of the kernel asks
// for (capped at what the device allows), and never changed again: raising it on every launch to that launch's size
// let another host thread lower it between this thread's raise and its launch.
class SmemLimit {
 public:
  // 0 when `bytes` may be launched on the current device, else -2 (more than the device allows) or a cudaError_t.
  template <typename Kern>
  int allow(Kern kernel, int bytes, int kernel_max_bytes) {
    if (bytes <= kDefaultSmemLimit) return 0;
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return reported(e);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = limit_.find(dev);
    if (it == limit_.end()) {
      int optin = 0;
      e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
      if (e != cudaSuccess) return reported(e);
      const int limit = kernel_max_bytes < optin ? kernel_max_bytes : optin;
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
      if (e != cudaSuccess) return reported(e);
      it = limit_.emplace(dev, limit).first;
    }
    return bytes <= it->second ? 0 : -2;
  }

 private:
  std::mutex mu_;
  std::map<int, int> limit_;  // device -> the limit set for the kernel there
};

template <typename MT, int K, int CBT>
int launch_fwd(const FwdArgs& a, const FwdTile& t, bool vec, cudaStream_t stream) {
  const int smem = fwd_smem_bytes<MT, K, CBT>(t.region_rows);
  static SmemLimit limit;  // one per kernel instantiation; choose_fwd_tile keeps region_rows <= kMaxTilePixels
  const int rc = limit.allow(fwd_kernel<MT, K, CBT>, smem, fwd_smem_bytes<MT, K, CBT>(kMaxTilePixels));
  if (rc != 0) return rc;
  const dim3 grid((unsigned)ceil_div64(a.s.C_out, CBT), (unsigned)t.tiles, (unsigned)a.s.N);
  fwd_kernel<MT, K, CBT><<<grid, kThreads, smem, stream>>>(a, t, vec);
  return (int)cudaGetLastError();
}

template <typename MT, int K>
int fwd_launch_t(const FwdArgs& a, cudaStream_t stream) {
  const ConvShape& s = a.s;
  FwdTile t;
  if (!choose_fwd_tile(s, &t)) return -1;
  const bool vec = (s.C_in % Cfg<MT>::VEC == 0) && (reinterpret_cast<uintptr_t>(a.x) % 16 == 0);
  if constexpr (Cfg<MT>::kTC) {
    if (t.CB == 16) return launch_fwd<MT, K, 16>(a, t, vec, stream);
  }
  return launch_fwd<MT, K, 32>(a, t, vec, stream);
}

// ------------------------------------------------------------------------------------------------ backward
struct BwdTile {
  int TH, TW, tiles_w;
  int pixels, rows;  // TH * TW <= kBwdPix, and that rounded up to the MMA's 16-row step
  int64_t tiles;
};

// The backward's tile block: W cut into equal parts of at most 32 columns, H into equal parts of at most
// kBwdPix / TW rows, so that a small map is not padded to a kBwdPix-pixel block (the recompute's MMA work follows
// the tile's rows). bsconv_cuda.cuda_backend._bwd_tile restates it.
BwdTile choose_bwd_tile(const ConvShape& s) {
  BwdTile t;
  t.TW = (int)ceil_div64(s.W, ceil_div64(s.W, 32));
  t.TH = (int)ceil_div64(s.H, ceil_div64(s.H, kBwdPix / t.TW));
  t.pixels = t.TH * t.TW;
  t.rows = round_up(t.pixels, 16);
  t.tiles_w = (int)ceil_div64(s.W, t.TW);
  t.tiles = ceil_div64(s.H, t.TH) * t.tiles_w;
  return t;
}

template <typename MT, int K>
__host__ __device__ __forceinline__ int bwd_smem_bytes() {
  return region0_bytes<MT>(kBwdPix) + (KSize<K>::kMax * KSize<K>::kMax + 1) * CB * (int)sizeof(float);
}

// grad_pre of mid pixel (h, w) of image n in channel ch (pre: its pre-activation, bias included): grad_mid gathered
// from grad_y through the transposed depthwise stencil (dw_c[tap * CBT]: the channel's fp32 taps, CBT the block's
// channels), times act'(pre).
// kDwPartials: also adds grad_y * mid of every tap into gD[i * KM + j], the thread's share of
// grad_dw_weight[ch][i][j]. Per-tap state lives in registers only because every array index is a compile-time
// constant after full unrolling.
template <typename T, int K, bool kDwPartials, int CBT = CB>
__device__ __forceinline__ float pixel_grad_pre(const ConvShape& s, const T* __restrict__ gy, int64_t n, int h, int w,
                                                int64_t ch, float pre, const float* dw_c,
                                                float (&gD)[KSize<K>::kMax * KSize<K>::kMax]) {
  constexpr int KM = KSize<K>::kMax;
  const int KH = K > 0 ? K : s.KH, KW = K > 0 ? K : s.KW;
  const int64_t C_out = s.C_out;
  const float m = kDwPartials ? act_fwd(pre, (int)s.act) : 0.f;
  float gm = 0.f;
  // mid pixel (h, w) feeds output (oh, ow) through tap (i, j) iff
  // oh*stride_h + i*dilation_h - pad_top == h (same for w).
  // owj[j]: the output column that tap column j reaches, -1 when none. Computed once per pixel and reused by every
  // tap row (recomputing it per (i, j), with the 64-bit address, pushed the 7x7 variants past the register cap).
  int owj[KM];
#pragma unroll
  for (int j = 0; j < KM; ++j) {
    const int own = w + s.pad_left - j * s.dilation_w;
    const int ow = own / s.stride_w;
    owj[j] = (own >= 0 && ow * s.stride_w == own && ow < s.W_out && (K > 0 || j < KW)) ? ow : -1;
  }
  auto tap_row = [&](int i) {
    const int ohn = h + s.pad_top - i * s.dilation_h;
    const int oh = ohn / s.stride_h;
    if (ohn < 0 || oh * s.stride_h != ohn || oh >= s.H_out) return;
    const T* __restrict__ grow = gy + ((n * s.H_out + oh) * s.W_out) * C_out + ch;
#pragma unroll
    for (int j = 0; j < KM; ++j) {
      if (owj[j] >= 0) {
        const float g = to_f(grow[(int64_t)owj[j] * C_out]);
        gm = fmaf(g, dw_c[(i * KW + j) * CBT], gm);
        if constexpr (kDwPartials) gD[i * KM + j] = fmaf(g, m, gD[i * KM + j]);
      }
    }
  };
  // Tap rows are unrolled only where gD needs compile-time indices (unrolled in the fused kernel, they pushed its
  // 5x5 and 7x7 variants past the register cap).
  if constexpr (kDwPartials) {
#pragma unroll
    for (int i = 0; i < KM; ++i) {
      if (K == 0 && i >= KH) break;
      tap_row(i);
    }
  } else {
#pragma unroll 1
    for (int i = 0; i < KM; ++i) {
      if (K == 0 && i >= KH) break;
      tap_row(i);
    }
  }
  return act_grad(gm, pre, (int)s.act);
}

// Launch bounds (256 threads, 2 blocks/SM): caps registers at 128, the budget it was tuned to (2 x 8 warps per SM;
// shared memory, about 43 KB per block, would allow more).
template <typename MT, int K>
__global__ void __launch_bounds__(kThreads, 2) bwd_tile_kernel(BwdArgs a, BwdTile t, bool vec) {
  using T = Elem<MT>;
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int KM = KSize<K>::kMax;
  const ConvShape& s = a.s;
  const int KH = K > 0 ? K : s.KH, KW = K > 0 ? K : s.KW;
  const int KK = KH * KW;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int c0 = blockIdx.x * CB;
  const int n = blockIdx.z;
  const int tile = blockIdx.y;
  const int h0 = (tile / t.tiles_w) * t.TH, w0 = (tile % t.tiles_w) * t.TW;
  const int H = (int)s.H, W = (int)s.W;
  const int64_t C_out = s.C_out;

  float* acc_s = reinterpret_cast<float*>(smem);
  float* dws = reinterpret_cast<float*>(smem + region0_bytes<MT>(kBwdPix));
  float* pbs = dws + KM * KM * CB;
  load_channel_params<T>(static_cast<const T*>(a.dw_w), KK, static_cast<const T*>(a.pw_b), nullptr, C_out, c0, dws,
                         pbs, nullptr);

  pointwise_gemm<MT>(static_cast<const T*>(a.x), static_cast<const T*>(a.pw_w), s, n, c0, h0, w0, t.TW, t.pixels,
                    t.rows, vec, smem);

  const T* __restrict__ gy = static_cast<const T*>(a.grad_y);
  T* __restrict__ gpre = static_cast<T*>(a.gpre);
  const int c = lane;
  const bool cok = c0 + c < C_out;
  float gD[KM * KM];  // gD[i * KM + j]: this thread's share of grad_dw_weight[c0 + lane][i][j]
#pragma unroll
  for (int q = 0; q < KM * KM; ++q) gD[q] = 0.f;
  float gpb = 0.f;

  for (int p = warp; p < t.pixels; p += kWarps) {
    const int h = h0 + p / t.TW, w = w0 + p % t.TW;
    if (!cok || h >= H || w >= W) continue;
    const float gp = pixel_grad_pre<T, K, true>(s, gy, n, h, w, c0 + c, acc_s[p * LDM + c] + pbs[c], dws + c, gD);
    gpb += gp;
    gpre[(((int64_t)n * H + h) * W + w) * C_out + c0 + c] = from_f<T>(gp);
  }

  // per-block partials (fixed order over the 8 warps): part_tile[tile_id][c][0..KK-1] = grad_dw, [KK] = grad_pb
  float* red = acc_s;  // acc no longer needed: every thread is past its last read once the barrier is passed
  const int64_t tile_id = (int64_t)n * gridDim.y + tile;
  float* out = a.part_tile + tile_id * C_out * (KK + 1);
  __syncthreads();
#pragma unroll
  for (int q = 0; q <= KM * KM; ++q) {
    // q < KM*KM: tap (i, j) = (q / KM, q % KM), stored at i * KW + j; q == KM*KM: grad_pw_bias, stored at KK.
    // The skip condition is uniform over the block, so the barriers stay matched.
    const int i = q / KM, j = q % KM;
    if (q < KM * KM && (i >= KH || j >= KW)) continue;
    const int slot = q < KM * KM ? i * KW + j : KK;
    red[warp * CB + lane] = q < KM * KM ? gD[q < KM * KM ? q : 0] : gpb;
    __syncthreads();
    if (warp == 0 && cok) {
      float sum = 0.f;
#pragma unroll
      for (int w8 = 0; w8 < kWarps; ++w8) sum += red[w8 * CB + lane];
      out[(int64_t)(c0 + lane) * (KK + 1) + slot] = sum;
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------------------ fused backward
// C (m_tiles*16 x n_tiles*16, fp32, row-major with leading dimension ldc, in shared or global memory)
//   = (accumulate ? C : 0) + A . B over K (a multiple of 16),
// A(m, k) at A[m * lda + k] (ARow) or A[k * lda + m]; B(k, n) at B[k * ldb + n] (BRow) or B[n * ldb + k]; A and B in
// shared memory. The block's warps share the 16 x 16 output tiles (a tile always goes to the same warp, so a C in
// global memory is read back by the thread that wrote it); tensor cores (WMMA) or, for IEEE fp32, one output
// element per thread at a time, K in ascending order. Every pointer and leading dimension keeps WMMA's alignment:
// 16-row and MMA_K-column steps are 32-byte multiples (see FusedSmem).
template <typename MT, bool ARow, bool BRow>
__device__ __forceinline__ void block_mma(float* C, int ldc, bool accumulate, const Elem<MT>* A, int lda,
                                          const Elem<MT>* B, int ldb, int m_tiles, int n_tiles, int K) {
  using Cf = Cfg<MT>;
  if constexpr (Cf::kTC) {
    using ALayout = typename std::conditional<ARow, wmma::row_major, wmma::col_major>::type;
    using BLayout = typename std::conditional<BRow, wmma::row_major, wmma::col_major>::type;
    for (int tile = threadIdx.x >> 5; tile < m_tiles * n_tiles; tile += kWarps) {
      const int mt = tile / n_tiles, nt = tile - mt * n_tiles;
      float* c = C + mt * 16 * ldc + nt * 16;
      wmma::fragment<wmma::accumulator, 16, 16, Cf::MMA_K, float> acc;
      if (accumulate)
        wmma::load_matrix_sync(acc, c, ldc, wmma::mem_row_major);
      else
        wmma::fill_fragment(acc, 0.f);
      // (unrolled further, the loads of the next steps' fragments pushed the bf16 kernels past the register cap)
#pragma unroll 2
      for (int k = 0; k < K; k += Cf::MMA_K) {
        wmma::fragment<wmma::matrix_a, 16, 16, Cf::MMA_K, typename Cf::MmaElem, ALayout> af;
        wmma::fragment<wmma::matrix_b, 16, 16, Cf::MMA_K, typename Cf::MmaElem, BLayout> bf;
        wmma::load_matrix_sync(af, ARow ? A + mt * 16 * lda + k : A + k * lda + mt * 16, lda);
        wmma::load_matrix_sync(bf, BRow ? B + k * ldb + nt * 16 : B + nt * 16 * ldb + k, ldb);
        to_mma_precision<MT>(af);
        to_mma_precision<MT>(bf);
        wmma::mma_sync(acc, af, bf, acc);
      }
      wmma::store_matrix_sync(c, acc, ldc, wmma::mem_row_major);
    }
  } else {
    const int N = n_tiles * 16;
    for (int e = threadIdx.x; e < m_tiles * 16 * N; e += kThreads) {
      const int m = e / N, n = e - m * N;
      float v = accumulate ? C[m * ldc + n] : 0.f;
      for (int k = 0; k < K; ++k)
        v = fmaf(to_f(A[ARow ? m * lda + k : k * lda + m]), to_f(B[BRow ? k * ldb + n : n * ldb + k]), v);
      C[m * ldc + n] = v;
    }
  }
}

// The fused backward's tiling (choose_bwd_path; bsconv_cuda.cuda_backend._fused_tiles restates it).
struct FusedTiles {
  int cb;            // output channels per round: 32, or 16 (fused_channel_block)
  int rows;          // mid pixels per tile: 64, 32 or 16 (a multiple of the MMA's 16 rows)
  int c_in_padded;   // C_in rounded up to 16 (the MMAs' K and N steps)
  int c_out_padded;  // C_out rounded up to cb (rows of a block's grad_pw_weight slot)
  int64_t tiles;     // ceil(N*H*W / rows): flat runs of pixels in NHWC order (a tile may span images)
  int64_t blocks;    // persistent blocks, each striding over the tiles with its own slot of partials
  bool slot_in_smem;  // the block accumulates its grad_pw_weight slot in shared memory and stores it once at the end
                      // (else it adds each tile's share into the slot in global memory)
};
constexpr int kFusedMaxRows = 64;

// Output channels per round of the fused backward: 16 where that pads C_out less than 32 (16 -> 16: 3 pointwise
// stages instead of 6; 24 -> 144: 144 instead of 160 channels), else 32. (Unlike the forward's, the FMA variant of
// the 16-channel round holds no per-row accumulators in registers: block_mma's FMA loop is the same for both.)
// bsconv_cuda.cuda_backend._fused_channel_block restates it.
inline int fused_channel_block(int64_t C_out) {
  return ceil_div64(C_out, 16) * 16 < ceil_div64(C_out, CB) * CB ? 16 : CB;
}

// One fused block's fp32 partials in global memory: its grad_pw_weight slot (c_out_padded x c_in_padded) and its
// channel slot (C_out x (taps + 1): grad_dw_weight, grad_pw_bias).
inline int64_t fused_weight_slot_bytes(const FusedTiles& f) { return 4 * (int64_t)f.c_out_padded * f.c_in_padded; }
inline int64_t fused_channel_slot_bytes(const ConvShape& s) { return 4 * s.C_out * ((int64_t)s.KH * s.KW + 1); }
inline int64_t fused_slot_bytes(const ConvShape& s, const FusedTiles& f) {
  return fused_weight_slot_bytes(f) + fused_channel_slot_bytes(s);
}

// Bytes the fused blocks move through L2 for their partials: a slot in global memory is stored by a block's first
// tile, read and stored again by each later one and read once by the reduction (2 x tiles x slot in all); the
// grad_pw_weight slot in shared memory is stored once per block and read by the reduction (2 x blocks x slot).
inline int64_t fused_partial_traffic(const ConvShape& s, const FusedTiles& f) {
  return 2 * (f.slot_in_smem ? f.blocks : f.tiles) * fused_weight_slot_bytes(f) +
         2 * f.tiles * fused_channel_slot_bytes(s);
}

// Shared memory of bwd_fused_kernel with cb output channels per round (byte offsets; each array starts on a 128-byte
// boundary). Leading dimensions pad rows to a 16-byte multiple (WMMA's ldm rule) that is not a multiple of 128 bytes
// (fewer bank conflicts):
//   xs  [rows][ld_x]  T     : x of the tile, all C_in (zero beyond C_in and beyond the tile's pixels)
//   ws  [cb][ld_x]    T     : pw_weight rows c0 .. c0+cb, all C_in
//   gps [rows][ld_gp] T     : grad_pre of the tile in channels c0 .. c0+cb (the two gradient MMAs' operand)
//   pre [rows][mid_ld(cb)] float : the recomputed pre-activation, then mid = act(pre) (the grad_dw_weight partials)
//   gxs [rows][ld_gx] float : grad_x accumulator of the tile, all C_in
//   red [kThreads]    float : the threads' grad_pw_bias sums (a warp's lanes cover 32 / cb pixels x cb channels)
//   pix [3][rows]     int   : image, row and column of the tile's pixels
//   dws [taps][cb], pbs [cb] float : depthwise taps and pw_bias of channels c0 .. c0+cb
//   gws [c_out_slot][ld_gx] float : the block's grad_pw_weight slot, when it is kept in shared memory
//                                   (c_out_slot = c_out_padded, else 0)
template <typename MT>
struct FusedSmem {
  int ld_x, ld_gp, ld_gx;
  int xs, ws, gps, pre, gxs, red, pix, dws, gws;
  int64_t bytes;  // 64-bit: the slot alone exceeds 2^31 bytes on layers far too wide for it (C_out = 2^22)
  __host__ __device__ FusedSmem(int c_in_padded, int rows, int taps, int cb, int c_out_slot) {
    const int item = (int)sizeof(Elem<MT>), pad = Cfg<MT>::kFloat ? 4 : 8;
    ld_x = c_in_padded + pad;
    ld_gp = cb + pad;
    ld_gx = c_in_padded + 4;
    xs = 0;
    ws = xs + round_up(rows * ld_x * item, 128);
    gps = ws + round_up(cb * ld_x * item, 128);
    pre = gps + round_up(rows * ld_gp * item, 128);
    gxs = pre + round_up(rows * mid_ld(cb) * (int)sizeof(float), 128);
    red = gxs + round_up(rows * ld_gx * (int)sizeof(float), 128);
    pix = red + kThreads * (int)sizeof(float);
    dws = pix + round_up(3 * rows * (int)sizeof(int), 128);
    gws = dws + round_up((taps + 1) * cb * (int)sizeof(float), 128);
    bytes = gws + (int64_t)c_out_slot * ld_gx * (int64_t)sizeof(float);
  }
  // the layout of a launch of tiling f (the slot's rows only where it is kept in shared memory)
  __host__ __device__ FusedSmem(const FusedTiles& f, int taps)
      : FusedSmem(f.c_in_padded, f.rows, taps, f.cb, f.slot_in_smem ? f.c_out_padded : 0) {}
};

// One block strides over tiles of f.rows mid pixels; per tile it keeps x and the grad_x accumulator of all input
// channels in shared memory and loops over rounds of CBT (f.cb) output channels:
//   pre = x . W[c0:c0+CBT]^T (MMA), grad_pre = grad_mid * act'(pre + b) (pixel_grad_pre, grad_y gathered per tap),
//   grad_x += grad_pre . W[c0:c0+CBT] (MMA), slot[c0:c0+CBT] += grad_pre^T . x (MMA into the block's own fp32 slot of
//   grad_pw_weight partials: in shared memory where it fits, stored to global memory once at the end; else in
//   global memory, L2-resident), and the tile's grad_dw_weight / grad_pw_bias partials (one thread per channel and
//   tap, over the tile's pixels in order) added into the block's channel slot.
// So the pointwise product is computed once per (pixel, output channel) and both gradient MMAs consume it from shared
// memory: nothing of mid's size is written. The slots are summed in block order afterwards (deterministic).
// Launch bounds (256 threads, 2 blocks/SM): registers capped at 128; shared memory (FusedSmem, at most
// kFusedMaxSmemBytes = 99 KB) allows two blocks per SM on sm_90, on sm_80 up to about 81 KB each (a slot in shared
// memory can take a block past that: 64 -> 128 at 64 pixels needs 87 KB), one on sm_86 / sm_89.
template <typename MT, int K, int CBT>
__global__ void __launch_bounds__(kThreads, 2) bwd_fused_kernel(BwdArgs a, FusedTiles f, bool vec) {
  using T = Elem<MT>;
  using Cf = Cfg<MT>;
  static_assert(CBT == 32 || CBT == 16, "rounds of 32 or 16 output channels");
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int KM = KSize<K>::kMax, VEC = Cf::VEC, LDP = mid_ld(CBT);
  // the grad_pre stage: lane = channel (lane % CBT) of one of a warp's 32 / CBT pixels (lane / CBT)
  constexpr int kPixPerWarp = 32 / CBT, kPixStep = kWarps * kPixPerWarp;
  const ConvShape& s = a.s;
  const int KH = K > 0 ? K : s.KH, KW = K > 0 ? K : s.KW;
  const int KK = KH * KW;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rows = f.rows, Cp = f.c_in_padded;
  const FusedSmem<MT> L(f, KM * KM);
  T* xs = reinterpret_cast<T*>(smem + L.xs);
  T* ws = reinterpret_cast<T*>(smem + L.ws);
  T* gps = reinterpret_cast<T*>(smem + L.gps);
  float* pre_s = reinterpret_cast<float*>(smem + L.pre);
  float* gxs = reinterpret_cast<float*>(smem + L.gxs);
  float* red = reinterpret_cast<float*>(smem + L.red);
  int* pix_n = reinterpret_cast<int*>(smem + L.pix);
  int* pix_h = pix_n + rows;
  int* pix_w = pix_h + rows;
  float* dws = reinterpret_cast<float*>(smem + L.dws);
  float* pbs = dws + KM * KM * CBT;
  float* gws = reinterpret_cast<float*>(smem + L.gws);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ pw = static_cast<const T*>(a.pw_w);
  const T* __restrict__ gy = static_cast<const T*>(a.grad_y);
  const int64_t C_in = s.C_in, C_out = s.C_out, HW = s.H * s.W, M = s.N * HW;
  const bool want_gx = a.grad_x != nullptr, want_gw = a.grad_pw_w != nullptr;
  const bool want_channels = a.grad_dw_w != nullptr || a.grad_pw_b != nullptr;
  float* gw_slot = a.part_gemm + (int64_t)blockIdx.x * f.c_out_padded * Cp;  // used only when want_gw
  float* channel_slot = a.part_tile + (int64_t)blockIdx.x * C_out * (KK + 1);
  // where the grad_pw_weight MMAs accumulate: the shared-memory slot (zeroed here) or the global one
  float* const gw_acc = f.slot_in_smem ? gws : gw_slot;
  const int ld_gw = f.slot_in_smem ? L.ld_gx : Cp;
  if (want_gw && f.slot_in_smem) {
    for (int e = tid; e < f.c_out_padded * L.ld_gx; e += kThreads) gws[e] = 0.f;
    __syncthreads();
  }

  for (int64_t tile = blockIdx.x; tile < f.tiles; tile += gridDim.x) {
    const bool first = tile == blockIdx.x;  // the block's first tile stores its slots, later tiles add to them
    const int64_t q0 = tile * rows;
    const int pixels = (int)(M - q0 < rows ? M - q0 : rows);
    // ---- stage x rows q0 .. q0+pixels (NHWC rows are contiguous), zero the grad_x accumulator
    if (vec) {
      const int nv = Cp / VEC;
      for (int v = tid; v < rows * nv; v += kThreads) {
        const int p = v / nv, k = (v - p * nv) * VEC;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (p < pixels && k < C_in) val = __ldg(reinterpret_cast<const uint4*>(x + (q0 + p) * C_in + k));
        *reinterpret_cast<uint4*>(xs + p * L.ld_x + k) = val;
      }
    } else {
      for (int e = tid; e < rows * Cp; e += kThreads) {
        const int p = e / Cp, k = e - p * Cp;
        xs[p * L.ld_x + k] = (p < pixels && k < C_in) ? x[(q0 + p) * C_in + k] : zero_val<T>();
      }
    }
    if (want_gx)
      for (int e = tid; e < rows * L.ld_gx; e += kThreads) gxs[e] = 0.f;
    for (int p = tid; p < pixels; p += kThreads) {
      const int64_t q = q0 + p, n = q / HW, hw = q - n * HW;  // (H * W may exceed the int range)
      pix_n[p] = (int)n;
      pix_h[p] = (int)(hw / s.W);
      pix_w[p] = (int)(hw - (int64_t)pix_h[p] * s.W);
    }

    for (int c0 = 0; c0 < C_out; c0 += CBT) {
      // ---- stage W rows c0 .. c0+CBT and the channels' taps and bias
      for (int e = tid; e < CBT * Cp; e += kThreads) {
        const int c = e / Cp, k = e - c * Cp;
        ws[c * L.ld_x + k] = (c0 + c < C_out && k < C_in) ? pw[(c0 + c) * C_in + k] : zero_val<T>();
      }
      load_channel_params<T, CBT>(static_cast<const T*>(a.dw_w), KK, static_cast<const T*>(a.pw_b), nullptr, C_out,
                                  c0, dws, pbs, nullptr);
      __syncthreads();  // xs, ws, dws, pbs staged (and the previous round's readers of pre / gps are done)
      // ---- pre[rows][CBT] = x . W^T
      block_mma<MT, true, false>(pre_s, LDP, false, xs, L.ld_x, ws, L.ld_x, rows / 16, CBT / 16, Cp);
      __syncthreads();
      // ---- grad_pre; rows beyond the pixels and channels beyond C_out are zeros. pre is overwritten by
      // mid = act(pre) (the same thread's element) for the grad_dw_weight partials below.
      const int c = lane % CBT;
      const bool cok = c0 + c < C_out;
      float no_dw_partials[KM * KM];  // pixel_grad_pre<.., false> leaves it alone
      float gpb = 0.f;
#pragma unroll 1
      for (int p = warp * kPixPerWarp + lane / CBT; p < rows; p += kPixStep) {
        float gp = 0.f;
        if (p < pixels && cok) {
          const float pre = pre_s[p * LDP + c] + pbs[c];
          gp = pixel_grad_pre<T, K, false, CBT>(s, gy, pix_n[p], pix_h[p], pix_w[p], c0 + c, pre, dws + c,
                                                no_dw_partials);
          pre_s[p * LDP + c] = act_fwd(pre, (int)s.act);
          gpb += gp;
        }
        gps[p * L.ld_gp + c] = from_f<T>(gp);
      }
      red[tid] = gpb;  // = red[(pixel lane group) * CBT + c]
      __syncthreads();  // gps, mid and the threads' grad_pw_bias sums complete
      // ---- the tile's channel partials, one thread per (channel, tap) summing the tile's pixels in order:
      // grad_dw_weight[c][i][j] += sum_p mid[p][c] * grad_y[output pixel that tap (i, j) of p reaches][c];
      // slot KK: grad_pw_bias[c] += the pixel groups' sums, in group order. Added into the block's channel slot.
      if (want_channels) {
        for (int e = tid; e < CBT * (KK + 1); e += kThreads) {
          const int cc = e % CBT, tap = e / CBT;
          if (c0 + cc >= C_out) continue;
          float sum = 0.f;
          if (tap == KK) {
#pragma unroll
            for (int g = 0; g < kPixStep; ++g) sum += red[g * CBT + cc];
          } else {
            const int i = tap / KW, j = tap - i * KW;
            const T* __restrict__ gy_c = gy + c0 + cc;
#pragma unroll 1
            for (int p = 0; p < pixels; ++p) {
              const int ohn = pix_h[p] + s.pad_top - i * s.dilation_h;
              const int own = pix_w[p] + s.pad_left - j * s.dilation_w;
              const int oh = ohn / s.stride_h, ow = own / s.stride_w;
              if (ohn >= 0 && own >= 0 && oh * s.stride_h == ohn && ow * s.stride_w == own && oh < s.H_out &&
                  ow < s.W_out) {
                const int64_t out_pixel = ((int64_t)pix_n[p] * s.H_out + oh) * s.W_out + ow;
                sum = fmaf(pre_s[p * LDP + cc], to_f(gy_c[out_pixel * C_out]), sum);
              }
            }
          }
          float* out = channel_slot + (int64_t)(c0 + cc) * (KK + 1) + tap;
          *out = first ? sum : *out + sum;
        }
      }
      // ---- grad_x[rows][C_in] += grad_pre . W;  slot[c0 .. c0+CBT][C_in] += grad_pre^T . x
      if (want_gx) block_mma<MT, true, true>(gxs, L.ld_gx, true, gps, L.ld_gp, ws, L.ld_x, rows / 16, Cp / 16, CBT);
      if (want_gw)
        block_mma<MT, false, true>(gw_acc + (int64_t)c0 * ld_gw, ld_gw, f.slot_in_smem || !first, gps, L.ld_gp, xs,
                                   L.ld_x, CBT / 16, Cp / 16, rows);
      __syncthreads();  // the MMAs are done with ws / gps before the next round restages them
    }
    // ---- write the tile's grad_x
    if (want_gx) {
      T* __restrict__ gx = static_cast<T*>(a.grad_x);
      for (int64_t e = tid; e < (int64_t)pixels * C_in; e += kThreads) {
        const int p = (int)(e / C_in), k = (int)(e - p * C_in);
        gx[(q0 + p) * C_in + k] = from_f<T>(gxs[p * L.ld_gx + k]);
      }
    }
    __syncthreads();  // before the next tile restages xs and zeroes gxs
  }
  // ---- store the shared-memory slot (the loop's last __syncthreads ordered the MMAs before this)
  if (want_gw && f.slot_in_smem)
    for (int e = tid; e < f.c_out_padded * Cp; e += kThreads) {
      const int c = e / Cp, k = e - c * Cp;
      gw_slot[e] = gws[c * L.ld_gx + k];
    }
}

// C = A . B over k in this block's split. A(m, k) = A[m*sAm + k*sAk], B(k, n) = B[k*sBk + n*sBn].
// PARTIAL: C is float [splits][M][N] (split = blockIdx.z); else C is T [M][N], or [N][M] when C_COL_MAJOR.
// Blocks of GBM x GBN outputs: up to 32 columns take the 32-wide block (gemm_block_n), so that a narrow GEMM is not
// padded to 64 columns.
constexpr int GBM = 64;

inline int gemm_block_n(int64_t N) { return N <= 32 ? 32 : 64; }

// grad_x = grad_pre . W has M = N*H*W pixel rows and C_in columns. With at most 32 pixels (a batch-1 layer on a
// 4 x 4 map), 64-row blocks are mostly padding: the GEMM then runs transposed, grad_x^T = W^T . grad_pre^T, with
// the input channels as its rows and the pixels padded only to the 32-wide block (1024 -> 1024 @ 4 x 4, N = 1: 2x
// the pointwise stage's multiply-adds instead of 4x). Chosen where that pads strictly less (only M <= 32 can).
// bsconv_cuda.cuda_backend._grad_x_transposed restates it.
inline bool grad_x_transposed(int64_t M, int64_t C_in) {
  const int64_t bn = gemm_block_n(C_in), bm = gemm_block_n(M);
  return ceil_div64(C_in, GBM) * GBM * ceil_div64(M, bm) * bm < ceil_div64(M, GBM) * GBM * ceil_div64(C_in, bn) * bn;
}

template <typename MT, int GBN>
struct GemmCfg {
  static_assert(GBN == 32 || GBN == 64, "the warp layout below covers 32- and 64-wide blocks");
  using T = Elem<MT>;
  static constexpr int BK = Cfg<MT>::kFloat ? 16 : 32;
  static constexpr int LDA = Cfg<MT>::kFloat ? BK + 4 : BK + 8;
  static constexpr int LDB = Cfg<MT>::kFloat ? GBN + 4 : GBN + 8;
  static constexpr int LDC = GBN + 4;
  static constexpr int kABytes = GBM * LDA * (int)sizeof(T);
  static constexpr int kBBytes = BK * LDB * (int)sizeof(T);
  static constexpr int kCBytes = GBM * LDC * (int)sizeof(float);
  static constexpr int kSmem = (kABytes + kBBytes) > kCBytes ? (kABytes + kBBytes) : kCBytes;
};

// Launch bounds (256 threads, 4 blocks/SM): caps registers at 64 (9-17 KB static shared memory per block). Without the
// min-blocks hint ptxas picked a register target by itself and spilled; the TF32 variant of the 32-wide block
// spilled under that cap (sm_90) and gets 3 blocks/SM, a higher cap (registers, spills and shared memory of every
// compiled kernel: benchmarks/kernel_report.py). C's layout is a template parameter: as a run-time argument it made
// the TF32 64-wide block spill on sm_80 / sm_86 / sm_89 even at 3 blocks/SM.
template <typename MT, bool PARTIAL, int GBN, bool C_COL_MAJOR>
__global__ void __launch_bounds__(kThreads, (Cfg<MT>::kTf32 && GBN == 32) ? 3 : 4)
    gemm_kernel(const Elem<MT>* __restrict__ A, int64_t sAm, int64_t sAk, const Elem<MT>* __restrict__ B, int64_t sBk,
                int64_t sBn, int64_t M, int64_t N, int64_t Ktot, int64_t kchunk, void* Cout) {
  static_assert(!(PARTIAL && C_COL_MAJOR), "split-K partials are row-major");
  using G = GemmCfg<MT, GBN>;
  using C = Cfg<MT>;
  using T = Elem<MT>;
  constexpr int BK = G::BK, LDA = G::LDA, LDB = G::LDB, LDC = G::LDC;
  __shared__ __align__(128) unsigned char smem[G::kSmem];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = reinterpret_cast<T*>(smem + G::kABytes);
  float* Cs = reinterpret_cast<float*>(smem);
  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t m0 = (int64_t)blockIdx.x * GBM, n0 = (int64_t)blockIdx.y * GBN;
  const int64_t kb = (int64_t)blockIdx.z * kchunk;
  const int64_t ke = kb + kchunk < Ktot ? kb + kchunk : Ktot;
  // Element e = tid + r * kThreads of a tile goes along the operand's contiguous dimension (coalesced loads).
  static_assert((GBM * BK) % kThreads == 0 && (BK * GBN) % kThreads == 0, "tile loads assume whole passes");
  const bool a_kfast = sAk == 1, b_nfast = sBn == 1;
  const int a_mm0 = a_kfast ? tid / BK : tid % GBM, a_kk0 = a_kfast ? tid % BK : tid / GBM;
  const int a_dmm = a_kfast ? kThreads / BK : 0, a_dkk = a_kfast ? 0 : kThreads / GBM;
  const int b_kk0 = b_nfast ? tid / GBN : tid % BK, b_nn0 = b_nfast ? tid % GBN : tid / BK;
  const int b_dkk = b_nfast ? kThreads / GBN : 0, b_dnn = b_nfast ? 0 : kThreads / BK;
  const int64_t a_step = a_dmm * sAm + a_dkk * sAk, b_step = b_dkk * sBk + b_dnn * sBn;
  const T* a_ptr = A + (m0 + a_mm0) * sAm + (kb + a_kk0) * sAk;
  const T* b_ptr = B + (kb + b_kk0) * sBk + (n0 + b_nn0) * sBn;

  // tensor cores: warp w owns M-tile w >> 1 and NT N-tiles from (w & 1) * NT (8 warps cover 4 x 2 NT 16x16 tiles);
  // FMA: thread (ty, tx) owns rows ty + 16 i and columns tx + 16 j
  constexpr int NT = GBN / 32, FJ = GBN / 16;
  wmma::fragment<wmma::accumulator, 16, 16, C::MMA_K, float> frag[C::kTC ? NT : 1];
  float facc[C::kTC ? 1 : 4][C::kTC ? 1 : FJ];
  if constexpr (C::kTC) {
#pragma unroll
    for (int q = 0; q < NT; ++q) wmma::fill_fragment(frag[q], 0.f);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < FJ; ++j) facc[i][j] = 0.f;
  }

  for (int64_t k0 = kb; k0 < ke; k0 += BK) {
    // Tile loads. Thread tid's element in pass r is (mm0 + r*dmm, kk0 + r*dkk): one base pointer per operand and a
    // constant step instead of re-deriving 64-bit addresses per element (keeps the kernel free of spills).
#pragma unroll 4
    for (int r = 0; r < GBM * BK / kThreads; ++r) {
      const int mm = a_mm0 + r * a_dmm, kk = a_kk0 + r * a_dkk;
      const int64_t m = m0 + mm, k = k0 + kk;
      As[mm * LDA + kk] = (m < M && k < ke) ? a_ptr[r * a_step] : zero_val<T>();
    }
#pragma unroll 4
    for (int r = 0; r < BK * GBN / kThreads; ++r) {
      const int kk = b_kk0 + r * b_dkk, nn = b_nn0 + r * b_dnn;
      const int64_t k = k0 + kk, nq = n0 + nn;
      Bs[kk * LDB + nn] = (k < ke && nq < N) ? b_ptr[r * b_step] : zero_val<T>();
    }
    a_ptr += BK * sAk;
    b_ptr += BK * sBk;
    __syncthreads();
    if constexpr (C::kTC) {
      const int mt = warp >> 1, nt0 = (warp & 1) * NT;
#pragma unroll
      for (int kk = 0; kk < BK; kk += C::MMA_K) {
        wmma::fragment<wmma::matrix_a, 16, 16, C::MMA_K, typename C::MmaElem, wmma::row_major> af;
        wmma::load_matrix_sync(af, As + mt * 16 * LDA + kk, LDA);
        to_mma_precision<MT>(af);
#pragma unroll
        for (int q = 0; q < NT; ++q) {
          wmma::fragment<wmma::matrix_b, 16, 16, C::MMA_K, typename C::MmaElem, wmma::row_major> bf;
          wmma::load_matrix_sync(bf, Bs + kk * LDB + (nt0 + q) * 16, LDB);
          to_mma_precision<MT>(bf);
          wmma::mma_sync(frag[q], af, bf, frag[q]);
        }
      }
    } else {
      const int ty = tid >> 4, tx = tid & 15;
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        float av[4], bv[FJ];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = to_f(As[(ty + 16 * i) * LDA + kk]);
#pragma unroll
        for (int j = 0; j < FJ; ++j) bv[j] = to_f(Bs[kk * LDB + tx + 16 * j]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < FJ; ++j) facc[i][j] = fmaf(av[i], bv[j], facc[i][j]);
      }
    }
    __syncthreads();
  }

  auto store = [&](int mm, int nn, float v) {
    const int64_t m = m0 + mm, nq = n0 + nn;
    if (m < M && nq < N) {
      if constexpr (PARTIAL)
        static_cast<float*>(Cout)[((int64_t)blockIdx.z * M + m) * N + nq] = v;
      else
        static_cast<T*>(Cout)[C_COL_MAJOR ? nq * M + m : m * N + nq] = from_f<T>(v);
    }
  };
  if constexpr (C::kTC) {
    const int mt = warp >> 1, nt0 = (warp & 1) * NT;
#pragma unroll
    for (int q = 0; q < NT; ++q)
      wmma::store_matrix_sync(Cs + mt * 16 * LDC + (nt0 + q) * 16, frag[q], LDC, wmma::mem_row_major);
    __syncthreads();
    for (int e = tid; e < GBM * GBN; e += kThreads) {  // consecutive threads along C's contiguous dimension
      const int mm = C_COL_MAJOR ? e % GBM : e / GBN, nn = C_COL_MAJOR ? e / GBM : e % GBN;
      store(mm, nn, Cs[mm * LDC + nn]);
    }
  } else {
    const int ty = tid >> 4, tx = tid & 15;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < FJ; ++j) store(ty + 16 * i, tx + 16 * j, facc[i][j]);
  }
}

// One gemm_kernel launch, in blocks of GBM x gemm_block_n(N) outputs, `splits` ways along K.
// C_COL_MAJOR (the transposed grad_x GEMM, N <= 32 pixels): the 32-wide block only.
template <typename MT, bool PARTIAL, bool C_COL_MAJOR = false>
int launch_gemm(const Elem<MT>* A, int64_t sAm, int64_t sAk, const Elem<MT>* B, int64_t sBk, int64_t sBn, int64_t M,
                int64_t N, int64_t Ktot, int64_t kchunk, int64_t splits, void* Cout, cudaStream_t stream) {
  const int block_n = C_COL_MAJOR ? 32 : gemm_block_n(N);
  const dim3 grid((unsigned)ceil_div64(M, GBM), (unsigned)ceil_div64(N, block_n), (unsigned)splits);
  const dim3 block(kThreads);
  if constexpr (C_COL_MAJOR)
    gemm_kernel<MT, PARTIAL, 32, true><<<grid, block, 0, stream>>>(A, sAm, sAk, B, sBk, sBn, M, N, Ktot, kchunk, Cout);
  else if (block_n == 32)
    gemm_kernel<MT, PARTIAL, 32, false><<<grid, block, 0, stream>>>(A, sAm, sAk, B, sBk, sBn, M, N, Ktot, kchunk, Cout);
  else
    gemm_kernel<MT, PARTIAL, 64, false><<<grid, block, 0, stream>>>(A, sAm, sAk, B, sBk, sBn, M, N, Ktot, kchunk, Cout);
  return (int)cudaGetLastError();
}

// part[rb][c] = sum of rows [rb*R, min(M, (rb+1)*R)) of a (M x C, row-major), fixed order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    colsum_kernel(const T* __restrict__ a, int64_t M, int64_t C, int64_t R, float* __restrict__ part) {
  __shared__ float red[kWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c = (int64_t)blockIdx.x * 32 + lane;
  const int64_t rb = blockIdx.y;
  const int64_t r_end = (rb + 1) * R < M ? (rb + 1) * R : M;
  float sum = 0.f;
  if (c < C)
    for (int64_t r = rb * R + warp; r < r_end; r += kWarps) sum += to_f(a[r * C + c]);
  red[warp][lane] = sum;
  __syncthreads();
  if (warp == 0 && c < C) {
    float tot = 0.f;
#pragma unroll
    for (int w8 = 0; w8 < kWarps; ++w8) tot += red[w8][lane];
    part[rb * C + c] = tot;
  }
}

// out[l] = sum_{s < S} part[s*L + l], s ascending (deterministic).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(const float* __restrict__ part, int64_t S, int64_t L, T* __restrict__ out) {
  const int64_t l = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (l >= L) return;
  float sum = 0.f;
  for (int64_t s = 0; s < S; ++s) sum += part[s * L + l];
  out[l] = from_f<T>(sum);
}

// out[c][k] = sum_{s < S} part[s][c][k] over slots of slot_rows x slot_cols floats (c < C_out <= slot_rows,
// k < C_in <= slot_cols), s ascending (deterministic): the fused backward's grad_pw_weight slots.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    reduce_slots_kernel(const float* __restrict__ part, int64_t S, int64_t C_out, int64_t C_in, int64_t slot_rows,
                        int64_t slot_cols, T* __restrict__ out) {
  const int64_t l = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (l >= C_out * C_in) return;
  const int64_t c = l / C_in, k = l - c * C_in;
  float sum = 0.f;
  for (int64_t s = 0; s < S; ++s) sum += part[(s * slot_rows + c) * slot_cols + k];
  out[l] = from_f<T>(sum);
}

// part_tile[s][c][q], q < KK -> grad_dw[c][q]; q == KK -> grad_pb[c] (each written only where its pointer is
// non-null: a gradient nobody asked for).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    reduce_tile_kernel(const float* __restrict__ part, int64_t S, int64_t C_out, int KK, T* __restrict__ gdw,
                       T* __restrict__ gpb) {
  const int64_t L = C_out * (KK + 1);
  const int64_t l = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (l >= L) return;
  float sum = 0.f;
  for (int64_t s = 0; s < S; ++s) sum += part[s * L + l];
  const int64_t c = l / (KK + 1);
  const int q = (int)(l - c * (KK + 1));
  if (q < KK) {
    if (gdw) gdw[c * KK + q] = from_f<T>(sum);
  } else if (gpb) {
    gpb[c] = from_f<T>(sum);
  }
}

// workspace geometry (shared by bwd_workspace and bwd_launch so the two always agree)
struct BwdGeom {
  BwdTile tile;       // split path
  int64_t num_tiles;  // N * tile.tiles
  int64_t splits;     // split-K count of the grad_pw_weight GEMM
  int64_t kchunk;     // pixels per split (multiple of the GEMM's BK)
  int64_t col_rows;   // rows per grad_dw_bias partial (both paths)
  int64_t col_blocks;
  bool grad_x_transposed;  // split: the grad_x GEMM runs transposed (grad_x_transposed)
  bool fused;         // the path (choose_bwd_path)
  FusedTiles fused_tiles;  // fused path (zeros where C_in > kFusedMaxCin)
};

// The fused path's tiles: rounds of fused_channel_block output channels; tiles of the largest of 64, 32, 16 pixels
// that still gives every SM a tile (a block rewrites a slot in global memory per tile, so larger tiles move fewer
// bytes) and whose shared memory (with room for 7x7 taps) fits kFusedMaxSmemBytes; the grad_pw_weight slot in shared
// memory too where it fits beside them (it then moves no bytes per tile). As many persistent blocks as one wave holds
// and the partials' L2 budget allows. bsconv_cuda.cuda_backend._fused_tiles restates it.
template <typename T>
FusedTiles choose_fused_tiles(const ConvShape& s) {
  FusedTiles f{};
  if (s.C_in > kFusedMaxCin) return f;
  const int64_t M = s.N * s.H * s.W;
  f.cb = fused_channel_block(s.C_out);
  f.c_in_padded = round_up((int)s.C_in, 16);
  f.c_out_padded = (int)(ceil_div64(s.C_out, f.cb) * f.cb);
  constexpr int kTaps = kMaxKernelSize * kMaxKernelSize;
  for (int rows : {kFusedMaxRows, 32, 16}) {
    f.rows = rows;
    if ((ceil_div64(M, rows) >= kTargetSms || rows == 16) &&
        FusedSmem<T>(f.c_in_padded, rows, kTaps, f.cb, 0).bytes <= kFusedMaxSmemBytes)
      break;
  }
  f.slot_in_smem = FusedSmem<T>(f.c_in_padded, f.rows, kTaps, f.cb, f.c_out_padded).bytes <= kFusedMaxSmemBytes;
  f.tiles = ceil_div64(M, f.rows);
  const int64_t slot = fused_slot_bytes(s, f);
  int64_t blocks = (int64_t)kTargetSms * kBlocksPerSm;
  if (blocks > kL2ResidentBytes / slot) blocks = kL2ResidentBytes / slot;
  if (blocks > f.tiles) blocks = f.tiles;
  f.blocks = blocks < 1 ? 1 : blocks;
  return f;
}

// The backward's path, unless the call forces one: fused where C_in allows it, its blocks give every SM work (or as
// much as the split tile kernel's), and it moves no more bytes beyond the byte floor than the split path plus that
// path's kSplitExtraLaunches launches at kLaunchL2Bytes each: its slots' traffic (fused_partial_traffic) against
// grad_pre written and read by both GEMMs, x read again and the split partials written and read (the grad_dw_bias
// partials are the same on both paths). The Triton backward chooses by the same rule (bsconv_cuda.plan.
// prefer_fused_backward); both are models, for a GPU run to confirm. bsconv_cuda.cuda_backend.work_plan restates it.
bool choose_bwd_path(const ConvShape& s, const BwdGeom& g, int64_t itemsize) {
  if (s.C_in > kFusedMaxCin || s.bwd_path == BwdPath::Split) return false;
  if (s.bwd_path == BwdPath::Fused) return true;
  const int64_t M = s.N * s.H * s.W, KK = (int64_t)s.KH * s.KW;
  const FusedTiles& f = g.fused_tiles;
  const int64_t fused_bytes = fused_partial_traffic(s, f);
  const int64_t split_partials = 4 * (g.num_tiles * s.C_out * (KK + 1) + g.splits * s.C_out * s.C_in);
  const int64_t split_bytes = 3 * M * s.C_out * itemsize + M * s.C_in * itemsize + 2 * split_partials;
  const int64_t split_blocks = ceil_div64(s.C_out, CB) * g.num_tiles;
  const bool fills = f.blocks >= (split_blocks < kTargetSms ? split_blocks : kTargetSms);
  return fills && fused_bytes <= split_bytes + kSplitExtraLaunches * kLaunchL2Bytes;
}

template <typename T>
BwdGeom bwd_geom_t(const ConvShape& s) {
  BwdGeom g;
  g.tile = choose_bwd_tile(s);
  g.num_tiles = s.N * g.tile.tiles;
  const int64_t M = s.N * s.H * s.W;
  const int64_t mn_tiles = ceil_div64(s.C_out, GBM) * ceil_div64(s.C_in, gemm_block_n(s.C_in));
  int64_t splits = ceil_div64(512, mn_tiles);
  const int64_t max_splits = ceil_div64(M, 256);
  if (splits > max_splits) splits = max_splits;
  if (splits < 1) splits = 1;
  const int BK = GemmCfg<T, 64>::BK;  // the same for both block widths
  g.kchunk = ceil_div64(ceil_div64(M, splits), BK) * BK;
  g.splits = ceil_div64(M, g.kchunk);  // every split non-empty
  const int64_t Mo = s.N * s.H_out * s.W_out;
  g.col_rows = ceil_div64(Mo, 32768) > 1024 ? ceil_div64(Mo, 32768) : 1024;  // keeps col_blocks <= 32768
  g.col_blocks = ceil_div64(Mo, g.col_rows);
  g.grad_x_transposed = grad_x_transposed(M, s.C_in);
  g.fused_tiles = choose_fused_tiles<T>(s);
  g.fused = choose_bwd_path(s, g, (int64_t)sizeof(T));
  return g;
}

BwdGeom bwd_geom(const ConvShape& s) {
  switch (s.dtype) {
    case DType::Float32: return bwd_geom_t<float>(s);
    default: return bwd_geom_t<__half>(s);  // same geometry for fp16 and bf16
  }
}

template <typename MT, int K, int CBT>
int launch_bwd_fused(const BwdArgs& a, const FusedTiles& f, bool vec, cudaStream_t stream) {
  const int smem = (int)FusedSmem<MT>(f, KSize<K>::kMax * KSize<K>::kMax).bytes;  // <= kFusedMaxSmemBytes
  static SmemLimit limit;  // one per kernel instantiation; choose_fused_tiles keeps smem under kFusedMaxSmemBytes
  const int rc = limit.allow(bwd_fused_kernel<MT, K, CBT>, smem, kFusedMaxSmemBytes);
  if (rc != 0) return rc;
  bwd_fused_kernel<MT, K, CBT><<<(unsigned)f.blocks, kThreads, smem, stream>>>(a, f, vec);
  return (int)cudaGetLastError();
}

template <typename MT, int K>
int bwd_launch_t(const BwdArgs& a, cudaStream_t stream) {
  using T = Elem<MT>;
  const ConvShape& s = a.s;
  const BwdGeom g = bwd_geom(s);
  const int KK = s.KH * s.KW;
  const bool vec = (s.C_in % Cfg<MT>::VEC == 0) && (reinterpret_cast<uintptr_t>(a.x) % 16 == 0);
  int rc;
  // a.grad_* is null for a gradient nobody asked for: its launches are skipped. grad_x, grad_pw_weight and
  // grad_pw_bias all start from grad_pre; grad_dw_weight needs the recomputed mid; grad_dw_bias only grad_y.
  const bool need_gpre = a.grad_x || a.grad_pw_w || a.grad_pw_b;
  if (g.fused) {
    // 1-2. everything but grad_dw_bias in one kernel, partials per block
    if (need_gpre || a.grad_dw_w) {
      const FusedTiles& f = g.fused_tiles;
      rc = f.cb == 16 ? launch_bwd_fused<MT, K, 16>(a, f, vec, stream) : launch_bwd_fused<MT, K, CB>(a, f, vec, stream);
      if (rc != 0) return rc;
    }
  } else {
    // 1. gpre + per-tile partials of grad_dw_weight / grad_pw_bias
    if (need_gpre || a.grad_dw_w) {
      const int smem = bwd_smem_bytes<MT, K>();
      static SmemLimit limit;  // one per kernel instantiation; its shared memory does not depend on the shape
      rc = limit.allow(bwd_tile_kernel<MT, K>, smem, smem);
      if (rc != 0) return rc;
      dim3 grid((unsigned)ceil_div64(s.C_out, CB), (unsigned)g.tile.tiles, (unsigned)s.N);
      bwd_tile_kernel<MT, K><<<grid, kThreads, smem, stream>>>(a, g.tile, vec);
      if ((rc = (int)cudaGetLastError()) != 0) return rc;
    }
    const int64_t M = s.N * s.H * s.W;
    const T* gpre = static_cast<const T*>(a.gpre);
    const T* x = static_cast<const T*>(a.x);
    const T* pw = static_cast<const T*>(a.pw_w);
    // 2a. grad_x[M][C_in] = gpre[M][C_out] . W[C_out][C_in], or its transpose W^T . gpre^T (grad_x_transposed)
    if (a.grad_x) {
      rc = g.grad_x_transposed
               ? launch_gemm<MT, false, true>(pw, 1, s.C_in, gpre, 1, s.C_out, s.C_in, M, s.C_out, s.C_out, 1,
                                              a.grad_x, stream)
               : launch_gemm<MT, false>(gpre, s.C_out, 1, pw, s.C_in, 1, M, s.C_in, s.C_out, s.C_out, 1, a.grad_x,
                                        stream);
      if (rc != 0) return rc;
    }
    // 2b. split-K partials of grad_pw_weight[C_out][C_in] = gpre^T . x
    if (a.grad_pw_w &&
        (rc = launch_gemm<MT, true>(gpre, 1, s.C_out, x, s.C_in, 1, s.C_out, s.C_in, M, g.kchunk, g.splits,
                                    a.part_gemm, stream)) != 0)
      return rc;
  }
  // 3. partials of grad_dw_bias
  if (a.grad_dw_b) {
    dim3 grid((unsigned)ceil_div64(s.C_out, 32), (unsigned)g.col_blocks, 1);
    colsum_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(a.grad_y), s.N * s.H_out * s.W_out,
                                                    s.C_out, g.col_rows, a.part_col);
    if ((rc = (int)cudaGetLastError()) != 0) return rc;
  }
  // 4. fixed-order reductions
  if (a.grad_dw_w || a.grad_pw_b) {
    const int64_t L = s.C_out * (KK + 1);
    reduce_tile_kernel<T><<<(unsigned)ceil_div64(L, kThreads), kThreads, 0, stream>>>(
        a.part_tile, g.fused ? g.fused_tiles.blocks : g.num_tiles, s.C_out, KK, static_cast<T*>(a.grad_dw_w),
        static_cast<T*>(a.grad_pw_b));
    if ((rc = (int)cudaGetLastError()) != 0) return rc;
  }
  if (a.grad_pw_w) {
    const int64_t Lw = s.C_out * s.C_in;
    const unsigned blocks = (unsigned)ceil_div64(Lw, kThreads);
    if (g.fused)
      reduce_slots_kernel<T><<<blocks, kThreads, 0, stream>>>(a.part_gemm, g.fused_tiles.blocks, s.C_out, s.C_in,
                                                              g.fused_tiles.c_out_padded, g.fused_tiles.c_in_padded,
                                                              static_cast<T*>(a.grad_pw_w));
    else
      reduce_kernel<T><<<blocks, kThreads, 0, stream>>>(a.part_gemm, g.splits, Lw, static_cast<T*>(a.grad_pw_w));
    if ((rc = (int)cudaGetLastError()) != 0) return rc;
  }
  if (a.grad_dw_b) {
    reduce_kernel<T><<<(unsigned)ceil_div64(s.C_out, kThreads), kThreads, 0, stream>>>(
        a.part_col, g.col_blocks, s.C_out, static_cast<T*>(a.grad_dw_b));
    if ((rc = (int)cudaGetLastError()) != 0) return rc;
  }
  return 0;
}

// ------------------------------------------------------------------------------------------------ dispatch
#define BSCONV_DISPATCH_K(T, FN, ...)                       \
  switch (s.KH == s.KW ? s.KH : 0) {                        \
    case 1: return FN<T, 1>(__VA_ARGS__);                   \
    case 3: return FN<T, 3>(__VA_ARGS__);                   \
    case 5: return FN<T, 5>(__VA_ARGS__);                   \
    case 7: return FN<T, 7>(__VA_ARGS__);                   \
    default: return FN<T, 0>(__VA_ARGS__);                  \
  }

#define BSCONV_DISPATCH(FN, ...)                                              \
  switch (s.dtype) {                                                          \
    case DType::Float32: {                                                    \
      if (s.tf32) { BSCONV_DISPATCH_K(Tf32, FN, __VA_ARGS__) }                \
      BSCONV_DISPATCH_K(float, FN, __VA_ARGS__)                               \
    }                                                                         \
    case DType::Float16: { BSCONV_DISPATCH_K(__half, FN, __VA_ARGS__) }       \
    case DType::BFloat16: { BSCONV_DISPATCH_K(__nv_bfloat16, FN, __VA_ARGS__) } \
    default: return -1;                                                       \
  }

}  // namespace

const char* supported_reason(const ConvShape& s) {
  if (s.KH < 1 || s.KH > kMaxKernelSize || s.KW < 1 || s.KW > kMaxKernelSize)
    return "kernel height and width must be in 1..7 (kMaxKernelSize)";
  if (s.N < 1 || s.C_in < 1 || s.C_out < 1 || s.H < 1 || s.W < 1 || s.H_out < 1 || s.W_out < 1)
    return "empty tensors are not handled by the CUDA kernels";
  if (s.N > kMaxGridYZ) return "batch size > 65535 (the CUDA grid's z limit)";
  if (s.H > kMaxSpatialSize || s.W > kMaxSpatialSize || s.H_out > kMaxSpatialSize || s.W_out > kMaxSpatialSize)
    return "spatial size > 2^24";
  if (s.stride_h > kMaxStrideOrDilation || s.stride_w > kMaxStrideOrDilation || s.dilation_h > kMaxStrideOrDilation ||
      s.dilation_w > kMaxStrideOrDilation || s.pad_top > kMaxPadding || s.pad_left > kMaxPadding)
    return "stride / dilation > 64 or padding > 4096";
  const int64_t footprint = ((int64_t)(s.KH - 1) * s.dilation_h + 1) * ((int64_t)(s.KW - 1) * s.dilation_w + 1);
  if (footprint > kMaxTilePixels)
    return "the dilated kernel covers more than the 384 input pixels a forward block keeps in shared memory";
  bool fwd_tile_fits = false;
  visit_fwd_tiles(s, [&](int, int, int, int, int64_t) {  // the first will do
    fwd_tile_fits = true;
    return false;
  });
  if (!fwd_tile_fits) return "no forward tile fits in shared memory with at most 65535 tiles per image";
  if (choose_bwd_tile(s).tiles > kMaxGridYZ) return "too many backward tiles per image (> 65535)";
  if (ceil_div64(s.C_in, gemm_block_n(s.C_in)) > kMaxGridYZ)
    return "too many input channels for the grad_x GEMM's grid";
  return nullptr;
}

int fwd_launch(const FwdArgs& a, void* stream) {
  const ConvShape& s = a.s;
  if (supported_reason(s) != nullptr) return -1;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  BSCONV_DISPATCH(fwd_launch_t, a, st)
}

int bwd_launch(const BwdArgs& a, void* stream) {
  const ConvShape& s = a.s;
  if (supported_reason(s) != nullptr) return -1;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  BSCONV_DISPATCH(bwd_launch_t, a, st)
}

BwdWorkspace bwd_workspace(const ConvShape& s) {
  const BwdGeom g = bwd_geom(s);
  BwdWorkspace w;
  const FusedTiles& f = g.fused_tiles;
  w.gpre_elems = g.fused ? 0 : s.N * s.H * s.W * s.C_out;
  w.part_tile_elems = (g.fused ? f.blocks : g.num_tiles) * s.C_out * (int64_t)(s.KH * s.KW + 1);
  w.part_gemm_elems = g.fused ? f.blocks * f.c_out_padded * f.c_in_padded : g.splits * s.C_out * s.C_in;
  w.part_col_elems = g.col_blocks * s.C_out;
  return w;
}

TilePlan tile_plan(const ConvShape& s) {
  TilePlan p{};
  FwdTile t;
  p.fwd_fits = choose_fwd_tile(s, &t);
  if (p.fwd_fits) {
    p.fwd_TH = t.TH; p.fwd_TW = t.TW; p.fwd_IH = t.IH; p.fwd_IW = t.IW; p.fwd_tiles = t.tiles; p.fwd_CB = t.CB;
  }
  const BwdGeom g = bwd_geom(s);
  p.bwd_TH = g.tile.TH; p.bwd_TW = g.tile.TW; p.bwd_tiles = g.tile.tiles;
  p.splits = g.splits; p.kchunk = g.kchunk; p.col_blocks = g.col_blocks;
  p.gemm_block_n = gemm_block_n(s.C_in);
  p.grad_x_transposed = g.grad_x_transposed;
  p.bwd_fused = g.fused;
  p.fused_cb = g.fused_tiles.cb;
  p.fused_rows = g.fused_tiles.rows;
  p.fused_tiles = g.fused_tiles.tiles;
  p.fused_blocks = g.fused_tiles.blocks;
  p.fused_slot_in_smem = g.fused_tiles.slot_in_smem;
  return p;
}

int take_pending_error() { return (int)cudaGetLastError(); }

const char* error_string(int code) {
  if (code == -1) return "shape not supported by the CUDA kernels";
  if (code == -2) return "not enough shared memory per block on this GPU";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

int cuda_runtime_version_built() { return CUDART_VERSION; }

}  // namespace bsconv

// Plain parameter structs shared by the host glue (bsconv_ops.cpp, compiled by the C++ compiler against torch's
// stable ABI) and the CUDA kernels (bsconv_kernels.cu, compiled by nvcc with CUDA headers only).
// No torch or CUDA headers here.
#pragma once
#include <cstdint>

namespace bsconv {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// The limits of the CUDA kernels, one home. bsconv_ops.cpp checks the op's arguments against them and exports them
// to Python (bsconv_cuda._C.MAX_KERNEL_SIZE, ...; bsconv_cuda.cuda_backend reads them there).
// kh, kw in 1..7: per-tap state in registers / shared memory is sized for 7x7
constexpr int kMaxKernelSize = 7;
constexpr int kMaxTilePixels = 384;         // input pixels (output tile + halo) one forward block keeps in shared
                                            // memory; a multiple of 16 (the MMA's M step)
constexpr int kMaxStrideOrDilation = 64;    // stride and dilation per axis
constexpr int kMaxPadding = 4096;           // padding per side
constexpr int64_t kMaxGridYZ = 65535;       // CUDA's limit on gridDim.y and gridDim.z (batch, tiles per image, ...)
constexpr int64_t kMaxSpatialSize = int64_t(1) << 24;  // H, W, H_out, W_out: pixel indices stay exact in 32-bit math

// The GPU the tile plans are sized for, and the cost model of the forward's tile choice (choose_fwd_tile): constants,
// never read from the device, so that a call's plan is the same on every GPU and in tile_plan. bsconv_cuda.plan
// holds the same model for the Triton backend; _C exports these and tests compare the two.
constexpr int kTargetSms = 132;          // H100 / H200 SXM
constexpr int kBlocksPerSm = 2;          // resident forward blocks per SM that the model assumes
constexpr double kFwdMaxMmaRatio = 3.0;  // forward MMA multiply-adds over the pointwise stage's, where a tile allows
// Tensor-core multiply-adds per depthwise FMA in the forward tile cost (H100 peak rates: bf16 / fp16 dense
// 495 T MAC/s, TF32 247 T, fp32 FMA 33.5 T; an FMA matrix stage: 1). Model weights, not measurements.
constexpr int kDepthwiseCostHalf = 16, kDepthwiseCostTf32 = 8, kDepthwiseCostFma = 1;
// A transient buffer up to half of the 50 MB L2 of an H100 / H200 is modeled to stay in L2: the fused backward's
// weight-gradient partials are bounded by it (bsconv_cuda.plan.L2_RESIDENT_BYTES).
constexpr int64_t kL2ResidentBytes = int64_t(24) << 20;
// What one more dependent kernel launch is modeled to cost, as bytes of L2 traffic (about 2 us between small
// dependent kernels at about 8 TB/s): the split backward runs kSplitExtraLaunches more than the fused one (its two
// GEMMs), which weighs most at batch 1 and 2. Model weights, not measurements (bsconv_cuda.plan.LAUNCH_L2_BYTES).
constexpr int64_t kLaunchL2Bytes = int64_t(16) << 20;
constexpr int kSplitExtraLaunches = 2;
// The fused backward keeps x and grad_x of all input channels of a tile in shared memory up to this many channels;
// wider layers take the split backward (bwd_tile_kernel writes grad_pre, two GEMMs read it).
constexpr int kFusedMaxCin = 128;
// Shared memory one fused-backward block may use on every GPU the build targets: the opt-in limit of sm_86 / sm_89
// (99 KB; sm_80 allows 163 KB, sm_90 227 KB). Device-independent, so that the workspace, the tile plan and its Python
// restatement agree everywhere; fp32 tiles of 64 pixels at more than 112 input channels exceed it and take 32.
constexpr int kFusedMaxSmemBytes = 99 * 1024;

// Output size along one axis, as torch's convolution gives it (bsconv_cuda.reference.output_size on the Python
// side); 0 when the padded input is smaller than the dilated kernel.
inline int64_t conv_output_size(int64_t in, int64_t pad_lo, int64_t pad_hi, int64_t kernel, int64_t stride,
                                int64_t dilation) {
  const int64_t span = in + pad_lo + pad_hi - dilation * (kernel - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}
// HardSwishClosedBand: hardswish whose gradient keeps -3 and 3 in the linear band, as torch 2.7's does (HardSwish:
// 0 at -3 and 1 at 3, as torch 2.11's); bsconv_cuda.reference.kernel_activation picks the installed torch's.
enum class Act : int { None = 0, ReLU = 1, ReLU6 = 2, HardSwish = 3, SiLU = 4, HardSwishClosedBand = 5 };
// The backward's path: Auto = chosen by the traffic model (choose_bwd_path); Fused / Split: forced (tests, benchmarks).
enum class BwdPath : int { Auto = 0, Fused = 1, Split = 2 };

// Shapes and hyper-parameters of one BSConv-U call. All tensors handed to the kernels are channels_last
// (NHWC-contiguous) copies or views: x (N, H, W, C_in), y / grad_y (N, H_out, W_out, C_out), grad_x like x.
// pw_weight (C_out, C_in) contiguous, dw_weight (C_out, KH*KW) contiguous, biases (C_out,) or nullptr.
struct ConvShape {
  int64_t N, C_in, H, W, C_out, H_out, W_out;
  int KH, KW;             // depthwise kernel size, 1..kMaxKernelSize each (1/3/5/7 square: compile-time fast paths)
  int stride_h, stride_w;
  int pad_top, pad_left;      // (pad_bottom / pad_right only enter H_out / W_out)
  int dilation_h, dilation_w;
  Act act;
  DType dtype;
  bool tf32;  // Float32 only: the matrix stages on TF32 tensor cores (torch allows TF32 for fp32 convolutions)
  BwdPath bwd_path;  // the backward only
};

struct FwdArgs {
  ConvShape s;
  const void* x;
  const void* pw_w;
  const void* pw_b;  // may be null
  const void* dw_w;
  const void* dw_b;  // may be null
  void* y;
};

struct BwdArgs {
  ConvShape s;
  const void* grad_y;
  const void* x;
  const void* pw_w;
  const void* pw_b;  // may be null
  const void* dw_w;
  // the gradients, each null when nobody asked for it (its launches are then skipped)
  void* grad_x;      // (N, H, W, C_in), input dtype
  void* grad_pw_w;   // (C_out, C_in), input dtype
  void* grad_pw_b;   // (C_out,), input dtype
  void* grad_dw_w;   // (C_out, KH*KW), input dtype
  void* grad_dw_b;   // (C_out,), input dtype
  // scratch, allocated by the host with the sizes that bwd_workspace() reports
  void* gpre;        // split path: (N*H*W, C_out), input dtype: d loss / d (pre-activation mid)
  float* part_tile;  // (tiles or fused blocks, C_out, KH*KW + 1) fp32 partials of grad_dw_w and grad_pw_b
  float* part_gemm;  // split: (splits, C_out, C_in) split-K partials of grad_pw_w; fused: (blocks,
                     // C_out rounded up to the round of 16 or 32 channels, C_in rounded up to 16) per-block slots;
                     // fp32
  float* part_col;   // (row_blocks, C_out) fp32 partials of grad_dw_b
};

// The tile plan of one call: what the launches of fwd_launch / bwd_launch use. Exported to Python as
// bsconv_cuda._C.tile_plan, against which tests check the work-accounting model in bsconv_cuda.cuda_backend.
struct TilePlan {
  bool fwd_fits;                       // false when no forward tile fits kMaxTilePixels and the grid (fwd_* are 0)
  int fwd_TH, fwd_TW, fwd_IH, fwd_IW;  // output tile and its input rows / columns (tile + halo)
  int fwd_CB;                          // output channels per forward block (32 or 16)
  int64_t fwd_tiles;                   // output tiles per image
  int bwd_TH, bwd_TW;                  // the mid pixels of one backward tile block
  int64_t bwd_tiles;                   // backward tiles per image
  int64_t splits, kchunk;              // split-K count and pixels per split of the grad_pw_weight GEMM
  int gemm_block_n;                    // columns (input channels) of the backward GEMMs' blocks (a transposed
                                       // grad_x GEMM has the pixels as columns: 32-wide)
  bool grad_x_transposed;              // the grad_x GEMM runs as grad_x^T = W^T . grad_pre^T (few pixels)
  int64_t col_blocks;                  // row blocks of the grad_dw_bias partials
  bool bwd_fused;                      // the backward's path: fused (no grad_pre) or split
  int fused_cb;                        // fused path: output channels per round (32 or 16) ...
  int fused_rows;                      // ... mid pixels per tile ...
  int64_t fused_tiles, fused_blocks;   // ... tiles over N*H*W, and persistent blocks (one slot of partials each)
  bool fused_slot_in_smem;             // ... whose grad_pw_weight slot accumulates in shared memory
};

struct BwdWorkspace {
  int64_t gpre_elems;       // elements of the input dtype (0 on the fused path)
  int64_t part_tile_elems;  // floats
  int64_t part_gemm_elems;  // floats
  int64_t part_col_elems;   // floats
};

// Implemented in bsconv_kernels.cu. Return a cudaError_t as int (0 = success) or a negative
// code for a shape the kernels do not support (see supported_reason()).
int fwd_launch(const FwdArgs& a, void* stream);
int bwd_launch(const BwdArgs& a, void* stream);
BwdWorkspace bwd_workspace(const ConvShape& s);
TilePlan tile_plan(const ConvShape& s);
// nullptr when the kernels support the shape, else a static string saying why not.
const char* supported_reason(const ConvShape& s);
const char* error_string(int code);
// Reads and clears (unless it is sticky) the CUDA error that earlier work left pending in this host thread, 0 if
// none. Called right before the launches, so that the error checks after them report only their own errors.
int take_pending_error();
int cuda_runtime_version_built();

}  // namespace bsconv

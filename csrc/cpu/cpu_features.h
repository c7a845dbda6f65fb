// What this CPU runs, read once (and SPARSEKERNELS_CPU_ISA, read per call): the one place the
// CPU kernels ask before taking an AVX-512 path. Each such path is compiled with
// __attribute__((target(...))) (the SK_TARGET_* macros), so a build for a CPU without those
// features still compiles.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SK_LOWP_X86 1
#define SK_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define SK_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define SK_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#endif

namespace sparsekernels {
namespace cpu {
namespace lowp {

struct Features {
  bool avx512 = false;  // F, BW, VL, DQ: what every AVX-512 path here needs
  bool bf16 = false;
  bool vnni = false;
};

inline Features detect_features() {
  Features f;
#ifdef SK_LOWP_X86
  __builtin_cpu_init();
  const bool base = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  f.avx512 = base;
  f.bf16 = base && __builtin_cpu_supports("avx512bf16");
  f.vnni = base && __builtin_cpu_supports("avx512vnni");
#endif
  return f;
}

inline const Features& features() {
  static const Features f = detect_features();
  return f;
}

// SPARSEKERNELS_CPU_ISA=generic forces the portable paths (tests; a CPU that misreports).
// Read per call, so a test can switch it; getenv costs far less than a kernel call.
inline bool forced_generic() {
  const char* v = std::getenv("SPARSEKERNELS_CPU_ISA");
  return v != nullptr && std::strcmp(v, "generic") == 0;
}
inline bool use_avx512() { return features().avx512 && !forced_generic(); }
inline bool use_bf16() { return features().bf16 && !forced_generic(); }
inline bool use_vnni() { return features().vnni && !forced_generic(); }

#ifdef SK_LOWP_X86
// The lanes of a row's last, partial piece of 16 (0: none), for masked loads and stores
inline __mmask16 tail_lanes(int64_t width) {
  return static_cast<__mmask16>((1u << (width % 16)) - 1u);
}
#endif

}  // namespace lowp
}  // namespace cpu
}  // namespace sparsekernels

// The exported sparse products' kernels (the export extension, export_kernels.cpp),
// for x86-64 CPUs with AVX2, FMA and BMI2, picked at run time (common.h: kernel_isa).
#include "common.h"

#if RIGL_FAST_HAVE_AVX2
// common.h, parsed above, stays baseline; only what the headers below define (in namespace rigl_fast::avx2) is AVX2.
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt,lzcnt")
#define RIGL_ISA avx2
#if !defined(__clang__)  // GCC: the intrinsics of product_kernels.h's transpose and packing (GCC does not define
                         // __AVX2__ under the pragma; clang ignores the pragma, and its intrinsics would not compile)
#define RIGL_ISA_AVX2 1
#endif
#include "product_kernels.h"
#pragma GCC pop_options
#endif

// The update kernels for x86-64 CPUs with AVX2, FMA and BMI2, picked at run time (rigl_ops.cpp).
#include "common.h"

#if RIGL_FAST_HAVE_AVX2
// Headers above stay baseline; only what update_kernels.h, shard_kernels.h, unit_kernels.h and product_kernels.h define (in namespace
// rigl_fast::avx2) is AVX2.
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt,lzcnt")
#define RIGL_ISA avx2
#include "update_kernels.h"
#include "shard_kernels.h"
#include "unit_kernels.h"
#include "product_kernels.h"
#pragma GCC pop_options
#endif

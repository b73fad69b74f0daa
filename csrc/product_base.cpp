// The exported sparse products' kernels (the export extension, export_kernels.cpp), for the baseline instruction
// set (every CPU).
#include "common.h"

#define RIGL_ISA base
#include "product_kernels.h"

// The update kernels for the baseline instruction set (every CPU).
#include "common.h"

#define RIGL_ISA base
#include "update_kernels.h"
#include "shard_kernels.h"
#include "unit_kernels.h"
#include "product_kernels.h"

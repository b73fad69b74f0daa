// The sharded update's and the structured update's kernels, for the baseline instruction set (every CPU).
#include "common.h"

#define RIGL_ISA base
#include "shard_kernels.h"
#include "unit_kernels.h"

// The update kernels (select_layers, write_layer), for the baseline instruction set (every CPU).
#include "common.h"

#define RIGL_ISA base
#include "update_ops.h"

#include "common.cuh"
__global__ void k(int* p){ p[0] = undefined_thing; }

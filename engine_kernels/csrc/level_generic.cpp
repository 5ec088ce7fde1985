// The kernels with no ISA assumed: the build's baseline (SSE2 on x86-64, NEON on aarch64),
// vectorized by the compiler where it can. What an ARM machine runs, and the floor anywhere.
#include "prelude.h"

#define ENGINE_GENERIC 1
namespace engine_generic {
#include "level.h"
}
const engine::KernelTable* engine::generic_table() { return &engine_generic::table; }

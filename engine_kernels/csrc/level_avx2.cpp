// The kernels for AVX2 + FMA + F16C (Zen 2/3, Haswell and later): GCC's target pragma
// compiles them for it in a build whose baseline is the machine's minimum; the platform
// calls them only where the CPU has it.
#include "prelude.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define ENGINE_AVX2 1
namespace engine_avx2 {
#include "level.h"
}
#pragma GCC pop_options
const engine::KernelTable* engine::avx2_table() { return &engine_avx2::table; }
#else
const engine::KernelTable* engine::avx2_table() { return nullptr; }
#endif

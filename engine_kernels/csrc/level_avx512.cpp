// The kernels for AVX-512 F/BW/VL/DQ + VNNI + BF16 (Zen 4, Sapphire Rapids): GCC's target
// pragma compiles them for it in a build whose baseline is the machine's minimum; the
// platform calls them only where the CPU has it (the BF16 parts only with AVX512-BF16).
#include "prelude.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4,avx512vnni,avx512bf16")
#define ENGINE_AVX512 1
#define ENGINE_BF16 1
namespace engine_avx512 {
#include "level.h"
}
#pragma GCC pop_options
const engine::KernelTable* engine::avx512_table() { return &engine_avx512::table; }
#else
const engine::KernelTable* engine::avx512_table() { return nullptr; }
#endif

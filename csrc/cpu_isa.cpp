// SPDX-License-Identifier: Apache-2.0
#include "tilefuse/cpu/isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace tilefuse::cpu {
namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

Isa initial_isa() {
  const Isa best = cpu_has_avx2() ? Isa::kAvx2 : Isa::kGeneric;
  const char* env = std::getenv("TILEFUSE_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  if (std::strcmp(env, "generic") == 0) return Isa::kGeneric;
  TORCH_CHECK(std::strcmp(env, "avx2") == 0,
              "TILEFUSE_CPU_ISA must be 'generic' or 'avx2', got '", env, "'");
  TORCH_CHECK(best == Isa::kAvx2, "TILEFUSE_CPU_ISA=avx2 but this CPU lacks AVX2/FMA/F16C");
  return Isa::kAvx2;
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_isa())};
  return slot;
}

}  // namespace

Isa current_isa() { return static_cast<Isa>(isa_slot().load(std::memory_order_relaxed)); }

void set_isa(Isa isa) {
  TORCH_CHECK(isa == Isa::kGeneric || cpu_has_avx2(), "this CPU lacks AVX2/FMA/F16C");
  isa_slot().store(static_cast<int>(isa));
}

const char* isa_name(Isa isa) { return isa == Isa::kAvx2 ? "cpu-avx2" : "cpu-generic"; }

}  // namespace tilefuse::cpu

// SPDX-License-Identifier: Apache-2.0
// Run-time choice of the CPU kernel tier.
#pragma once
#include <string>

namespace tilefuse::cpu {

enum class Isa : int { kGeneric = 0, kAvx2 = 1 };

/// \brief Tier used by the CPU ops: the best one the CPU supports, unless lowered with
/// set_isa() or the environment variable TILEFUSE_CPU_ISA=generic|avx2 (read once).
Isa current_isa();
/// \brief Forces a tier (for tests and A/B benchmarks); raises if the CPU lacks it.
void set_isa(Isa isa);
const char* isa_name(Isa isa);

}  // namespace tilefuse::cpu

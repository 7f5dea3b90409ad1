// SPDX-License-Identifier: Apache-2.0
// The Python module tilefuse._C: importing it runs the static TORCH_LIBRARY registrars of every
// family. Library-wide utility ops live here; family schemas live in csrc/<family>/<family>.cpp.
#include <Python.h>
#include <torch/library.h>

#include "tilefuse/cpu/isa.h"

namespace {

std::string cpu_isa() { return tilefuse::cpu::isa_name(tilefuse::cpu::current_isa()); }

void set_cpu_isa(const std::string& name) {
  using tilefuse::cpu::Isa;
  TORCH_CHECK_VALUE(name == "cpu-generic" || name == "cpu-avx2",
                    "set_cpu_isa: name must be 'cpu-generic' or 'cpu-avx2', got '", name, "'");
  tilefuse::cpu::set_isa(name == "cpu-avx2" ? Isa::kAvx2 : Isa::kGeneric);
}

}  // namespace

TORCH_LIBRARY(tilefuse, m) {
  m.def("_cpu_isa() -> str", &cpu_isa);
  m.def("_set_cpu_isa(str name) -> ()", &set_cpu_isa);
}

static PyModuleDef tilefuse_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&tilefuse_module); }

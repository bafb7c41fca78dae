// Python bindings of hecate's c10d-level collectives, added to the hecate._C module.
#pragma once

#include <pybind11/pybind11.h>

namespace hecate {

// Called once from PYBIND11_MODULE(_C, m) in csrc/ops.cpp; implemented in csrc/cpu/c10d_bindings.cpp.
void register_c10d_bindings(pybind11::module_& m);

}  // namespace hecate

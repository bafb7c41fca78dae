// Placeholder: the collectives work fills in the c10d bindings of hecate._C here.
#include "c10d_bindings.h"

namespace hecate {

void register_c10d_bindings(pybind11::module_& /*m*/) {}

}  // namespace hecate

// The error of malformed bytes, as opposed to a caller's wrong arguments.
//
// Kernels that parse bytes a peer sent (index streams, packed codes) throw
// MalformedData when the bytes break the format; the binding layer registers it
// as fedpress.DecodeError (a ValueError), the class every decode path raises.
// Arguments a caller got wrong stay std::invalid_argument (ValueError).
#pragma once

#include <stdexcept>

namespace fedpress {

class MalformedData : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

}  // namespace fedpress

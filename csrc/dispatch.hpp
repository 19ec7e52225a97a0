// A value known at run time, among a few known at compile time, handed to a kernel as a
// constant: each value's own instantiation of it (a code width in a loop's shifts and
// masks), without a switch written out per kernel.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

namespace fedpress {

// fn(std::integral_constant<unsigned, V>{}) for the V among Values equal to value. The
// callers check their inputs first: a value that is none of them is a bug (logic_error).
template <unsigned... Values, class Fn>
void with_constant(unsigned value, Fn&& fn) {
  const bool found = ((value == Values && (fn(std::integral_constant<unsigned, Values>{}), true)) || ...);
  if (!found) throw std::logic_error("with_constant: " + std::to_string(value) + " is none of the instantiated values");
}

}  // namespace fedpress

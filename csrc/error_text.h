// Text for numbers and shapes in error messages, built with std::to_string rather than by
// streaming integers into c10::str: on the GPU image, streaming an integer from inside the
// extension crashed (ostream::_M_insert<long>, a libstdc++ mismatch between the build compiler's
// headers and the loaded runtime), turning every argument error into a segfault.
#pragma once

#include <c10/core/SymInt.h>
#include <c10/util/ArrayRef.h>

#include <initializer_list>
#include <string>

namespace moequant {

inline std::string num_str(int64_t v) { return std::to_string(v); }

inline std::string num_str(const c10::SymInt& v) {
  if (auto concrete = v.maybe_as_int()) return std::to_string(*concrete);
  return v.toSymNode()->str();
}

namespace detail {
template <typename T>
std::string join_dims(c10::ArrayRef<T> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + num_str(dims[i]);
  return s + "]";
}
}  // namespace detail

inline std::string dims_str(c10::IntArrayRef dims) { return detail::join_dims(dims); }
inline std::string dims_str(c10::SymIntArrayRef dims) { return detail::join_dims(dims); }
inline std::string dims_str(std::initializer_list<int64_t> dims) { return dims_str(c10::IntArrayRef(dims)); }

}  // namespace moequant

// Python's spelling of a shape tuple, (2,) or (2, 3), for error messages of the pybind11 modules.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastdream {

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

}  // namespace fastdream

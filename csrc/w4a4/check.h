// Formatting for argument-check messages. Numbers and shapes are turned into strings with
// std::to_string instead of being streamed: on the device image, streaming an integer into
// TORCH_CHECK's message from this extension crashed the process (segfault inside the error path;
// enum and string messages worked), so the messages avoid ostream number formatting.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>

namespace nunchaku {

inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string shape(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a[i]);
  }
  return s + "]";
}

}  // namespace nunchaku

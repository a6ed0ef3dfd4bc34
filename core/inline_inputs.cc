#include "core/inline_inputs.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace reasonalloc {
namespace {

std::string ShapeString(std::span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::Status CheckShape(absl::string_view field, const RawTensor& t,
                        std::span<const int64_t> expected, std::span<const char* const> dim_names) {
  if (t.shape.size() != expected.size()) {
    return absl::InvalidArgumentError(absl::StrCat(field, " has shape ", ShapeString(t.shape),
                                                   "; expected ", ShapeString(expected)));
  }
  for (size_t i = 0; i < expected.size(); ++i) {
    if (expected[i] >= 0 && t.shape[i] != expected[i]) {
      return absl::InvalidArgumentError(absl::StrCat(field, " has shape ", ShapeString(t.shape),
                                                     ": dimension ", i, " (", dim_names[i], ") is ",
                                                     t.shape[i], ", expected ", expected[i]));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckTensorBytes(absl::string_view field, const RawTensor& t) {
  uint64_t count = 1;
  for (size_t i = 0; i < t.shape.size(); ++i) {
    const int64_t dim = t.shape[i];
    if (dim < 0 || dim > (int64_t{1} << 40)) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, " dimension ", i, " = ", dim, " is out of range"));
    }
    if (dim != 0 && count > (uint64_t{1} << 50) / static_cast<uint64_t>(dim)) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, " shape ", ShapeString(t.shape), " is too large"));
    }
    count *= static_cast<uint64_t>(dim);
  }
  const uint64_t want = count * DTypeSize(t.dtype);
  if (want != t.data.size()) {
    return absl::InvalidArgumentError(absl::StrCat(field, " holds ", t.data.size(),
                                                   " bytes; shape ", ShapeString(t.shape), " of ",
                                                   DTypeName(t.dtype), " needs ", want));
  }
  return absl::OkStatus();
}

absl::StatusOr<PreparedInputs> PrepareInlineInputs(const SessionConfig& config,
                                                   const RawTensor& query_window,
                                                   const RawTensor& keys, const RawTensor& values,
                                                   std::span<const int32_t> lengths) {
  const ModelGeometry& m = config.model;
  const int window = config.budget.window;
  static constexpr const char* kQDims[] = {"num_layers", "num_q_heads", "window", "head_dim"};
  static constexpr const char* kKDims[] = {"num_layers", "num_kv_heads", "tokens", "head_dim"};

  if (!query_window.present) {
    return absl::InvalidArgumentError("inline_tensors.query_window is required");
  }
  if (!keys.present) return absl::InvalidArgumentError("inline_tensors.keys is required");
  // Values follow the session's mode: a mismatch is a call for the wrong kind of session.
  if (config.managed && !values.present) {
    return absl::FailedPreconditionError(
        "inline_tensors.values is required for a managed-mode session (the sidecar holds K and V)");
  }
  if (!config.managed && values.present) {
    return absl::FailedPreconditionError(
        "inline_tensors.values must be empty for an advisory-mode session");
  }
  const int64_t q_shape[] = {m.num_layers, m.num_q_heads, window, m.head_dim};
  if (auto s = CheckShape("inline_tensors.query_window", query_window, q_shape, kQDims); !s.ok()) {
    return s;
  }
  if (auto s = CheckTensorBytes("inline_tensors.query_window", query_window); !s.ok()) return s;
  const int64_t k_shape[] = {m.num_layers, m.num_kv_heads, -1, m.head_dim};
  if (auto s = CheckShape("inline_tensors.keys", keys, k_shape, kKDims); !s.ok()) return s;
  const int64_t n_max = keys.shape[2];
  if (n_max < 1 || n_max > m.max_context) {
    return absl::InvalidArgumentError(
        absl::StrCat("inline_tensors.keys has ", n_max,
                     " tokens per head; expected 1 to model.max_context = ", m.max_context));
  }
  if (keys.dtype != m.dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat("inline_tensors.keys has dtype ", DTypeName(keys.dtype),
                     "; the session's model.dtype is ", DTypeName(m.dtype)));
  }
  if (auto s = CheckTensorBytes("inline_tensors.keys", keys); !s.ok()) return s;
  if (values.present) {
    const int64_t v_shape[] = {m.num_layers, m.num_kv_heads, n_max, m.head_dim};
    if (auto s = CheckShape("inline_tensors.values", values, v_shape, kKDims); !s.ok()) return s;
    if (values.dtype != m.dtype) {
      return absl::InvalidArgumentError(
          absl::StrCat("inline_tensors.values has dtype ", DTypeName(values.dtype),
                       "; the session's model.dtype is ", DTypeName(m.dtype)));
    }
    if (auto s = CheckTensorBytes("inline_tensors.values", values); !s.ok()) return s;
  }

  const int64_t heads = m.num_heads_total();
  PreparedInputs out;
  out.n_max = n_max;
  if (lengths.empty()) {
    out.lengths.assign(static_cast<size_t>(heads), static_cast<int32_t>(n_max));
  } else {
    if (static_cast<int64_t>(lengths.size()) != heads) {
      return absl::InvalidArgumentError(
          absl::StrCat("inline_tensors.lengths has ", lengths.size(),
                       " entries; expected num_layers * num_kv_heads = ", heads, " (or none)"));
    }
    for (size_t i = 0; i < lengths.size(); ++i) {
      if (lengths[i] < 0 || lengths[i] > n_max) {
        return absl::InvalidArgumentError(absl::StrCat(
            "inline_tensors.lengths[", i, "] = ", lengths[i], " is out of range [0, ", n_max, "]"));
      }
    }
    out.lengths.assign(lengths.begin(), lengths.end());
  }

  out.query_window.resize(static_cast<size_t>(heads / m.num_kv_heads * m.num_q_heads) *
                          static_cast<size_t>(window * m.head_dim));
  const int64_t bad_q =
      ConvertToFloat32(query_window.dtype, query_window.data.data(),
                       static_cast<int64_t>(out.query_window.size()), out.query_window.data());
  if (bad_q >= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("inline_tensors.query_window holds a NaN or Inf at flat index ", bad_q));
  }

  // Keys and values are checked over live rows only: padding past a head's length may hold
  // anything.
  const size_t row = static_cast<size_t>(m.head_dim);
  out.keys.assign(static_cast<size_t>(heads * n_max) * row, 0.0f);
  const size_t k_item = DTypeSize(keys.dtype);
  const size_t v_item = values.present ? DTypeSize(values.dtype) : 0;
  std::vector<float> scratch;
  for (int64_t head = 0; head < heads; ++head) {
    const int64_t n = out.lengths[static_cast<size_t>(head)];
    const size_t first = static_cast<size_t>(head * n_max) * row;
    const int64_t bad = ConvertToFloat32(keys.dtype, keys.data.data() + first * k_item,
                                         n * m.head_dim, out.keys.data() + first);
    if (bad >= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("inline_tensors.keys holds a NaN or Inf at flat index ",
                       static_cast<int64_t>(first) + bad, " (layer ", head / m.num_kv_heads,
                       ", kv head ", head % m.num_kv_heads, ", token ", bad / m.head_dim, ")"));
    }
    if (values.present) {
      scratch.resize(static_cast<size_t>(n) * row);
      const int64_t bad_v = ConvertToFloat32(values.dtype, values.data.data() + first * v_item,
                                             n * m.head_dim, scratch.data());
      if (bad_v >= 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("inline_tensors.values holds a NaN or Inf at flat index ",
                         static_cast<int64_t>(first) + bad_v, " (layer ", head / m.num_kv_heads,
                         ", kv head ", head % m.num_kv_heads, ", token ", bad_v / m.head_dim, ")"));
      }
    }
  }
  return out;
}

}  // namespace reasonalloc

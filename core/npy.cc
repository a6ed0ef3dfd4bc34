#include "core/npy.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"

namespace reasonalloc {
namespace {

// Every .npy file starts with these six bytes.
constexpr absl::string_view kMagic("\x93NUMPY", 6);
// Magic plus the two version bytes, the part before the header length.
constexpr size_t kMagicAndVersionSize = 8;
// NumPy aligns the data start to 64 bytes so that the data can be memory mapped
// with any dtype alignment; matching it keeps our files byte-identical to np.save.
constexpr size_t kArrayAlign = 64;
// NumPy reserves room for the leading axis to grow to this many digits so that
// appending rows can rewrite the header in place; we copy it for identical bytes.
constexpr size_t kGrowthAxisMaxDigits = 21;
constexpr size_t kMaxVersion1HeaderSize = std::numeric_limits<uint16_t>::max();

// Debian's abseil is built with its own string_view rather than an alias of
// std::string_view, so the public std::string_view arguments are converted once
// at the API edge. The conversion is a no-op where the two types are the same.
absl::string_view ToAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

struct DTypeInfo {
  NpyDType dtype;
  // A C string converts to both std::string_view (the public API) and
  // absl::string_view (everything abseil takes).
  const char* descr;
  size_t item_size;
};

constexpr DTypeInfo kDTypes[] = {
    {NpyDType::kFloat32, "<f4", 4}, {NpyDType::kFloat16, "<f2", 2}, {NpyDType::kFloat64, "<f8", 8},
    {NpyDType::kInt32, "<i4", 4},   {NpyDType::kInt64, "<i8", 8},   {NpyDType::kUInt8, "|u1", 1},
    {NpyDType::kUInt16, "<u2", 2},  {NpyDType::kUInt64, "<u8", 8},  {NpyDType::kBool, "|b1", 1},
};

const DTypeInfo& InfoFor(NpyDType dtype) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.dtype == dtype) return info;
  }
  // Every enumerator is in kDTypes, so this only guards against a cast from a bad integer.
  return kDTypes[0];
}

// Returns nullopt when a * b does not fit in int64; both operands are non-negative.
std::optional<int64_t> CheckedMul(int64_t a, int64_t b) {
  if (b != 0 && a > std::numeric_limits<int64_t>::max() / b) return std::nullopt;
  return a * b;
}

// NumPy writes the tuple repr, whose one-element form needs the trailing comma.
std::string FormatShape(const std::vector<int64_t>& shape) {
  if (shape.size() == 1) return absl::StrCat("(", shape[0], ",)");
  return absl::StrCat("(", absl::StrJoin(shape, ", "), ")");
}

absl::Status Invalid(absl::string_view what, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat(what, ": ", problem));
}

// Checks the shape the same way for parsed headers and arrays about to be
// written, so that nothing we write is something we would refuse to read.
absl::StatusOr<int64_t> ByteSize(const std::vector<int64_t>& shape, NpyDType dtype,
                                 absl::string_view what) {
  const DTypeInfo& info = InfoFor(dtype);
  // Zero dimensions are skipped rather than ending the product early: a shape such
  // as (0, 2**40, 2**40) holds no bytes, but NumPy refuses it because the other
  // axes overflow, and so do we.
  int64_t nonzero_bytes = static_cast<int64_t>(info.item_size);
  bool has_zero = false;
  for (int64_t dim : shape) {
    if (dim < 0) {
      return Invalid(what,
                     absl::StrCat("negative dimension ", dim, " in shape ", FormatShape(shape)));
    }
    if (dim == 0) {
      has_zero = true;
      continue;
    }
    std::optional<int64_t> product = CheckedMul(nonzero_bytes, dim);
    if (!product.has_value()) {
      return Invalid(what, absl::StrCat("shape ", FormatShape(shape), " with descr '", info.descr,
                                        "' overflows the byte size"));
    }
    nonzero_bytes = *product;
  }
  return has_zero ? 0 : nonzero_bytes;
}

std::optional<NpyDType> DTypeFromDescr(absl::string_view descr) {
  for (const DTypeInfo& info : kDTypes) {
    if (descr == info.descr) return info.dtype;
    // '=' means the writer's native order: meaningless for one byte, but for wider
    // types it depends on a machine we cannot see, so only one-byte types take it.
    if (info.item_size == 1 && !descr.empty() && descr[0] == '=' &&
        descr.substr(1) == absl::string_view(info.descr).substr(1)) {
      return info.dtype;
    }
  }
  return std::nullopt;
}

struct ParsedHeader {
  absl::string_view descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
};

// A parser for exactly the Python dict literal that .npy headers contain. NumPy
// reads headers with ast.literal_eval, so hand-written and older writers vary in
// spacing, quoting, key order and trailing commas; this accepts those variations
// without evaluating anything.
class HeaderParser {
 public:
  HeaderParser(absl::string_view text, absl::string_view what, bool allow_long_suffix)
      : text_(text), what_(what), allow_long_suffix_(allow_long_suffix) {}

  absl::StatusOr<ParsedHeader> Parse() {
    ParsedHeader header;
    bool have_descr = false;
    bool have_fortran_order = false;
    bool have_shape = false;
    SkipSpace();
    if (!Consume('{')) return Error("expected '{' opening the header dict");
    while (true) {
      SkipSpace();
      if (Consume('}')) break;
      const size_t key_pos = pos_;
      absl::StatusOr<absl::string_view> key = ParseString("header key");
      if (!key.ok()) return key.status();
      SkipSpace();
      if (!Consume(':')) return Error(absl::StrCat("expected ':' after key '", *key, "'"));
      SkipSpace();
      if (*key == "descr") {
        if (have_descr) return DuplicateKey(*key);
        have_descr = true;
        if (Peek() != '\'' && Peek() != '"') {
          // A list here is a structured dtype, which has no NpyDType.
          return Error("descr is not a simple dtype string (structured dtypes are not supported)");
        }
        absl::StatusOr<absl::string_view> descr = ParseString("descr");
        if (!descr.ok()) return descr.status();
        header.descr = *descr;
      } else if (*key == "fortran_order") {
        if (have_fortran_order) return DuplicateKey(*key);
        have_fortran_order = true;
        absl::StatusOr<bool> fortran_order = ParseBool();
        if (!fortran_order.ok()) return fortran_order.status();
        header.fortran_order = *fortran_order;
      } else if (*key == "shape") {
        if (have_shape) return DuplicateKey(*key);
        have_shape = true;
        absl::StatusOr<std::vector<int64_t>> shape = ParseShape();
        if (!shape.ok()) return shape.status();
        header.shape = *std::move(shape);
      } else {
        pos_ = key_pos;
        return Error(absl::StrCat("unexpected header key '", *key, "'"));
      }
      SkipSpace();
      if (Consume('}')) break;
      if (!Consume(',')) return Error("expected ',' or '}' after a header value");
    }
    SkipSpace();
    if (pos_ != text_.size()) return Error("unexpected text after the header dict");
    if (!have_descr) return MissingKey("descr");
    if (!have_fortran_order) return MissingKey("fortran_order");
    if (!have_shape) return MissingKey("shape");
    return header;
  }

 private:
  char Peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }

  bool Consume(char c) {
    if (Peek() != c || pos_ >= text_.size()) return false;
    ++pos_;
    return true;
  }

  // NumPy pads with spaces and ends with '\n'; other writers may use any Python whitespace.
  void SkipSpace() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' ||
                                   text_[pos_] == '\n' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }

  // No key or descr we accept contains a backslash, so escapes are refused
  // rather than decoded.
  absl::StatusOr<absl::string_view> ParseString(absl::string_view context) {
    const char quote = Peek();
    if (quote != '\'' && quote != '"') return Error(absl::StrCat("expected a quoted ", context));
    const size_t start = pos_ + 1;
    const size_t end = text_.find(quote, start);
    if (end == absl::string_view::npos) return Error(absl::StrCat("unterminated ", context));
    absl::string_view value = text_.substr(start, end - start);
    if (value.find('\\') != absl::string_view::npos) {
      return Error(absl::StrCat("escape sequence in ", context, " '", value, "'"));
    }
    pos_ = end + 1;
    return value;
  }

  absl::StatusOr<bool> ParseBool() {
    const size_t start = pos_;
    while (pos_ < text_.size() && absl::ascii_isalnum(static_cast<unsigned char>(text_[pos_]))) {
      ++pos_;
    }
    const absl::string_view word = text_.substr(start, pos_ - start);
    if (word == "True") return true;
    if (word == "False") return false;
    pos_ = start;
    // NumPy insists on a real bool, so 0 or 1 is refused as it is there.
    return Error(absl::StrCat("fortran_order is not True or False: '", word, "'"));
  }

  absl::StatusOr<std::vector<int64_t>> ParseShape() {
    const size_t start = pos_;
    if (!Consume('(')) return Error("shape is not a tuple");
    std::vector<int64_t> shape;
    bool trailing_comma = false;
    while (true) {
      SkipSpace();
      if (Consume(')')) break;
      absl::StatusOr<int64_t> dim = ParseDim();
      if (!dim.ok()) return dim.status();
      shape.push_back(*dim);
      SkipSpace();
      trailing_comma = Consume(',');
      if (trailing_comma) continue;
      SkipSpace();
      if (Consume(')')) break;
      return Error("expected ',' or ')' in shape");
    }
    // In Python "(3)" is the int 3, not a tuple, and NumPy rejects it.
    if (shape.size() == 1 && !trailing_comma) {
      return Error(absl::StrCat("shape ", text_.substr(start, pos_ - start),
                                " is not a tuple (a one-element tuple needs a trailing comma)"));
    }
    // Negative dimensions parse here and are refused by ByteSize with the other
    // shape checks.
    return shape;
  }

  absl::StatusOr<int64_t> ParseDim() {
    const size_t start = pos_;
    // The sign is accepted so that a negative dimension is reported as such
    // rather than as a syntax error.
    const bool negative = Consume('-');
    if (!absl::ascii_isdigit(static_cast<unsigned char>(Peek()))) {
      return Error("shape dimension is not an integer");
    }
    // Accumulate negatively so that the most negative int64 is representable,
    // and report every out-of-range dimension rather than wrapping.
    int64_t value = 0;
    while (absl::ascii_isdigit(static_cast<unsigned char>(Peek()))) {
      const int digit = Peek() - '0';
      if (value < (std::numeric_limits<int64_t>::min() + digit) / 10) {
        while (absl::ascii_isdigit(static_cast<unsigned char>(Peek()))) ++pos_;
        return Error(absl::StrCat("shape dimension ", text_.substr(start, pos_ - start),
                                  " does not fit in 64 bits"));
      }
      value = value * 10 - digit;
      ++pos_;
    }
    // Python 2 NumPy wrote dimensions as longs ("3L") in version 1.0 and 2.0 files.
    if (allow_long_suffix_) Consume('L');
    if (!negative) {
      if (value == std::numeric_limits<int64_t>::min()) {
        return Error(absl::StrCat("shape dimension ", text_.substr(start, pos_ - start),
                                  " does not fit in 64 bits"));
      }
      value = -value;
    }
    return value;
  }

  absl::Status DuplicateKey(absl::string_view key) {
    return Error(absl::StrCat("duplicate header key '", key, "'"));
  }

  absl::Status MissingKey(absl::string_view key) {
    return Invalid(what_, absl::StrCat("header is missing key '", key, "'"));
  }

  absl::Status Error(absl::string_view problem) {
    return Invalid(what_, absl::StrCat(problem, " at header offset ", pos_));
  }

  absl::string_view text_;
  absl::string_view what_;
  bool allow_long_suffix_;
  size_t pos_ = 0;
};

uint32_t ReadLittleEndian(absl::string_view bytes, size_t offset, size_t width) {
  uint32_t value = 0;
  for (size_t i = 0; i < width; ++i) {
    value |= static_cast<uint32_t>(static_cast<unsigned char>(bytes[offset + i])) << (8 * i);
  }
  return value;
}

void AppendLittleEndian(std::string& out, uint32_t value, size_t width) {
  for (size_t i = 0; i < width; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xff));
}

absl::Status ErrnoError(int error_number, const std::string& path, absl::string_view operation) {
  return absl::ErrnoToStatus(error_number, absl::StrCat(path, ": ", operation));
}

absl::Status WriteAll(int fd, absl::string_view bytes) {
  while (!bytes.empty()) {
    const ssize_t written = ::write(fd, bytes.data(), bytes.size());
    if (written < 0) {
      if (errno == EINTR) continue;
      return absl::ErrnoToStatus(errno, "write");
    }
    bytes.remove_prefix(static_cast<size_t>(written));
  }
  return absl::OkStatus();
}

}  // namespace

size_t NpyItemSize(NpyDType dtype) { return InfoFor(dtype).item_size; }

std::string_view NpyDescr(NpyDType dtype) { return InfoFor(dtype).descr; }

int64_t NpyArray::NumElements() const {
  int64_t count = 1;
  for (int64_t dim : shape) count *= dim;
  return count;
}

absl::StatusOr<NpyArray> ParseNpy(std::string_view std_bytes, std::string_view std_what) {
  const absl::string_view bytes = ToAbsl(std_bytes);
  const absl::string_view what = ToAbsl(std_what);
  if (bytes.size() < kMagicAndVersionSize || bytes.substr(0, kMagic.size()) != kMagic) {
    return Invalid(what, "not a .npy file (bad magic)");
  }
  const int major = static_cast<unsigned char>(bytes[6]);
  const int minor = static_cast<unsigned char>(bytes[7]);
  if ((major != 1 && major != 2 && major != 3) || minor != 0) {
    return Invalid(what, absl::StrFormat("unsupported .npy format version %d.%d", major, minor));
  }
  // Version 1.0 has a 16-bit header length; 2.0 widened it to 32 bits and 3.0
  // only changed the header encoding to UTF-8, which is moot for our ASCII keys.
  const size_t length_width = major == 1 ? 2 : 4;
  const size_t header_start = kMagicAndVersionSize + length_width;
  if (bytes.size() < header_start) {
    return Invalid(what, absl::StrCat("truncated header length: file has ", bytes.size(),
                                      " bytes, need ", header_start));
  }
  const size_t header_size = ReadLittleEndian(bytes, kMagicAndVersionSize, length_width);
  if (bytes.size() - header_start < header_size) {
    return Invalid(what, absl::StrCat("truncated header: header length says ", header_size,
                                      " bytes, file has ", bytes.size() - header_start));
  }
  HeaderParser parser(bytes.substr(header_start, header_size), what,
                      /*allow_long_suffix=*/major < 3);
  absl::StatusOr<ParsedHeader> header = parser.Parse();
  if (!header.ok()) return header.status();

  if (!header->descr.empty() && header->descr[0] == '>') {
    return Invalid(what, absl::StrCat("big-endian descr '", header->descr, "' is not supported"));
  }
  const std::optional<NpyDType> dtype = DTypeFromDescr(header->descr);
  if (!dtype.has_value()) {
    return Invalid(what, absl::StrCat("unsupported descr '", header->descr, "'"));
  }
  if (header->fortran_order) {
    return Invalid(what, "fortran_order True is not supported (only C order arrays are)");
  }
  absl::StatusOr<int64_t> byte_size = ByteSize(header->shape, *dtype, what);
  if (!byte_size.ok()) return byte_size.status();

  const absl::string_view data = bytes.substr(header_start + header_size);
  const uint64_t expected = static_cast<uint64_t>(*byte_size);
  if (data.size() < expected) {
    return Invalid(
        what, absl::StrCat("truncated data: shape ", FormatShape(header->shape), " with descr '",
                           header->descr, "' needs ", expected, " bytes, file has ", data.size()));
  }
  if (data.size() > expected) {
    return Invalid(what,
                   absl::StrCat(data.size() - expected, " trailing bytes after the data for shape ",
                                FormatShape(header->shape), " with descr '", header->descr, "'"));
  }

  NpyArray array;
  array.dtype = *dtype;
  array.shape = std::move(header->shape);
  array.data = std::string(data);
  return array;
}

std::string SerializeNpy(const NpyArray& array) {
  std::string dict =
      absl::StrCat("{'descr': '", InfoFor(array.dtype).descr,
                   "', 'fortran_order': False, 'shape': ", FormatShape(array.shape), ", }");
  if (!array.shape.empty()) {
    const size_t digits = absl::StrCat(array.shape[0]).size();
    if (digits < kGrowthAxisMaxDigits) dict.append(kGrowthAxisMaxDigits - digits, ' ');
  }
  // NumPy always adds 1 to kArrayAlign spaces before the '\n', never zero, and
  // only falls back to version 2.0 when the padded header overflows 16 bits.
  const size_t unpadded = dict.size() + 1;  // + '\n'
  size_t length_width = 2;
  size_t padding = kArrayAlign - (kMagicAndVersionSize + length_width + unpadded) % kArrayAlign;
  if (unpadded + padding > kMaxVersion1HeaderSize) {
    length_width = 4;
    padding = kArrayAlign - (kMagicAndVersionSize + length_width + unpadded) % kArrayAlign;
  }
  const size_t header_size = unpadded + padding;

  std::string out;
  out.reserve(kMagicAndVersionSize + length_width + header_size + array.data.size());
  out.append(kMagic.data(), kMagic.size());
  out.push_back(length_width == 2 ? '\x01' : '\x02');
  out.push_back('\x00');
  AppendLittleEndian(out, static_cast<uint32_t>(header_size), length_width);
  out.append(dict);
  out.append(padding, ' ');
  out.push_back('\n');
  out.append(array.data);
  return out;
}

absl::StatusOr<NpyArray> ReadNpyFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, path, "open");
  std::string bytes;
  struct stat st;
  if (::fstat(fd, &st) == 0 && st.st_size > 0) bytes.reserve(static_cast<size_t>(st.st_size));
  // Read to EOF rather than trusting st_size, which a concurrent writer or a
  // special file can make wrong.
  char buffer[1 << 16];
  while (true) {
    const ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n < 0) {
      if (errno == EINTR) continue;
      const int error_number = errno;
      ::close(fd);
      return ErrnoError(error_number, path, "read");
    }
    if (n == 0) break;
    bytes.append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);
  return ParseNpy(bytes, path);
}

absl::Status WriteNpyFile(const std::string& path, const NpyArray& array) {
  // SerializeNpy trusts the struct invariant; checking it here keeps a bad array
  // from becoming a file that ParseNpy would later refuse.
  absl::StatusOr<int64_t> byte_size = ByteSize(array.shape, array.dtype, path);
  if (!byte_size.ok()) return byte_size.status();
  if (array.data.size() != static_cast<uint64_t>(*byte_size)) {
    return Invalid(path, absl::StrCat("data has ", array.data.size(), " bytes but shape ",
                                      FormatShape(array.shape), " with descr '",
                                      InfoFor(array.dtype).descr, "' needs ", *byte_size));
  }
  const std::string bytes = SerializeNpy(array);

  // A sibling temporary file makes rename() atomic (same filesystem), so readers
  // see either the old file or the complete new one. The pid and counter keep
  // concurrent writers, in this process or others, off each other's files.
  static std::atomic<uint64_t> counter{0};
  std::string temp_path;
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    temp_path = absl::StrCat(path, ".tmp.", ::getpid(), ".", counter.fetch_add(1));
    // 0666 lets the umask decide permissions, as for a file opened directly.
    fd = ::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) return ErrnoError(errno, temp_path, "create temporary file");

  absl::Status status = WriteAll(fd, bytes);
  // Without fsync a crash after the rename can leave an empty or partial file
  // under the final name.
  if (status.ok() && ::fsync(fd) != 0) status = absl::ErrnoToStatus(errno, "fsync");
  if (::close(fd) != 0 && status.ok()) status = absl::ErrnoToStatus(errno, "close");
  if (status.ok() && ::rename(temp_path.c_str(), path.c_str()) != 0) {
    status = absl::ErrnoToStatus(errno, absl::StrCat("rename from ", temp_path));
  }
  if (!status.ok()) {
    ::unlink(temp_path.c_str());
    return absl::Status(status.code(), absl::StrCat(path, ": ", status.message()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> NpyToInt64(const NpyArray& array, absl::string_view what) {
  const size_t n = static_cast<size_t>(array.NumElements());
  std::vector<int64_t> out(n);
  if (array.dtype == NpyDType::kInt64) {
    if (n > 0) std::memcpy(out.data(), array.data.data(), n * sizeof(int64_t));
  } else if (array.dtype == NpyDType::kInt32) {
    for (size_t i = 0; i < n; ++i) {
      int32_t v;
      std::memcpy(&v, array.data.data() + i * sizeof(int32_t), sizeof(int32_t));
      out[i] = v;
    }
  } else {
    return absl::InvalidArgumentError(absl::StrCat(what, " must hold int32 or int64"));
  }
  return out;
}

}  // namespace reasonalloc

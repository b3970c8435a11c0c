// IDX reader (LeCun's MNIST format, also used by Fashion-MNIST). zlib's gz* API
// reads gzip and plain files alike, so the Debian .gz files are read in place.
//
// Layout: magic u32 BE (0x00000800 | ndims; type byte 0x08 = unsigned byte),
// ndims u32 BE sizes, then the payload in row-major order.
#include <torch/torch.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "data-impl.h"
#include "moecert/error.h"
#include "moecert/limits.h"

namespace moecert {
namespace {

constexpr uint32_t kImagesMagic = 0x00000803;  // u8, 3 dims: N, H, W
constexpr uint32_t kLabelsMagic = 0x00000801;  // u8, 1 dim: N
// The payload arrives in chunks of this size: a header that promises more than the
// file holds costs at most one chunk beyond what the file really has.
constexpr int64_t kChunkBytes = int64_t{64} << 20;

/// Owns a gzFile and turns every zlib failure into a DataError naming the file.
class GzReader {
 public:
  explicit GzReader(const std::string& path) : path_(path) {
    std::error_code ec;  // the non-throwing overloads: every failure must be a DataError
    if (!std::filesystem::is_regular_file(path, ec))
      throw DataError::cannot_open(
          path, std::filesystem::exists(path, ec) ? "not a regular file" : "no such file");
    errno = 0;
    file_ = gzopen(path.c_str(), "rb");
    if (file_ == nullptr) throw DataError::cannot_open(path, errno ? std::strerror(errno) : "zlib");
    gzbuffer(file_, 1 << 18);
  }
  ~GzReader() { gzclose(file_); }
  GzReader(const GzReader&) = delete;
  GzReader& operator=(const GzReader&) = delete;

  /// Reads up to n bytes; returns how many arrived (fewer only at end of data).
  int64_t read(void* dst, int64_t n) {
    auto* out = static_cast<char*>(dst);
    int64_t got = 0;
    while (got < n) {
      // gzread takes an unsigned count and returns int: read in chunks below INT_MAX.
      const auto chunk = static_cast<unsigned>(std::min<int64_t>(n - got, 1 << 30));
      const int r = gzread(file_, out + got, chunk);
      if (r < 0) throw DataError::corrupt(path_, "zlib: " + zlib_message());
      if (r == 0) break;
      got += r;
    }
    // A truncated gzip stream ends with Z_BUF_ERROR and a short count: the caller
    // reports that as truncation. Any other pending error is corruption.
    int errnum = Z_OK;
    gzerror(file_, &errnum);
    if (errnum != Z_OK && errnum != Z_BUF_ERROR)
      throw DataError::corrupt(path_, "zlib: " + zlib_message());
    return got;
  }

  /// Reads exactly n bytes or throws DataError::truncated.
  void read_exact(void* dst, int64_t n) {
    const int64_t got = read(dst, n);
    if (got != n) throw DataError::truncated(path_, n, got);
  }

  /// Throws if anything follows the payload (also forces the gzip CRC check).
  void expect_end(int64_t payload_bytes) {
    char extra[64];
    const int64_t got = read(extra, sizeof extra);
    if (got > 0)
      throw DataError::corrupt(
          path_, "unexpected bytes after the " + std::to_string(payload_bytes) + "-byte payload");
  }

 private:
  std::string zlib_message() {
    int errnum = Z_OK;
    const char* msg = gzerror(file_, &errnum);
    if (errnum == Z_ERRNO) return std::strerror(errno);
    std::string text = msg != nullptr && *msg ? msg : "unknown error";
    // zlib prefixes the path, which our message already names.
    const std::string prefix = path_ + ": ";
    if (text.compare(0, prefix.size(), prefix) == 0) text.erase(0, prefix.size());
    return text;
  }

  std::string path_;
  gzFile file_ = nullptr;
};

uint32_t be32(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

/// Reads one u8 IDX file with `ndims` dimensions -> uint8 tensor of those sizes.
torch::Tensor idx_read(const std::string& path, uint32_t magic, int ndims) {
  GzReader in(path);
  // Magic first, alone: a file of the other kind must report its magic, not a
  // truncated header.
  std::array<unsigned char, 4 * 4> header{};
  in.read_exact(header.data(), 4);
  const uint32_t got_magic = be32(header.data());
  if (got_magic != magic) throw DataError::bad_magic(path, magic, got_magic);
  in.read_exact(header.data() + 4, 4 * ndims);

  std::vector<int64_t> sizes;
  for (int d = 0; d < ndims; ++d) sizes.push_back(be32(header.data() + 4 * (d + 1)));
  // Every size within its limit before any product: at most 2^31 · 8192 · 8192 bytes.
  const char* what[] = {"images", "height", "width"};
  for (int d = 0; d < ndims; ++d)
    if (sizes[d] > (d == 0 ? limits::max_samples : limits::max_side))
      throw DataError::corrupt(
          path, "implausible dimensions " + shape_str(sizes) + " in header (" + what[d] +
                    " above " + std::to_string(d == 0 ? limits::max_samples : limits::max_side) +
                    ")");
  int64_t bytes = 1;
  for (int64_t s : sizes) bytes *= s;
  if (!limits::fits(static_cast<double>(bytes)))
    throw DataError::corrupt(
        path, "header dimensions " + shape_str(sizes) + " promise " +
                  limits::bytes_text(static_cast<double>(bytes)) +
                  ", more than the memory available (" +
                  limits::bytes_text(static_cast<double>(limits::memory_budget())) + ")");
  // Read in chunks into a buffer that grows with what arrives: a header that promises
  // more than the file holds is truncation, found before allocating the promise.
  auto buffer = std::make_shared<std::vector<uint8_t>>();
  for (int64_t done = 0; done < bytes;) {
    const int64_t n = std::min(kChunkBytes, bytes - done);
    buffer->resize(static_cast<size_t>(done + n));
    const int64_t got = in.read(buffer->data() + done, n);
    done += got;
    if (got < n) throw DataError::truncated(path, bytes, done);
  }
  in.expect_end(bytes);
  // The tensor owns the buffer (the deleter holds it): no copy.
  return torch::from_blob(
      buffer->data(), sizes, [buffer](void*) {}, torch::kUInt8);
}

}  // namespace

Dataset data_load_idx(const std::string& images_path, const std::string& labels_path,
                      int64_t num_classes) {
  torch::Tensor images = idx_read(images_path, kImagesMagic, 3);
  torch::Tensor labels = idx_read(labels_path, kLabelsMagic, 1);
  if (images.size(0) != labels.size(0))
    throw DataError::mismatch(images_path, "holds " + std::to_string(images.size(0)) +
                                               " images but " + labels_path + " holds " +
                                               std::to_string(labels.size(0)) + " labels");
  Dataset data;
  data.name = "idx";
  data.images = images.unsqueeze(1);  // [N, H, W] -> [N, 1, H, W]
  data.labels = labels.to(torch::kInt64);
  data.num_classes = num_classes;
  data_impl::check_labels(data.labels, num_classes, labels_path);
  // Callers that know the data set (data_load) replace these with published values.
  data_impl::pixel_stats(data.images, data.mean, data.std);
  return data;
}

}  // namespace moecert

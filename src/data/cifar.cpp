// CIFAR-10 binary version (https://www.cs.toronto.edu/~kriz/cifar.html): each
// batch file is a sequence of 3073-byte records, 1 label byte followed by a
// 32x32 image stored channel-major (1024 R, 1024 G, 1024 B bytes, rows top-down).
#include <torch/torch.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "data-impl.h"
#include "moecert/error.h"
#include "moecert/limits.h"

namespace moecert {
namespace {

constexpr int64_t kSide = 32;
constexpr int64_t kChannels = 3;
constexpr int64_t kRecordBytes = 1 + kChannels * kSide * kSide;  // 3073
constexpr int64_t kClasses = 10;

/// Reads one batch file -> uint8 [R, 3073] (label byte, then the CHW image).
torch::Tensor cifar_read_batch(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    throw DataError::cannot_open(
        path, std::filesystem::exists(path, ec) ? "not a regular file" : "no such file");
  const auto size = static_cast<int64_t>(std::filesystem::file_size(path, ec));
  if (ec) throw DataError::cannot_open(path, ec.message());
  if (size == 0) throw DataError::corrupt(path, "empty file, expected 3073-byte records");
  if (size % kRecordBytes != 0) {
    // A partial last record: the file was cut short (or is not a CIFAR-10 batch).
    const int64_t expected = (size / kRecordBytes + 1) * kRecordBytes;
    throw DataError::truncated(path, expected, size);
  }
  if (!limits::fits(static_cast<double>(size)))
    throw DataError::corrupt(path, "a " + limits::bytes_text(static_cast<double>(size)) +
                                       " file, more than the memory available");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError::cannot_open(path, std::strerror(errno));
  auto records = torch::empty({size / kRecordBytes, kRecordBytes}, torch::kUInt8);
  in.read(reinterpret_cast<char*>(records.data_ptr<uint8_t>()), size);
  if (in.gcount() != size) throw DataError::truncated(path, size, in.gcount());
  return records;
}

std::vector<std::string> cifar_files(const std::string& dir, bool train) {
  if (!train) return {dir + "/test_batch.bin"};
  std::vector<std::string> files;
  for (int i = 1; i <= 5; ++i) files.push_back(dir + "/data_batch_" + std::to_string(i) + ".bin");
  return files;
}

}  // namespace

Dataset data_load_cifar10(const std::string& dir, bool train) {
  std::vector<torch::Tensor> images, labels;
  for (const std::string& path : cifar_files(dir, train)) {
    torch::Tensor records = cifar_read_batch(path);
    torch::Tensor file_labels = records.select(1, 0).to(torch::kInt64);
    data_impl::check_labels(file_labels, kClasses, path);
    labels.push_back(file_labels);
    images.push_back(
        records.narrow(1, 1, kRecordBytes - 1).reshape({records.size(0), kChannels, kSide, kSide}));
  }
  Dataset data;
  data.name = "cifar10";
  data.images = torch::cat(images).contiguous();
  data.labels = torch::cat(labels);
  data.num_classes = kClasses;
  // Published per-channel statistics of the CIFAR-10 training set, used for both
  // splits so that test images are normalised exactly like training images.
  data.mean = {0.4914, 0.4822, 0.4465};
  data.std = {0.2470, 0.2435, 0.2616};
  return data;
}

}  // namespace moecert

// CIFAR-10 and CIFAR-100 binary versions (https://www.cs.toronto.edu/~kriz/cifar.html):
// each file is a sequence of records, label byte(s) followed by a 32x32 image stored
// channel-major (1024 R, 1024 G, 1024 B bytes, rows top-down). CIFAR-10: 1 label
// byte (3073-byte records, data_batch_1..5.bin, test_batch.bin); CIFAR-100: a coarse
// (20 classes) then a fine (100 classes) label byte (3074-byte records, train.bin,
// test.bin).
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
constexpr int64_t kImageBytes = kChannels * kSide * kSide;  // 3072

/// Reads one batch file of `kRecordBytes`-byte records -> uint8 [R, kRecordBytes]
/// (label bytes, then the CHW image).
torch::Tensor cifar_read_batch(const std::string& path, int64_t kRecordBytes) {
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

/// The images and the label at byte `label_byte` of every record of `files`.
Dataset cifar_load(const std::vector<std::string>& files, int64_t record_bytes, int64_t label_byte,
                   int64_t classes) {
  std::vector<torch::Tensor> images, labels;
  for (const std::string& path : files) {
    torch::Tensor records = cifar_read_batch(path, record_bytes);
    torch::Tensor file_labels = records.select(1, label_byte).to(torch::kInt64);
    data_impl::check_labels(file_labels, classes, path);
    labels.push_back(file_labels);
    images.push_back(records.narrow(1, record_bytes - kImageBytes, kImageBytes)
                         .reshape({records.size(0), kChannels, kSide, kSide}));
  }
  Dataset data;
  data.images = torch::cat(images).contiguous();
  data.labels = torch::cat(labels);
  data.num_classes = classes;
  return data;
}

}  // namespace

Dataset data_load_cifar10(const std::string& dir, bool train) {
  Dataset data = cifar_load(cifar_files(dir, train), 1 + kImageBytes, 0, 10);
  data.name = "cifar10";
  // Published per-channel statistics of the CIFAR-10 training set, used for both
  // splits so that test images are normalised exactly like training images.
  data.mean = {0.4914, 0.4822, 0.4465};
  data.std = {0.2470, 0.2435, 0.2616};
  return data;
}

Dataset data_load_cifar100(const std::string& dir, bool train, bool coarse) {
  Dataset data = cifar_load({dir + (train ? "/train.bin" : "/test.bin")}, 2 + kImageBytes,
                            coarse ? 0 : 1, coarse ? 20 : 100);
  data.name = coarse ? "cifar100-coarse" : "cifar100";
  // Per-channel statistics of the CIFAR-100 training set (both splits, as above).
  data.mean = {0.5071, 0.4865, 0.4409};
  data.std = {0.2673, 0.2564, 0.2762};
  return data;
}

}  // namespace moecert

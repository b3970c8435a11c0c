// TinyImageNet (the standard `tiny-imagenet-200` folder): 200 classes named by the
// WordNet ids of wnids.txt (class index = position in sorted order, as a folder-based
// loader sees them), training images train/<wnid>/images/*.JPEG, the labelled
// validation images (the test split: the official test set has no labels)
// val/images/*.JPEG with val/val_annotations.txt (file <TAB> wnid <TAB> box). Every
// image is a 64x64 JPEG (a few are greyscale: decoded to RGB), decoded with
// libjpeg(-turbo). The decoded split is cached once beside the data as one binary
// tensor file with a SHA-256 checksum and a key of its sources (names, sizes, times):
// a changed, missing or corrupt cache is rebuilt, never trusted.
#include <jpeglib.h>
#include <sys/stat.h>
#include <torch/torch.h>

#include <algorithm>
#include <csetjmp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include "data-impl.h"
#include "moecert/checkpoint.h"
#include "moecert/error.h"
#include "moecert/limits.h"

namespace moecert {
namespace {

namespace fs = std::filesystem;
constexpr int64_t kSide = 64, kChannels = 3, kImage = kChannels * kSide * kSide;
constexpr char kMagic[8] = {'M', 'C', 'T', 'I', 'N', '0', '0', '1'};

struct JpegError {
  jpeg_error_mgr mgr;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void on_jpeg_error(j_common_ptr info) {
  auto* e = reinterpret_cast<JpegError*>(info->err);
  (*info->err->format_message)(info, e->message);
  longjmp(e->jump, 1);
}

/// Decodes a 64x64 JPEG (RGB or greyscale) into `out` (CHW, 3·64·64 bytes).
void decode_jpeg(const std::string& path, uint8_t* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError::cannot_open(path, std::strerror(errno));
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() > (size_t{1} << 24))
    throw DataError::corrupt(path, "a " + std::to_string(bytes.size()) +
                                       "-byte file; TinyImageNet images are small 64x64 JPEGs");
  jpeg_decompress_struct info{};
  JpegError err{};
  info.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = on_jpeg_error;
  std::vector<uint8_t> row(kSide * kChannels);
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&info);
    throw DataError::corrupt(path, std::string("not a readable JPEG: ") + err.message);
  }
  jpeg_create_decompress(&info);
  jpeg_mem_src(&info, reinterpret_cast<const unsigned char*>(bytes.data()),
               static_cast<unsigned long>(bytes.size()));
  jpeg_read_header(&info, TRUE);
  if (info.image_width != kSide || info.image_height != kSide) {
    const std::string size =
        std::to_string(info.image_width) + "x" + std::to_string(info.image_height);
    jpeg_destroy_decompress(&info);
    throw DataError::mismatch(path, "a " + size + " image; TinyImageNet images are 64x64");
  }
  info.out_color_space = JCS_RGB;  // greyscale sources are expanded
  jpeg_start_decompress(&info);
  while (info.output_scanline < info.output_height) {
    const int64_t y = info.output_scanline;
    JSAMPROW p = row.data();
    jpeg_read_scanlines(&info, &p, 1);
    for (int64_t x = 0; x < kSide; ++x)
      for (int64_t c = 0; c < kChannels; ++c)
        out[c * kSide * kSide + y * kSide + x] = row[static_cast<size_t>(x * kChannels + c)];
  }
  jpeg_finish_decompress(&info);
  jpeg_destroy_decompress(&info);
}

/// One image file and its class.
struct Item {
  std::string path;
  int64_t label;
};

std::vector<std::string> read_wnids(const std::string& dir) {
  const std::string path = dir + "/wnids.txt";
  std::ifstream in(path);
  if (!in)
    throw DataError::cannot_open(path, "no such file (is --data the tiny-imagenet-200 folder?)");
  std::vector<std::string> wnids;
  for (std::string line; std::getline(in, line);) {
    while (!line.empty() && std::isspace(static_cast<unsigned char>(line.back()))) line.pop_back();
    if (line.empty()) continue;
    if (line.size() > 64 || line.find('/') != std::string::npos)
      throw DataError::corrupt(path, "'" + line.substr(0, 64) + "' is not a WordNet id");
    wnids.push_back(line);
  }
  std::sort(wnids.begin(), wnids.end());
  if (wnids.empty() || wnids.size() > 1000 ||
      std::adjacent_find(wnids.begin(), wnids.end()) != wnids.end())
    throw DataError::corrupt(path, std::to_string(wnids.size()) +
                                       " ids (or a repeated one); expected 1 to 1000 distinct ids");
  return wnids;
}

std::vector<Item> list_split(const std::string& dir, const std::vector<std::string>& wnids,
                             bool train) {
  std::map<std::string, int64_t> label;
  for (size_t i = 0; i < wnids.size(); ++i) label[wnids[i]] = static_cast<int64_t>(i);
  std::vector<Item> items;
  std::error_code ec;
  if (train) {
    for (const auto& w : wnids) {
      const std::string images = dir + "/train/" + w + "/images";
      if (!fs::is_directory(images, ec)) throw DataError::cannot_open(images, "no such directory");
      std::vector<std::string> files;
      for (const auto& e : fs::directory_iterator(images, ec))
        if (e.is_regular_file() && e.path().extension() == ".JPEG") files.push_back(e.path());
      std::sort(files.begin(), files.end());
      for (auto& f : files) items.push_back({std::move(f), label[w]});
    }
    return items;
  }
  const std::string path = dir + "/val/val_annotations.txt";
  std::ifstream in(path);
  if (!in) throw DataError::cannot_open(path, "no such file");
  int64_t line_no = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    if (line.empty()) continue;
    std::istringstream fields(line);
    std::string file, wnid;
    std::getline(fields, file, '\t');
    std::getline(fields, wnid, '\t');
    const auto it = label.find(wnid);
    if (file.empty() || file.find('/') != std::string::npos || it == label.end())
      throw DataError::corrupt(path, "line " + std::to_string(line_no) + ": '" +
                                         line.substr(0, 80) +
                                         "' is not '<file> <TAB> <wnid of wnids.txt> ...'");
    items.push_back({dir + "/val/images/" + file, it->second});
  }
  return items;
}

/// SHA-256 of every source's name, size and modification time.
std::string source_key(const std::vector<Item>& items) {
  std::string all;
  for (const auto& it : items) {
    struct stat st {};
    if (::stat(it.path.c_str(), &st) != 0) throw DataError::cannot_open(it.path, "no such file");
    all += it.path + '\t' + std::to_string(st.st_size) + '\t' + std::to_string(st.st_mtime) + '\n';
  }
  return sha256_hex(all);
}

/// The cached split, when its checksum and source key match. Undefined otherwise.
Dataset read_cache(const std::string& bin, const std::string& sum, const std::string& key) {
  std::error_code ec;
  if (!fs::exists(bin, ec) || !fs::exists(sum, ec)) return {};
  std::ifstream s(sum);
  std::string digest, stored_key;
  s >> digest >> stored_key;
  if (stored_key != key || sha256_file(bin) != digest) {
    std::cerr << "tiny-imagenet: the cache " << bin << " is stale or corrupt; decoding again\n";
    return {};
  }
  std::ifstream in(bin, std::ios::binary);
  char magic[8];
  int64_t n = 0, classes = 0;
  in.read(magic, 8);
  in.read(reinterpret_cast<char*>(&n), 8);
  in.read(reinterpret_cast<char*>(&classes), 8);
  const auto size = static_cast<int64_t>(fs::file_size(bin, ec));
  if (!in || std::memcmp(magic, kMagic, 8) != 0 || n < 0 || classes < 1 ||
      size != 24 + n * (8 + kImage))
    return {};
  Dataset d;
  d.labels = torch::empty({n}, torch::kInt64);
  d.images = torch::empty({n, kChannels, kSide, kSide}, torch::kUInt8);
  in.read(reinterpret_cast<char*>(d.labels.data_ptr<int64_t>()), n * 8);
  in.read(reinterpret_cast<char*>(d.images.data_ptr<uint8_t>()), n * kImage);
  if (!in) return {};
  d.num_classes = classes;
  return d;
}

void write_cache(const Dataset& d, const std::string& bin, const std::string& sum,
                 const std::string& key) {
  try {
    fs::create_directories(fs::path(bin).parent_path());
    const int64_t n = d.size();
    std::string bytes(kMagic, 8);
    bytes.append(reinterpret_cast<const char*>(&n), 8);
    bytes.append(reinterpret_cast<const char*>(&d.num_classes), 8);
    bytes.append(reinterpret_cast<const char*>(d.labels.data_ptr<int64_t>()),
                 static_cast<size_t>(n * 8));
    bytes.append(reinterpret_cast<const char*>(d.images.data_ptr<uint8_t>()),
                 static_cast<size_t>(n * kImage));
    write_file_atomic(bin, bytes);
    write_file_atomic(sum, sha256_hex(bytes) + " " + key + "\n");
  } catch (const std::exception& e) {  // a read-only data directory: work without a cache
    std::cerr << "tiny-imagenet: cannot write the cache " << bin << " (" << e.what()
              << "); decoding on every load\n";
  }
}

}  // namespace

Dataset data_load_tiny_imagenet(const std::string& dir, bool train) {
  const auto wnids = read_wnids(dir);
  const auto items = list_split(dir, wnids, train);
  const int64_t n = static_cast<int64_t>(items.size());
  if (n == 0)
    throw DataError::corrupt(dir,
                             "no images in the " + std::string(train ? "train" : "val") + " split");
  const std::string split = train ? "train" : "val";
  const std::string bin = dir + "/.moecert-cache/" + split + ".bin", sum = bin + ".sha256";
  const std::string key = source_key(items);
  Dataset d = read_cache(bin, sum, key);
  if (!d.labels.defined()) {
    if (!limits::fits(static_cast<double>(n) * kImage))
      throw DataError::corrupt(
          dir, std::to_string(n) + " images of 64x64x3 exceed the memory available");
    d.images = torch::empty({n, kChannels, kSide, kSide}, torch::kUInt8);
    d.labels = torch::empty({n}, torch::kInt64);
    d.num_classes = static_cast<int64_t>(wnids.size());
    auto* px = d.images.data_ptr<uint8_t>();
    auto* lab = d.labels.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      decode_jpeg(items[static_cast<size_t>(i)].path, px + i * kImage);
      lab[i] = items[static_cast<size_t>(i)].label;
      if ((i + 1) % 10000 == 0)
        std::cerr << "tiny-imagenet: decoded " << i + 1 << "/" << n << " " << split << " images\n";
    }
    write_cache(d, bin, sum, key);
  }
  data_impl::check_labels(d.labels, static_cast<int64_t>(wnids.size()), bin);
  d.num_classes = static_cast<int64_t>(wnids.size());
  d.name = "tiny-imagenet";
  // Per-channel statistics of the TinyImageNet training set (both splits).
  d.mean = {0.4802, 0.4481, 0.3975};
  d.std = {0.2770, 0.2691, 0.2821};
  return d;
}

}  // namespace moecert

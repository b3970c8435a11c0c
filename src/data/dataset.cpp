// Data set dispatch, the synthetic set, subsets, epoch orders and batching.
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numeric>

#include "data-impl.h"
#include "moecert/defaults.h"
#include "moecert/error.h"

namespace moecert {

// --- shared helpers -----------------------------------------------------------

double data_impl::rng_normal(std::mt19937_64& rng) {
  const double u1 = 1.0 - rng_unit(rng);  // (0, 1]: log stays finite
  const double u2 = rng_unit(rng);
  constexpr double kTwoPi = 6.283185307179586;  // M_PI is not standard C++
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(kTwoPi * u2);
}

void data_impl::pixel_stats(const torch::Tensor& images, std::vector<double>& mean,
                            std::vector<double>& std) {
  mean.clear();
  std.clear();
  for (int64_t c = 0; c < images.size(1); ++c) {
    auto hist = torch::bincount(images.select(1, c).reshape({-1}), {}, /*minlength=*/256)
                    .to(torch::kFloat64);
    auto values = torch::arange(256, torch::kFloat64) / 255.0;
    const double count = hist.sum().item<double>();
    const double m = count > 0 ? (hist * values).sum().item<double>() / count : 0.0;
    const double var = count > 0 ? (hist * (values - m).pow(2)).sum().item<double>() / count : 0.0;
    mean.push_back(m);
    std.push_back(std::sqrt(var));
  }
}

void data_impl::check_labels(const torch::Tensor& labels, int64_t num_classes,
                             const std::string& path) {
  if (labels.numel() == 0) return;
  auto bad = ((labels < 0) | (labels >= num_classes)).nonzero();
  if (bad.size(0) == 0) return;
  const int64_t index = bad[0][0].item<int64_t>();
  throw DataError::mismatch(path, "label " + std::to_string(labels[index].item<int64_t>()) +
                                      " at index " + std::to_string(index) + " is outside [0, " +
                                      std::to_string(num_classes) + ")");
}

// --- batching -------------------------------------------------------------------

torch::Tensor Dataset::batch_images(const torch::Tensor& index) const {
  return images.index_select(0, index.to(images.device())).to(torch::kFloat32).div_(255.0);
}

torch::Tensor Dataset::batch_labels(const torch::Tensor& index) const {
  return labels.index_select(0, index.to(labels.device()));
}

int64_t Dataset::source_index(int64_t row) const {
  return index.defined() ? index[row].item<int64_t>() : row;
}

Dataset Dataset::select(const torch::Tensor& rows) const {
  Dataset out = *this;
  out.images = images.index_select(0, rows.to(images.device())).contiguous();
  out.labels = labels.index_select(0, rows.to(labels.device())).contiguous();
  out.index = index.defined() ? index.index_select(0, rows.to(index.device()))
                              : rows.to(torch::kCPU).clone();
  return out;
}

// --- synthetic ------------------------------------------------------------------

namespace {

// Knobs of the synthetic set, chosen so that a small model learns it fast but
// not perfectly: the blended second template, shifts and pixel noise keep some
// samples ambiguous. Measured on 2000/2000 samples, 5 epochs of Adam: a 2-conv
// CNN and a linear model both reach ~98% test accuracy (~96% after one epoch).
constexpr int64_t kGrid = 5;          // coarse grid of a template: smooth, not trivial
constexpr int64_t kMaxShift = 2;      // per-sample translation in pixels
constexpr double kNoise = 0.20;       // pixel noise std (pixels in [0, 1])
constexpr double kMaxMix = 0.45;      // weight of a second class's template
constexpr double kMinContrast = 0.7;  // per-sample contrast in [min, max]
constexpr double kMaxContrast = 1.3;
// Fixed normalisation instead of per-split statistics: the train and test splits
// then normalise identically. Close to the measured values (mean 0.48, std 0.25).
constexpr double kMean = 0.5;
constexpr double kStd = 0.25;
// Stream ids mixed into the seed: templates depend on the seed alone, samples
// on (seed, split), so the two splits are distinct draws of one distribution.
constexpr uint64_t kTemplateStream = 0;
constexpr uint64_t kTrainStream = 1;
constexpr uint64_t kTestStream = 2;
constexpr uint64_t kSubsetStream = 3;
constexpr uint64_t kAugmentStream = 4;  // data_augment: crop offsets and flips  // data_subset:
                                        // independent of the synthetic samples
constexpr uint64_t kEpochStream = 4;    // data_epoch_order, mixed with the epoch afterwards

/// Per-class smooth templates in [0, 1]: a kGrid x kGrid random grid, bilinearly
/// upsampled. -> [classes][C * H * W]
std::vector<std::vector<double>> synthetic_templates(int64_t classes, int64_t c, int64_t h,
                                                     int64_t w, uint64_t seed) {
  std::mt19937_64 rng(data_impl::seed_mix(seed, kTemplateStream));
  std::vector<std::vector<double>> templates(classes, std::vector<double>(c * h * w));
  auto coord = [](int64_t i, int64_t n) { return n > 1 ? double(i) * (kGrid - 1) / (n - 1) : 0.0; };
  for (auto& t : templates) {
    for (int64_t ch = 0; ch < c; ++ch) {
      double grid[kGrid][kGrid];
      for (auto& row : grid)
        for (double& g : row) g = data_impl::rng_unit(rng);
      for (int64_t y = 0; y < h; ++y) {
        const double gy = coord(y, h);
        const int64_t y0 = std::min<int64_t>(int64_t(gy), kGrid - 2), y1 = y0 + 1;
        for (int64_t x = 0; x < w; ++x) {
          const double gx = coord(x, w);
          const int64_t x0 = std::min<int64_t>(int64_t(gx), kGrid - 2), x1 = x0 + 1;
          const double fy = gy - y0, fx = gx - x0;
          t[(ch * h + y) * w + x] = (1 - fy) * ((1 - fx) * grid[y0][x0] + fx * grid[y0][x1]) +
                                    fy * ((1 - fx) * grid[y1][x0] + fx * grid[y1][x1]);
        }
      }
    }
  }
  return templates;
}

/// Balanced labels (i % classes) in a seeded random order.
std::vector<int64_t> synthetic_labels(int64_t n, int64_t classes, std::mt19937_64& rng) {
  std::vector<int64_t> labels(n);
  for (int64_t i = 0; i < n; ++i) labels[i] = i % classes;
  for (int64_t i = n - 1; i > 0; --i)
    std::swap(labels[i], labels[data_impl::rng_below(rng, i + 1)]);
  return labels;
}

Dataset synthetic_generate(int64_t n, int64_t c, int64_t h, int64_t w, int64_t classes,
                           uint64_t seed, uint64_t stream) {
  TORCH_CHECK(n >= 0 && c > 0 && h > 0 && w > 0 && classes > 0, "synthetic: bad sizes");
  const auto templates = synthetic_templates(classes, c, h, w, seed);
  std::mt19937_64 rng(data_impl::seed_mix(seed, stream));
  const std::vector<int64_t> labels = synthetic_labels(n, classes, rng);
  auto images = torch::empty({n, c, h, w}, torch::kUInt8);
  uint8_t* out = images.data_ptr<uint8_t>();
  for (int64_t i = 0; i < n; ++i) {
    // A second, different class blended in (its own class when classes == 1).
    const int64_t offset = 1 + data_impl::rng_below(rng, std::max<int64_t>(classes - 1, 1));
    const auto& own = templates[labels[i]];
    const auto& other = templates[(labels[i] + offset) % classes];
    const double mix = kMaxMix * data_impl::rng_unit(rng);
    const double contrast = kMinContrast + (kMaxContrast - kMinContrast) * data_impl::rng_unit(rng);
    const int64_t dy = int64_t(data_impl::rng_below(rng, 2 * kMaxShift + 1)) - kMaxShift;
    const int64_t dx = int64_t(data_impl::rng_below(rng, 2 * kMaxShift + 1)) - kMaxShift;
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x) {
          const int64_t sy = std::clamp<int64_t>(y - dy, 0, h - 1);
          const int64_t sx = std::clamp<int64_t>(x - dx, 0, w - 1);
          const int64_t k = (ch * h + sy) * w + sx;
          const double t = (1 - mix) * own[k] + mix * other[k];
          const double v = 0.5 + contrast * (t - 0.5) + kNoise * data_impl::rng_normal(rng);
          *out++ = static_cast<uint8_t>(std::lround(std::clamp(v, 0.0, 1.0) * 255.0));
        }
  }
  Dataset data;
  data.name = "synthetic";
  data.images = images;
  data.labels = torch::tensor(labels, torch::kInt64);
  data.num_classes = classes;
  data.mean.assign(c, kMean);
  data.std.assign(c, kStd);
  return data;
}

/// `dir/name.gz` if present, else the uncompressed `dir/name`, else the .gz path
/// (so that the error names the file the Debian package would provide).
std::string idx_path(const std::string& dir, const std::string& name) {
  const std::string gz = dir + "/" + name + ".gz", plain = dir + "/" + name;
  std::error_code ec;
  if (!std::filesystem::exists(gz, ec) && std::filesystem::exists(plain, ec)) return plain;
  return gz;
}

Dataset fashion_mnist_load(const std::string& dir_or_empty, bool train) {
  const std::string dir = dir_or_empty.empty() ? defaults::fashion_mnist_dir : dir_or_empty;
  const std::string split = train ? "train" : "t10k";
  Dataset data = data_load_idx(idx_path(dir, split + "-images-idx3-ubyte"),
                               idx_path(dir, split + "-labels-idx1-ubyte"), /*num_classes=*/10);
  data.name = "fashion-mnist";
  // Training-set statistics for both splits: test images are normalised like training ones.
  data.mean = {defaults::fashion_mnist_mean};
  data.std = {defaults::fashion_mnist_std};
  return data;
}

}  // namespace

Dataset data_synthetic(int64_t n, int64_t channels, int64_t height, int64_t width,
                       int64_t num_classes, uint64_t seed) {
  return synthetic_generate(n, channels, height, width, num_classes, seed, kTrainStream);
}

// --- loading, subsets, epochs -----------------------------------------------------

namespace {

/// A directory the reader cannot default: ConfigError naming what it must hold.
const std::string& required_dir(const DataSpec& spec, const char* holds) {
  if (spec.dir.empty()) throw ConfigError::invalid("--data", "", holds);
  return spec.dir;
}

Dataset synthetic_split(const DataSpec& spec, int64_t c, int64_t side) {
  const int64_t n = spec.train ? defaults::synthetic_train_size : defaults::synthetic_test_size;
  return synthetic_generate(n, c, side, side, 10, spec.seed,
                            spec.train ? kTrainStream : kTestStream);
}

}  // namespace

const std::vector<DataEntry>& data_registry() {
  static const std::vector<DataEntry> table{
      {"fashion-mnist", "Fashion-MNIST IDX files (default: the Debian package's)",
       [](const DataSpec& s) { return fashion_mnist_load(s.dir, s.train); }},
      {"cifar10", "CIFAR-10 binary batches (data_batch_1..5.bin, test_batch.bin) in --data",
       [](const DataSpec& s) {
         return data_load_cifar10(
             required_dir(s, "the directory holding the CIFAR-10 .bin batches"), s.train);
       }},
      {"cifar100", "CIFAR-100 binary (train.bin, test.bin) in --data, fine labels (100 classes)",
       [](const DataSpec& s) {
         return data_load_cifar100(
             required_dir(s, "the directory holding CIFAR-100's train.bin and test.bin"), s.train,
             false);
       }},
      {"cifar100-coarse", "CIFAR-100 with its coarse labels (20 superclasses)",
       [](const DataSpec& s) {
         return data_load_cifar100(
             required_dir(s, "the directory holding CIFAR-100's train.bin and test.bin"), s.train,
             true);
       }},
      {"tiny-imagenet",
       "TinyImageNet: the tiny-imagenet-200 folder in --data (64x64, 200 "
       "classes; val is the test split; decoded once, cached beside it)",
       [](const DataSpec& s) {
         return data_load_tiny_imagenet(
             required_dir(s, "the tiny-imagenet-200 folder (wnids.txt, train/, val/)"), s.train);
       }},
      {"synthetic", "generated 1x28x28 set of 10 classes (tests, demos; --seed)",
       [](const DataSpec& s) { return synthetic_split(s, 1, 28); }},
      {"synthetic-cifar", "generated 3x32x32 set of 10 classes (tests of the CIFAR backbones)",
       [](const DataSpec& s) { return synthetic_split(s, 3, 32); }},
  };
  return table;
}

std::string data_names() {
  std::string out;
  for (const auto& e : data_registry()) out += (out.empty() ? "" : " | ") + std::string(e.name);
  return out;
}

Dataset data_load(const DataSpec& spec) {
  const auto& table = data_registry();
  auto it = std::find_if(table.begin(), table.end(),
                         [&](const DataEntry& e) { return spec.name == e.name; });
  if (it == table.end()) throw ConfigError::invalid("--dataset", spec.name, data_names());
  Dataset data = it->load(spec);
  data.index = torch::arange(data.size(), torch::kInt64);
  if (spec.samples > 0)
    data = spec.first ? data_first(data, spec.samples) : data_subset(data, spec.samples, spec.seed);
  return data;
}

torch::Tensor data_augment(const torch::Tensor& x, const torch::Tensor& rows, const Augment& a,
                           uint64_t seed, int64_t epoch) {
  if (!a.active()) return x;
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3), p = a.crop_pad;
  auto padded = p > 0 ? torch::constant_pad_nd(x, {p, p, p, p}) : x;
  auto rows_cpu = rows.to(torch::kCPU).contiguous();
  const auto* r = rows_cpu.data_ptr<int64_t>();
  std::vector<torch::Tensor> out;
  out.reserve(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    std::mt19937_64 rng(data_impl::seed_mix(
        data_impl::seed_mix(seed, kAugmentStream),
        static_cast<uint64_t>(epoch) * 0x100000000ULL + static_cast<uint64_t>(r[b])));
    const auto dy =
        static_cast<int64_t>(data_impl::rng_below(rng, static_cast<uint64_t>(2 * p + 1)));
    const auto dx =
        static_cast<int64_t>(data_impl::rng_below(rng, static_cast<uint64_t>(2 * p + 1)));
    const bool mirror = a.flip && data_impl::rng_below(rng, 2) == 1;
    auto img = padded[b].narrow(1, dy, H).narrow(2, dx, W);
    out.push_back(mirror ? img.flip({2}) : img);
  }
  return torch::stack(out);
}

Dataset data_first(const Dataset& data, int64_t n) {
  TORCH_CHECK(n >= 0, "data_first: negative size ", n);
  if (n >= data.size()) return data;
  return data.select(torch::arange(n, torch::kInt64));
}

Dataset data_subset(const Dataset& data, int64_t n, uint64_t seed) {
  const int64_t size = data.size();
  if (n >= size) return data;
  TORCH_CHECK(n >= 0, "data_subset: negative size ", n);
  // Partial Fisher-Yates: the first n slots become a uniform sample without
  // replacement. Sorting keeps the rows in file order (training shuffles per
  // epoch anyway), so a subset is easy to compare with its source.
  std::mt19937_64 rng(data_impl::seed_mix(seed, kSubsetStream));
  std::vector<int64_t> index(size);
  std::iota(index.begin(), index.end(), int64_t{0});
  for (int64_t i = 0; i < n; ++i)
    std::swap(index[i], index[i + data_impl::rng_below(rng, size - i)]);
  index.resize(n);
  std::sort(index.begin(), index.end());
  return data.select(torch::tensor(index, torch::kInt64));
}

torch::Tensor data_epoch_order(int64_t n, uint64_t seed, int64_t epoch) {
  TORCH_CHECK(n >= 0, "data_epoch_order: negative size ", n);
  std::mt19937_64 rng(
      data_impl::seed_mix(data_impl::seed_mix(seed, kEpochStream), static_cast<uint64_t>(epoch)));
  auto order = torch::arange(n, torch::kInt64);
  int64_t* p = order.data_ptr<int64_t>();
  for (int64_t i = n - 1; i > 0; --i) std::swap(p[i], p[data_impl::rng_below(rng, i + 1)]);
  return order;
}

}  // namespace moecert

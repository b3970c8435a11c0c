// CIFAR-10 fixtures, data_load dispatch, the synthetic set, subsets, epoch
// orders and batching.
#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "moecert/data.h"
#include "moecert/error.h"

namespace fs = std::filesystem;
using moecert::Dataset;
using moecert::DataSpec;

namespace {

constexpr int kRecord = 3073;

/// A fresh temporary directory, removed afterwards.
struct TempDir {
  fs::path dir;
  TempDir() {
    static std::atomic<int> counter{0};
    dir = fs::temp_directory_path() /
          ("moecert-test-data-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  ~TempDir() { fs::remove_all(dir); }
  std::string path(const std::string& name) const { return (dir / name).string(); }
};

/// CIFAR-10 records whose pixel (c, y, x) of record r is (r + 3c + 5y + 7x) % 256;
/// with `coarse`, CIFAR-100 records (coarse label byte, then the fine label byte).
std::vector<char> cifar_records(const std::vector<int>& labels, int first_record,
                                const std::vector<int>* coarse = nullptr) {
  std::vector<char> out;
  for (size_t i = 0; i < labels.size(); ++i) {
    const int r = first_record + static_cast<int>(i);
    if (coarse) out.push_back(static_cast<char>(coarse->at(i)));
    out.push_back(static_cast<char>(labels[i]));
    for (int c = 0; c < 3; ++c)
      for (int y = 0; y < 32; ++y)
        for (int x = 0; x < 32; ++x)
          out.push_back(static_cast<char>((r + 3 * c + 5 * y + 7 * x) % 256));
  }
  return out;
}

void write_file(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

/// A set whose label is its row number, so that a subset shows which rows it took.
Dataset numbered_set(int64_t n) {
  Dataset data;
  data.name = "numbered";
  data.images = torch::arange(n).remainder(256).to(torch::kUInt8).reshape({n, 1, 1, 1});
  data.labels = torch::arange(n, torch::kInt64);
  data.num_classes = n;
  return data;
}

/// Every image's bytes, as a set of strings.
std::set<std::string> image_rows(const Dataset& data) {
  auto flat = data.images.reshape({data.size(), -1}).contiguous();
  const auto* p = reinterpret_cast<const char*>(flat.data_ptr<uint8_t>());
  std::set<std::string> rows;
  for (int64_t i = 0; i < data.size(); ++i) rows.emplace(p + i * flat.size(1), flat.size(1));
  return rows;
}

/// Per-class mean images in [0, 1]. -> [classes, C*H*W]
torch::Tensor class_means(const Dataset& data) {
  auto x = data.images.to(torch::kFloat64).reshape({data.size(), -1}) / 255.0;
  std::vector<torch::Tensor> means;
  for (int64_t k = 0; k < data.num_classes; ++k)
    means.push_back(x.index({data.labels == k}).mean(0));
  return torch::stack(means);
}

/// Accuracy of the nearest-class-mean classifier fitted on `train`, scored on `test`.
double nearest_mean_accuracy(const Dataset& train, const Dataset& test) {
  auto means = class_means(train);
  auto x = test.images.to(torch::kFloat64).reshape({test.size(), -1}) / 255.0;
  auto predicted = torch::cdist(x, means).argmin(1);
  return predicted.eq(test.labels).to(torch::kFloat64).mean().item<double>();
}

}  // namespace

TEST_CASE("data_load_cifar10 reads batches channel-major", "[unit][data]") {
  TempDir tmp;
  write_file(tmp.path("test_batch.bin"), cifar_records({6, 2}, 0));
  for (int i = 1; i <= 5; ++i)
    write_file(tmp.path("data_batch_" + std::to_string(i) + ".bin"), cifar_records({i}, 10 * i));

  DataSpec spec;
  spec.name = "cifar10";
  spec.dir = tmp.dir.string();
  spec.train = false;
  const Dataset test = moecert::data_load(spec);
  CHECK(test.name == "cifar10");
  REQUIRE(test.images.sizes() == torch::IntArrayRef({2, 3, 32, 32}));
  CHECK(torch::equal(test.labels, torch::tensor({6, 2}, torch::kInt64)));
  CHECK(test.images[1][2][4][5].item<int>() == (1 + 3 * 2 + 5 * 4 + 7 * 5) % 256);
  CHECK(test.images[0][1][31][0].item<int>() == (3 + 5 * 31) % 256);
  CHECK(test.mean.size() == 3);
  CHECK(test.std.size() == 3);

  spec.train = true;
  const Dataset train = moecert::data_load(spec);
  REQUIRE(train.size() == 5);  // data_batch_1..5 in order
  CHECK(torch::equal(train.labels, torch::tensor({1, 2, 3, 4, 5}, torch::kInt64)));
  CHECK(train.images[3][0][0][1].item<int>() == (40 + 7) % 256);
}

TEST_CASE("CIFAR-100: fine labels by default, coarse on request, 3074-byte records",
          "[unit][data]") {
  TempDir tmp;
  const std::vector<int> fine{99, 0, 42}, coarse{19, 0, 7};
  write_file(tmp.path("train.bin"), cifar_records(fine, 0, &coarse));
  write_file(tmp.path("test.bin"), cifar_records({5}, 7, &coarse));
  DataSpec spec;
  spec.name = "cifar100";
  spec.dir = tmp.dir.string();
  const Dataset train = moecert::data_load(spec);
  CHECK(train.name == "cifar100");
  CHECK(train.num_classes == 100);
  CHECK(torch::equal(train.labels, torch::tensor({99, 0, 42}, torch::kInt64)));
  REQUIRE(train.images.sizes() == torch::IntArrayRef({3, 3, 32, 32}));
  CHECK(train.images[2][1][4][5].item<int>() == (2 + 3 * 1 + 5 * 4 + 7 * 5) % 256);
  CHECK(train.mean.size() == 3);
  spec.name = "cifar100-coarse";
  const Dataset c = moecert::data_load(spec);
  CHECK(c.num_classes == 20);
  CHECK(torch::equal(c.labels, torch::tensor({19, 0, 7}, torch::kInt64)));
  CHECK(torch::equal(c.images, train.images));
  spec.train = false;
  CHECK(moecert::data_load(spec).size() == 1);
  // A CIFAR-10 batch is not a CIFAR-100 file: 3073-byte records do not divide it.
  write_file(tmp.path("test.bin"), cifar_records({1, 2, 3}, 0));
  CHECK_THROWS_WITH(moecert::data_load(spec),
                    Catch::Contains(tmp.path("test.bin")) && Catch::Contains("truncated"));
  // A fine label of 100 is out of range, named with its index.
  std::vector<int> bad_fine{3, 100}, bad_coarse{1, 1};
  write_file(tmp.path("test.bin"), cifar_records(bad_fine, 0, &bad_coarse));
  spec.name = "cifar100";
  CHECK_THROWS_WITH(moecert::data_load(spec), Catch::Contains("label 100 at index 1"));
  spec.dir.clear();
  CHECK_THROWS_WITH(moecert::data_load(spec), Catch::Contains("--data"));
}

TEST_CASE("every registered data set is named in the --dataset error", "[unit][data]") {
  DataSpec spec;
  spec.name = "imagenet";
  try {
    moecert::data_load(spec);
    FAIL("expected a ConfigError");
  } catch (const moecert::ConfigError& e) {
    for (const auto& d : moecert::data_registry()) CHECK_THAT(e.what(), Catch::Contains(d.name));
  }
  spec.name = "synthetic-cifar";
  spec.train = false;
  const Dataset d = moecert::data_load(spec);
  CHECK(d.images.sizes() == torch::IntArrayRef({d.size(), 3, 32, 32}));
  CHECK(d.num_classes == 10);
}

TEST_CASE("data_load_cifar10 rejects broken batches", "[unit][data]") {
  TempDir tmp;
  std::vector<char> bytes = cifar_records({1, 2}, 0);
  std::string expected_words;
  SECTION("a size that is not a multiple of 3073") {
    bytes.resize(kRecord + 100);
    expected_words = "truncated";
  }
  SECTION("a label outside 0..9") {
    bytes[kRecord] = 10;
    expected_words = "label 10 at index 1";
  }
  write_file(tmp.path("test_batch.bin"), bytes);
  try {
    moecert::data_load_cifar10(tmp.dir.string(), /*train=*/false);
    FAIL("expected a DataError");
  } catch (const moecert::DataError& e) {
    CHECK(e.exit_code() == 2);
    CHECK_THAT(e.what(),
               Catch::Contains(tmp.path("test_batch.bin")) && Catch::Contains(expected_words));
  }
}

TEST_CASE("data_load names a missing CIFAR batch and rejects bad options", "[unit][data]") {
  TempDir tmp;
  CHECK_THROWS_WITH(
      moecert::data_load_cifar10(tmp.dir.string(), true),
      Catch::Contains(tmp.path("data_batch_1.bin")) && Catch::Contains("cannot open"));
  DataSpec spec;
  spec.name = "cifar10";  // no directory: there is no default location
  CHECK_THROWS_AS(moecert::data_load(spec), moecert::ConfigError);
  spec.name = "mnist";
  try {
    moecert::data_load(spec);
    FAIL("expected a ConfigError");
  } catch (const moecert::ConfigError& e) {
    CHECK(e.exit_code() == 2);
    CHECK_THAT(e.what(), Catch::Contains("--dataset") && Catch::Contains("mnist") &&
                             Catch::Contains("synthetic"));
  }
  spec.name = "fashion-mnist";
  spec.dir = tmp.dir.string();
  CHECK_THROWS_AS(moecert::data_load(spec), moecert::DataError);
}

TEST_CASE("data_synthetic is deterministic in its seed", "[unit][data]") {
  const Dataset a = moecert::data_synthetic(300, 1, 28, 28, 10, 11);
  const Dataset b = moecert::data_synthetic(300, 1, 28, 28, 10, 11);
  const Dataset c = moecert::data_synthetic(300, 1, 28, 28, 10, 12);
  REQUIRE(a.images.sizes() == torch::IntArrayRef({300, 1, 28, 28}));
  CHECK(a.images.scalar_type() == torch::kUInt8);
  CHECK(torch::equal(a.images, b.images));
  CHECK(torch::equal(a.labels, b.labels));
  CHECK_FALSE(torch::equal(a.images, c.images));
  CHECK(torch::equal(torch::bincount(a.labels), torch::full({10}, 30, torch::kInt64)));
  // Not constant, not saturated: real contrast for a model to learn from.
  const double stddev = a.batch_images(torch::arange(300)).std().item<double>();
  CHECK(stddev > 0.15);
  CHECK(stddev < 0.35);
  // Other shapes work too (the CIFAR-shaped smoke sets).
  CHECK(moecert::data_synthetic(4, 3, 32, 32, 10, 0).images.sizes() ==
        torch::IntArrayRef({4, 3, 32, 32}));
  // Torch's global generator is left alone.
  torch::manual_seed(5);
  const double before = torch::rand({1}).item<double>();
  torch::manual_seed(5);
  moecert::data_synthetic(10, 1, 8, 8, 2, 3);
  CHECK(torch::rand({1}).item<double>() == before);
}

TEST_CASE("synthetic splits are different draws of one learnable distribution", "[unit][data]") {
  DataSpec spec;
  spec.name = "synthetic";
  spec.seed = 4;
  const Dataset train = moecert::data_load(spec);
  spec.train = false;
  const Dataset test = moecert::data_load(spec);
  REQUIRE(train.size() == 2000);
  REQUIRE(test.size() == 2000);
  CHECK(train.images.sizes() == torch::IntArrayRef({2000, 1, 28, 28}));
  CHECK(torch::equal(train.images, moecert::data_synthetic(2000, 1, 28, 28, 10, 4).images));
  // No test image occurs in the training split.
  const std::set<std::string> train_rows = image_rows(train);
  int64_t shared = 0;
  for (const std::string& row : image_rows(test)) shared += train_rows.count(row);
  CHECK(shared == 0);
  // Shared class templates: class means agree across splits, unlike another seed's.
  spec.seed = 5;
  const Dataset other = moecert::data_load(spec);
  const double same = (class_means(train) - class_means(test)).abs().mean().item<double>();
  const double different = (class_means(train) - class_means(other)).abs().mean().item<double>();
  CHECK(same * 3 < different);
  // Learnable from train to test, but not trivially so.
  const double accuracy = nearest_mean_accuracy(train, test);
  CHECK(accuracy > 0.85);
  CHECK(accuracy < 0.999);
}

TEST_CASE("data_subset is seeded and sized and draws without replacement", "[unit][data]") {
  const Dataset data = numbered_set(1000);
  const Dataset a = moecert::data_subset(data, 100, 9);
  REQUIRE(a.size() == 100);
  CHECK(a.images.size(0) == 100);
  CHECK(torch::equal(a.labels, moecert::data_subset(data, 100, 9).labels));
  CHECK_FALSE(torch::equal(a.labels, moecert::data_subset(data, 100, 10).labels));
  const auto rows =
      std::vector<int64_t>(a.labels.data_ptr<int64_t>(), a.labels.data_ptr<int64_t>() + a.size());
  CHECK(std::set<int64_t>(rows.begin(), rows.end()).size() == 100);  // no row twice
  // Images travel with their labels.
  CHECK(torch::equal(a.images.reshape({-1}), a.labels.remainder(256).to(torch::kUInt8)));
  // Not just the first rows: the sample spreads over the set.
  CHECK(rows.back() > 500);
  CHECK(moecert::data_subset(data, 1000, 9).size() == 1000);
  CHECK(torch::equal(moecert::data_subset(data, 5000, 9).labels, data.labels));

  DataSpec spec;
  spec.name = "synthetic";
  spec.samples = 50;
  CHECK(moecert::data_load(spec).size() == 50);
}

TEST_CASE("data_epoch_order is a permutation fixed by seed and epoch", "[unit][data]") {
  const auto order = moecert::data_epoch_order(500, 1, 0);
  REQUIRE(order.scalar_type() == torch::kInt64);
  REQUIRE(order.numel() == 500);
  CHECK(torch::equal(std::get<0>(order.sort()), torch::arange(500, torch::kInt64)));
  CHECK_FALSE(torch::equal(order, torch::arange(500, torch::kInt64)));
  CHECK(torch::equal(order, moecert::data_epoch_order(500, 1, 0)));
  CHECK_FALSE(torch::equal(order, moecert::data_epoch_order(500, 1, 1)));
  CHECK_FALSE(torch::equal(order, moecert::data_epoch_order(500, 2, 0)));
  CHECK(moecert::data_epoch_order(0, 1, 0).numel() == 0);
}

TEST_CASE("batches are float32 scaled to the unit interval with their labels", "[unit][data]") {
  const Dataset data = numbered_set(300);
  const auto index = torch::tensor({299, 0, 255}, torch::kInt64);
  const auto x = data.batch_images(index);
  REQUIRE(x.scalar_type() == torch::kFloat32);
  REQUIRE(x.sizes() == torch::IntArrayRef({3, 1, 1, 1}));
  CHECK(x[0].item<float>() == Approx(43.0 / 255.0));
  CHECK(x[1].item<float>() == 0.0f);
  CHECK(x[2].item<float>() == 1.0f);
  CHECK(torch::equal(data.batch_labels(index), index));
}

TEST_CASE("subsets and selections keep each row's index in its split", "[unit][data]") {
  DataSpec spec;
  spec.name = "synthetic";
  spec.train = false;
  const Dataset full = moecert::data_load(spec);
  REQUIRE(torch::equal(full.index, torch::arange(full.size(), torch::kInt64)));
  // The first N (what evaluation commands take) and a seeded subset (training).
  spec.samples = 7;
  spec.first = true;
  const Dataset first = moecert::data_load(spec);
  CHECK(torch::equal(first.index, torch::arange(7, torch::kInt64)));
  spec.first = false;
  const Dataset seeded = moecert::data_load(spec);
  REQUIRE(seeded.size() == 7);
  CHECK_FALSE(torch::equal(seeded.index, torch::arange(7, torch::kInt64)));
  for (const Dataset* d : {&first, &seeded})
    for (int64_t i = 0; i < d->size(); ++i) {
      const int64_t at = d->source_index(i);
      CHECK(torch::equal(d->images[i], full.images[at]));
      CHECK(d->labels[i].item<int64_t>() == full.labels[at].item<int64_t>());
    }
  // A selection of a selection still names the split's rows.
  const Dataset two = seeded.select(torch::tensor({3, 1}, torch::kInt64));
  CHECK(two.source_index(0) == seeded.source_index(3));
  CHECK(two.source_index(1) == seeded.source_index(1));
  // The synthetic splits have fixed sizes: an index names one image whatever --samples is.
  spec.samples = 3;
  spec.first = true;
  CHECK(torch::equal(moecert::data_load(spec).images, first.images.narrow(0, 0, 3)));
}

TEST_CASE("data_augment: a crop of the padded image, maybe mirrored, fixed by seed, epoch, row",
          "[unit][data]") {
  const int64_t B = 24;
  auto x = torch::rand({B, 3, 8, 8});
  auto rows = torch::arange(100, 100 + B, torch::kLong);
  moecert::Augment a;
  CHECK(torch::equal(moecert::data_augment(x, rows, a, 1, 0), x));  // inactive: unchanged
  a.crop_pad = 2, a.flip = true;
  auto y = moecert::data_augment(x, rows, a, 1, 0);
  REQUIRE(y.sizes() == x.sizes());
  auto padded = torch::constant_pad_nd(x, {2, 2, 2, 2});
  int mirrored = 0, shifted = 0;
  for (int64_t b = 0; b < B; ++b) {
    bool found = false;
    for (int64_t dy = 0; dy <= 4 && !found; ++dy)
      for (int64_t dx = 0; dx <= 4 && !found; ++dx)
        for (bool m : {false, true}) {
          auto w = padded[b].narrow(1, dy, 8).narrow(2, dx, 8);
          if (torch::equal(m ? w.flip({2}) : w, y[b])) {
            found = true, mirrored += m, shifted += (dy != 2 || dx != 2);
            break;
          }
        }
    CHECK(found);
  }
  CHECK(mirrored > 0);
  CHECK(mirrored < B);
  CHECK(shifted > 0);
  // The same row gets the same image whatever batch it is in; another epoch or seed
  // draws again.
  auto alone = moecert::data_augment(x.narrow(0, 5, 1), rows.narrow(0, 5, 1), a, 1, 0);
  CHECK(torch::equal(alone[0], y[5]));
  CHECK(!torch::equal(moecert::data_augment(x, rows, a, 1, 1), y));
  CHECK(!torch::equal(moecert::data_augment(x, rows, a, 2, 0), y));
}

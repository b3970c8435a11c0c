// IDX reader: real Fashion-MNIST, and small fixtures (gzip and plain) for every
// failure the reader must name: truncation, bad magic, corrupt gzip, trailing
// bytes, count mismatch, labels out of range, missing files.
#include <torch/torch.h>
#include <unistd.h>
#include <zlib.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "moecert/data.h"
#include "moecert/error.h"

namespace fs = std::filesystem;
using moecert::DataError;

namespace {

using Bytes = std::vector<unsigned char>;

void put_be32(Bytes& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8)
    out.push_back(static_cast<unsigned char>(v >> shift));
}

/// An IDX u8 file: magic, big-endian sizes, payload.
Bytes idx_bytes(uint32_t magic, const std::vector<uint32_t>& sizes, const Bytes& payload) {
  Bytes out;
  put_be32(out, magic);
  for (uint32_t s : sizes) put_be32(out, s);
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

void write_plain(const std::string& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

void write_gz(const std::string& path, const Bytes& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  if (!bytes.empty())
    REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) ==
            static_cast<int>(bytes.size()));
  REQUIRE(gzclose(f) == Z_OK);
}

Bytes read_plain(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

/// A fresh temporary directory with a consistent 5-image 4x3 IDX pair in it.
struct IdxFixture {
  fs::path dir;
  int64_t n = 5, h = 4, w = 3;
  Bytes pixels, labels;

  IdxFixture() {
    static std::atomic<int> counter{0};
    dir = fs::temp_directory_path() /
          ("moecert-test-idx-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::remove_all(dir);
    fs::create_directories(dir);
    std::mt19937 rng(7);  // arbitrary pixels: every byte position matters
    for (int64_t i = 0; i < n * h * w; ++i) pixels.push_back(rng() & 0xff);
    labels = {3, 0, 9, 1, 3};
  }
  ~IdxFixture() { fs::remove_all(dir); }

  std::string path(const std::string& name) const { return (dir / name).string(); }
  Bytes images_file() const {
    return idx_bytes(0x803, {uint32_t(n), uint32_t(h), uint32_t(w)}, pixels);
  }
  Bytes labels_file() const { return idx_bytes(0x801, {uint32_t(n)}, labels); }
};

/// Runs `load` and returns the DataError's message; fails the test if none is thrown.
template <typename F>
std::string data_error_of(F load) {
  try {
    load();
  } catch (const DataError& e) {
    CHECK(e.exit_code() == 2);
    return e.what();
  }
  FAIL("expected a DataError");
  return {};
}

}  // namespace

TEST_CASE_METHOD(IdxFixture, "data_load_idx round-trips known pixels from gzip and plain files",
                 "[unit][data]") {
  const bool gz = GENERATE(true, false);
  const std::string ext = gz ? ".gz" : "";
  (gz ? write_gz : write_plain)(path("img" + ext), images_file());
  (gz ? write_gz : write_plain)(path("lbl" + ext), labels_file());

  const moecert::Dataset data = moecert::data_load_idx(path("img" + ext), path("lbl" + ext), 10);
  REQUIRE(data.images.sizes() == torch::IntArrayRef({5, 1, 4, 3}));
  REQUIRE(data.images.scalar_type() == torch::kUInt8);
  REQUIRE(data.labels.scalar_type() == torch::kInt64);
  CHECK(data.size() == 5);
  CHECK(data.num_classes == 10);
  auto expected = torch::tensor(std::vector<int64_t>(pixels.begin(), pixels.end()))
                      .to(torch::kUInt8)
                      .reshape({5, 1, 4, 3});
  CHECK(torch::equal(data.images, expected));
  CHECK(torch::equal(data.labels, torch::tensor({3, 0, 9, 1, 3}, torch::kInt64)));
  // Row-major: image 2, row 1, column 2 is payload byte 2*12 + 1*3 + 2.
  CHECK(data.images[2][0][1][2].item<int>() == pixels[2 * 12 + 1 * 3 + 2]);
  // Statistics computed from the pixels themselves.
  const double mean = expected.to(torch::kFloat64).mean().item<double>() / 255.0;
  REQUIRE(data.mean.size() == 1);
  CHECK(data.mean[0] == Approx(mean).epsilon(1e-9));
}

TEST_CASE_METHOD(IdxFixture, "data_load_idx names a truncated images file", "[unit][data]") {
  const bool gz = GENERATE(true, false);
  Bytes cut = images_file();
  cut.resize(cut.size() - 7);
  (gz ? write_gz : write_plain)(path("img"), cut);
  write_plain(path("lbl"), labels_file());
  const std::string msg =
      data_error_of([&] { moecert::data_load_idx(path("img"), path("lbl"), 10); });
  CHECK_THAT(msg, Catch::Contains(path("img")) && Catch::Contains("truncated"));
  CHECK_THAT(msg, Catch::Contains("expected 60 bytes") && Catch::Contains("holds 53"));

  SECTION("a file cut inside the header is truncated too") {
    write_plain(path("img"), Bytes{0, 0, 8, 3, 0, 0});
    const std::string m =
        data_error_of([&] { moecert::data_load_idx(path("img"), path("lbl"), 10); });
    CHECK_THAT(m, Catch::Contains(path("img")) && Catch::Contains("truncated"));
  }
}

TEST_CASE_METHOD(IdxFixture, "data_load_idx refuses header sizes before allocating them",
                 "[unit][data]") {
  write_plain(path("lbl"), labels_file());
  auto error_for = [&](const std::vector<uint32_t>& sizes) {
    write_gz(path("img"), idx_bytes(0x803, sizes, pixels));
    return data_error_of([&] { moecert::data_load_idx(path("img"), path("lbl"), 10); });
  };
  // Past a size limit: named before any product of sizes is formed.
  CHECK_THAT(error_for({5, 4, 100000}), Catch::Contains(path("img")) &&
                                            Catch::Contains("[5, 4, 100000]") &&
                                            Catch::Contains("width above 8192"));
  // Within the limits but past the memory there is (2^31 images of 8192 x 8192: 128 PiB).
  CHECK_THAT(error_for({0x80000000u, 8192, 8192}),
             Catch::Contains("more than the memory available"));
  // A header that promises 1 GB over 60 bytes of payload: truncation, found after at
  // most one 64 MiB chunk, not a 1 GB allocation.
  CHECK_THAT(error_for({1000000, 1000, 1}),
             Catch::Contains("truncated") && Catch::Contains("expected 1000000000 bytes"));
}

TEST_CASE_METHOD(IdxFixture, "data_load_idx rejects a bad magic number", "[unit][data]") {
  write_gz(path("img.gz"), images_file());
  write_gz(path("lbl.gz"), labels_file());
  // Swapped arguments: each file has the other's magic.
  const std::string msg =
      data_error_of([&] { moecert::data_load_idx(path("lbl.gz"), path("img.gz"), 10); });
  CHECK_THAT(msg, Catch::Contains(path("lbl.gz")) && Catch::Contains("magic") &&
                      Catch::Contains("0x801") && Catch::Contains("0x803"));
}

TEST_CASE_METHOD(IdxFixture, "data_load_idx reports corrupt gzip data", "[unit][data]") {
  write_gz(path("img.gz"), images_file());
  write_gz(path("lbl.gz"), labels_file());
  Bytes gz = read_plain(path("img.gz"));
  REQUIRE(gz.size() > 40);
  for (size_t i = gz.size() / 2 - 2; i < gz.size() / 2 + 2; ++i) gz[i] ^= 0x5a;
  write_plain(path("img.gz"), gz);
  const std::string msg =
      data_error_of([&] { moecert::data_load_idx(path("img.gz"), path("lbl.gz"), 10); });
  CHECK_THAT(msg, Catch::Contains(path("img.gz")) && Catch::Contains("corrupt") &&
                      Catch::Contains("zlib"));
}

TEST_CASE_METHOD(IdxFixture, "data_load_idx rejects bytes after the payload", "[unit][data]") {
  Bytes longer = images_file();
  longer.push_back(42);
  write_gz(path("img.gz"), longer);
  write_gz(path("lbl.gz"), labels_file());
  const std::string msg =
      data_error_of([&] { moecert::data_load_idx(path("img.gz"), path("lbl.gz"), 10); });
  CHECK_THAT(msg, Catch::Contains(path("img.gz")) && Catch::Contains("corrupt") &&
                      Catch::Contains("after the 60-byte payload"));
}

TEST_CASE_METHOD(IdxFixture, "data_load_idx rejects an image/label count mismatch",
                 "[unit][data]") {
  write_gz(path("img.gz"), images_file());
  write_gz(path("lbl.gz"), idx_bytes(0x801, {4}, Bytes{1, 2, 3, 4}));
  const std::string msg =
      data_error_of([&] { moecert::data_load_idx(path("img.gz"), path("lbl.gz"), 10); });
  CHECK_THAT(msg, Catch::Contains(path("img.gz")) && Catch::Contains(path("lbl.gz")) &&
                      Catch::Contains("5 images") && Catch::Contains("4 labels"));
}

TEST_CASE_METHOD(IdxFixture, "data_load_idx rejects a label out of range", "[unit][data]") {
  write_gz(path("img.gz"), images_file());
  write_gz(path("lbl.gz"), labels_file());
  // Label 9 sits at index 2: fine with 10 classes, out of range with 9.
  const std::string msg =
      data_error_of([&] { moecert::data_load_idx(path("img.gz"), path("lbl.gz"), 9); });
  CHECK_THAT(msg, Catch::Contains(path("lbl.gz")) && Catch::Contains("label 9") &&
                      Catch::Contains("index 2"));
}

TEST_CASE_METHOD(IdxFixture, "data_load_idx names a missing file", "[unit][data]") {
  write_gz(path("lbl.gz"), labels_file());
  const std::string msg =
      data_error_of([&] { moecert::data_load_idx(path("nope.gz"), path("lbl.gz"), 10); });
  CHECK_THAT(msg, Catch::Contains(path("nope.gz")) && Catch::Contains("cannot open"));
}

TEST_CASE("data_load reads the installed Fashion-MNIST", "[unit][data]") {
  moecert::DataSpec spec;  // defaults: fashion-mnist from the Debian package
  const moecert::Dataset train = moecert::data_load(spec);
  CHECK(train.name == "fashion-mnist");
  REQUIRE(train.images.sizes() == torch::IntArrayRef({60000, 1, 28, 28}));
  REQUIRE(train.size() == 60000);
  CHECK(train.num_classes == 10);
  CHECK(train.labels.min().item<int64_t>() == 0);
  CHECK(train.labels.max().item<int64_t>() == 9);
  const auto histogram = torch::bincount(train.labels);
  CHECK(torch::equal(histogram, torch::full({10}, 6000, torch::kInt64)));
  // Published statistics, which the real pixels must agree with.
  REQUIRE(train.mean.size() == 1);
  CHECK(train.mean[0] == Approx(0.2860).margin(1e-4));
  CHECK(train.batch_images(torch::arange(1000)).mean().item<double>() ==
        Approx(0.2860).margin(0.02));

  spec.train = false;
  const moecert::Dataset test = moecert::data_load(spec);
  CHECK(test.images.sizes() == torch::IntArrayRef({10000, 1, 28, 28}));
  CHECK(torch::equal(torch::bincount(test.labels), torch::full({10}, 1000, torch::kInt64)));
}

// TinyImageNet: a small `tiny-imagenet-200`-format folder written here (real JPEGs,
// RGB and greyscale) is read with sorted-wnid labels, the val split from its
// annotations, cached once with a checksum, and rebuilt when the cache is corrupt;
// bad folders are DataErrors naming the file.
#include <jpeglib.h>
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>

#include "moecert/data.h"
#include "moecert/error.h"
#include "test_util.h"

using moecert_test::TempDir;
namespace fs = std::filesystem;

namespace {

/// Writes a w x h JPEG (quality 100) whose pixel (x, y) channel c is f(x, y, c);
/// `grey`: one channel.
void write_jpeg(const std::string& path, int w, int h, bool grey, int seed) {
  jpeg_compress_struct info{};
  jpeg_error_mgr err{};
  info.err = jpeg_std_error(&err);
  jpeg_create_compress(&info);
  unsigned char* buf = nullptr;
  unsigned long size = 0;
  jpeg_mem_dest(&info, &buf, &size);
  info.image_width = w, info.image_height = h;
  info.input_components = grey ? 1 : 3;
  info.in_color_space = grey ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_set_defaults(&info);
  jpeg_set_quality(&info, 100, TRUE);
  jpeg_start_compress(&info, TRUE);
  std::vector<unsigned char> row(static_cast<size_t>(w * info.input_components));
  while (info.next_scanline < info.image_height) {
    const int y = static_cast<int>(info.next_scanline);
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < info.input_components; ++c)
        row[static_cast<size_t>(x * info.input_components + c)] =
            static_cast<unsigned char>(40 + seed * 20 + c * 50 + (x + y) / 2);
    JSAMPROW p = row.data();
    jpeg_write_scanlines(&info, &p, 1);
  }
  jpeg_finish_compress(&info);
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<char*>(buf), size);
  free(buf);
  jpeg_destroy_compress(&info);
}

/// wnids n02, n01 (sorted: n01 = class 0); 2 training images each; 3 val images.
void make_folder(const std::string& d) {
  std::ofstream(d + "/wnids.txt") << "n02000000\nn01000000\n";
  for (const char* w : {"n01000000", "n02000000"}) {
    fs::create_directories(d + "/train/" + w + "/images");
    for (int i = 0; i < 2; ++i)
      write_jpeg(d + "/train/" + w + "/images/" + w + "_" + std::to_string(i) + ".JPEG", 64, 64,
                 i == 1, w[2] == '1' ? 0 : 3);
  }
  fs::create_directories(d + "/val/images");
  std::ofstream ann(d + "/val/val_annotations.txt");
  for (int i = 0; i < 3; ++i) {
    write_jpeg(d + "/val/images/val_" + std::to_string(i) + ".JPEG", 64, 64, false, i);
    ann << "val_" << i << ".JPEG\t" << (i == 1 ? "n01000000" : "n02000000") << "\t0\t0\t63\t63\n";
  }
}

}  // namespace

TEST_CASE("TinyImageNet: sorted wnids, train and val splits, a checksummed cache", "[unit][data]") {
  TempDir tmp;
  const std::string d = tmp / "tiny-imagenet-200";
  fs::create_directories(d);
  make_folder(d);
  moecert::DataSpec spec;
  spec.name = "tiny-imagenet", spec.dir = d;
  const auto train = moecert::data_load(spec);
  CHECK(train.name == "tiny-imagenet");
  CHECK(train.num_classes == 2);
  REQUIRE(train.images.sizes() == torch::IntArrayRef({4, 3, 64, 64}));
  CHECK(torch::equal(train.labels, torch::tensor({0, 0, 1, 1}, torch::kInt64)));
  // pixel (x = 10, y = 6) of the first (RGB) image: 40 + c·50 + 8, within JPEG's loss
  for (int c = 0; c < 3; ++c)
    CHECK(std::abs(train.images[0][c][6][10].item<int>() - (48 + c * 50)) <= 3);
  // a greyscale JPEG is expanded to three equal channels
  CHECK(torch::equal(train.images[1][0], train.images[1][2]));
  CHECK(train.mean.size() == 3);
  spec.train = false;
  const auto val = moecert::data_load(spec);
  CHECK(torch::equal(val.labels, torch::tensor({1, 0, 1}, torch::kInt64)));
  // cached once, with a checksum; a second load reads the cache (same data)
  const std::string bin = d + "/.moecert-cache/val.bin";
  REQUIRE(fs::exists(bin));
  REQUIRE(fs::exists(bin + ".sha256"));
  CHECK(torch::equal(moecert::data_load(spec).images, val.images));
  // a corrupt cache is detected by its checksum and rebuilt from the JPEGs
  {
    std::fstream f(bin, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(100);
    f.put('\x7f');
  }
  CHECK(torch::equal(moecert::data_load(spec).images, val.images));
  CHECK(moecert::data_load_tiny_imagenet(d, false).size() == 3);
}

TEST_CASE("TinyImageNet: broken folders are DataErrors naming the file", "[unit][data]") {
  TempDir tmp;
  const std::string d = tmp / "t";
  fs::create_directories(d);
  CHECK_THROWS_WITH(moecert::data_load_tiny_imagenet(d, true), Catch::Contains("wnids.txt"));
  make_folder(d);
  // a JPEG of the wrong size
  write_jpeg(d + "/train/n01000000/images/n01000000_0.JPEG", 32, 32, false, 0);
  CHECK_THROWS_WITH(moecert::data_load_tiny_imagenet(d, true),
                    Catch::Contains("n01000000_0.JPEG") && Catch::Contains("64x64"));
  // not a JPEG at all
  std::ofstream(d + "/train/n01000000/images/n01000000_0.JPEG") << "not a jpeg";
  try {
    moecert::data_load_tiny_imagenet(d, true);
    FAIL("expected a DataError");
  } catch (const moecert::DataError& e) {
    CHECK(e.exit_code() == 2);
    CHECK_THAT(e.what(), Catch::Contains("n01000000_0.JPEG") && Catch::Contains("JPEG"));
  }
  // an annotation naming an unknown wnid
  std::ofstream(d + "/val/val_annotations.txt") << "val_0.JPEG\tn09999999\t0\t0\t1\t1\n";
  CHECK_THROWS_WITH(moecert::data_load_tiny_imagenet(d, false),
                    Catch::Contains("val_annotations.txt") && Catch::Contains("line 1"));
}

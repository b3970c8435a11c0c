// SHA-256 against the FIPS 180-2 / NIST example vectors, plus the streaming paths
// (arbitrary update splits, files larger than the read chunk).
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "../../src/io/io-impl.h"
#include "moecert/checkpoint.h"
#include "moecert/error.h"

namespace fs = std::filesystem;
using moecert::sha256_file;
using moecert::sha256_hex;

namespace {

/// A deterministic, non-periodic byte string of length n.
std::string sha_test_bytes(size_t n) {
  std::string bytes(n, '\0');
  uint32_t x = 2463534242u;
  for (char& c : bytes) {
    x ^= x << 13, x ^= x >> 17, x ^= x << 5;  // xorshift32
    c = char(x & 0xff);
  }
  return bytes;
}

std::string sha_temp_path(const std::string& name) {
  return (fs::temp_directory_path() / ("moecert-sha-" + std::to_string(::getpid()) + "-" + name))
      .string();
}

}  // namespace

TEST_CASE("sha256_hex matches the FIPS 180 example vectors", "[unit][io]") {
  CHECK(sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  // 448 bits: the length no longer fits in the first block's padding.
  CHECK(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  CHECK(sha256_hex("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnop"
                   "jklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu") ==
        "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
  CHECK(sha256_hex(std::string(1000000, 'a')) ==
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST_CASE("Sha256 gives the same digest for any split of the input", "[unit][io]") {
  for (size_t n : {0, 1, 55, 56, 63, 64, 65, 127, 128, 129, 300}) {
    const std::string bytes = sha_test_bytes(n);
    const std::string whole = sha256_hex(bytes);
    for (size_t cut = 0; cut <= n; cut += (n < 70 ? 1 : 7)) {
      moecert::io_impl::Sha256 hash;
      hash.update(bytes.data(), cut);
      hash.update(bytes.data() + cut, 0);
      hash.update(bytes.data() + cut, n - cut);
      INFO("n=" << n << " cut=" << cut);
      REQUIRE(hash.hex_digest() == whole);
    }
  }
  // One million 'a' fed in odd-sized pieces, as a chunked file read would.
  moecert::io_impl::Sha256 hash;
  const std::string piece(997, 'a');
  size_t left = 1000000;
  for (; left >= piece.size(); left -= piece.size()) hash.update(piece.data(), piece.size());
  hash.update(piece.data(), left);
  CHECK(hash.hex_digest() == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST_CASE("sha256_file streams files larger than its read chunk", "[unit][io]") {
  const std::string path = sha_temp_path("big.bin");
  const std::string bytes = sha_test_bytes((size_t(5) << 19) + 77);  // 2.5 MiB + 77
  std::ofstream(path, std::ios::binary) << bytes;
  CHECK(sha256_file(path) == sha256_hex(bytes));

  std::ofstream(path, std::ios::binary | std::ios::trunc);  // now empty
  CHECK(sha256_file(path) == sha256_hex(""));
  std::remove(path.c_str());
}

TEST_CASE("sha256_file of a missing file is CheckpointError::missing", "[unit][io]") {
  const std::string path = sha_temp_path("does-not-exist.bin");
  REQUIRE_THROWS_AS(sha256_file(path), moecert::CheckpointError);
  REQUIRE_THROWS_WITH(sha256_file(path),
                      Catch::Matchers::Contains(path) && Catch::Matchers::Contains("not found"));
}

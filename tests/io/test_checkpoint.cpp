// Checkpoint save/load: bit-exact round trips, every corruption and mismatch as a
// CheckpointError naming what is wrong, and atomic replacement (also under SIGKILL).
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <random>
#include <sstream>
#include <thread>

#include "../../src/io/io-impl.h"
#include "moecert/checkpoint.h"
#include "moecert/error.h"

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using moecert::CheckpointError;

namespace {

/// A fresh directory under /tmp, removed with everything in it at scope exit.
struct CkptScratch {
  fs::path root;
  CkptScratch() {
    static int counter = 0;
    root = fs::temp_directory_path() /
           ("moecert-ckpt-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::remove_all(root);
    fs::create_directories(root);
  }
  ~CkptScratch() {
    std::error_code ec;
    fs::permissions(root, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(root, ec);
  }
  std::string path(const std::string& name) const { return (root / name).string(); }
};

struct IoTestInnerImpl : torch::nn::Module {
  explicit IoTestInnerImpl(int64_t channels)
      : conv(register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, channels, 3)))),
        scale(register_buffer("scale", torch::rand({channels}))) {}
  torch::Tensor forward(const torch::Tensor& x) { return conv(x) * scale.view({1, -1, 1, 1}); }
  torch::nn::Conv2d conv;
  torch::Tensor scale;
};
TORCH_MODULE(IoTestInner);

/// Linear on top of a nested submodule (Conv2d + buffer); input [B, 1, 6, 6].
struct IoTestNetImpl : torch::nn::Module {
  IoTestNetImpl(int64_t channels = 2, int64_t classes = 3, bool extra = false)
      : inner(register_module("inner", IoTestInner(channels))),
        fc(register_module("fc", torch::nn::Linear(channels * 16, classes))) {
    if (extra) register_parameter("bonus", torch::randn({5}));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc(inner(x).flatten(1)); }
  IoTestInner inner;
  torch::nn::Linear fc;
};
TORCH_MODULE(IoTestNet);

nlohmann::json io_test_manifest(int step = 0) {
  return {{"architecture", {{"kind", "io-test"}, {"channels", 2}}},
          {"metrics", {{"accuracy", 0.5}, {"step", step}}}};
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

/// Runs `f`, which must throw CheckpointError, and returns that error.
template <typename F>
CheckpointError checkpoint_error_of(F&& f) {
  try {
    f();
  } catch (const CheckpointError& e) {
    return e;
  }
  FAIL("expected a CheckpointError");
  throw std::logic_error("unreachable");
}

/// Every parameter and buffer of `a` and `b`, compared bit for bit.
bool same_state(const torch::nn::Module& a, const torch::nn::Module& b) {
  auto pa = a.named_parameters(), pb = b.named_parameters();
  auto ba = a.named_buffers(), bb = b.named_buffers();
  if (pa.size() != pb.size() || ba.size() != bb.size()) return false;
  for (const auto& p : pa)
    if (!torch::equal(p.value(), pb[p.key()])) return false;
  for (const auto& p : ba)
    if (!torch::equal(p.value(), bb[p.key()])) return false;
  return true;
}

/// Rewrites model.json through `edit`, keeping the weights untouched.
template <typename Edit>
void edit_manifest(const std::string& dir, Edit edit) {
  nlohmann::json manifest = nlohmann::json::parse(read_bytes(dir + "/model.json"));
  edit(manifest);
  write_bytes(dir + "/model.json", manifest.dump(2));
}

/// Replaces weights.pt with `bytes` and records their hash, so that loading gets past the
/// hash check to the archive itself.
void replace_weights(const std::string& dir, const std::string& bytes) {
  write_bytes(dir + "/weights.pt", bytes);
  edit_manifest(dir, [&](nlohmann::json& m) {
    m["weights_sha256"] = moecert::sha256_file(dir + "/weights.pt");
  });
}

/// A committed fuzz input of the weights harness (tests/fuzz/corpus/weights/).
std::string weights_corpus(const std::string& name) {
  return read_bytes(std::string(MOECERT_SOURCE_DIR) + "/tests/fuzz/corpus/weights/" + name);
}

std::vector<std::string> entries_with(const fs::path& root, const std::string& needle) {
  std::vector<std::string> found;
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::string name = entry.path().filename().string();
    if (name.find(needle) != std::string::npos) found.push_back(name);
  }
  return found;
}

}  // namespace

TEST_CASE("checkpoint round trip is bit-identical", "[unit][io]") {
  CkptScratch scratch;
  const std::string dir = scratch.path("ckpt");
  torch::manual_seed(1);
  IoTestNet saved;
  IoTestNet loaded;
  REQUIRE_FALSE(same_state(*saved, *loaded));
  moecert::checkpoint_save(dir, *saved, io_test_manifest());
  moecert::checkpoint_load_weights(dir, *loaded);
  CHECK(same_state(*saved, *loaded));
  const torch::Tensor x = torch::randn({4, 1, 6, 6});
  CHECK(torch::equal(saved->forward(x), loaded->forward(x)));
  CHECK(loaded->fc->weight.requires_grad());  // still the module's own parameter
  CHECK(moecert::checkpoint_load_state(dir) == nullptr);
}

TEST_CASE("checkpoint manifest round-trips and records the weights hash", "[unit][io]") {
  CkptScratch scratch;
  const std::string dir = scratch.path("ckpt");
  IoTestNet net;
  moecert::checkpoint_save(dir + "/", *net, io_test_manifest(7));
  const nlohmann::json manifest = moecert::checkpoint_read_manifest(dir);
  CHECK(manifest["architecture"] == io_test_manifest()["architecture"]);
  CHECK(manifest["metrics"]["step"] == 7);
  CHECK(manifest["format_version"] == moecert::checkpoint_format_version);
  CHECK_FALSE(manifest["moecert_version"].get<std::string>().empty());
  CHECK(manifest["weights_sha256"] == moecert::sha256_file(dir + "/weights.pt"));
  CHECK_THAT(read_bytes(dir + "/model.json"), Contains("\n  \"architecture\": {"));
}

TEST_CASE("a changed byte in weights.pt is a SHA-256 mismatch", "[unit][io]") {
  CkptScratch scratch;
  const std::string dir = scratch.path("ckpt");
  IoTestNet net;
  moecert::checkpoint_save(dir, *net, io_test_manifest());
  std::string bytes = read_bytes(dir + "/weights.pt");
  bytes[bytes.size() / 2] ^= 0x01;
  write_bytes(dir + "/weights.pt", bytes);
  const CheckpointError e = checkpoint_error_of([&] { moecert::checkpoint_read_manifest(dir); });
  CHECK_THAT(e.what(), Contains("SHA-256") && Contains("weights.pt"));
  CHECK(e.exit_code() == 2);
  CHECK_THROWS_WITH(moecert::checkpoint_load_weights(dir, *net), Contains("SHA-256"));
}

TEST_CASE("a truncated weights.pt is a CheckpointError, even with a matching hash", "[unit][io]") {
  CkptScratch scratch;
  const std::string dir = scratch.path("ckpt");
  IoTestNet net;
  moecert::checkpoint_save(dir, *net, io_test_manifest());
  const std::string bytes = read_bytes(dir + "/weights.pt");
  write_bytes(dir + "/weights.pt", bytes.substr(0, bytes.size() / 2));
  CHECK_THROWS_WITH(moecert::checkpoint_load_weights(dir, *net), Contains("SHA-256"));
  // Past the hash check, the archive reader's own c10::Error must not escape.
  replace_weights(dir, bytes.substr(0, bytes.size() / 2));
  const CheckpointError e =
      checkpoint_error_of([&] { moecert::checkpoint_load_weights(dir, *net); });
  CHECK_THAT(e.what(), Contains("weights.pt"));
  CHECK(std::string(e.what()).find('\n') == std::string::npos);
  // An archive whose pickle names a type LibTorch's TorchScript parser rejects: it throws
  // torch::jit::ErrorReport, not c10::Error, and must not escape either (found by fuzzing).
  replace_weights(dir, weights_corpus("crash-torchscript-type-error.pt"));
  const CheckpointError hostile =
      checkpoint_error_of([&] { moecert::checkpoint_load_weights(dir, *net); });
  CHECK_THAT(hostile.what(), Contains("weights.pt") && Contains("not an archive moecert can read"));
}

TEST_CASE("a weights archive is checked before LibTorch opens it", "[unit][io]") {
  CkptScratch scratch;
  const std::string dir = scratch.path("ckpt");
  IoTestNet net;
  moecert::checkpoint_save(dir, *net, io_test_manifest());
  const std::string good = read_bytes(dir + "/weights.pt");
  auto error_with = [&](const std::string& bytes) {
    replace_weights(dir, bytes);
    return std::string(
        checkpoint_error_of([&] { moecert::checkpoint_load_weights(dir, *net); }).what());
  };
  // moecert's own archive passes (and loads).
  moecert::io_impl::archive_check(dir + "/weights.pt");
  // A fuzzed archive whose class file made LibTorch's TorchScript importer crash
  // (SIGSEGV in its class-constant parser): refused before LibTorch sees it.
  CHECK_THAT(error_with(weights_corpus("crash-class-constant-segv.pt")),
             Contains("weights.pt") && Contains("not a weights archive moecert writes"));
  // A fuzzed archive whose class file's debug pickle made LibTorch allocate 28 GB.
  CHECK_THAT(error_with(weights_corpus("crash-memo-index-oom.pt")),
             Contains("pickle") && Contains("is malformed"));
  // An entry compressed another way than deflate (method 12, bzip2): refused by name.
  std::string packed = good;
  const auto entry = packed.find(std::string("PK\x01\x02", 4));
  REQUIRE(entry != std::string::npos);
  packed[entry + 10] = 12;
  CHECK_THAT(error_with(packed), Contains("has method 12"));
  // A stored entry that claims more bytes than it holds.
  std::string claim = good;
  claim[entry + 24 + 3] = 0x40;  // uncompressed size += 1 GiB
  CHECK_THAT(error_with(claim), Contains("has method 0 and sizes"));
  // A directory that claims more entries than it has bytes for.
  std::string lying = good;
  const auto end = lying.rfind(std::string("PK\x05\x06", 4));
  REQUIRE(end != std::string::npos);
  lying[end + 10] = '\xfe', lying[end + 11] = '\x7f';
  CHECK_THAT(error_with(lying), Contains("not a weights archive moecert writes"));
}

TEST_CASE("missing checkpoint pieces are CheckpointError::missing", "[unit][io]") {
  CkptScratch scratch;
  const std::string dir = scratch.path("ckpt");
  IoTestNet net;
  CHECK_THROWS_WITH(moecert::checkpoint_read_manifest(dir), Contains(dir) && Contains("not found"));
  CHECK_THROWS_AS(moecert::checkpoint_load_weights(dir, *net), CheckpointError);
  CHECK_THROWS_AS(moecert::checkpoint_load_state(dir), CheckpointError);

  moecert::checkpoint_save(dir, *net, io_test_manifest());
  fs::remove(dir + "/weights.pt");
  CHECK_THROWS_WITH(moecert::checkpoint_read_manifest(dir),
                    Contains("weights.pt") && Contains("not found"));
  fs::remove(dir + "/model.json");
  CHECK_THROWS_WITH(moecert::checkpoint_read_manifest(dir),
                    Contains("model.json") && Contains("not found"));
}

TEST_CASE("invalid JSON in model.json is a bad manifest", "[unit][io]") {
  CkptScratch scratch;
  const std::string dir = scratch.path("ckpt");
  IoTestNet net;
  moecert::checkpoint_save(dir, *net, io_test_manifest());
  write_bytes(dir + "/model.json", "{\"format_version\": 1,");
  CHECK_THROWS_WITH(moecert::checkpoint_read_manifest(dir),
                    Contains("'<root>'") && Contains("is not valid JSON"));
  write_bytes(dir + "/model.json", "[1, 2]");
  CHECK_THROWS_WITH(moecert::checkpoint_read_manifest(dir), Contains("not a JSON object"));
  // A number JSON cannot hold is invalid JSON too, not an internal error (found by fuzzing).
  write_bytes(dir + "/model.json", "{\"format_version\": 0.5e100611}");
  const CheckpointError e = checkpoint_error_of([&] { moecert::checkpoint_read_manifest(dir); });
  CHECK_THAT(e.what(), Contains("is not valid JSON") && Contains("number overflow"));
}

TEST_CASE("manifest fields are checked by name", "[unit][io]") {
  CkptScratch scratch;
  const std::string dir = scratch.path("ckpt");
  IoTestNet net;
  moecert::checkpoint_save(dir, *net, io_test_manifest());
  const std::string good = read_bytes(dir + "/model.json");
  auto error_after = [&](auto edit) {
    write_bytes(dir + "/model.json", good);
    edit_manifest(dir, edit);
    return std::string(checkpoint_error_of([&] { moecert::checkpoint_read_manifest(dir); }).what());
  };
  const std::string future = error_after([](nlohmann::json& m) { m["format_version"] = 99; });
  CHECK_THAT(future,
             Contains("'format_version'") && Contains("is 99") &&
                 Contains("format version " + std::to_string(moecert::checkpoint_format_version)));
  CHECK_THAT(error_after([](nlohmann::json& m) { m["format_version"] = "1"; }),
             Contains("'format_version'") && Contains("integer"));
  CHECK_THAT(error_after([](nlohmann::json& m) { m.erase("format_version"); }),
             Contains("'format_version' is missing"));
  CHECK_THAT(error_after([](nlohmann::json& m) { m["weights_sha256"] = "abc"; }),
             Contains("'weights_sha256'"));
  CHECK_THAT(error_after([](nlohmann::json& m) { m.erase("architecture"); }),
             Contains("'architecture' is missing"));
  CHECK_THAT(error_after([](nlohmann::json& m) { m["architecture"] = 3; }),
             Contains("'architecture'") && Contains("object"));
  // The optional fields readers use have their types checked too (fuzzing found a
  // number as "kind" escaping as an internal error).
  const std::vector<std::pair<std::function<void(nlohmann::json&)>, std::string>> typed{
      {[](nlohmann::json& m) { m["kind"] = 5; }, "'kind' must be a string"},
      {[](nlohmann::json& m) { m["kind"] = "triple"; }, "'kind' must be 'moe' or 'dual'"},
      {[](nlohmann::json& m) { m["kind"] = "dual"; }, "'architecture.standard' is missing"},
      {[](nlohmann::json& m) { m["alpha"] = "high"; }, "'alpha' must be a number"},
      {[](nlohmann::json& m) {
         m["dataset"] = {{"name", 3}};
       },
       "'dataset.name' must be a string"},
      {[](nlohmann::json& m) {
         m["training"] = {{"method", {1}}};
       },
       "'training.method'"},
      {[](nlohmann::json& m) {
         m["members"] = {{"standard", 1}};
       },
       "'members.standard'"},
      {[](nlohmann::json& m) {
         m["metrics"] = {{"history", {{{"epoch", "one"}}}}};
       },
       "'metrics.history[0].epoch'"},
  };
  for (const auto& [edit, message] : typed) {
    INFO(message);
    CHECK_THAT(error_after(edit), Contains(message));
  }
  // An upper-case but otherwise equal hash is accepted.
  write_bytes(dir + "/model.json", good);
  edit_manifest(dir, [](nlohmann::json& m) {
    std::string hex = m["weights_sha256"];
    for (char& c : hex) c = char(std::toupper(static_cast<unsigned char>(c)));
    m["weights_sha256"] = hex;
  });
  CHECK_NOTHROW(moecert::checkpoint_read_manifest(dir));
}

TEST_CASE("a training history is checked where model.json and train_state.pt hold one",
          "[unit][io]") {
  using moecert::checkpoint_check_history;
  const auto good = nlohmann::json::parse(
      R"([{"epoch": 1, "heldout_ra": 0.5, "expert_usage_clean": [0.5, 0.5], "lr": null}])");
  checkpoint_check_history("run/train_state.pt", "history", good);
  checkpoint_check_history("run/train_state.pt", "history", nlohmann::json::array());
  auto error_of = [](const nlohmann::json& history) {
    return std::string(checkpoint_error_of([&] {
                         checkpoint_check_history("run/train_state.pt", "history", history);
                       }).what());
  };
  CHECK_THAT(error_of({{"epoch", 1}}),
             Contains("train_state.pt") && Contains("'history'") && Contains("must be an array"));
  CHECK_THAT(error_of(nlohmann::json::parse(R"([{"epoch": 1}, 2])")),
             Contains("'history[1]'") && Contains("must be an object"));
  CHECK_THAT(error_of(nlohmann::json::parse(R"([{"epoch": 1}, {"heldout_ra": "high"}])")),
             Contains("'history[1].heldout_ra'") && Contains("a number or an array of numbers"));
  CHECK_THAT(error_of(nlohmann::json::parse(R"([{"expert_usage_clean": [0.5, "x"]}])")),
             Contains("'history[0].expert_usage_clean'") && Contains("must be numbers"));
}

TEST_CASE("loading into a differently shaped module names the parameter", "[unit][io]") {
  CkptScratch scratch;
  const std::string dir = scratch.path("ckpt");
  IoTestNet saved(/*channels=*/2, /*classes=*/3);
  moecert::checkpoint_save(dir, *saved, io_test_manifest());

  IoTestNet wider(/*channels=*/2, /*classes=*/5);
  const torch::Tensor before = wider->inner->conv->weight.clone();
  const CheckpointError e =
      checkpoint_error_of([&] { moecert::checkpoint_load_weights(dir, *wider); });
  CHECK_THAT(e.what(), Contains("'fc.weight'") && Contains("[3, 32]") && Contains("[5, 32]"));
  CHECK(e.exit_code() == 2);
  // Nothing is copied unless everything matches.
  CHECK(torch::equal(wider->inner->conv->weight, before));

  IoTestNet more_channels(/*channels=*/3, /*classes=*/3);
  CHECK_THROWS_WITH(moecert::checkpoint_load_weights(dir, *more_channels),
                    Contains("buffer 'inner.scale' has shape [2] in the file but [3]"));
}

TEST_CASE("an extra or a missing parameter is an error naming it", "[unit][io]") {
  CkptScratch scratch;
  IoTestNet plain;
  IoTestNet with_extra(2, 3, /*extra=*/true);
  moecert::checkpoint_save(scratch.path("plain"), *plain, io_test_manifest());
  moecert::checkpoint_save(scratch.path("extra"), *with_extra, io_test_manifest());
  CHECK_THROWS_WITH(moecert::checkpoint_load_weights(scratch.path("plain"), *with_extra),
                    Contains("'bonus'") && Contains("missing"));
  CHECK_THROWS_WITH(moecert::checkpoint_load_weights(scratch.path("extra"), *plain),
                    Contains("'bonus' [5]") && Contains("does not have"));
  // A registered buffer is checked like a parameter.
  IoTestNet more_buffers;
  more_buffers->inner->register_buffer("shift", torch::zeros({2}));
  CHECK_THROWS_WITH(moecert::checkpoint_load_weights(scratch.path("plain"), *more_buffers),
                    Contains("buffer 'inner.shift' [2]") && Contains("missing"));
}

TEST_CASE("saving twice replaces the checkpoint and leaves no temp directories", "[unit][io]") {
  CkptScratch scratch;
  const std::string dir = scratch.path("ckpt");
  torch::manual_seed(2);
  IoTestNet first, second, loaded;
  moecert::checkpoint_save(dir, *first, io_test_manifest(1));
  // The replaced tree goes completely, nested directories included.
  fs::create_directories(dir + "/notes/deeper");
  write_bytes(dir + "/notes/deeper/x.txt", "x");
  moecert::checkpoint_save(dir, *second, io_test_manifest(2),
                           [](auto& a) { a.write("epoch", c10::IValue(int64_t(2))); });
  CHECK_FALSE(fs::exists(dir + "/notes"));
  CHECK(moecert::checkpoint_read_manifest(dir)["metrics"]["step"] == 2);
  moecert::checkpoint_load_weights(dir, *loaded);
  CHECK(same_state(*second, *loaded));
  CHECK(entries_with(scratch.root, ".tmp-").empty());
  CHECK(entries_with(scratch.root, ".old").empty());
  // A save without train state drops the previous one (the whole directory is replaced).
  moecert::checkpoint_save(dir, *first, io_test_manifest(3));
  CHECK(moecert::checkpoint_load_state(dir) == nullptr);
  CHECK(entries_with(scratch.root, "ckpt") == std::vector<std::string>{"ckpt"});
}

TEST_CASE("stale temp directories are ignored and removed by the next save", "[unit][io]") {
  CkptScratch scratch;
  const std::string dir = scratch.path("ckpt");
  IoTestNet net;
  moecert::checkpoint_save(dir, *net, io_test_manifest(1));
  const pid_t dead = fork();
  if (dead == 0) _exit(0);
  REQUIRE(dead > 0);
  waitpid(dead, nullptr, 0);
  const std::string stale = dir + ".tmp-" + std::to_string(dead) + "-0";
  const std::string ours = dir + ".tmp-" + std::to_string(getpid()) + "-999999";
  const std::string live = dir + ".tmp-1-0";  // pid 1 always runs: maybe a save in progress
  for (const std::string& d : {stale, ours, live}) {
    fs::create_directories(d + "/nested");
    write_bytes(d + "/model.json", "garbage");
    write_bytes(d + "/nested/weights.pt", "garbage");
  }
  CHECK(moecert::checkpoint_read_manifest(dir)["metrics"]["step"] == 1);
  CHECK_NOTHROW(moecert::checkpoint_load_weights(dir, *net));
  moecert::checkpoint_save(dir, *net, io_test_manifest(2));
  CHECK_FALSE(fs::exists(stale));
  CHECK_FALSE(fs::exists(ours));
  CHECK(fs::exists(live));
}

TEST_CASE("the two-rename fallback and its recovery keep a checkpoint loadable", "[unit][io]") {
  CkptScratch scratch;
  const std::string dir = scratch.path("ckpt");
  torch::manual_seed(3);
  IoTestNet first, second, loaded;
  moecert::checkpoint_save(dir, *first, io_test_manifest(1));
  moecert::checkpoint_save(scratch.path("next"), *second, io_test_manifest(2));
  moecert::io_impl::commit_directory(scratch.path("next"), dir, /*allow_exchange=*/false);
  CHECK(moecert::checkpoint_read_manifest(dir)["metrics"]["step"] == 2);
  CHECK(entries_with(scratch.root, "ckpt") == std::vector<std::string>{"ckpt"});

  // A fallback save killed between its renames leaves only ckpt.old.
  fs::rename(dir, dir + ".old");
  CHECK(moecert::checkpoint_read_manifest(dir)["metrics"]["step"] == 2);
  moecert::checkpoint_load_weights(dir, *loaded);
  CHECK(same_state(*second, *loaded));
  moecert::checkpoint_save(dir, *first, io_test_manifest(3));
  CHECK(moecert::checkpoint_read_manifest(dir)["metrics"]["step"] == 3);
}

TEST_CASE("train state round-trips through train_state.pt", "[unit][io]") {
  CkptScratch scratch;
  const std::string dir = scratch.path("ckpt");
  IoTestNet net;
  const torch::Tensor momentum = torch::randn({3, 4}, torch::kFloat64);
  moecert::checkpoint_save(dir, *net, io_test_manifest(), [&](torch::serialize::OutputArchive& a) {
    a.write("epoch", c10::IValue(int64_t(17)));
    a.write("momentum", momentum, /*is_buffer=*/true);
  });
  auto state = moecert::checkpoint_load_state(dir);
  REQUIRE(state != nullptr);
  c10::IValue epoch;
  state->read("epoch", epoch);
  CHECK(epoch.toInt() == 17);
  torch::Tensor read_back;
  state->read("momentum", read_back, /*is_buffer=*/true);
  CHECK(torch::equal(read_back, momentum));

  write_bytes(dir + "/train_state.pt", "not a zip archive");
  CHECK_THROWS_WITH(moecert::checkpoint_load_state(dir), Contains("train_state.pt"));
}

TEST_CASE("checkpoint_save refuses bad input and leaves nothing behind", "[unit][io]") {
  CkptScratch scratch;
  IoTestNet net;
  CHECK_THROWS_WITH(moecert::checkpoint_save(scratch.path("a"), *net, {{"metrics", 1}}),
                    Contains("'architecture'"));
  const std::string notes = scratch.path("notes");
  fs::create_directories(notes);
  write_bytes(notes + "/todo.txt", "keep me");
  CHECK_THROWS_WITH(moecert::checkpoint_save(notes, *net, io_test_manifest()),
                    Contains("not a checkpoint"));
  CHECK(read_bytes(notes + "/todo.txt") == "keep me");
  CHECK_THROWS_AS(moecert::checkpoint_save(scratch.path("b"), *net, io_test_manifest(),
                                           [](auto&) { throw std::runtime_error("writer"); }),
                  std::runtime_error);
  CHECK(entries_with(scratch.root, "a").empty());
  CHECK(entries_with(scratch.root, "b").empty());
}

TEST_CASE("write_file_atomic replaces files and reports unwritable paths", "[unit][io]") {
  CkptScratch scratch;
  const std::string path = scratch.path("report.json");
  moecert::write_file_atomic(path, "first");
  moecert::write_file_atomic(path, "second, longer");
  CHECK(read_bytes(path) == "second, longer");
  CHECK(entries_with(scratch.root, ".tmp-").empty());

  const std::string nowhere = scratch.path("no/such/dir/report.json");
  const CheckpointError e = checkpoint_error_of([&] { moecert::write_file_atomic(nowhere, "x"); });
  CHECK_THAT(e.what(), Contains(nowhere) && Contains("No such file or directory"));
  CHECK_THROWS_WITH(moecert::write_file_atomic(path + "/under-a-file", "x"),
                    Contains(path + "/under-a-file") && Contains("Not a directory"));
  if (::geteuid() != 0) {  // root ignores directory permissions
    fs::permissions(scratch.root, fs::perms::owner_write, fs::perm_options::remove);
    CHECK_THROWS_WITH(moecert::write_file_atomic(path, "x"),
                      Contains(path) && Contains("Permission denied"));
    fs::permissions(scratch.root, fs::perms::owner_write, fs::perm_options::add);
    CHECK(read_bytes(path) == "second, longer");
  }
}

TEST_CASE("a save killed at random moments leaves the previous checkpoint loadable",
          "[integration][io]") {
  CkptScratch scratch;
  const std::string dir = scratch.path("ckpt");
  IoTestNet net;
  moecert::checkpoint_save(dir, *net, io_test_manifest(0));
  std::mt19937 rng(12345);
  int child_saves_seen = 0;
  for (int round = 0; round < 30; ++round) {
    const pid_t child = fork();
    REQUIRE(child >= 0);
    if (child == 0) {  // saves forever; only SIGKILL ends it
      try {
        for (int step = 1;; ++step) moecert::checkpoint_save(dir, *net, io_test_manifest(step));
      } catch (...) {
      }
      _exit(1);
    }
    // Random moments within a save or two, and every fifth round long enough for some
    // saves to complete even when the disk is slow (CTest runs two tests at once).
    const auto wait_us = 2000 + rng() % 20000 + (round % 5 == 4 ? 300000 : 0);
    std::this_thread::sleep_for(std::chrono::microseconds(wait_us));
    kill(child, SIGKILL);
    int status = 0;
    waitpid(child, &status, 0);
    REQUIRE(WIFSIGNALED(status));  // not an early exit from a failed save
    INFO("round " << round);
    const nlohmann::json manifest = moecert::checkpoint_read_manifest(dir);
    REQUIRE_NOTHROW(moecert::checkpoint_load_weights(dir, *net));
    child_saves_seen += manifest["metrics"]["step"].get<int>() > 0;
  }
  CHECK(child_saves_seen > 0);
  moecert::checkpoint_save(dir, *net, io_test_manifest(0));
  CHECK(entries_with(scratch.root, ".tmp-").empty());
}

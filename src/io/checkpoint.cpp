// Checkpoint directories (SPEC §6): model.json + weights.pt (+ train_state.pt).
//
// Crash safety. A save builds the complete new checkpoint in a sibling directory
// `<dir>.tmp-<pid>-<n>`, fsyncs every file and that directory, and only then makes it
// visible under `dir` with a single directory operation: rename(2) when `dir` does not
// exist yet, otherwise renameat2(RENAME_EXCHANGE), which swaps the two names in one
// atomic step. So at every instant, and after a crash, `dir` names either the whole old
// or the whole new checkpoint. Leftover `<dir>.tmp-*` directories of killed runs are
// never read, and the next save for the same `dir` removes them.
//
// Filesystems without RENAME_EXCHANGE (EINVAL/ENOSYS, e.g. some network filesystems)
// get two renames, dir -> dir.old and tmp -> dir. Between them only `<dir>.old` exists;
// readers therefore fall back to `<dir>.old` when `dir` itself is missing.
#include "moecert/checkpoint.h"

#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdio.h>  // renameat2, RENAME_EXCHANGE (glibc >= 2.28 with _GNU_SOURCE)
#include <sys/stat.h>
#include <sys/syscall.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/utils.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <utility>
#include <vector>

#include "io-impl.h"

#ifndef MOECERT_VERSION
#define MOECERT_VERSION "0.0.0-dev"
#endif

namespace fs = std::filesystem;

namespace moecert {
namespace io_impl {

CheckpointError os_error(const std::string& action, const std::string& path, int err) {
  return CheckpointError("cannot " + action + " " + path + ": " + std::strerror(err));
}

/// Removes a file or a directory tree, ignoring errors (like fs::remove_all with an
/// error_code). POSIX nftw rather than std::filesystem: a LibTorch built with another
/// GCC (PyTorch's manylinux wheels) exports its own std::filesystem::remove_all with a
/// different path layout, and calls from our code then land there and crash.
void remove_tree(const std::string& path) {
  ::nftw(
      path.c_str(),
      [](const char* p, const struct stat*, int, struct FTW*) {
        ::remove(p);
        return 0;  // keep going: remove what can be removed
      },
      16, FTW_DEPTH | FTW_PHYS);
}

void fsync_path(const std::string& path, bool is_directory) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | (is_directory ? O_DIRECTORY : 0));
  if (fd < 0) throw os_error("open", path, errno);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  // Some filesystems cannot fsync a directory (EINVAL); its entries are then as durable
  // as that filesystem makes them, and failing the save would not help.
  if (rc != 0 && !(is_directory && err == EINVAL)) throw os_error("fsync", path, err);
}

void write_file_synced(const std::string& path, const std::string& bytes) {
  // O_TRUNC rather than O_EXCL: our temp names hold our pid, so an existing file can
  // only be the leftover of a dead process that had the same pid.
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw os_error("create", path, errno);
  int err = 0;
  for (size_t done = 0; done < bytes.size() && err == 0;) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n >= 0)
      done += size_t(n);
    else if (errno != EINTR)
      err = errno;
  }
  const char* action = err ? "write" : "fsync";
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (err != 0) {
    ::close(fd);
    throw os_error(action, path, err);
  }
  if (::close(fd) != 0) throw os_error("close", path, errno);
}

std::string parent_dir(const std::string& path) {
  const std::string parent = fs::path(path).parent_path().string();
  return parent.empty() ? "." : parent;
}

namespace {

/// ".tmp-<pid>-<n>": unique among processes (pid) and among saves of this one (n).
std::string unique_suffix() {
  static std::atomic<uint64_t> counter{0};
  return ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
}

void rename_or_throw(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) throw os_error("rename " + from + " to", to, errno);
}

/// Atomically swaps two existing paths; -1 with errno set on failure.
int rename_exchange(const std::string& a, const std::string& b) {
#if defined(RENAME_EXCHANGE)
  return ::renameat2(AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(), RENAME_EXCHANGE);
#elif defined(SYS_renameat2)
  constexpr unsigned kRenameExchange = 1u << 1;  // linux/fs.h
  return int(::syscall(SYS_renameat2, AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(), kRenameExchange));
#else
  errno = ENOSYS;
  return -1;
#endif
}

bool path_exists(const std::string& path) {
  std::error_code ec;
  return fs::exists(path, ec);
}

}  // namespace

void commit_directory(const std::string& tmp, const std::string& dir, bool allow_exchange) {
  if (!path_exists(dir)) {
    rename_or_throw(tmp, dir);
  } else if (allow_exchange && rename_exchange(tmp, dir) == 0) {
    remove_tree(tmp);  // the old checkpoint, now under the temp name
  } else if (allow_exchange && errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP) {
    throw os_error("exchange " + tmp + " with", dir, errno);
  } else {
    const std::string old = dir + ".old";
    remove_tree(old);  // left by a fallback save killed after its second rename
    rename_or_throw(dir, old);
    if (::rename(tmp.c_str(), dir.c_str()) != 0) {
      const int err = errno;
      ::rename(old.c_str(), dir.c_str());  // put the previous checkpoint back
      throw os_error("rename " + tmp + " to", dir, err);
    }
    remove_tree(old);
  }
  fsync_path(parent_dir(dir), /*is_directory=*/true);
}

}  // namespace io_impl

using io_impl::os_error;

namespace {

std::string strip_trailing_slash(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  return path;
}

/// The directory that holds the last complete checkpoint saved as `dir`.
std::string resolve_dir(const std::string& dir_arg) {
  const std::string dir = strip_trailing_slash(dir_arg);
  std::error_code ec;
  if (fs::is_directory(dir, ec)) return dir;
  // A fallback save (no RENAME_EXCHANGE) killed between its two renames.
  if (!fs::exists(dir, ec) && fs::is_directory(dir + ".old", ec)) return dir + ".old";
  throw CheckpointError::missing(dir);
}

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

// Temp directories being written by this process right now; all other
// `<dir>.tmp-<pid>-<n>` of ours or of dead processes are leftovers.
std::mutex g_in_flight_mutex;
std::set<std::string> g_in_flight;

void set_in_flight(const std::string& tmp, bool in_flight) {
  std::lock_guard<std::mutex> lock(g_in_flight_mutex);
  in_flight ? void(g_in_flight.insert(tmp)) : void(g_in_flight.erase(tmp));
}

/// True if `path` = `<dir>.tmp-<pid>-<n>` and no running save can own it.
bool is_stale_temp(const std::string& path, const std::string& prefix) {
  if (path.rfind(prefix, 0) != 0) return false;
  long pid = 0;
  unsigned long long n = 0;
  char tail = 0;
  if (std::sscanf(path.c_str() + prefix.size(), "%ld-%llu%c", &pid, &n, &tail) != 2 || pid <= 0)
    return false;
  if (pid == long(::getpid())) {
    std::lock_guard<std::mutex> lock(g_in_flight_mutex);
    return g_in_flight.count(path) == 0;
  }
  return ::kill(pid_t(pid), 0) != 0 && errno == ESRCH;
}

void remove_stale_temps(const std::string& dir) {
  const std::string prefix = dir + ".tmp-";
  std::error_code ec;
  std::vector<std::string> stale;
  for (fs::directory_iterator it(io_impl::parent_dir(dir), ec), end; !ec && it != end;
       it.increment(ec)) {
    // Compare with the same spelling of the parent as `dir` uses ("./x" vs "x").
    const std::string path = (fs::path(dir).parent_path() / it->path().filename()).string();
    if (is_stale_temp(path, prefix)) stale.push_back(path);
  }
  for (const std::string& path : stale) io_impl::remove_tree(path);
}

/// Refuses to replace something that is not a checkpoint: the old tree gets deleted.
void check_replaceable(const std::string& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) return;
  const bool is_checkpoint =
      fs::is_directory(dir, ec) &&
      (fs::is_empty(dir, ec) || io_impl::path_exists(dir + "/" + checkpoint_manifest_file));
  if (!is_checkpoint)
    throw CheckpointError("checkpoint " + dir + ": exists but is not a checkpoint directory (no " +
                          checkpoint_manifest_file + "); refusing to replace it");
}

/// Writes an archive filled by `fill` to `path` and fsyncs it.
template <typename Fill>
void save_archive(const std::string& path, const Fill& fill) {
  torch::serialize::OutputArchive archive;
  fill(archive);
  try {
    archive.save_to(path);
  } catch (const c10::Error& e) {
    throw CheckpointError("cannot write " + path + ": " + first_line(e.what_without_backtrace()));
  }
  io_impl::fsync_path(path, /*is_directory=*/false);
}

void write_checkpoint_files(const std::string& tmp, const torch::nn::Module& module,
                            nlohmann::json manifest, const TrainStateWriter& train_state) {
  const std::string weights = tmp + "/" + checkpoint_weights_file;
  // What torch::save(module) writes; PyTorch's torch.jit.load reads it.
  save_archive(weights, [&](torch::serialize::OutputArchive& a) { module.save(a); });
  manifest["format_version"] = checkpoint_format_version;
  manifest["moecert_version"] = MOECERT_VERSION;
  manifest["weights_sha256"] = sha256_file(weights);
  // Invalid UTF-8 in a caller's string becomes U+FFFD instead of failing the save.
  const std::string text =
      manifest.dump(/*indent=*/2, ' ', false, nlohmann::json::error_handler_t::replace);
  io_impl::write_file_synced(tmp + "/" + checkpoint_manifest_file, text + "\n");
  if (train_state) save_archive(tmp + "/" + checkpoint_state_file, train_state);
}

nlohmann::json parse_manifest(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    if (!io_impl::path_exists(path)) throw CheckpointError::missing(path);
    throw os_error("open", path, errno);
  }
  std::ostringstream text;
  text << in.rdbuf();
  try {
    return nlohmann::json::parse(text.str());
  } catch (const nlohmann::json::exception& e) {  // a syntax error, or a number out of range
    throw CheckpointError::bad_manifest(path, "<root>",
                                        std::string("is not valid JSON: ") + e.what());
  }
}

const nlohmann::json& required_field(const std::string& path, const nlohmann::json& manifest,
                                     const std::string& field) {
  const auto it = manifest.find(field);
  if (it == manifest.end()) throw CheckpointError::bad_manifest(path, field, "is missing");
  return *it;
}

void check_format_version(const std::string& path, const nlohmann::json& manifest) {
  const nlohmann::json& version = required_field(path, manifest, "format_version");
  if (!version.is_number_integer())
    throw CheckpointError::bad_manifest(path, "format_version",
                                        "must be an integer, got " + version.dump());
  if (version.get<int64_t>() == checkpoint_format_version) return;
  const auto writer = manifest.find("moecert_version");
  const std::string written_by = writer != manifest.end() && writer->is_string()
                                     ? " (written by moecert " + writer->get<std::string>() + ")"
                                     : "";
  throw CheckpointError::bad_manifest(path, "format_version",
                                      "is " + version.dump() + written_by + " but this moecert " +
                                          MOECERT_VERSION + " reads format version " +
                                          std::to_string(checkpoint_format_version));
}

using JsonType = bool (nlohmann::json::*)() const noexcept;

/// Throws a bad_manifest naming `field` unless `j` is of the type `is` tests.
void expect_type(const std::string& path, const nlohmann::json& j, const std::string& field,
                 JsonType is, const char* what) {
  if (!(j.*is)())
    throw CheckpointError::bad_manifest(
        path, field, std::string("must be ") + what + ", got " + j.dump().substr(0, 60));
}

/// The optional fields moecert reads besides the architecture, each of the type it reads
/// (so that no reader meets a number where it expects text): kind, alpha, dataset,
/// training, members, metrics and its per-epoch history.
void check_field_types(const std::string& path, const nlohmann::json& m) {
  auto expect = [&](const nlohmann::json& j, const std::string& field, JsonType is,
                    const char* what) { expect_type(path, j, field, is, what); };
  auto optional = [&](const nlohmann::json& o, const std::string& key, const std::string& field,
                      JsonType is, const char* what) -> const nlohmann::json* {
    if (!o.contains(key) || o[key].is_null()) return nullptr;
    expect(o[key], field, is, what);
    return &o[key];
  };
  const auto* kind = optional(m, "kind", "kind", &nlohmann::json::is_string, "a string");
  if (kind && *kind != "moe" && *kind != "dual")
    throw CheckpointError::bad_manifest(path, "kind",
                                        "must be 'moe' or 'dual', got " + kind->dump());
  if (kind && *kind == "dual")
    for (const char* member : {"standard", "robust"}) {
      const auto& arch = m.at("architecture");
      if (!arch.contains(member))
        throw CheckpointError::bad_manifest(
            path, std::string("architecture.") + member,
            "is missing (a dual-model has 'standard' and 'robust')");
      expect(arch[member], std::string("architecture.") + member, &nlohmann::json::is_object,
             "an object");
    }
  optional(m, "alpha", "alpha", &nlohmann::json::is_number, "a number");
  if (const auto* d = optional(m, "dataset", "dataset", &nlohmann::json::is_object, "an object"))
    optional(*d, "name", "dataset.name", &nlohmann::json::is_string, "a string");
  if (const auto* t = optional(m, "training", "training", &nlohmann::json::is_object, "an object"))
    optional(*t, "method", "training.method", &nlohmann::json::is_string, "a string");
  if (const auto* members =
          optional(m, "members", "members", &nlohmann::json::is_object, "an object"))
    for (const auto& [role, member] : members->items()) {
      const std::string field = "members." + role;
      expect(member, field, &nlohmann::json::is_object, "an object");
      optional(member, "path", field + ".path", &nlohmann::json::is_string, "a string");
      if (const auto* t = optional(member, "training", field + ".training",
                                   &nlohmann::json::is_object, "an object"))
        optional(*t, "method", field + ".training.method", &nlohmann::json::is_string, "a string");
    }
  const auto* metrics = optional(m, "metrics", "metrics", &nlohmann::json::is_object, "an object");
  if (metrics && metrics->contains("history") && !(*metrics)["history"].is_null())
    checkpoint_check_history(path, "metrics.history", (*metrics)["history"]);
}

}  // namespace

void checkpoint_check_history(const std::string& path, const std::string& field,
                              const nlohmann::json& history) {
  expect_type(path, history, field, &nlohmann::json::is_array, "an array");
  for (size_t i = 0; i < history.size(); ++i) {
    const auto& row = history[i];
    const std::string at = field + "[" + std::to_string(i) + "]";
    expect_type(path, row, at, &nlohmann::json::is_object, "an object");
    for (const auto& [key, v] : row.items()) {
      if (v.is_array()) {
        for (const auto& x : v)
          expect_type(path, x, at + "." + key, &nlohmann::json::is_number, "numbers");
      } else if (!v.is_null()) {
        expect_type(path, v, at + "." + key, &nlohmann::json::is_number,
                    "a number or an array of numbers");
      }
    }
  }
}

namespace {

/// The recorded weights hash in lowercase; must be 64 hex digits.
std::string check_weights_hash(const std::string& path, const nlohmann::json& manifest) {
  const nlohmann::json& hash = required_field(path, manifest, "weights_sha256");
  std::string hex = hash.is_string() ? hash.get<std::string>() : "";
  if (hex.size() != 64 || hex.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos)
    throw CheckpointError::bad_manifest(path, "weights_sha256",
                                        "must be 64 hex digits, got " + hash.dump());
  for (char& c : hex) c = char(std::tolower(static_cast<unsigned char>(c)));
  return hex;
}

/// The module tensors to overwrite and the loaded values, in matching pairs.
using CopyPlan = std::vector<std::pair<torch::Tensor, torch::Tensor>>;

void match_tensor(torch::serialize::InputArchive& archive, const std::string& key,
                  const std::string& name, const std::string& kind, const torch::Tensor& dst,
                  const std::string& path, CopyPlan& plan) {
  c10::IValue value;
  if (!archive.try_read(key, value) || !value.isTensor())
    throw CheckpointError::bad_weights(path, "the model's " + kind + " '" + name + "' " +
                                                 shape_str(dst.sizes().vec()) +
                                                 " is missing from the file");
  torch::Tensor src = value.toTensor();
  if (src.sizes() != dst.sizes())
    throw CheckpointError::bad_weights(
        path, kind + " '" + name + "' has shape " + shape_str(src.sizes().vec()) +
                  " in the file but " + shape_str(dst.sizes().vec()) + " in the model");
  if (src.scalar_type() != dst.scalar_type())
    throw CheckpointError::bad_weights(
        path, kind + " '" + name + "' has dtype " + c10::toString(src.scalar_type()) +
                  " in the file but " + c10::toString(dst.scalar_type()) + " in the model");
  plan.emplace_back(dst, std::move(src));
}

/// Runs `read` on the archive at `path`; whatever LibTorch throws on a corrupt or hostile
/// file (c10::Error, and from its TorchScript importer torch::jit::ErrorReport and
/// others) becomes a CheckpointError naming the file. Our own errors pass unchanged.
template <typename Read>
void reading_archive(const std::string& path, Read&& read) {
  try {
    read();
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& e) {
    throw CheckpointError::bad_weights(path, first_line(e.what_without_backtrace()));
  } catch (const std::exception& e) {
    const std::string why = first_line(e.what());
    throw CheckpointError::bad_weights(path, why.empty() ? "not an archive moecert can read" : why);
  }
}

/// Mirrors Module::load: parameters, buffers, then each serializable child as a nested
/// archive; but checks every key and shape first so that errors name the parameter.
void match_module(torch::serialize::InputArchive& archive, const torch::nn::Module& module,
                  const std::string& prefix, const std::string& path, CopyPlan& plan) {
  std::set<std::string> expected;
  for (const auto& p : module.named_parameters(/*recurse=*/false)) {
    match_tensor(archive, p.key(), prefix + p.key(), "parameter", p.value(), path, plan);
    expected.insert(p.key());
  }
  for (const auto& b : module.named_buffers(/*recurse=*/false)) {
    match_tensor(archive, b.key(), prefix + b.key(), "buffer", b.value(), path, plan);
    expected.insert(b.key());
  }
  for (const auto& child : module.named_children()) {
    if (!child.value()->is_serializable()) continue;
    torch::serialize::InputArchive nested;
    if (!archive.try_read(child.key(), nested))
      throw CheckpointError::bad_weights(
          path, "the model's submodule '" + prefix + child.key() + "' is missing from the file");
    match_module(nested, *child.value(), prefix + child.key() + ".", path, plan);
    expected.insert(child.key());
  }
  for (const std::string& key : archive.keys()) {
    if (expected.count(key)) continue;
    c10::IValue value;
    archive.try_read(key, value);
    const std::string what =
        value.isTensor() ? " " + shape_str(value.toTensor().sizes().vec()) : "";
    throw CheckpointError::bad_weights(
        path, "the file holds '" + prefix + key + "'" + what + ", which the model does not have");
  }
}

}  // namespace

void checkpoint_save(const std::string& dir_arg, const torch::nn::Module& module,
                     nlohmann::json manifest, const TrainStateWriter& train_state) {
  const std::string dir = strip_trailing_slash(dir_arg);
  if (!manifest.is_object() || !manifest.contains("architecture") ||
      !manifest["architecture"].is_object())
    throw CheckpointError::bad_manifest(dir, "architecture",
                                        "must be an object describing the model (not saved)");
  check_replaceable(dir);
  std::error_code ec;
  fs::create_directories(io_impl::parent_dir(dir), ec);
  if (ec) throw os_error("create directory", io_impl::parent_dir(dir), ec.value());
  remove_stale_temps(dir);

  const std::string tmp = dir + io_impl::unique_suffix();
  set_in_flight(tmp, true);
  try {
    if (::mkdir(tmp.c_str(), 0755) != 0) throw os_error("create directory", tmp, errno);
    write_checkpoint_files(tmp, module, std::move(manifest), train_state);
    io_impl::fsync_path(tmp, /*is_directory=*/true);
    io_impl::commit_directory(tmp, dir);
  } catch (...) {
    io_impl::remove_tree(tmp);  // the unfinished new checkpoint, or the replaced old one
    set_in_flight(tmp, false);
    throw;
  }
  set_in_flight(tmp, false);
}

nlohmann::json checkpoint_read_manifest(const std::string& dir_arg) {
  const std::string dir = resolve_dir(dir_arg);
  const std::string path = dir + "/" + checkpoint_manifest_file;
  const nlohmann::json manifest = parse_manifest(path);
  if (!manifest.is_object())
    throw CheckpointError::bad_manifest(path, "<root>", "is not a JSON object");
  check_format_version(path, manifest);
  const std::string expected = check_weights_hash(path, manifest);
  const nlohmann::json& architecture = required_field(path, manifest, "architecture");
  if (!architecture.is_object())
    throw CheckpointError::bad_manifest(path, "architecture",
                                        "must be an object, got " + architecture.dump());
  check_field_types(path, manifest);
  const std::string weights = dir + "/" + checkpoint_weights_file;
  const std::string got = sha256_file(weights);
  if (got != expected) throw CheckpointError::hash_mismatch(weights, expected, got);
  return manifest;
}

void checkpoint_load_weights(const std::string& dir_arg, torch::nn::Module& module) {
  const std::string dir = resolve_dir(dir_arg);
  checkpoint_read_manifest(dir);
  const std::string path = dir + "/" + checkpoint_weights_file;
  CopyPlan plan;
  io_impl::archive_check(path);
  reading_archive(path, [&] {
    torch::serialize::InputArchive archive;
    // Read onto the CPU so a GPU-saved checkpoint opens anywhere; copy_ below moves
    // each value to the device of the module's own tensor.
    archive.load_from(path, torch::Device(torch::kCPU));
    match_module(archive, module, "", path, plan);
  });
  torch::NoGradGuard no_grad;
  for (auto& [dst, src] : plan) dst.copy_(src);
}

std::unique_ptr<torch::serialize::InputArchive> checkpoint_load_state(const std::string& dir_arg) {
  const std::string path = resolve_dir(dir_arg) + "/" + checkpoint_state_file;
  if (!io_impl::path_exists(path)) return nullptr;
  io_impl::archive_check(path);
  auto archive = std::make_unique<torch::serialize::InputArchive>();
  // Tensors return to the device they were saved from.
  reading_archive(path, [&] { archive->load_from(path); });
  return archive;
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + io_impl::unique_suffix();
  try {
    io_impl::write_file_synced(tmp, bytes);
    io_impl::rename_or_throw(tmp, path);
    io_impl::fsync_path(io_impl::parent_dir(path), /*is_directory=*/true);
  } catch (...) {
    ::unlink(tmp.c_str());  // no-op once renamed
    throw;
  }
}

}  // namespace moecert

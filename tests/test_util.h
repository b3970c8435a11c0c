// Shared test helpers: temporary directories and running the moecert binary.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace moecert_test {

/// A fresh directory under the system temp dir, removed when the object dies.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "moecert-test-XXXXXX").string();
    if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

/// Exit code and combined stdout+stderr of a shell command.
struct RunResult {
  int code = -1;
  std::string output;
};

inline RunResult run_shell(const std::string& command) {
  RunResult r;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (!pipe) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) r.output.append(buf, n);
  const int status = pclose(pipe);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

/// Threads for each test process: MOECERT_TEST_THREADS (CTest sets 1, and runs as
/// many tests at once as there are cores; OpenMP threads of two processes spinning on
/// the same cores slow both by 10x or more), else all cores.
inline int test_threads() {
  const char* v = std::getenv("MOECERT_TEST_THREADS");
  return v ? std::max(1, std::atoi(v)) : 0;
}

/// Runs the moecert binary built beside the tests with `args`.
inline RunResult run_moecert(const std::string& args) {
  return run_shell(std::string(MOECERT_BINARY) + " --threads " + std::to_string(test_threads()) +
                   " " + args);
}

/// The command line running moecert with `args` on one thread: for tests that start
/// several processes at once (ranks of a data-parallel run, or a run to compare with).
inline std::string moecert_cmd(const std::string& args) {
  return std::string(MOECERT_BINARY) + " --threads 1 " + args;
}

inline std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

/// A TCP port nothing listens on now (the kernel's choice for port 0).
inline int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  const bool ok = fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0;
  if (fd >= 0) ::close(fd);
  if (!ok) throw std::runtime_error("no free TCP port on loopback");
  return ntohs(a.sin_port);
}

/// The environment of rank `rank` of `world` on loopback.
inline std::string rank_env(int rank, int world, int port) {
  return "WORLD_SIZE=" + std::to_string(world) + " RANK=" + std::to_string(rank) +
         " LOCAL_RANK=" + std::to_string(rank) + " LOCAL_WORLD_SIZE=" + std::to_string(world) +
         " MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) + " ";
}

}  // namespace moecert_test

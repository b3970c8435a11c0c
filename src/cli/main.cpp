// moecert: one CLI11 app, each stage registers its subcommand, one catch.
#include <c10/util/Exception.h>
#include <execinfo.h>
#include <unistd.h>

#include <csignal>
#include <iostream>

#include "commands.h"
#include "moecert/error.h"

namespace {
/// A crash is a bug: say so on stderr with a raw backtrace, then die of the same signal.
void crash_handler(int sig) {
  const char msg[] = "moecert: internal error (fatal signal); backtrace:\n";
  (void)!::write(2, msg, sizeof msg - 1);
  void* frames[64];
  ::backtrace_symbols_fd(frames, ::backtrace(frames, 64), 2);
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}
}  // namespace

int main(int argc, char** argv) {
  std::signal(SIGSEGV, crash_handler);
  std::signal(SIGBUS, crash_handler);
  CLI::App app{"moecert: train, attack and certify robust Mixture-of-Experts classifiers"};
  app.require_subcommand(1);
  app.set_version_flag("--version", MOECERT_VERSION);
  moecert::CommonOptions common;
  moecert::cli_register_common(app, common);
  moecert::cli_register_train(app, common);
  moecert::cli_register_attack(app, common);
  moecert::cli_register_dual(app, common);
  moecert::cli_register_import(app, common);
  moecert::cli_register_info(app, common);
  moecert::cli_register_lipschitz(app, common);
  moecert::cli_register_certify(app, common, argc, argv);
  moecert::cli_register_verify(app, common);
  moecert::cli_register_report(app, common, argc, argv);
  moecert::cli_register_merge(app, common);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);  // prints help/usage
    return rc == 0 ? 0 : static_cast<int>(moecert::ExitCode::bad_input);
  } catch (const moecert::Error& e) {
    std::cerr << "moecert: error: " << e.what() << std::endl;
    return e.exit_code();
  } catch (const c10::Error& e) {
    std::cerr << "moecert: internal error (LibTorch): " << e.what_without_backtrace() << std::endl;
    return static_cast<int>(moecert::ExitCode::internal);
  } catch (const std::exception& e) {
    std::cerr << "moecert: internal error: " << e.what() << std::endl;
    return static_cast<int>(moecert::ExitCode::internal);
  }
  return 0;
}

// Gate expressions (`--gate`): parsed, then evaluated on a small results value.
#include <string>

#include "fuzz.h"
#include "moecert/error.h"
#include "moecert/report.h"

namespace {

moecert::Results sample_results() {
  moecert::Results r;
  r.config.grid = moecert::EpsGrid({0.01, 0.1});
  for (int i = 0; i < 3; ++i) {
    moecert::ResultRow row;
    row.index = i, row.correct = i < 2;
    row.radii[{"candidate", moecert::Estimator::crown}] = 0.05 * i;
    row.headline = 0.05 * i;
    row.headline_key = moecert::RadiusKey{"candidate", moecert::Estimator::crown};
    row.empirical = 0.2;
    r.rows.push_back(row);
  }
  r.aggregate();
  return r;
}

}  // namespace

MOECERT_FUZZ_TARGET(gate) {
  static const moecert::Results results = sample_results();
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const auto g = moecert::gate_parse(text);
    moecert::junit_xml(moecert::gates_evaluate(results, {g}), text);
  } catch (const moecert::Error&) {
  }
  return 0;
}

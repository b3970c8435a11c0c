// results.json: read (every schema version), aggregated, written back, merged with
// itself (refused: the rows overlap), gated against itself as a baseline.
#include <nlohmann/json.hpp>

#include "fuzz.h"
#include "moecert/error.h"
#include "moecert/report.h"
#include "reports/report-impl.h"

MOECERT_FUZZ_TARGET(results) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(data, data + size);
  } catch (const nlohmann::json::exception&) {
    return 0;  // Results::read turns this into a ConfigError naming the file
  }
  try {
    const auto r = moecert::Results::from_json(j, "fuzz.json");
    const auto back =
        moecert::Results::from_json(nlohmann::json::parse(r.to_json().dump()), "back.json");
    const auto gates = moecert::baseline_gates(back, r, 0.02);
    moecert::report_impl::report_render({r, back}, {"a", "b"}, {}, gates, {}, "fuzz");
    if (!r.rows.empty()) moecert::results_merge({r, r});
  } catch (const moecert::Error&) {
  }
  return 0;
}

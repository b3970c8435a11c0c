// What the two halves of the results module share (private to certify/).
#pragma once

#include <nlohmann/json.hpp>

#include "moecert/results.h"

namespace moecert {

/// The config as results.json writes it: what was read, with the typed fields in their
/// current form (without "samples", which the rows give).
nlohmann::json results_config_json(const ResultsConfig& c);

}  // namespace moecert

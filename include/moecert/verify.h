// `moecert verify MODEL.onnx PROPERTY.vnnlib` (SPEC §8; docs/import.md "VNN-COMP"):
// a VNN-COMP property checked on an ONNX model. Every case of the property (an input box
// and a conjunction of linear output constraints describing counterexamples) is refuted
// by a sound lower bound on one of its constraints (CROWN, then α-CROWN, with the float32
// evaluation error subtracted) or falsified by an attack on its box (PGD on the sum of the
// constraints' violations from random starts, checked on the float32 model). A case the
// bounds leave open whose box has few free inputs is split: input-domain branch and
// bound bisects the box until every piece is refuted, a piece's centre is a
// counterexample, or the budget ends (docs/certification.md §21).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moecert/onnx_model.h"
#include "moecert/vnnlib.h"

namespace moecert {

struct VerifyOptions {
  double timeout = 300;  ///< seconds for the whole property
  int64_t attack_steps = 100;
  int64_t restarts = 16;    ///< random starts per attack round
  bool alpha_crown = true;  ///< try α-CROWN on the cases CROWN leaves open
  uint64_t seed = 0;
  /// Input splitting on open cases with at most this many free inputs (0: off).
  int64_t split_max_inputs = 16;
  int64_t split_batch = 64;           ///< boxes bounded in one bound pass
  int64_t split_max_boxes = 1 << 20;  ///< queued boxes at most (memory bound)
  int split_max_depth = 48;           ///< bisections of one box at most
  bool progress = false;              ///< a progress line on stderr every few seconds
};

struct VerifyOutcome {
  VnnResult result = VnnResult::unknown;
  std::vector<double> x, y;  ///< the counterexample (violated), the float32 model's outputs
  int64_t cases = 0, refuted = 0;
  /// Input splitting: boxes bounded; the fractions of the cases' boxes refuted and left
  /// open, summed over the split cases (2^-depth per piece; refuted + open = the number
  /// of cases split, unless a counterexample ended the run).
  int64_t boxes = 0;
  double refuted_fraction = 0, open_fraction = 0;
  double seconds = 0;
  std::string detail;  ///< one line: what decided the result
};

/// Checks `p` on `m`. Throws ShapeError when the property's variables do not match the
/// model's input and output sizes.
VerifyOutcome verify_property(const OnnxModel& m, const VnnProperty& p, const VerifyOptions& o);

}  // namespace moecert

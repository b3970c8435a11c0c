// ONNX models (SPEC §8; docs/import.md "ONNX"): a feed-forward classifier's graph read
// with Debian's ONNX protobuf library and turned into moecert's operator graph, so that
// the bound rules certify it and `moecert verify` checks VNN-COMP properties on it.
// Operators: Conv, Gemm, MatMul, Add, Sub, Mul, Div (with a constant: the input
// normalisation; Add of two tensors: a residual sum), Relu, BatchNormalization, MaxPool,
// AveragePool, GlobalAveragePool, Flatten, Reshape (to [batch, n]), Identity, Dropout,
// Constant. Anything else is refused naming the node, its op type and the rule it needs.
#pragma once

#include <string>

#include "moecert/graph.h"
#include "moecert/rules.h"

namespace moecert {

/// A converted ONNX model: its graph (float64 parameters, exact conversions of the
/// float32 ones) and the input shape without the batch dimension.
struct OnnxModel {
  std::string path;
  LayerGraph graph;
  Shape input_shape;       ///< e.g. [1, 28, 28], or [784] for a flat input
  Shape onnx_input_shape;  ///< the declared input shape without its batch dimension
  int64_t outputs = 0;
  std::string input_name, output_name;
};

/// Reads and converts `path`. Throws DataError (exit 2) naming the file and the node:
/// unreadable or oversized files, unsupported operators or attributes, shapes that do not
/// fit, several inputs or outputs.
OnnxModel onnx_load(const std::string& path);

/// The reference evaluation of the file's graph, node by node with LibTorch's operators
/// in float32 by the ONNX definitions — a path independent of onnx_load's conversion,
/// which `moecert import` checks the converted model against. x: [B, *declared input
/// shape] -> outputs [B, K]. Throws DataError as onnx_load (read it with onnx_load first:
/// the evaluation assumes a file the conversion accepted).
torch::Tensor onnx_evaluate(const std::string& path, const torch::Tensor& x);

}  // namespace moecert

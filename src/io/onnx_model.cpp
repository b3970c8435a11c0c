// The ONNX reader (include/moecert/onnx_model.h). Each ONNX value is either a constant
// (an initializer or a Constant node, kept in float64) or a node of the layer graph with
// its shape; each supported operator becomes one or two layers. Parameters are read
// from the protobuf's typed fields or raw_data after checking that their sizes agree
// with the declared dims.
#include "moecert/onnx_model.h"

#include <onnx/onnx_pb.h>
#include <sys/stat.h>
#include <torch/torch.h>

#include <algorithm>
#include <fstream>
#include <map>

#include "moecert/error.h"
#include "moecert/limits.h"

namespace moecert {
namespace {

/// Largest model read (protobuf's own limit is 2 GiB).
constexpr int64_t kMaxBytes = int64_t{2} << 30;

struct Value {
  bool constant = false;
  torch::Tensor tensor;  ///< constant: float64 values in ONNX's shape (batch included or not)
  int node = -1;         ///< graph node (-1: the graph input)
  Shape shape;           ///< graph value: shape without the batch dimension
};

class Converter {
 public:
  explicit Converter(std::string path) : path_(std::move(path)) {}

  OnnxModel run(const onnx::ModelProto& model) {
    const auto& g = model.graph();
    for (const auto& t : g.initializer())
      values_[t.name()] = constant(tensor_of(t, "initializer " + t.name()));
    std::vector<const onnx::ValueInfoProto*> inputs;
    for (const auto& in : g.input())
      if (!values_.count(in.name())) inputs.push_back(&in);
    if (inputs.size() != 1)
      fail("", "has " + std::to_string(inputs.size()) + " non-constant inputs (one is supported)");
    if (g.output_size() != 1)
      fail("", "has " + std::to_string(g.output_size()) + " outputs (one is supported)");
    OnnxModel out;
    out.path = path_;
    out.input_name = inputs[0]->name();
    out.output_name = g.output(0).name();
    const auto& dims = inputs[0]->type().tensor_type().shape().dim();
    Shape declared;
    for (const auto& d : dims) declared.push_back(d.has_dim_value() ? d.dim_value() : -1);
    if (declared.size() < 2)
      fail("", "input '" + out.input_name + "' needs a batch dimension and a shape");
    declared.erase(declared.begin());  // the batch
    for (int64_t d : declared)
      if (d <= 0 || d > limits::max_side * limits::max_channels)
        fail("", "input '" + out.input_name + "' has an unknown or implausible dimension");
    out.onnx_input_shape = declared;
    // Our graphs read [C, H, W] images or flat vectors.
    Shape in = declared;
    if (in.size() == 2) in.insert(in.begin(), 1);
    if (in.size() != 1 && in.size() != 3)
      fail("", "input of rank " + std::to_string(declared.size() + 1) + " (2 or 4 expected)");
    out.input_shape = in;
    values_[out.input_name] = Value{false, {}, -1, in};
    for (const auto& n : g.node()) convert(n);
    const auto it = values_.find(out.output_name);
    if (it == values_.end()) fail("", "output '" + out.output_name + "' is never computed");
    if (it->second.constant || it->second.node != graph_.output() || graph_.empty())
      fail("", "output '" + out.output_name + "' is not the last operator's result");
    if (it->second.shape.size() != 1)
      fail("", "output has shape of rank " + std::to_string(it->second.shape.size()) +
                   " (logits [batch, K] expected)");
    out.outputs = it->second.shape[0];
    out.graph = std::move(graph_);
    return out;
  }

  /// The reference evaluation of the ONNX graph: every node by its ONNX definition with
  /// LibTorch's own operators in float32 (conv2d, batch_norm, max_pool2d, matmul with
  /// broadcasting, ...), independent of the conversion to layers above.
  torch::Tensor evaluate(const onnx::ModelProto& model, const torch::Tensor& x) {
    const auto& g = model.graph();
    std::map<std::string, torch::Tensor> v;
    for (const auto& t : g.initializer()) v[t.name()] = tensor_of(t, "initializer " + t.name());
    std::string in_name;
    for (const auto& in : g.input())
      if (!v.count(in.name())) in_name = in.name();
    v[in_name] = x.to(torch::kFloat32);
    auto get = [&](const onnx::NodeProto& n, int k) -> torch::Tensor {
      if (k >= n.input_size() || n.input(k).empty()) return {};
      const auto it = v.find(n.input(k));
      if (it == v.end()) fail(label(n), "reads '" + n.input(k) + "', which nothing computed");
      // Constants are read in float64; the graph computes in float32.
      return it->second.scalar_type() == torch::kFloat64 ? it->second.to(torch::kFloat32)
                                                         : it->second;
    };
    auto pads2 = [&](const onnx::NodeProto& n) {
      const auto p = attr_ints(n, "pads");
      if (p.empty()) return std::vector<int64_t>{0, 0};
      if (p.size() != 4 || p[0] != p[2] || p[1] != p[3]) fail(label(n), "has asymmetric pads");
      return std::vector<int64_t>{p[0], p[1]};
    };
    auto ints_or = [&](const onnx::NodeProto& n, const char* name, std::vector<int64_t> dflt) {
      const auto p = attr_ints(n, name);
      return p.empty() ? dflt : p;
    };
    for (const auto& n : g.node()) {
      const std::string& op = n.op_type();
      torch::Tensor y;
      if (op == "Identity" || op == "Dropout") {
        y = get(n, 0);
      } else if (op == "Constant") {
        y = tensor_of(attr(n, "value")->t(), "Constant " + label(n));
      } else if (op == "Add" || op == "Sub" || op == "Mul" || op == "Div") {
        const auto a = get(n, 0), b = get(n, 1);
        y = op == "Add" ? a + b : op == "Sub" ? a - b : op == "Mul" ? a * b : a / b;
      } else if (op == "Relu") {
        y = torch::relu(get(n, 0));
      } else if (op == "Conv") {
        y = torch::conv2d(get(n, 0), get(n, 1), get(n, 2), ints_or(n, "strides", {1, 1}), pads2(n),
                          ints_or(n, "dilations", {1, 1}), attr_int(n, "group", 1));
      } else if (op == "Gemm") {
        auto a = get(n, 0), b = get(n, 1);
        if (attr_int(n, "transA", 0)) a = a.t();
        if (attr_int(n, "transB", 0)) b = b.t();
        y = torch::matmul(a, b) * attr_float(n, "alpha", 1.0);
        if (auto c = get(n, 2); c.defined()) y = y + c * attr_float(n, "beta", 1.0);
      } else if (op == "MatMul") {
        y = torch::matmul(get(n, 0), get(n, 1));
      } else if (op == "BatchNormalization") {
        y = torch::batch_norm(get(n, 0), get(n, 1), get(n, 2), get(n, 3), get(n, 4), false, 0.0,
                              attr_float(n, "epsilon", 1e-5), false);
      } else if (op == "MaxPool") {
        y = torch::max_pool2d(get(n, 0), attr_ints(n, "kernel_shape"),
                              ints_or(n, "strides", {1, 1}), pads2(n),
                              ints_or(n, "dilations", {1, 1}), attr_int(n, "ceil_mode", 0) != 0);
      } else if (op == "AveragePool") {
        y = torch::avg_pool2d(
            get(n, 0), attr_ints(n, "kernel_shape"), ints_or(n, "strides", {1, 1}), pads2(n),
            attr_int(n, "ceil_mode", 0) != 0, attr_int(n, "count_include_pad", 0) != 0);
      } else if (op == "Pad") {
        y = get(n, 0);  // the conversion accepts only empty pads
      } else if (op == "GlobalAveragePool") {
        y = get(n, 0).mean({2, 3}, true);
      } else if (op == "Flatten") {
        const auto a = get(n, 0);
        int64_t lead = 1;
        for (int64_t k = 0; k < attr_int(n, "axis", 1); ++k) lead *= a.size(k);
        y = a.reshape({lead, -1});
      } else if (op == "Reshape") {
        const auto a = get(n, 0);
        auto shape = get(n, 1).to(torch::kLong);
        std::vector<int64_t> dims(shape.data_ptr<int64_t>(),
                                  shape.data_ptr<int64_t>() + shape.numel());
        for (size_t k = 0; k < dims.size(); ++k)
          if (dims[k] == 0) dims[k] = a.size(static_cast<int64_t>(k));
        y = a.reshape(dims);
      } else {
        fail(label(n), "has no reference evaluation (" + op + ")");
      }
      v[n.output(0)] = y;
    }
    return v.at(g.output(0).name());
  }

 private:
  [[noreturn]] void fail(const std::string& node, const std::string& why) const {
    throw DataError("ONNX model " + path_ + (node.empty() ? "" : ": node " + node) + ": " + why);
  }
  static Value constant(torch::Tensor t) { return Value{true, std::move(t), -1, {}}; }

  torch::Tensor tensor_of(const onnx::TensorProto& t, const std::string& what) {
    std::vector<int64_t> dims(t.dims().begin(), t.dims().end());
    int64_t n = 1;
    for (int64_t d : dims) {
      if (d < 0 || (d > 0 && n > (int64_t{1} << 40) / d)) fail("", what + " has dims out of range");
      n *= d;
    }
    limits::check_memory("an ONNX tensor", what, std::to_string(n), 16.0 * static_cast<double>(n));
    if (t.data_location() == onnx::TensorProto::EXTERNAL)
      fail("", what + " keeps its data in an external file (not supported)");
    auto take = [&](const auto& field, auto type) -> torch::Tensor {
      using T = decltype(type);
      if (static_cast<int64_t>(field.size()) != n)
        fail("", what + " holds " + std::to_string(field.size()) + " values for dims of " +
                     std::to_string(n));
      std::vector<T> v(field.begin(), field.end());
      return torch::tensor(v, torch::kFloat64).reshape(dims);
    };
    auto raw = [&](torch::ScalarType st) -> torch::Tensor {
      const auto& r = t.raw_data();
      const auto es = static_cast<int64_t>(c10::elementSize(st));
      if (static_cast<int64_t>(r.size()) != n * es)
        fail("", what + " holds " + std::to_string(r.size()) + " raw bytes for " +
                     std::to_string(n) + " values");
      return torch::from_blob(const_cast<char*>(r.data()), {n}, torch::TensorOptions().dtype(st))
          .to(torch::kFloat64)
          .reshape(dims);
    };
    switch (t.data_type()) {
      case onnx::TensorProto::FLOAT:
        return t.has_raw_data() ? raw(torch::kFloat) : take(t.float_data(), double{});
      case onnx::TensorProto::DOUBLE:
        return t.has_raw_data() ? raw(torch::kDouble) : take(t.double_data(), double{});
      case onnx::TensorProto::INT64:
        return t.has_raw_data() ? raw(torch::kLong) : take(t.int64_data(), double{});
      case onnx::TensorProto::INT32:
        return t.has_raw_data() ? raw(torch::kInt) : take(t.int32_data(), double{});
      default:
        fail("", what + " has ONNX data type " + std::to_string(t.data_type()) +
                     " (float, double, int32, int64 are read)");
    }
  }

  const Value& input(const onnx::NodeProto& n, int k) {
    if (k >= n.input_size() || n.input(k).empty())
      fail(label(n), "misses input " + std::to_string(k));
    const auto it = values_.find(n.input(k));
    if (it == values_.end())
      fail(label(n), "reads '" + n.input(k) + "', which nothing computed before it");
    return it->second;
  }
  const Value& graph_input(const onnx::NodeProto& n, int k) {
    const Value& v = input(n, k);
    if (v.constant) fail(label(n), "has a constant where its data input belongs (not supported)");
    return v;
  }
  torch::Tensor constant_input(const onnx::NodeProto& n, int k, const char* what) {
    const Value& v = input(n, k);
    if (!v.constant)
      fail(label(n), std::string("needs a constant ") + what +
                         " (a computed one would need a bilinear rule)");
    return v.tensor;
  }
  static std::string label(const onnx::NodeProto& n) {
    return "'" +
           (n.name().empty() ? (n.output_size() ? n.output(0) : std::string("?")) : n.name()) +
           "' (" + n.op_type() + ")";
  }
  const onnx::AttributeProto* attr(const onnx::NodeProto& n, const std::string& name) {
    for (const auto& a : n.attribute())
      if (a.name() == name) return &a;
    return nullptr;
  }
  int64_t attr_int(const onnx::NodeProto& n, const std::string& name, int64_t dflt) {
    const auto* a = attr(n, name);
    return a ? a->i() : dflt;
  }
  double attr_float(const onnx::NodeProto& n, const std::string& name, double dflt) {
    const auto* a = attr(n, name);
    return a ? a->f() : dflt;
  }
  std::vector<int64_t> attr_ints(const onnx::NodeProto& n, const std::string& name) {
    const auto* a = attr(n, name);
    return a ? std::vector<int64_t>(a->ints().begin(), a->ints().end()) : std::vector<int64_t>{};
  }
  /// One value for every entry (kernel, strides, pads), or fail.
  int64_t uniform(const onnx::NodeProto& n, const std::string& name, const std::vector<int64_t>& v,
                  int64_t dflt) {
    if (v.empty()) return dflt;
    for (int64_t x : v)
      if (x != v[0])
        fail(label(n),
             "has " + name + " that differ by axis (only square / symmetric ones are supported)");
    return v[0];
  }
  void no_auto_pad(const onnx::NodeProto& n) {
    if (const auto* a = attr(n, "auto_pad"); a && a->s() != "NOTSET" && !a->s().empty())
      fail(label(n), "has auto_pad " + a->s() + " (explicit pads only)");
  }
  void output(const onnx::NodeProto& n, Layer l, std::vector<int> ins) {
    l.name = n.name().empty() ? n.output(0) : n.name();
    int idx = 0;
    try {
      idx = graph_.add(std::move(l), std::move(ins));
      shape_ = graph_out_shape(graph_, in_shape());
    } catch (const Error& e) {
      fail(label(n), e.what());
    }
    values_[n.output(0)] = Value{false, {}, idx, shape_};
  }
  Shape in_shape() const { return values_.at(input_name_()).shape; }
  const std::string& input_name_() const {
    for (const auto& [k, v] : values_)
      if (!v.constant && v.node == -1) return k;
    throw std::logic_error("no input");
  }
  void alias(const onnx::NodeProto& n, const Value& v) { values_[n.output(0)] = v; }

  /// A constant that acts per channel of `shape` (or per feature of a flat value, or
  /// on everything): its values as a [C] vector, or undefined when it does not.
  static torch::Tensor per_channel(const torch::Tensor& c, const Shape& shape) {
    const int64_t C = shape.at(0);
    if (c.numel() == 1) return c.reshape({1}).expand({C}).contiguous();
    if (c.numel() != C) return {};
    // Its non-unit dims must sit at the channel axis counted from the end.
    auto sizes = c.sizes().vec();
    const auto rank = static_cast<int64_t>(shape.size());
    for (int64_t k = 0; k < static_cast<int64_t>(sizes.size()); ++k) {
      const int64_t from_end = static_cast<int64_t>(sizes.size()) - k;  // 1 = last axis
      if (sizes[static_cast<size_t>(k)] != 1 && from_end != rank) return {};
    }
    return c.reshape({C}).contiguous();
  }

  void elementwise(const onnx::NodeProto& n) {
    const std::string& op = n.op_type();
    const Value& a = input(n, 0);
    const Value& b = input(n, 1);
    if (a.constant && b.constant) {  // folded
      auto r = op == "Add"   ? a.tensor + b.tensor
               : op == "Sub" ? a.tensor - b.tensor
               : op == "Mul" ? a.tensor * b.tensor
                             : a.tensor / b.tensor;
      values_[n.output(0)] = constant(r);
      return;
    }
    if (!a.constant && !b.constant) {
      if (op != "Add")
        fail(label(n),
             "multiplies or divides two computed tensors: that needs a bilinear rule moecert does "
             "not have");
      if (a.shape != b.shape)
        fail(label(n), "adds tensors of different shapes (broadcasting is not supported)");
      output(n, Layer::simple(Layer::Kind::residual), {a.node, b.node});
      return;
    }
    const Value& x = a.constant ? b : a;
    const torch::Tensor c = per_channel(a.constant ? a.tensor : b.tensor, x.shape);
    if (!c.defined())
      fail(label(n), "has a constant that is neither a scalar nor one value per channel");
    torch::Tensor scale = torch::ones_like(c), shift = torch::zeros_like(c);
    if (op == "Add") shift = c;
    if (op == "Sub") a.constant ? (scale = -scale, shift = c) : (shift = -c);
    if (op == "Mul") scale = c;
    if (op == "Div") {
      if (a.constant) fail(label(n), "divides a constant by a computed tensor (not supported)");
      scale = 1.0 / c;
    }
    output(n, Layer::affine("", scale, shift), {x.node});
  }

  void convert(const onnx::NodeProto& n) {
    const std::string& op = n.op_type();
    if (n.output_size() < 1) fail(label(n), "has no output");
    if (!n.domain().empty() && n.domain() != "ai.onnx")
      fail(label(n), "is in domain '" + n.domain() + "'");
    if (op == "Identity" || op == "Dropout") return alias(n, input(n, 0));
    if (op == "Constant") {
      const auto* v = attr(n, "value");
      if (!v || !v->has_t()) fail(label(n), "has no tensor 'value'");
      values_[n.output(0)] = constant(tensor_of(v->t(), "Constant " + label(n)));
      return;
    }
    if (op == "Add" || op == "Sub" || op == "Mul" || op == "Div") return elementwise(n);
    if (op == "Relu") return output(n, Layer::simple(Layer::Kind::relu), {graph_input(n, 0).node});
    if (op == "Conv") {
      const Value& x = graph_input(n, 0);
      auto w = constant_input(n, 1, "weight");
      torch::Tensor b = n.input_size() > 2 && !n.input(2).empty() ? constant_input(n, 2, "bias")
                                                                  : torch::Tensor();
      no_auto_pad(n);
      if (attr_int(n, "group", 1) != 1)
        fail(label(n),
             "is a grouped convolution (group " + std::to_string(attr_int(n, "group", 1)) + ")");
      if (uniform(n, "dilations", attr_ints(n, "dilations"), 1) != 1) fail(label(n), "is dilated");
      if (w.dim() != 4 || w.size(2) != w.size(3))
        fail(label(n), "has a non-square or non-2-D kernel");
      const int64_t stride = uniform(n, "strides", attr_ints(n, "strides"), 1);
      const int64_t pad = uniform(n, "pads", attr_ints(n, "pads"), 0);
      return output(n, Layer::conv2d("", w, b, stride, pad), {x.node});
    }
    if (op == "Gemm" || op == "MatMul") {
      const Value& x = graph_input(n, 0);
      auto w = constant_input(n, 1, "weight");
      if (w.dim() != 2) fail(label(n), "has a weight of rank " + std::to_string(w.dim()));
      torch::Tensor bias;
      if (op == "Gemm") {
        if (attr_int(n, "transA", 0) != 0) fail(label(n), "has transA = 1");
        if (!attr_int(n, "transB", 0)) w = w.t();
        w = w * attr_float(n, "alpha", 1.0);
        if (n.input_size() > 2 && !n.input(2).empty())
          bias = (constant_input(n, 2, "bias") * attr_float(n, "beta", 1.0)).flatten();
      } else {
        w = w.t();
      }
      int from = x.node;
      if (x.shape.size() != 1) {
        output(n, Layer::simple(Layer::Kind::flatten), {from});
        from = graph_.output();
      }
      if (bias.defined() && bias.numel() == 1) bias = bias.expand({w.size(0)}).contiguous();
      return output(n, Layer::dense("", w.contiguous(), bias), {from});
    }
    if (op == "BatchNormalization") {
      const Value& x = graph_input(n, 0);
      auto gamma = constant_input(n, 1, "scale").flatten(),
           beta = constant_input(n, 2, "bias").flatten();
      auto mean = constant_input(n, 3, "mean").flatten(),
           var = constant_input(n, 4, "var").flatten();
      return output(n,
                    Layer::batch_norm("", gamma, beta, mean, var, attr_float(n, "epsilon", 1e-5)),
                    {x.node});
    }
    if (op == "MaxPool" || op == "AveragePool") {
      const Value& x = graph_input(n, 0);
      no_auto_pad(n);
      if (attr_int(n, "ceil_mode", 0)) fail(label(n), "has ceil_mode = 1");
      const int64_t k = uniform(n, "kernel_shape", attr_ints(n, "kernel_shape"), 0);
      const int64_t stride = uniform(n, "strides", attr_ints(n, "strides"), 1);
      const int64_t pad = uniform(n, "pads", attr_ints(n, "pads"), 0);
      if (k <= 0 || x.shape.size() != 3) fail(label(n), "needs a kernel and a [C, H, W] input");
      if (op == "MaxPool") {
        if (uniform(n, "dilations", attr_ints(n, "dilations"), 1) != 1)
          fail(label(n), "is dilated");
        return output(n, Layer::max_pool("", k, stride, pad), {x.node});
      }
      if (pad != 0 && !attr_int(n, "count_include_pad", 0))
        fail(label(n), "pads without count_include_pad");
      // The average over each window: a convolution with weight 1/k² on the diagonal.
      const int64_t C = x.shape[0];
      auto w = torch::zeros({C, C, k, k}, torch::kFloat64);
      for (int64_t c = 0; c < C; ++c) w[c][c].fill_(1.0 / static_cast<double>(k * k));
      return output(n, Layer::conv2d("", w, {}, stride, pad), {x.node});
    }
    if (op == "Pad") {  // torch.onnx exports average pools with an explicit (often empty) Pad
      const Value& x = graph_input(n, 0);
      torch::Tensor pads = n.input_size() > 1 ? constant_input(n, 1, "pads") : torch::Tensor();
      const auto listed = attr_ints(n, "pads");
      const bool zero = pads.defined() ? pads.abs().sum().item<double>() == 0
                                       : std::all_of(listed.begin(), listed.end(),
                                                     [](int64_t v) { return v == 0; });
      if (!zero)
        fail(label(n),
             "pads a tensor (only an empty Pad is supported; pad in Conv or MaxPool instead)");
      return alias(n, x);
    }
    if (op == "GlobalAveragePool")
      return output(n, Layer::simple(Layer::Kind::global_avgpool), {graph_input(n, 0).node});
    if (op == "Flatten" || op == "Reshape") {
      const Value& x = graph_input(n, 0);
      if (op == "Flatten" && attr_int(n, "axis", 1) != 1)
        fail(label(n), "flattens from axis " + std::to_string(attr_int(n, "axis", 1)));
      if (op == "Reshape") {
        auto target = constant_input(n, 1, "shape");
        int64_t numel = 1;
        for (int64_t d : x.shape) numel *= d;
        const auto t = target.to(torch::kLong).flatten();
        const bool flat =
            t.numel() == 2 && (t[1].item<int64_t>() == numel || t[1].item<int64_t>() == -1) &&
            (t[0].item<int64_t>() == -1 || t[0].item<int64_t>() == 1 || t[0].item<int64_t>() == 0);
        if (!flat) fail(label(n), "reshapes to something other than [batch, n]");
      }
      if (x.shape.size() == 1) return alias(n, x);
      return output(n, Layer::simple(Layer::Kind::flatten), {x.node});
    }
    fail(label(n), "is not supported: an operator moecert has no bound rule for (" + op +
                       "); supported: Conv, Gemm, MatMul, Add, Sub, Mul, Div, Relu, "
                       "BatchNormalization, MaxPool, "
                       "AveragePool, GlobalAveragePool, Flatten, Reshape, Identity, Dropout, "
                       "Constant, Pad (empty)");
  }

  std::string path_;
  std::map<std::string, Value> values_;
  LayerGraph graph_;
  Shape shape_;
};

}  // namespace

namespace {
onnx::ModelProto onnx_read(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw DataError::cannot_open(path, "no such file");
  if (st.st_size > kMaxBytes)
    throw DataError("ONNX model " + path + ": " +
                    limits::bytes_text(static_cast<double>(st.st_size)) + " (2 GiB at most)");
  limits::check_memory("reading an ONNX model", "the file", path,
                       3.0 * static_cast<double>(st.st_size));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError::cannot_open(path, "not readable");
  onnx::ModelProto model;
  if (!model.ParseFromIstream(&in))
    throw DataError("ONNX model " + path +
                    ": not a valid ONNX protobuf (truncated or another format)");
  if (!model.has_graph()) throw DataError("ONNX model " + path + ": has no graph");
  return model;
}
}  // namespace

OnnxModel onnx_load(const std::string& path) { return Converter(path).run(onnx_read(path)); }

torch::Tensor onnx_evaluate(const std::string& path, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  return Converter(path).evaluate(onnx_read(path), x);
}

}  // namespace moecert

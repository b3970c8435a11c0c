// The restricted reader of torch.save files (include/moecert/torch_file.h).
//
// The pickle is interpreted by a small stack machine that knows Python objects only as
// data: None, booleans, integers, floats, strings, bytes, tuples, lists, dicts, the few
// allowed globals, storages and tensor descriptors. REDUCE calls nothing: it recognises
// the three allowed callables and builds the value they would return from their
// arguments. Objects live in an arena, so a pickle that builds a cycle or a million
// nested lists costs memory proportional to its own length and nothing recursive.
#include "moecert/torch_file.h"

#include <cstring>
#include <map>
#include <unordered_map>

#include "io-impl.h"
#include "moecert/error.h"
#include "moecert/limits.h"

namespace moecert {

struct TorchFile::Zip {
  explicit Zip(const std::string& path)
      : reader(path, [path](const std::string& why) {
          throw DataError("torch.save file " + path + ": " + why);
        }) {}
  io_impl::ZipReader reader;
};

namespace {

/// The storage types torch.save names in a storage's persistent id, and their dtypes.
const std::map<std::string, torch::ScalarType>& storage_types() {
  static const std::map<std::string, torch::ScalarType> m = {
      {"torch.FloatStorage", torch::kFloat}, {"torch.DoubleStorage", torch::kDouble},
      {"torch.HalfStorage", torch::kHalf},   {"torch.BFloat16Storage", torch::kBFloat16},
      {"torch.LongStorage", torch::kLong},   {"torch.IntStorage", torch::kInt},
      {"torch.ShortStorage", torch::kShort}, {"torch.CharStorage", torch::kChar},
      {"torch.ByteStorage", torch::kByte},   {"torch.BoolStorage", torch::kBool}};
  return m;
}

/// The globals a tensor dictionary uses besides the storage types.
bool allowed_global(const std::string& name) {
  return name == "collections.OrderedDict" || name == "torch._utils._rebuild_tensor_v2" ||
         name == "torch._utils._rebuild_parameter" || name == "torch.Size" ||
         storage_types().count(name) > 0;
}

struct Value {
  enum Kind {
    none,
    boolean,
    integer,
    real,
    string,
    bytes,
    tuple,
    list,
    dict,
    global,
    storage,
    tensor
  };
  Kind kind = none;
  int64_t i = 0;
  double f = 0;
  std::string s;              ///< string, bytes, a global's "module.name", a storage's key
  std::vector<Value*> items;  ///< tuple, list
  std::vector<std::pair<Value*, Value*>> pairs;  ///< dict, in insertion order
  torch::ScalarType dtype = torch::kFloat;       ///< storage
  TorchTensorRef ref;                            ///< tensor
};

const char* kind_name(Value::Kind k) {
  static const char* names[] = {"None",  "bool", "int",  "float",  "str",     "bytes",
                                "tuple", "list", "dict", "global", "storage", "tensor"};
  return names[k];
}

/// Most nested containers a state dict needs (checkpoint dict, state dict, optimizer
/// state, param groups' lists) is about 6; far deeper is refused.
constexpr int kMaxDepth = 64;

class Unpickler {
 public:
  /// `record_bytes(key)` is the size of storage record `key`, or -1 when there is none.
  Unpickler(std::string path, const std::string& pickle,
            std::function<int64_t(const std::string&)> record_bytes)
      : path_(std::move(path)), p_(pickle), record_bytes_(std::move(record_bytes)) {}

  Value* run() {
    while (at_ < p_.size()) {
      const size_t op_at = at_;
      const auto op = static_cast<unsigned char>(p_[at_++]);
      if (op == '.') {
        if (stack_.size() != 1 || !marks_.empty())
          fail(op_at, "STOP with a stack of " + std::to_string(stack_.size()));
        return stack_.back();
      }
      step(op, op_at);
    }
    fail(at_, "the pickle ends without STOP (truncated)");
  }

 private:
  [[noreturn]] void fail(size_t at, const std::string& why) const {
    throw DataError("torch.save file " + path_ + ": data.pkl at byte " + std::to_string(at) + ": " +
                    why);
  }
  Value* make(Value::Kind k) {
    arena_.push_back(std::make_unique<Value>());
    arena_.back()->kind = k;
    return arena_.back().get();
  }
  uint64_t uint(int bytes) {
    if (p_.size() - at_ < static_cast<size_t>(bytes))
      fail(at_, "an argument past the end (truncated)");
    uint64_t v = 0;
    for (int b = bytes - 1; b >= 0; --b) v = (v << 8) | static_cast<unsigned char>(p_[at_ + b]);
    at_ += static_cast<size_t>(bytes);
    return v;
  }
  std::string chars(uint64_t n) {
    if (n > p_.size() - at_) fail(at_, "a string of " + std::to_string(n) + " bytes past the end");
    std::string s = p_.substr(at_, n);
    at_ += n;
    return s;
  }
  std::string line() {
    const auto nl = p_.find('\n', at_);
    if (nl == std::string::npos) fail(at_, "a text argument without its newline");
    std::string s = p_.substr(at_, nl - at_);
    at_ = nl + 1;
    return s;
  }
  Value* pop(size_t op_at) {
    if (stack_.empty() || (!marks_.empty() && stack_.size() == marks_.back()))
      fail(op_at, "pop from an empty stack");
    Value* v = stack_.back();
    stack_.pop_back();
    return v;
  }
  Value* top(size_t op_at) {
    if (stack_.empty()) fail(op_at, "the stack is empty");
    return stack_.back();
  }
  /// Pops everything above the last MARK, and the mark.
  std::vector<Value*> pop_mark(size_t op_at) {
    if (marks_.empty()) fail(op_at, "no MARK");
    const size_t m = marks_.back();
    marks_.pop_back();
    std::vector<Value*> v(stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
    stack_.resize(m);
    return v;
  }
  Value* integer(int64_t i) {
    Value* v = make(Value::integer);
    v->i = i;
    return v;
  }
  Value* text(Value::Kind k, std::string s) {
    Value* v = make(k);
    v->s = std::move(s);
    return v;
  }
  Value* tuple(std::vector<Value*> items) {
    Value* v = make(Value::tuple);
    v->items = std::move(items);
    return v;
  }
  void push(Value* v) { stack_.push_back(v); }
  void set_items(Value* d, const std::vector<Value*>& kv, size_t op_at) {
    if (d->kind != Value::dict) fail(op_at, "SETITEM on a " + std::string(kind_name(d->kind)));
    if (kv.size() % 2) fail(op_at, "SETITEMS with an odd number of values");
    for (size_t k = 0; k < kv.size(); k += 2) {
      const auto kk = kv[k]->kind;
      if (kk != Value::string && kk != Value::integer)
        fail(op_at,
             std::string("a dict key of type ") + kind_name(kk) + " (str and int keys only)");
      d->pairs.emplace_back(kv[k], kv[k + 1]);
    }
  }
  void append(Value* l, const std::vector<Value*>& items, size_t op_at) {
    if (l->kind != Value::list) fail(op_at, "APPEND to a " + std::string(kind_name(l->kind)));
    l->items.insert(l->items.end(), items.begin(), items.end());
  }
  void global(const std::string& name, size_t op_at) {
    if (!allowed_global(name))
      fail(op_at,
           "refused global '" + name +
               "': a state dict needs only collections.OrderedDict, "
               "torch._utils._rebuild_tensor_v2 / "
               "_rebuild_parameter, torch.Size and the torch.*Storage types (nothing was run)");
    push(text(Value::global, name));
  }
  int64_t int_arg(Value* v, const char* what, size_t op_at) {
    if (v->kind != Value::integer)
      fail(op_at, std::string(what) + " is a " + kind_name(v->kind) + ", not an int");
    return v->i;
  }
  std::vector<int64_t> ints(Value* v, const char* what, size_t op_at) {
    if (v->kind != Value::tuple && v->kind != Value::list)
      fail(op_at, std::string(what) + " is not a tuple");
    if (v->items.size() > 64)
      fail(op_at, std::string(what) + " has " + std::to_string(v->items.size()) + " dimensions");
    std::vector<int64_t> out;
    for (Value* x : v->items) out.push_back(int_arg(x, what, op_at));
    return out;
  }
  /// BINPERSID: ('storage', <storage type>, key, location, numel) -> a storage.
  Value* persistent(Value* pid, size_t op_at) {
    if (pid->kind != Value::tuple || pid->items.size() != 5 ||
        pid->items[0]->kind != Value::string || pid->items[0]->s != "storage" ||
        pid->items[1]->kind != Value::global || pid->items[2]->kind != Value::string)
      fail(op_at, "a persistent id that is not ('storage', type, key, location, numel)");
    const auto type = storage_types().find(pid->items[1]->s);
    if (type == storage_types().end()) fail(op_at, "a storage of type '" + pid->items[1]->s + "'");
    const std::string& key = pid->items[2]->s;
    const int64_t numel = int_arg(pid->items[4], "a storage's size", op_at);
    const int64_t bytes = record_bytes_(key);
    const int64_t element = static_cast<int64_t>(c10::elementSize(type->second));
    if (bytes < 0)
      fail(op_at, "storage '" + key + "' has no record data/" + key + " in the archive");
    if (numel < 0 || numel > bytes / element || numel * element != bytes)
      fail(op_at, "storage '" + key + "' claims " + std::to_string(numel) + " elements of " +
                      std::to_string(element) + " bytes but its record holds " +
                      std::to_string(bytes) + " bytes");
    Value* s = text(Value::storage, key);
    s->dtype = type->second;
    s->i = numel;
    return s;
  }
  /// _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata]).
  Value* rebuild_tensor(const std::vector<Value*>& a, size_t op_at) {
    if (a.size() < 4 || a[0]->kind != Value::storage)
      fail(op_at, "_rebuild_tensor_v2 without a storage");
    Value* t = make(Value::tensor);
    t->ref.storage = a[0]->s;
    t->ref.dtype = a[0]->dtype;
    t->ref.offset = int_arg(a[1], "a tensor's storage offset", op_at);
    t->ref.sizes = ints(a[2], "a tensor's size", op_at);
    t->ref.strides = ints(a[3], "a tensor's stride", op_at);
    if (t->ref.sizes.size() != t->ref.strides.size())
      fail(op_at, "a tensor whose size and stride differ in length");
    // The last element the view reaches must lie in the storage; computed with overflow
    // checks so that a 10^12-element shape is refused here, before anything exists.
    const int64_t numel = a[0]->i;
    int64_t last = t->ref.offset, count = 1;
    bool empty = false;
    for (size_t d = 0; d < t->ref.sizes.size(); ++d) {
      const int64_t n = t->ref.sizes[d], s = t->ref.strides[d];
      if (n < 0 || s < 0) fail(op_at, "a tensor with a negative size or stride");
      if (n == 0) empty = true;
      if (n > 0 && (s > 0 && n - 1 > (std::numeric_limits<int64_t>::max() - last) / s))
        fail(op_at, "a tensor whose extent overflows");
      if (n > 0) last += (n - 1) * s;
      if (n > 0 && count > std::numeric_limits<int64_t>::max() / n)
        fail(op_at, "a tensor whose size overflows");
      count *= n;
    }
    if (t->ref.offset < 0 || (!empty && last >= numel))
      fail(op_at, "a tensor of size " + shape_str(t->ref.sizes) + " reaches element " +
                      std::to_string(last) + " of storage '" + t->ref.storage + "', which has " +
                      std::to_string(numel));
    return t;
  }
  Value* reduce(Value* callable, Value* args, size_t op_at) {
    if (callable->kind != Value::global)
      fail(op_at, "REDUCE of a " + std::string(kind_name(callable->kind)));
    if (args->kind != Value::tuple) fail(op_at, "REDUCE with arguments that are not a tuple");
    const std::string& name = callable->s;
    if (name == "collections.OrderedDict") {
      if (!args->items.empty()) fail(op_at, "OrderedDict called with arguments");
      return make(Value::dict);
    }
    if (name == "torch._utils._rebuild_tensor_v2") return rebuild_tensor(args->items, op_at);
    if (name == "torch._utils._rebuild_parameter") {
      if (args->items.empty() || args->items[0]->kind != Value::tensor)
        fail(op_at, "_rebuild_parameter without a tensor");
      return args->items[0];
    }
    if (name == "torch.Size") {
      if (args->items.size() != 1)
        fail(op_at, "torch.Size with " + std::to_string(args->items.size()) + " arguments");
      return tuple(args->items[0]->items);
    }
    fail(op_at,
         "calling '" + name +
             "' (only OrderedDict, _rebuild_tensor_v2, _rebuild_parameter, torch.Size are built)");
  }

  void step(unsigned char op, size_t op_at) {
    switch (op) {
      case 0x80:
        uint(1);
        break;  // PROTO
      case 0x95:
        uint(8);
        break;  // FRAME
      case '(':
        marks_.push_back(stack_.size());
        break;
      case '}':
        push(make(Value::dict));
        break;
      case ']':
        push(make(Value::list));
        break;
      case ')':
        push(tuple({}));
        break;
      case 'N':
        push(make(Value::none));
        break;
      case 0x88:
      case 0x89: {
        Value* v = make(Value::boolean);
        v->i = op == 0x88;
        push(v);
        break;
      }
      case 'K':
        push(integer(static_cast<int64_t>(uint(1))));
        break;
      case 'M':
        push(integer(static_cast<int64_t>(uint(2))));
        break;
      case 'J':
        push(integer(static_cast<int32_t>(uint(4))));
        break;
      case 0x8a: {  // LONG1: n-byte two's complement
        const uint64_t n = uint(1);
        if (n > 8) fail(op_at, "an integer of " + std::to_string(n) + " bytes");
        uint64_t v = n ? uint(static_cast<int>(n)) : 0;
        if (n && n < 8 && (v >> (8 * n - 1)) & 1) v |= ~uint64_t{0} << (8 * n);
        push(integer(static_cast<int64_t>(v)));
        break;
      }
      case 'G': {  // BINFLOAT, big-endian
        uint64_t bits = 0;
        const std::string b = chars(8);
        for (char c : b) bits = (bits << 8) | static_cast<unsigned char>(c);
        Value* v = make(Value::real);
        std::memcpy(&v->f, &bits, 8);
        push(v);
        break;
      }
      case 'X':
        push(text(Value::string, chars(uint(4))));
        break;  // BINUNICODE
      case 0x8c:
        push(text(Value::string, chars(uint(1))));
        break;  // SHORT_BINUNICODE
      case 0x8d:
        push(text(Value::string, chars(uint(8))));
        break;  // BINUNICODE8
      case 'T':
        push(text(Value::string, chars(uint(4))));
        break;  // BINSTRING (Python 2)
      case 'U':
        push(text(Value::string, chars(uint(1))));
        break;  // SHORT_BINSTRING
      case 'B':
        push(text(Value::bytes, chars(uint(4))));
        break;  // BINBYTES
      case 'C':
        push(text(Value::bytes, chars(uint(1))));
        break;     // SHORT_BINBYTES
      case 'c': {  // GLOBAL module\nname\n
        const std::string module = line();
        global(module + "." + line(), op_at);
        break;
      }
      case 0x93: {  // STACK_GLOBAL
        Value* name = pop(op_at);
        Value* module = pop(op_at);
        if (name->kind != Value::string || module->kind != Value::string)
          fail(op_at, "STACK_GLOBAL of non-strings");
        global(module->s + "." + name->s, op_at);
        break;
      }
      case 'q':
        memo_put(uint(1), op_at);
        break;  // BINPUT
      case 'r':
        memo_put(uint(4), op_at);
        break;  // LONG_BINPUT
      case 0x94:
        memo_put(memo_.size(), op_at);
        break;  // MEMOIZE
      case 'h':
        push(memo_get(uint(1), op_at));
        break;  // BINGET
      case 'j':
        push(memo_get(uint(4), op_at));
        break;  // LONG_BINGET
      case 't':
        push(tuple(pop_mark(op_at)));
        break;
      case 0x85:
      case 0x86:
      case 0x87: {  // TUPLE1..3
        std::vector<Value*> items(static_cast<size_t>(op - 0x84));
        for (size_t k = items.size(); k-- > 0;) items[k] = pop(op_at);
        push(tuple(std::move(items)));
        break;
      }
      case 'l': {  // LIST from the mark
        Value* l = make(Value::list);
        l->items = pop_mark(op_at);
        push(l);
        break;
      }
      case 'd': {  // DICT from the mark
        Value* d = make(Value::dict);
        set_items(d, pop_mark(op_at), op_at);
        push(d);
        break;
      }
      case 'a': {
        Value* v = pop(op_at);
        append(top(op_at), {v}, op_at);
        break;
      }
      case 'e': {
        auto items = pop_mark(op_at);
        append(top(op_at), items, op_at);
        break;
      }
      case 's': {
        Value* v = pop(op_at);
        Value* k = pop(op_at);
        set_items(top(op_at), {k, v}, op_at);
        break;
      }
      case 'u': {
        auto kv = pop_mark(op_at);
        set_items(top(op_at), kv, op_at);
        break;
      }
      case 'Q': {  // BINPERSID
        Value* pid = pop(op_at);
        push(persistent(pid, op_at));
        break;
      }
      case 'R': {
        Value* args = pop(op_at);
        Value* callable = pop(op_at);
        push(reduce(callable, args, op_at));
        break;
      }
      case 'b': {  // BUILD: an OrderedDict's attributes (a state dict's _metadata) are dropped
        Value* state = pop(op_at);
        Value* obj = top(op_at);
        if (obj->kind != Value::dict || (state->kind != Value::dict && state->kind != Value::none))
          fail(op_at, std::string("BUILD of a ") + kind_name(obj->kind) + " with a " +
                          kind_name(state->kind));
        break;
      }
      case '0':
        pop(op_at);
        break;  // POP
      case '1':
        pop_mark(op_at);
        break;  // POP_MARK
      case '2':
        push(top(op_at));
        break;  // DUP
      default: {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02x", op);
        fail(op_at,
             std::string("opcode ") + hex +
                 " is not one a tensor dictionary needs (protocols 2-5 binary opcodes only)");
      }
    }
  }
  void memo_put(uint64_t index, size_t op_at) {
    if (index > p_.size()) fail(op_at, "a memo index beyond the pickle's length");
    memo_[index] = top(op_at);
  }
  Value* memo_get(uint64_t index, size_t op_at) {
    const auto it = memo_.find(index);
    if (it == memo_.end()) fail(op_at, "memo entry " + std::to_string(index) + " was never stored");
    return it->second;
  }

  std::string path_;
  const std::string& p_;
  std::function<int64_t(const std::string&)> record_bytes_;
  size_t at_ = 0;
  std::vector<Value*> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, Value*> memo_;

 public:
  std::vector<std::unique_ptr<Value>> arena_;
};

/// Collects the tensors under `v` with dotted paths; refuses cycles and deep nesting.
void collect(const std::string& path, const Value* v, int depth, std::vector<const Value*>& on_path,
             std::vector<std::pair<std::string, TorchTensorRef>>& out, const std::string& file) {
  if (v->kind == Value::tensor) {
    out.emplace_back(path, v->ref);
    return;
  }
  if (v->kind != Value::dict && v->kind != Value::list && v->kind != Value::tuple) return;
  if (depth > kMaxDepth)
    throw DataError("torch.save file " + file + ": containers nested deeper than " +
                    std::to_string(kMaxDepth) + " at '" + path + "'");
  for (const Value* p : on_path)
    if (p == v) throw DataError("torch.save file " + file + ": '" + path + "' contains itself");
  on_path.push_back(v);
  const auto child = [&](const std::string& key) { return path.empty() ? key : path + "." + key; };
  if (v->kind == Value::dict) {
    for (const auto& [k, x] : v->pairs)
      collect(child(k->kind == Value::string ? k->s : std::to_string(k->i)), x, depth + 1, on_path,
              out, file);
  } else {
    for (size_t i = 0; i < v->items.size(); ++i)
      collect(child(std::to_string(i)), v->items[i], depth + 1, on_path, out, file);
  }
  on_path.pop_back();
}

}  // namespace

TorchFile::TorchFile(const std::string& path) : path_(path) {
  {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw DataError::cannot_open(path, "no such file or not readable");
    char magic[4] = {};
    in.read(magic, 4);
    if (in.gcount() >= 1 && static_cast<unsigned char>(magic[0]) == 0x80)
      throw DataError(
          "torch.save file " + path +
          ": a legacy (pre-zip) file, which moecert does not read; re-save it in Python with "
          "torch.save(torch.load(f, weights_only=True), g, _use_new_zipfile_serialization=True)");
    if (in.gcount() < 4 || std::memcmp(magic, "PK\x03\x04", 4) != 0)
      throw DataError("torch.save file " + path +
                      ": not a zip archive (torch.save writes one since PyTorch 1.6)");
  }
  zip_ = std::make_unique<Zip>(path);
  auto& zip = zip_->reader;
  const io_impl::ZipEntry* pickle = nullptr;
  for (const auto& e : zip.entries()) {
    const auto slash = e.name.find('/');
    if (slash != std::string::npos && e.name.compare(slash, std::string::npos, "/data.pkl") == 0) {
      if (pickle) zip.fail("two data.pkl records");
      pickle = &e, prefix_ = e.name.substr(0, slash);
    }
  }
  if (!pickle) zip.fail("no <archive>/data.pkl record (not a torch.save file)");
  if (const auto* order = zip.find(prefix_ + "/byteorder"); order && order->size < 16) {
    const std::string o = zip.data(*order);
    if (o != "little") zip.fail("byte order '" + o + "' (moecert reads little-endian files)");
  }
  if (pickle->size > (uint64_t{1} << 30))
    zip.fail("data.pkl of " + std::to_string(pickle->size) + " bytes");
  const std::string program = zip.data(*pickle);
  Unpickler u(path, program, [&](const std::string& key) -> int64_t {
    const auto* e = zip.find(prefix_ + "/data/" + key);
    return e ? static_cast<int64_t>(e->size) : -1;
  });
  const Value* root = u.run();
  std::vector<const Value*> on_path;
  collect("", root, 0, on_path, tensors_, path);
  if (root->kind == Value::dict)
    for (const auto& [k, x] : root->pairs) {
      if (k->kind != Value::string) continue;
      if (x->kind == Value::integer) scalars_[k->s] = x->i;
      if (x->kind == Value::real && std::isfinite(x->f)) scalars_[k->s] = x->f;
      if (x->kind == Value::boolean) scalars_[k->s] = x->i != 0;
      if (x->kind == Value::string && x->s.size() <= 256) scalars_[k->s] = x->s;
    }
}

TorchFile::~TorchFile() = default;

torch::Tensor TorchFile::load(const TorchTensorRef& ref) {
  auto& zip = zip_->reader;
  const auto* e = zip.find(prefix_ + "/data/" + ref.storage);
  if (!e) zip.fail("no record for storage '" + ref.storage + "'");
  limits::check_memory("reading storage '" + ref.storage + "'", "the file", path_,
                       static_cast<double>(e->size));
  const std::string bytes = zip.data(*e);
  const auto element = static_cast<int64_t>(c10::elementSize(ref.dtype));
  auto storage = torch::from_blob(const_cast<char*>(bytes.data()),
                                  {static_cast<int64_t>(bytes.size()) / element},
                                  torch::TensorOptions().dtype(ref.dtype));
  return storage.as_strided(ref.sizes, ref.strides, ref.offset).clone(at::MemoryFormat::Contiguous);
}

}  // namespace moecert

// Data sets: Fashion-MNIST IDX (.gz read directly), CIFAR-10 and CIFAR-100 binary
// batches and deterministic synthetic sets for tests, by name from one registry. Images stay uint8
// in memory and are converted to float32 in [0, 1] one batch at a time.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace moecert {

/// An in-memory labelled image set.
struct Dataset {
  std::string name;      ///< "fashion-mnist", "cifar10", "synthetic"
  torch::Tensor images;  ///< [N, C, H, W] uint8
  torch::Tensor labels;  ///< [N] int64, values in [0, num_classes)
  int64_t num_classes = 0;
  std::vector<double> mean;  ///< per-channel normalisation mean (pixels in [0,1])
  std::vector<double> std;   ///< per-channel normalisation std
  /// [N] int64: each row's index in the split it was read from (undefined: the row's
  /// own position). Per-sample results report it, so rows of different commands join.
  torch::Tensor index;

  int64_t size() const { return labels.defined() ? labels.size(0) : 0; }
  int64_t channels() const { return images.size(1); }
  int64_t height() const { return images.size(2); }
  int64_t width() const { return images.size(3); }
  /// Float32 images in [0, 1] of the given rows. index: [b] int64 -> [b, C, H, W]
  torch::Tensor batch_images(const torch::Tensor& index) const;
  /// Labels of the given rows. index: [b] int64 -> [b] int64
  torch::Tensor batch_labels(const torch::Tensor& index) const;
  /// The split index of row `row` (see `index`).
  int64_t source_index(int64_t row) const;
  /// The data set of the given rows, in that order, with their split indices.
  /// rows: [n] int64
  Dataset select(const torch::Tensor& rows) const;
};

/// What to load: `name` picks the reader, `dir` overrides its default location.
struct DataSpec {
  std::string name = "fashion-mnist";  ///< a data_registry() name
  std::string dir;                     ///< empty: the reader's default directory
  bool train = true;                   ///< training split or test split
  /// >0: keep this many rows: a seeded random subset, or with `first` the first ones
  /// (what evaluation commands use, as AutoAttack and RobustBench do).
  int64_t samples = 0;
  bool first = false;
  uint64_t seed = 0;  ///< seed of the subset choice (and synthetic data)
};

/// Loads a data set; throws DataError (exit 2) naming the file and the problem. The
/// synthetic set's splits have fixed sizes (synthetic_train_size, synthetic_test_size),
/// so that an index names the same image whatever `samples` is.
Dataset data_load(const DataSpec& spec);

/// Reads a pair of IDX files (gzip or plain): images u8 [N, H, W] (magic 0x803)
/// and labels u8 [N] (magic 0x801). Validates magic, sizes, counts and labels.
Dataset data_load_idx(const std::string& images_path, const std::string& labels_path,
                      int64_t num_classes);

/// Reads CIFAR-10 binary batches (data_batch_1..5.bin or test_batch.bin) in `dir`.
Dataset data_load_cifar10(const std::string& dir, bool train);

/// Reads CIFAR-100 binary (train.bin or test.bin) in `dir`: the fine labels (100
/// classes), or with `coarse` the superclasses (20).
Dataset data_load_cifar100(const std::string& dir, bool train, bool coarse);

/// Reads the `tiny-imagenet-200` folder `dir`: the train split, or the labelled val
/// split as the test split; 64x64 JPEGs decoded once and cached in dir/.moecert-cache/
/// with a checksum (rebuilt when stale or corrupt).
Dataset data_load_tiny_imagenet(const std::string& dir, bool train);

/// The data-set registry: every name `--dataset` takes, with its help and reader.
struct DataEntry {
  const char* name;
  const char* help;
  Dataset (*load)(const DataSpec& spec);  ///< the whole split, before any subset
};
const std::vector<DataEntry>& data_registry();
/// "name | name | ..." of the registered data sets.
std::string data_names();

/// Deterministic, learnable synthetic set: each class is a fixed random template
/// plus per-sample noise. Same (n, seed, shape) -> bit-identical data.
Dataset data_synthetic(int64_t n, int64_t channels, int64_t height, int64_t width,
                       int64_t num_classes, uint64_t seed);

/// The first `n` rows (n >= size: the set unchanged).
Dataset data_first(const Dataset& data, int64_t n);

/// A seeded random subset of `n` rows, in split order (n >= size: the set unchanged).
Dataset data_subset(const Dataset& data, int64_t n, uint64_t seed);

/// The papers' training augmentations (random crop with zero padding, horizontal flip).
struct Augment {
  int64_t crop_pad = 0;  ///< > 0: pad by this many zero pixels, crop back at a random offset
  bool flip = false;     ///< mirror left-right with probability 1/2
  bool active() const { return crop_pad > 0 || flip; }
};

/// Augments a batch x [B, C, H, W] whose rows are the data-set rows `rows` [B]: each
/// image's crop offset and flip are drawn from (seed, epoch, row) alone, so a resumed
/// run, any batch size and any split of the batch see the same images. -> [B, C, H, W]
torch::Tensor data_augment(const torch::Tensor& x, const torch::Tensor& rows, const Augment& a,
                           uint64_t seed, int64_t epoch);

/// The rows of epoch `epoch` in training order: a permutation that depends only on
/// (seed, epoch), so that a resumed run sees the same batches. -> [N] int64
torch::Tensor data_epoch_order(int64_t n, uint64_t seed, int64_t epoch);

}  // namespace moecert

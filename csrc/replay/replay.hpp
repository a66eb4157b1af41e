// Replay ring buffer core: one ring per env stream, raw bytes per field, no torch dependency.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <shared_mutex>
#include <string>
#include <vector>

namespace fastdream {

struct FieldSpec {
  std::string name;
  std::vector<int64_t> shape;  // per-row element shape
  char kind;                   // numpy dtype kind: 'b', 'u', 'i', 'f'
  int64_t itemsize;            // bytes per element
  int64_t row_bytes;           // bytes per row = prod(shape) * itemsize
};

class ReplayCore {
 public:
  ReplayCore(int64_t capacity, int64_t num_envs, std::vector<FieldSpec> fields, uint64_t seed);

  int64_t num_envs() const { return num_envs_; }
  int64_t env_capacity() const { return env_capacity_; }
  const std::vector<FieldSpec>& fields() const { return fields_; }
  uint8_t* field_data(size_t f) { return storage_[f].get(); }
  int64_t field_nbytes(size_t f) const { return storage_bytes_[f]; }

  // Rows written per env since creation (monotonic); stored rows = min(count, env_capacity).
  std::vector<int64_t> counts() const;
  void set_counts(const std::vector<int64_t>& counts);
  int64_t size() const;

  // src[f] points at n rows of field f, row i belonging to env env_ids[i]; already validated.
  void add(const int64_t* env_ids, int64_t n, const std::vector<const uint8_t*>& src);

  // Number of complete windows of length seq_len over all envs.
  int64_t num_windows(int64_t seq_len) const;

  // Chooses batch windows and gathers them into dst[f] ([B, T, row] contiguous) under one lock,
  // so a concurrent add can never overwrite a window between choice and copy.
  // Writes chosen (env, start) pairs into out_env/out_start (logical start index).
  void sample(int64_t batch, int64_t seq_len, double recency, const std::vector<uint8_t*>& dst,
              int64_t* out_env, int64_t* out_start, int num_threads);

  void seed(uint64_t s) {
    std::lock_guard<std::mutex> rng_lock(rng_mutex_);
    rng_.seed(s);
  }
  std::string rng_state() const;
  void set_rng_state(const std::string& state);

 private:
  int64_t num_envs_;
  int64_t env_capacity_;
  std::vector<FieldSpec> fields_;
  // Per field: [num_envs, env_capacity, row_bytes], from calloc: large blocks come as lazily
  // zeroed pages, so a 12 GB pixel buffer costs memory only as it fills.
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::vector<std::unique_ptr<uint8_t, Free>> storage_;
  std::vector<int64_t> storage_bytes_;
  std::vector<int64_t> counts_;
  std::mt19937_64 rng_;
  mutable std::mutex rng_mutex_;  // sample() holds only a shared data lock
  mutable std::shared_mutex mutex_;
};

}  // namespace fastdream

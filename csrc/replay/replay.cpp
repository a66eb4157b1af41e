#include "replay.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace fastdream {

ReplayCore::ReplayCore(int64_t capacity, int64_t num_envs, std::vector<FieldSpec> fields,
                       uint64_t seed)
    : num_envs_(num_envs), fields_(std::move(fields)), counts_(num_envs, 0), rng_(seed) {
  if (num_envs <= 0) throw std::invalid_argument("num_envs must be >= 1");
  if (capacity < num_envs) throw std::invalid_argument("capacity must be >= num_envs");
  env_capacity_ = capacity / num_envs;
  for (const auto& field : fields_) {
    const int64_t bytes = num_envs_ * env_capacity_ * field.row_bytes;
    auto* p = static_cast<uint8_t*>(std::calloc(static_cast<size_t>(bytes), 1));
    if (p == nullptr) throw std::bad_alloc();
    storage_.emplace_back(p);
    storage_bytes_.push_back(bytes);
  }
}

std::vector<int64_t> ReplayCore::counts() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return counts_;
}

void ReplayCore::set_counts(const std::vector<int64_t>& counts) {
  if (static_cast<int64_t>(counts.size()) != num_envs_)
    throw std::invalid_argument("counts length must equal num_envs");
  std::unique_lock<std::shared_mutex> lock(mutex_);
  counts_ = counts;
}

int64_t ReplayCore::size() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  int64_t total = 0;
  for (int64_t c : counts_) total += std::min(c, env_capacity_);
  return total;
}

void ReplayCore::add(const int64_t* env_ids, int64_t n, const std::vector<const uint8_t*>& src) {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = env_ids[i];
    const int64_t slot = counts_[e] % env_capacity_;
    for (size_t f = 0; f < fields_.size(); ++f) {
      const int64_t rb = fields_[f].row_bytes;
      std::memcpy(storage_[f].get() + (e * env_capacity_ + slot) * rb, src[f] + i * rb,
                  static_cast<size_t>(rb));
    }
    counts_[e] += 1;
  }
}

int64_t ReplayCore::num_windows(int64_t seq_len) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  int64_t total = 0;
  for (int64_t c : counts_) total += std::max<int64_t>(0, std::min(c, env_capacity_) - seq_len + 1);
  return total;
}

void ReplayCore::sample(int64_t batch, int64_t seq_len, double recency,
                        const std::vector<uint8_t*>& dst, int64_t* out_env, int64_t* out_start,
                        int num_threads) {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  // Windows per env; a window is seq_len logically consecutive rows that are all still stored.
  std::vector<int64_t> cum(num_envs_ + 1, 0);
  for (int64_t e = 0; e < num_envs_; ++e) {
    const int64_t w = std::max<int64_t>(0, std::min(counts_[e], env_capacity_) - seq_len + 1);
    cum[e + 1] = cum[e] + w;
  }
  const int64_t total = cum[num_envs_];
  if (total <= 0) throw std::invalid_argument("no env stream holds a complete window to sample");
  {
    std::lock_guard<std::mutex> rng_lock(rng_mutex_);
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    for (int64_t b = 0; b < batch; ++b) {
      // Pick a window uniformly over all windows; with probability `recency` re-draw its age
      // within that env from a triangular density 2(1 - x) on x = age / windows, which gives
      // the newest window twice the uniform weight and the oldest none.
      const int64_t k = static_cast<int64_t>(unit(rng_) * static_cast<double>(total));
      const int64_t idx = std::min(k, total - 1);
      const int64_t e = static_cast<int64_t>(std::upper_bound(cum.begin(), cum.end(), idx) - cum.begin()) - 1;
      const int64_t w = cum[e + 1] - cum[e];
      const int64_t oldest = counts_[e] - std::min(counts_[e], env_capacity_);
      int64_t offset = idx - cum[e];  // 0 = oldest window
      if (recency > 0.0 && unit(rng_) < recency) {
        const double x = 1.0 - std::sqrt(1.0 - unit(rng_));
        const int64_t age = std::min(w - 1, static_cast<int64_t>(x * static_cast<double>(w)));
        offset = w - 1 - age;
      }
      out_env[b] = e;
      out_start[b] = oldest + offset;
    }
  }
  auto gather = [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e = out_env[b];
      const int64_t slot = out_start[b] % env_capacity_;
      const int64_t first = std::min(seq_len, env_capacity_ - slot);  // rows before the physical wrap
      for (size_t f = 0; f < fields_.size(); ++f) {
        const int64_t rb = fields_[f].row_bytes;
        const uint8_t* ring = storage_[f].get() + e * env_capacity_ * rb;
        uint8_t* out = dst[f] + b * seq_len * rb;
        std::memcpy(out, ring + slot * rb, static_cast<size_t>(first * rb));
        if (first < seq_len) std::memcpy(out + first * rb, ring, static_cast<size_t>((seq_len - first) * rb));
      }
    }
  };
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, batch)));
  if (threads == 1) {
    gather(0, batch);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t per = (batch + threads - 1) / threads;
  for (int t = 1; t < threads; ++t) {
    const int64_t b0 = t * per, b1 = std::min(batch, b0 + per);
    if (b0 < b1) pool.emplace_back(gather, b0, b1);
  }
  gather(0, std::min(batch, per));
  for (auto& th : pool) th.join();
}

std::string ReplayCore::rng_state() const {
  std::lock_guard<std::mutex> rng_lock(rng_mutex_);
  std::ostringstream os;
  os << rng_;
  return os.str();
}

void ReplayCore::set_rng_state(const std::string& state) {
  std::lock_guard<std::mutex> rng_lock(rng_mutex_);
  std::istringstream is(state);
  std::mt19937_64 tmp;
  is >> tmp;
  if (is.fail()) throw std::invalid_argument("malformed RNG state");
  rng_ = tmp;
}

}  // namespace fastdream

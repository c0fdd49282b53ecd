// kv_pool.cpp — paged KV block manager: free list, reference counts, prefix cache.
#include "serve/kv_pool.h"

#include <cstring>

#include "core/error.h"

namespace moe {

KvPool::KvPool(int64_t n_blocks, int64_t block_size)
    : n_blocks_(n_blocks),
      block_size_(block_size),
      refs_(static_cast<size_t>(n_blocks), 0),
      lru_pos_(static_cast<size_t>(n_blocks)),
      in_lru_(static_cast<size_t>(n_blocks), false) {
  MOE_CHECK(n_blocks > 0 && n_blocks < (int64_t(1) << 31) && block_size > 0,
            "KV pool: %lld blocks of %lld positions", (long long)n_blocks, (long long)block_size);
  free_.reserve(static_cast<size_t>(n_blocks));
  // Lowest block ids first (pop_back takes from the end).
  for (int64_t b = n_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

std::string KvPool::key(int32_t parent, const int32_t* tokens) const {
  std::string k(sizeof(int32_t) * static_cast<size_t>(block_size_ + 1), '\0');
  std::memcpy(k.data(), &parent, sizeof parent);
  std::memcpy(k.data() + sizeof parent, tokens, sizeof(int32_t) * static_cast<size_t>(block_size_));
  return k;
}

void KvPool::ref(int32_t b) {
  if (refs_[static_cast<size_t>(b)]++ == 0) {
    ++in_use_;
    if (in_lru_[static_cast<size_t>(b)]) {
      evictable_.erase(lru_pos_[static_cast<size_t>(b)]);
      in_lru_[static_cast<size_t>(b)] = false;
    }
  }
}

int32_t KvPool::take_block() {
  if (!free_.empty()) {
    int32_t b = free_.back();
    free_.pop_back();
    return b;
  }
  if (evictable_.empty()) return -1;
  // Evict the cached block released longest ago: its content key goes with it.
  int32_t b = evictable_.front();
  evictable_.pop_front();
  in_lru_[static_cast<size_t>(b)] = false;
  auto it = key_of_.find(b);
  if (it != key_of_.end()) {
    block_of_.erase(it->second);
    key_of_.erase(it);
  }
  return b;
}

bool KvPool::grow(std::vector<int32_t>& table, int64_t n_positions) {
  const int64_t need = (n_positions + block_size_ - 1) / block_size_ - static_cast<int64_t>(table.size());
  if (need <= 0) return true;
  if (need > blocks_available()) return false;
  for (int64_t i = 0; i < need; ++i) {
    int32_t b = take_block();
    MOE_CHECK(b >= 0, "KV pool: no block although %lld were available", (long long)blocks_available());
    ref(b);
    table.push_back(b);
  }
  return true;
}

void KvPool::release(std::vector<int32_t>& table) {
  for (int32_t b : table) {
    MOE_CHECK(b >= 0 && b < n_blocks_ && refs_[static_cast<size_t>(b)] > 0, "KV pool: release of unheld block %d", b);
    if (--refs_[static_cast<size_t>(b)] > 0) continue;
    --in_use_;
    if (key_of_.count(b)) {
      lru_pos_[static_cast<size_t>(b)] = evictable_.insert(evictable_.end(), b);
      in_lru_[static_cast<size_t>(b)] = true;
    } else {
      free_.push_back(b);
    }
  }
  table.clear();
}

int64_t KvPool::match_prefix(const std::vector<int32_t>& prompt, std::vector<int32_t>& table) {
  MOE_CHECK(table.empty(), "KV pool: prefix match into a non-empty table");
  if (prompt.empty()) return 0;
  const int64_t max_blocks = (static_cast<int64_t>(prompt.size()) - 1) / block_size_;
  int32_t parent = -1;
  for (int64_t i = 0; i < max_blocks; ++i) {
    auto it = block_of_.find(key(parent, prompt.data() + i * block_size_));
    if (it == block_of_.end()) break;
    ref(it->second);
    table.push_back(it->second);
    parent = it->second;
    ++prefix_hits_;
  }
  return static_cast<int64_t>(table.size()) * block_size_;
}

void KvPool::publish_prefix(const std::vector<int32_t>& prompt, const std::vector<int32_t>& table, int64_t n_filled) {
  const int64_t whole = std::min<int64_t>(n_filled, static_cast<int64_t>(prompt.size())) / block_size_;
  int32_t parent = -1;
  for (int64_t i = 0; i < whole && i < static_cast<int64_t>(table.size()); ++i) {
    const int32_t b = table[static_cast<size_t>(i)];
    if (!key_of_.count(b)) {
      std::string k = key(parent, prompt.data() + i * block_size_);
      if (block_of_.count(k)) break;  // the same content is cached in another block already
      block_of_.emplace(k, b);
      key_of_.emplace(b, std::move(k));
    }
    parent = b;
  }
}

}  // namespace moe

// kv_pool.h — the block manager of a paged KV cache (model.h KVCache, paged mode): which of
// the N blocks of P positions each sequence holds, reference counts, and prefix reuse.
//
// A sequence's block table lists its blocks in position order; a block can be in several
// tables at once (a shared prompt prefix) and is written only by the sequence that allocated
// it. Prefix reuse: once a prompt has been prefilled, each of its *full* blocks is published
// under a key naming its content — the block before it plus its P token ids — so a later
// prompt that starts with the same tokens takes those blocks instead of recomputing them.
// A published block nobody holds stays cached (evictable, least recently released first)
// until a fresh block is needed and the free list is empty.
#pragma once
#include <cstdint>
#include <list>
#include <string>
#include <unordered_map>
#include <vector>

namespace moe {

class KvPool {
 public:
  KvPool(int64_t n_blocks, int64_t block_size);

  int64_t n_blocks() const { return n_blocks_; }
  int64_t block_size() const { return block_size_; }
  // Blocks some sequence holds (a leak check: 0 when no sequence is active).
  int64_t blocks_in_use() const { return in_use_; }
  // Blocks a new sequence could get now: free plus cached-but-unheld (evictable).
  int64_t blocks_available() const { return n_blocks_ - in_use_; }
  int64_t blocks_cached() const { return static_cast<int64_t>(key_of_.size()); }
  int64_t prefix_hits() const { return prefix_hits_; }  // blocks reused, since start

  // Grows `table` so it covers n_positions positions. All or nothing: false (table unchanged)
  // when there are not enough blocks.
  bool grow(std::vector<int32_t>& table, int64_t n_positions);
  // Drops the table's references (blocks nobody holds become free or cached) and clears it.
  void release(std::vector<int32_t>& table);

  // Prefix reuse for a new sequence with an empty table: appends the cached blocks that hold
  // the longest run of whole leading blocks of `prompt`, at most (prompt.size()-1)/P of them
  // (the last prompt token is always computed: its logits start generation). Returns the
  // positions they cover.
  int64_t match_prefix(const std::vector<int32_t>& prompt, std::vector<int32_t>& table);
  // Publishes the whole blocks among the first n_filled positions of `prompt` held in `table`.
  void publish_prefix(const std::vector<int32_t>& prompt, const std::vector<int32_t>& table, int64_t n_filled);

 private:
  std::string key(int32_t parent, const int32_t* tokens) const;
  int32_t take_block();  // a free block, else the least recently released cached one; -1: none
  void ref(int32_t b);

  int64_t n_blocks_, block_size_;
  int64_t in_use_ = 0, prefix_hits_ = 0;
  std::vector<int32_t> refs_;
  std::vector<int32_t> free_;
  std::list<int32_t> evictable_;  // cached, unheld; front = released longest ago
  std::vector<std::list<int32_t>::iterator> lru_pos_;
  std::vector<bool> in_lru_;
  std::unordered_map<std::string, int32_t> block_of_;  // content key -> cached block
  std::unordered_map<int32_t, std::string> key_of_;    // cached block -> its key
};

}  // namespace moe

// data.h — training data: corpus files -> fixed-length token rows, a held-out validation split,
// and a deterministic, resumable batch sampler.
//
// Formats (load_dataset picks one by extension, then by content):
//   .safetensors  pre-tokenized: `input_ids` [N,S] (i32 or i64) and optional `labels` [N,S]
//                 (absent: labels = input_ids). Rows are taken as they are (no packing).
//   .jsonl/.ndjson, or a file whose first non-blank line is a JSON object with a string "text":
//                 JSONL, one object per line with a string field "text"; blank lines are skipped;
//                 any other line is an error naming the file and line number.
//   chat JSONL    (first non-blank line has "messages"): conversations rendered with the chat
//                 template (DataOptions::chat; an error without one), loss on assistant tokens
//                 only (chat_data.h);
//   prompt/completion JSONL (first line has "prompt" and "completion"): loss on the completion.
//                 These two keep their labels through packing; with packing off each example is
//                 one row (cut to seq_len, padded with EOS/0 and ignored labels). A dataset
//                 without one scored token is an error.
//   anything else plain UTF-8 text (one document).
// A file that starts like a safetensors file (8-byte little-endian header length, then '{') is
// read as one whatever its extension.
//
// Tokenizing and packing (text and JSONL): each document is encoded with the tokenizer
// (add_special_tokens = false); JSONL documents are joined with the tokenizer's EOS id between
// them when it has one. With tok == nullptr the byte-level tokenizer (Tokenizer::byte_level({}),
// ids 0..255 = the bytes, no special tokens) is used. The token stream (cut to max_tokens when
// set) is packed into floor(n_tokens / seq_len) rows of seq_len tokens; the tail shorter than a
// row is dropped. Labels of packed rows are the input ids.
//
// Labels follow HF semantics: NOT shifted (the model's output at position t is scored against
// labels[t+1]); kIgnoreLabel (-100) marks positions that are not scored.
//
// Validation split: round(n_rows · val_fraction) rows (at least 1 when val_fraction > 0, and
// always leaving at least one training row) chosen by a permutation of the rows seeded by `seed`;
// both splits keep the file's row order. val_fraction 0 -> val is empty and train = every row
// in file order (the `--no-shuffle` training contract: step i reads rows [i·B, (i+1)·B)).
//
// Errors (moe::Error, naming the file): unreadable file, empty or whitespace-only corpus,
// malformed JSONL (with its 1-based line number), a corpus too small for one row (with the
// token count and seq_len), wrong tensor names/dtypes/shapes in a pre-tokenized file, token ids
// < 0 or >= vocab_size (when given), labels that are neither ignored nor valid ids.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/tensor.h"
#include "train/chat_data.h"

namespace moe {

class Tokenizer;
class ChatTemplate;

constexpr int32_t kIgnoreLabel = -100;

struct DataOptions {
  int64_t seq_len = 0;        // S; text needs > 0; a pre-tokenized file: 0 takes the file's S
  uint64_t seed = 0;          // picks the validation rows
  bool shuffle = true;        // not used by load_dataset; carried for the sampler (BatchSampler)
  double val_fraction = 0.05;  // in [0, 1)
  int64_t max_tokens = 0;     // text: use at most this many tokens (0: all)
  int64_t vocab_size = 0;     // > 0: reject token ids >= vocab_size (naming file, row, column)
  const ChatTemplate* chat = nullptr;  // renders chat JSONL
  bool packing = true;        // chat / prompt-completion: pack examples into rows (else one per row)
};

// n rows of `seq` tokens, row-major: input_ids[r*seq + t].
struct TokenRows {
  int64_t n = 0, seq = 0;
  std::vector<int32_t> input_ids, labels;
};

struct Dataset {
  TokenRows train, val;
  std::string source;    // "text", "jsonl" or "safetensors", then ": PATH"
  int64_t n_tokens = 0;  // tokens in the corpus after tokenization (before dropping the tail);
                         // pre-tokenized: N·S
  int64_t n_documents = 0;  // text: 1; JSONL: non-blank lines; pre-tokenized: N
  ChatStats sft;            // chat / prompt-completion: examples, turns and tokens labeled
};

Dataset load_dataset(const std::string& path, const Tokenizer* tok, const DataOptions& opt);

// Deterministic sampler of training rows. Conceptually an endless stream of row indices: stream
// position j is in epoch j / n_rows; without shuffle it is row j % n_rows, with shuffle it is
// perm(seed, epoch)[j % n_rows], a permutation drawn with moe::Rng from (seed, epoch) alone.
// next() returns the next `batch` indices of the stream (a batch may span two epochs), so with
// shuffle off call i returns rows [i·B, (i+1)·B) modulo n_rows.
// state()/restore() save and restore the stream position: a restored sampler returns exactly the
// batches the original would have returned next.
class BatchSampler {
 public:
  BatchSampler(int64_t n_rows, int64_t batch, uint64_t seed, bool shuffle);
  void next(std::vector<int64_t>* rows);
  int64_t epoch() const { return pos_ / n_rows_; }
  int64_t position() const { return pos_; }  // stream indices consumed so far
  // {"n_rows","batch","seed","shuffle","position"} (seed as a decimal string: JSON numbers are
  // not safe for 64-bit values in other readers).
  nlohmann::json state() const;
  // Throws moe::Error naming the field when the state is malformed or was saved by a sampler of
  // different n_rows, batch, seed or shuffle.
  void restore(const nlohmann::json& state);

 private:
  const std::vector<int64_t>& perm(int64_t epoch);
  int64_t n_rows_, batch_;
  uint64_t seed_;
  bool shuffle_;
  int64_t pos_ = 0;
  int64_t perm_epoch_ = -1;  // epoch whose permutation perm_ holds
  std::vector<int64_t> perm_;
};

// Copies `rows` of `data` into ids and labels, [B,S] i32 CPU tensors (B = rows.size()). They are
// reused when already of that shape and dtype on the CPU, else (re)allocated as Workspace.
void gather_batch(const TokenRows& data, const std::vector<int64_t>& rows, Tensor* ids, Tensor* labels);

}  // namespace moe

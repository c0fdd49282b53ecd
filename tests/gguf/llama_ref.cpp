// llama_ref.cpp — a small driver of llama.cpp's own library (the prebuilt libllama that npm's
// node-llama-cpp ships), the reference for the GGUF tests. Built by tests/gguf/setup.sh against
// the llama.h of the same release (node-llama-cpp's llama/gitRelease.bundle).
//
//   llama_ref run N IDS OUTDIR M1.gguf [M2.gguf ...]
//       for each model i: one line "i: t1 t2 ... tN" (N greedy tokens after the prompt IDS) and
//       OUTDIR/i.f32, the logits of every prompt position ([S, V] f32 raw)
//   llama_ref quantize IN.gguf OUT.gguf FTYPE [OUT2.gguf FTYPE2 ...]
//       llama_model_quantize (FTYPE = LLAMA_FTYPE_*)
//   llama_ref dequant  TYPE IN.bin OUT.f32 N       ggml's to_float for N values of ggml type TYPE
//   llama_ref quant    TYPE IN.f32 OUT.bin ROW     ggml_quantize_chunk (no imatrix), rows of ROW
//   llama_ref bench M.gguf N_PROMPT N_GEN REPS THREADS
//       llama.cpp's own speed on the file, with its default (fast) settings: prefill of N_PROMPT
//       tokens in one batch and N_GEN decode steps, best of REPS; prints "pp N: X tok/s" and
//       "tg N: Y tok/s" (what llama-bench reports as pp/tg)
//   llama_ref tokenize M.gguf STRINGS.bin           the vocabulary alone (vocab_only); STRINGS.bin
//       holds texts separated by NUL bytes; one line "i: id id ..." per text (llama_tokenize with
//       add_special and parse_special, as llama.cpp's own tools tokenize a prompt)
// IDS is a comma-separated list of token ids. Exit status 0 on success, 1 with a message.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "ggml-backend.h"
#include "llama.h"

namespace {

std::vector<llama_token> parse_ids(const char* s) {
  std::vector<llama_token> ids;
  std::string cur;
  for (const char* p = s;; ++p) {
    if (*p == ',' || *p == '\0') {
      if (!cur.empty()) ids.push_back(static_cast<llama_token>(std::atoi(cur.c_str())));
      cur.clear();
      if (*p == '\0') break;
    } else {
      cur += *p;
    }
  }
  return ids;
}

std::vector<char> read_file(const char* path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

bool write_file(const char* path, const void* data, size_t n) {
  FILE* f = std::fopen(path, "wb");
  if (!f) return false;
  const bool ok = std::fwrite(data, 1, n, f) == n;
  return std::fclose(f) == 0 && ok;
}

void quiet_log(ggml_log_level level, const char* text, void*) {
  if (level >= GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
}

struct Session {
  llama_model* model = nullptr;
  llama_context* ctx = nullptr;
  int n_vocab = 0;
  bool open(const char* path, int n_ctx) {
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    model = llama_model_load_from_file(path, mp);
    if (!model) return false;
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = static_cast<uint32_t>(n_ctx);
    cp.n_batch = static_cast<uint32_t>(n_ctx);
    cp.n_ubatch = static_cast<uint32_t>(n_ctx);
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    // f32 KV cache and plain attention: the reference computes in f32 like the engine's CPU path
    // (the default f16 cache alone costs ~3e-4 relative on the logits).
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    ctx = llama_init_from_model(model, cp);
    if (!ctx) return false;
    n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    return true;
  }
  // Decodes ids at positions pos0.. with logits for every position; false on failure.
  bool decode(const std::vector<llama_token>& ids, int pos0) {
    llama_batch b = llama_batch_init(static_cast<int32_t>(ids.size()), 0, 1);
    for (size_t i = 0; i < ids.size(); ++i) {
      b.token[i] = ids[i];
      b.pos[i] = pos0 + static_cast<int32_t>(i);
      b.n_seq_id[i] = 1;
      b.seq_id[i][0] = 0;
      b.logits[i] = 1;
    }
    b.n_tokens = static_cast<int32_t>(ids.size());
    const int rc = llama_decode(ctx, b);
    llama_batch_free(b);
    return rc == 0;
  }
  ~Session() {
    if (ctx) llama_free(ctx);
    if (model) llama_model_free(model);
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: llama_ref logits|greedy|quantize ...\n");
    return 1;
  }
  llama_log_set(quiet_log, nullptr);
  const char* libdir = std::getenv("LLAMA_REF_LIBDIR");
  if (libdir) {
    ggml_backend_load_all_from_path(libdir);
  } else {
    ggml_backend_load_all();
  }
  llama_backend_init();
  const std::string cmd = argv[1];
  if (cmd == "dequant" && argc == 6) {
    const auto type = static_cast<ggml_type>(std::atoi(argv[2]));
    const int64_t n = std::atoll(argv[5]);
    const std::vector<char> in = read_file(argv[3]);
    if (static_cast<int64_t>(in.size()) * ggml_blck_size(type) < n * static_cast<int64_t>(ggml_type_size(type))) {
      std::fprintf(stderr, "llama_ref: %s is too short\n", argv[3]);
      return 1;
    }
    std::vector<float> out(static_cast<size_t>(n));
    ggml_get_type_traits(type)->to_float(in.data(), out.data(), n);
    return write_file(argv[4], out.data(), out.size() * 4) ? 0 : 1;
  }
  if (cmd == "bench" && argc == 7) {
    const int n_prompt = std::atoi(argv[3]), n_gen = std::atoi(argv[4]), reps = std::atoi(argv[5]);
    const int threads = std::atoi(argv[6]);
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.progress_callback = [](float, void*) { return true; };  // no progress dots
    llama_model* model = llama_model_load_from_file(argv[2], mp);
    if (!model || n_prompt < 1 || n_gen < 1 || reps < 1 || threads < 1) return 1;
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = static_cast<uint32_t>(n_prompt + n_gen + 8);
    cp.n_batch = cp.n_ubatch = static_cast<uint32_t>(n_prompt);
    cp.n_threads = cp.n_threads_batch = threads;
    llama_context* ctx = llama_init_from_model(model, cp);
    if (!ctx) return 1;
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    std::vector<llama_token> prompt(static_cast<size_t>(n_prompt));
    for (int i = 0; i < n_prompt; ++i) prompt[static_cast<size_t>(i)] = (i * 7919 + 13) % n_vocab;
    double best_pp = 1e30, best_tg = 1e30;
    for (int r = 0; r < reps; ++r) {
      llama_memory_clear(llama_get_memory(ctx), true);
      auto t0 = std::chrono::steady_clock::now();
      if (llama_decode(ctx, llama_batch_get_one(prompt.data(), n_prompt)) != 0) return 1;
      llama_synchronize(ctx);
      auto t1 = std::chrono::steady_clock::now();
      best_pp = std::min(best_pp, std::chrono::duration<double>(t1 - t0).count());
      llama_token tok = prompt.back();
      t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < n_gen; ++i) {
        if (llama_decode(ctx, llama_batch_get_one(&tok, 1)) != 0) return 1;
        llama_synchronize(ctx);
        tok = (tok * 31 + 7) % n_vocab;
      }
      t1 = std::chrono::steady_clock::now();
      best_tg = std::min(best_tg, std::chrono::duration<double>(t1 - t0).count());
    }
    std::printf("pp %d: %.2f tok/s\ntg %d: %.2f tok/s\n", n_prompt, n_prompt / best_pp, n_gen, n_gen / best_tg);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
  }
  if (cmd == "tokenize" && argc == 4) {
    llama_model_params mp = llama_model_default_params();
    mp.vocab_only = true;
    llama_model* model = llama_model_load_from_file(argv[2], mp);
    if (!model) {
      std::fprintf(stderr, "llama_ref: cannot load the vocabulary of %s\n", argv[2]);
      return 1;
    }
    const llama_vocab* vocab = llama_model_get_vocab(model);
    const std::vector<char> in = read_file(argv[3]);
    size_t start = 0;
    int index = 0;
    std::vector<llama_token> ids;
    for (size_t i = 0; i <= in.size(); ++i) {
      if (i < in.size() && in[i] != '\0') continue;
      if (i == in.size() && start == i) break;
      const int32_t len = static_cast<int32_t>(i - start);
      ids.resize(static_cast<size_t>(len) + 8);
      int32_t n = llama_tokenize(vocab, in.data() + start, len, ids.data(), static_cast<int32_t>(ids.size()), true, true);
      if (n < 0) {
        ids.resize(static_cast<size_t>(-n));
        n = llama_tokenize(vocab, in.data() + start, len, ids.data(), static_cast<int32_t>(ids.size()), true, true);
      }
      std::printf("%d:", index++);
      for (int32_t k = 0; k < n; ++k) std::printf(" %d", ids[static_cast<size_t>(k)]);
      std::printf("\n");
      start = i + 1;
    }
    llama_model_free(model);
    return 0;
  }
  if (cmd == "quant" && argc == 6) {
    const auto type = static_cast<ggml_type>(std::atoi(argv[2]));
    const int64_t row = std::atoll(argv[5]);
    const std::vector<char> in = read_file(argv[3]);
    const int64_t n = static_cast<int64_t>(in.size() / 4);
    if (row <= 0 || n % row != 0) return 1;
    std::vector<char> out(ggml_row_size(type, row) * static_cast<size_t>(n / row));
    ggml_quantize_chunk(type, reinterpret_cast<const float*>(in.data()), out.data(), 0, n / row, row, nullptr);
    return write_file(argv[4], out.data(), out.size()) ? 0 : 1;
  }
  if (cmd == "quantize" && argc >= 5 && (argc - 3) % 2 == 0) {
    for (int k = 3; k + 1 < argc; k += 2) {
      llama_model_quantize_params qp = llama_model_quantize_default_params();
      qp.nthread = 2;
      qp.ftype = static_cast<llama_ftype>(std::atoi(argv[k + 1]));
      if (llama_model_quantize(argv[2], argv[k], &qp) != 0) {
        std::fprintf(stderr, "llama_ref: llama_model_quantize to %s failed\n", argv[k]);
        return 1;
      }
    }
    return 0;
  }
  if (cmd == "run" && argc >= 6) {
    const int n = std::atoi(argv[2]);
    const std::vector<llama_token> prompt = parse_ids(argv[3]);
    const std::string outdir = argv[4];
    for (int m = 5; m < argc; ++m) {
      const int i = m - 5;
      Session s;
      if (!s.open(argv[m], 64)) {
        std::fprintf(stderr, "llama_ref: cannot load %s\n", argv[m]);
        return 1;
      }
      std::vector<llama_token> step = prompt;
      std::printf("%d:", i);
      int pos = 0;
      for (int k = 0; k < n; ++k) {
        if (!s.decode(step, pos)) {
          std::fprintf(stderr, "llama_ref: llama_decode failed on %s\n", argv[m]);
          return 1;
        }
        if (k == 0) {
          std::vector<float> all;
          for (size_t j = 0; j < prompt.size(); ++j) {
            const float* l = llama_get_logits_ith(s.ctx, static_cast<int32_t>(j));
            all.insert(all.end(), l, l + s.n_vocab);
          }
          const std::string path = outdir + "/" + std::to_string(i) + ".f32";
          if (!write_file(path.c_str(), all.data(), all.size() * 4)) return 1;
        }
        pos += static_cast<int>(step.size());
        const float* l = llama_get_logits_ith(s.ctx, -1);
        int best = 0;
        for (int v = 1; v < s.n_vocab; ++v)
          if (l[v] > l[best]) best = v;
        std::printf(" %d", best);
        step.assign(1, best);
      }
      std::printf("\n");
    }
    return 0;
  }
  std::fprintf(stderr, "llama_ref: bad arguments\n");
  return 1;
}

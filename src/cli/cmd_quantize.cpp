// cmd_quantize.cpp — `moe quantize MODEL_DIR --type T --out FILE.gguf`: a HF model directory
// (config.json + safetensors) to a GGUF file llama.cpp loads, as f32/f16/bf16 or quantised
// (q8_0, q4_0, q4_k_m, q5_k_m, q6_k; see io/gguf_model.h for the per-tensor mix). Progress goes
// to stderr, one line per tensor; the summary (tensors per type, bytes, time) to stdout. The
// directory's tokenizer and chat template go into the file too (tokenizer/gguf_vocab.h).
#include <cstdio>
#include <optional>
#include <sys/stat.h>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/gguf_summary.h"
#include "core/error.h"
#include "io/gguf.h"
#include "io/gguf_model.h"
#include "io/hf_config.h"
#include "tokenizer/gguf_vocab.h"

namespace moe {

void add_quantize_command(CLI::App& app) {
  struct Opts {
    std::string dir, type = "q8_0", out, name;
    bool quiet = false, no_tokenizer = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand("quantize", "Write a HF model directory as a GGUF file (llama.cpp's format), optionally quantised");
  cmd->add_option("model", o->dir, "model directory (config.json + safetensors)")->required();
  cmd->add_option("--type", o->type, "f32|f16|bf16|q8_0|q4_0|q4_k_m|q5_k_m|q6_k")->capture_default_str();
  cmd->add_option("--out", o->out, "output .gguf file")->required();
  cmd->add_option("--name", o->name, "general.name (default: the directory's name)");
  cmd->add_flag("--quiet", o->quiet, "no per-tensor progress");
  cmd->add_flag("--no-tokenizer", o->no_tokenizer, "leave the tokenizer out (tokenizer.ggml.model \"none\")");
  cmd->callback([o] {
    GgufWriteOptions opt;
    MOE_CHECK(gguf_file_type_from_name(o->type, &opt.type),
              "--type '%s' is not one of f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k", o->type.c_str());
    opt.name = o->name;
    // The directory's tokenizer goes into the file (llama.cpp's tokenizer.ggml.* keys) when it
    // can be written so that llama.cpp tokenizes as the engine does; else the file says "none".
    std::optional<GgufVocab> vocab;
    if (!o->no_tokenizer) {
      std::string why;
      vocab = gguf_vocab_from_dir(o->dir, load_hf_config(o->dir + "/config.json").vocab_size, &why);
      if (vocab) {
        opt.vocab = &*vocab;
        std::printf("tokenizer: %s%s%s, %zu tokens%s\n", vocab->model.c_str(), vocab->pre.empty() ? "" : " / ",
                    vocab->pre.c_str(), vocab->tokens.size(), vocab->chat_template.empty() ? "" : ", chat template");
      } else {
        std::printf("tokenizer: not written (%s); run the file with --tokenizer DIR\n", why.c_str());
      }
    }
    const double t0 = now_seconds();
    if (!o->quiet) {
      opt.progress = [](size_t i, size_t n, const std::string& name, GgmlType t) {
        std::fprintf(stderr, "[%zu/%zu] %-32s %s\n", i + 1, n, name.c_str(), ggml_type_name(t));
      };
    }
    write_gguf(o->dir, o->out, opt);
    const double secs = now_seconds() - t0;

    // Summary from the file as written (re-read through the validating reader).
    auto f = GgufFile::open(o->out);
    struct stat st{};
    ::stat(o->out.c_str(), &st);
    std::printf("wrote %s: %s, %zu tensors, file %.1f MiB, %.2f s\n", o->out.c_str(), gguf_file_type_name(opt.type),
                f->tensors().size(), static_cast<double>(st.st_size) / 1048576.0, secs);
    const GgufTensorTotals t = print_gguf_tensor_types(*f);
    std::printf("%lld parameters, %.1f MiB of tensor data (%.3f bits/parameter)\n", static_cast<long long>(t.params),
                t.bytes / 1048576.0, t.bits_per_param());
  });
}

}  // namespace moe

// cmd_quantize.cpp — `moe quantize MODEL_DIR --type T --out FILE.gguf`: a HF model directory
// (config.json + safetensors) to a GGUF file llama.cpp loads, as f32/f16/bf16 or quantised
// (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_m, q5_k_m, q6_k; see io/gguf_model.h for the per-tensor mix); with --type nf4,
// to a bitsandbytes 4-bit model directory instead (io/bnb_checkpoint.h). Progress goes
// to stderr, one line per tensor; the summary (tensors per type, bytes, time) to stdout. The
// directory's tokenizer and chat template go into the file too (tokenizer/gguf_vocab.h).
#include <cstdio>
#include <optional>
#include <sys/stat.h>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/gguf_summary.h"
#include "core/error.h"
#include "core/memory.h"
#include "io/bnb_checkpoint.h"
#include "io/gguf.h"
#include "io/gguf_model.h"
#include "io/hf_config.h"
#include "tokenizer/gguf_vocab.h"

namespace moe {

void add_quantize_command(CLI::App& app) {
  struct Opts {
    std::string dir, type = "q8_0", out, name;
    bool quiet = false, no_tokenizer = false, no_double_quant = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand("quantize", "Write a HF model directory as a GGUF file (llama.cpp's format), optionally quantised");
  cmd->add_option("model", o->dir, "model directory (config.json + safetensors)")->required();
  cmd->add_option("--type", o->type, "f32|f16|bf16|q8_0|q4_0|q4_1|q5_0|q5_1|q4_k_m|q5_k_m|q6_k (GGUF), or nf4 (a bitsandbytes 4-bit "
                  "model directory, as transformers saves load_in_4bit models)")->capture_default_str();
  cmd->add_option("--out", o->out, "output .gguf file (nf4: a new directory)")->required();
  cmd->add_option("--name", o->name, "general.name (default: the directory's name)");
  cmd->add_flag("--quiet", o->quiet, "no per-tensor progress");
  cmd->add_flag("--no-tokenizer", o->no_tokenizer, "leave the tokenizer out (tokenizer.ggml.model \"none\")");
  cmd->add_flag("--no-double-quant", o->no_double_quant,
                "nf4: keep the block absmax values f32 (0.5 bits/weight) instead of 8-bit codes (0.127)");
  cmd->callback([o] {
    if (o->type == "nf4") {
      const double t0 = now_seconds();
      std::function<void(size_t, size_t, const std::string&)> progress;
      if (!o->quiet)
        progress = [](size_t i, size_t n, const std::string& name) {
          std::fprintf(stderr, "[%zu/%zu] %-48s nf4\n", i + 1, n, name.c_str());
        };
      const Bnb4DirStats st = write_bnb4_dir(o->dir, o->out, !o->no_double_quant, progress);
      std::printf("wrote %s: bitsandbytes nf4%s, %zu weights quantized (%s -> %s, %.3f bits/weight), %zu tensors "
                  "kept, %s of tensors in all, %.2f s\n",
                  o->out.c_str(), o->no_double_quant ? "" : " with double quantization", st.quantized,
                  human_bytes(double(st.bytes_before)).c_str(), human_bytes(double(st.bytes_after)).c_str(),
                  8.0 * double(st.bytes_after) / double(st.quantized_params),
                  st.kept, human_bytes(double(st.bytes_total)).c_str(), now_seconds() - t0);
      return;
    }
    GgufWriteOptions opt;
    MOE_CHECK(gguf_file_type_from_name(o->type, &opt.type),
              "--type '%s' is not one of f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_m, q5_k_m, q6_k, nf4", o->type.c_str());
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

// cmd_model.cpp — `moe init`, `moe inspect`, `moe logits`, `moe generate`.
#include <cstdio>
#include <fstream>
#include <filesystem>
#include <map>
#include <memory>
#include <sstream>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/gguf_summary.h"
#include "train/distributed.h"
#include "io/bnb_checkpoint.h"
#include "io/safetensors.h"
#include "tokenizer/gguf_vocab.h"
#include "model/random_init.h"
#include "ops/cpu/cpu_quant_gemm.h"
#include "plan/plan_model.h"
#include "plan/planner.h"
#include "ops/ops.h"
#include "serve/engine.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace moe {
namespace {

std::vector<int32_t> parse_ids(const std::string& s) {
  std::vector<int32_t> ids;
  std::stringstream ss(s);
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    MOE_CHECK(!tok.empty(), "--ids: empty entry in '%s'", s.c_str());
    char* end = nullptr;
    long v = std::strtol(tok.c_str(), &end, 10);
    MOE_CHECK(end && *end == 0 && v >= 0 && v <= INT32_MAX, "--ids: '%s' is not a token id", tok.c_str());
    ids.push_back(static_cast<int32_t>(v));
  }
  MOE_CHECK(!ids.empty(), "--ids: no token ids given");
  return ids;
}

}  // namespace

void add_init_command(CLI::App& app) {
  struct Opts {
    std::string arch = "mixtral", preset = "tiny", out, dtype = "auto", tokenizer;
    uint64_t seed = 1;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand("init", "write a random model in HF format (config.json + model.safetensors)");
  cmd->add_option("--arch", o->arch, "mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, deepseek_v2 or deepseek_v3")->capture_default_str();
  cmd->add_option("--preset", o->preset, "tiny, small, medium (~1B) or 8x7b")->capture_default_str();
  cmd->add_option("--seed", o->seed, "random seed")->capture_default_str();
  cmd->add_option("--dtype", o->dtype, "auto (f32 for tiny/small, bf16 for larger), f32 or bf16")
      ->check(CLI::IsMember({"auto", "f32", "bf16"}));
  cmd->add_option("--out", o->out, "output directory")->required();
  cmd->add_option("--tokenizer", o->tokenizer,
                  "copy tokenizer.json/tokenizer_config.json from this directory and size the vocabulary to it; "
                  "'byte' writes a byte-level tokenizer (256 bytes + <|endoftext|>) for training from scratch");
  cmd->callback([o]() {
    ModelConfig cfg = preset_config(o->arch, o->preset);
    const bool byte_level = o->tokenizer == "byte";
    if (byte_level) {
      cfg.vocab_size = 257;
      cfg.bos_token_id = -1;
      cfg.eos_token_id = 256;
    } else if (!o->tokenizer.empty()) {
      Tokenizer tok = Tokenizer::from_dir(o->tokenizer);
      cfg.vocab_size = tok.vocab_size();
      if (tok.bos_id()) cfg.bos_token_id = *tok.bos_id();
      if (tok.eos_id()) cfg.eos_token_id = *tok.eos_id();
    }
    if (o->dtype != "auto") dtype_from_name(o->dtype, &cfg.torch_dtype);
    double t0 = now_seconds();
    auto tensors = random_weights(cfg, o->seed, cfg.torch_dtype);
    int64_t n = 0;
    for (auto& [name, t] : tensors) n += t.numel();
    std::printf("generated %s parameters (%s) in %.1f s\n", with_commas(n).c_str(), dtype_name(cfg.torch_dtype),
                now_seconds() - t0);
    write_model_dir(o->out, cfg, tensors);
    std::printf("wrote %s/config.json and %s/model.safetensors\n", o->out.c_str(), o->out.c_str());
    if (byte_level) {
      std::ofstream f(o->out + "/tokenizer.json");
      f << Tokenizer::byte_level_json({"<|endoftext|>"}).dump(1) << "\n";
      MOE_CHECK(f.good(), "cannot write %s/tokenizer.json", o->out.c_str());
      std::printf("wrote %s/tokenizer.json (byte-level)\n", o->out.c_str());
    }
    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja"}) {
      if (byte_level) break;
      std::error_code ec;
      const std::string src = o->tokenizer + "/" + f;
      if (o->tokenizer.empty() || !std::filesystem::exists(src)) continue;
      std::filesystem::copy_file(src, o->out + "/" + f, std::filesystem::copy_options::overwrite_existing, ec);
      MOE_CHECK(!ec, "cannot copy %s: %s", src.c_str(), ec.message().c_str());
      std::printf("copied %s\n", f);
    }
  });
}

void add_inspect_command(CLI::App& app) {
  auto dir = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand("inspect", "describe a model directory or .gguf file: architecture, parameters, memory");
  cmd->add_option("dir", *dir, "model directory (config.json + safetensors) or .gguf file")->required();
  cmd->callback([dir]() {
    if (is_gguf_path(*dir)) return inspect_gguf(*dir);
    ModelConfig c = load_hf_config(*dir + "/config.json");
    Checkpoint ck = Checkpoint::open_dir(*dir);
    const ArchSpec& a = arch_spec(c.model_type);
    int64_t total = 0, experts = 0, embed = 0;
    int64_t bnb4 = 0;
    for (auto& [name, shape] : expected_tensors(c)) {
      MOE_CHECK(ck.has(name), "%s: missing tensor '%s'", dir->c_str(), name.c_str());
      // A bitsandbytes 4-bit weight is stored packed: its shape is the decoded one.
      const bool packed = is_bnb4_weight(ck, name);
      bnb4 += packed;
      const Shape stored = packed ? read_bnb4_weight(ck, name).shape() : ck.info(name).shape;
      MOE_CHECK(stored == shape, "%s: tensor '%s' has shape %s, config implies %s", dir->c_str(),
                name.c_str(), shape_str(stored).c_str(), shape_str(shape).c_str());
      int64_t n = shape_numel(shape);
      total += n;
      if (name.find(".experts.") != std::string::npos) experts += n;
      if (name.find("embed_tokens") != std::string::npos || name.find("lm_head") != std::string::npos) embed += n;
    }
    int64_t moe_layers = 0;
    for (int64_t l = 0; l < c.n_layer; ++l) moe_layers += c.layer_is_moe(l);
    int64_t active_experts = moe_layers * c.n_expert_used * 3 * c.moe_intermediate_size * c.hidden_size;
    int64_t active = total - experts + active_experts;
    std::map<DType, size_t> bytes;
    for (auto& n : ck.names()) bytes[ck.info(n).dtype] += ck.info(n).end - ck.info(n).begin;

    std::printf("model            %s (%s)\n", dir->c_str(), a.hf_architecture);
    std::printf("architecture     %s: %lld layers (%lld MoE), hidden %lld, heads %lld (kv %lld, head_dim %lld)\n",
                c.model_type.c_str(), (long long)c.n_layer, (long long)moe_layers, (long long)c.hidden_size,
                (long long)c.n_head, (long long)c.n_head_kv, (long long)c.head_dim);
    std::printf("experts          %lld per MoE layer, top-%lld%s, expert ffn %lld", (long long)c.n_expert,
                (long long)c.n_expert_used, c.norm_topk_prob ? " (renormalised)" : "",
                (long long)c.moe_intermediate_size);
    if (c.shared_expert_intermediate_size) std::printf(", shared expert %lld", (long long)c.shared_expert_intermediate_size);
    std::printf("\nvocab            %lld%s\n", (long long)c.vocab_size, c.tie_word_embeddings ? " (tied embeddings)" : "");
    std::printf("parameters       total %s, active per token %s (embedding + LM head %s)\n",
                with_commas(total).c_str(), with_commas(active).c_str(), with_commas(embed).c_str());
    for (auto& [dt, b] : bytes) std::printf("bytes (%-4s)     %s\n", dtype_name(dt), human_bytes(double(b)).c_str());
    if (bnb4) std::printf("quantization     bitsandbytes nf4: %lld weights (loaded as NF4 blocks)\n", (long long)bnb4);
    // Inference memory as the planner predicts it for this engine (f32 compute on the CPU,
    // weights as stored, batch 1, 4096 positions of KV cache, prefill chunks of 512).
    size_t weight_bytes = 0;
    for (auto& [dt, b] : bytes) weight_bytes += b;
    JobSpec job;
    job.weights = bytes.count(DType::F32) && bytes[DType::F32] * 2 > weight_bytes ? WeightFormat::F32 : WeightFormat::BF16;
    job.act_bytes = 4;
    job.seq = 512;
    job.context = 4096;
    MemoryPlan mp = plan_memory(plan_model_from_config(c), job, Parallel{});
    std::printf("memory estimate  CPU inference, batch 1, 4096-token KV cache, prefill chunks of 512 (moe plan %s "
                "for more):\n", dir->c_str());
    std::printf("                 weights %s, kv-cache %s, activations %s: total %s\n",
                human_bytes(double(mp.weights)).c_str(), human_bytes(double(mp.kv_cache)).c_str(),
                human_bytes(double(mp.activations)).c_str(),
                human_bytes(double(mp.weights + mp.kv_cache + mp.activations)).c_str());
  });
}

void add_logits_command(CLI::App& app) {
  struct Opts {
    std::string dir, input, out, weights = "none";
    bool fast = false;
    DeviceFlags dev;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand("logits", "full forward pass: input_ids -> logits and router logits");
  cmd->add_option("dir", o->dir, "model directory (HF) or .gguf file")->required();
  cmd->add_option("--input", o->input, "safetensors file with input_ids [B,S] (i32 or i64)")->required();
  cmd->add_option("--out", o->out, "output safetensors: logits [B,S,V] f32, router_logits.<layer> [B*S,E] f32")
      ->required();
  cmd->add_flag("--fast", o->fast,
                "quantized weights: generate's kernels (activations rounded to int8, as llama.cpp) instead of the "
                "exact product with the dequantized blocks");
  add_device_flags(cmd, &o->dev);
  add_weights_flag(cmd, &o->weights);
  cmd->callback([o]() {
    auto in = SafetensorsFile::open(o->input);
    MOE_CHECK(in->find("input_ids") != nullptr, "%s: no tensor 'input_ids'", o->input.c_str());
    Tensor ids = in->tensor("input_ids", MemCategory::Activations);
    MOE_CHECK(ids.ndim() == 2 && (ids.dtype() == DType::I32 || ids.dtype() == DType::I64),
              "%s: input_ids must be [B,S] i32 or i64, got %s", o->input.c_str(), ids.desc().c_str());
    // Quantized weights: the exact product with the dequantized blocks (the reference-test
    // contract) unless --fast asks for generate's kernels, which round activations to int8.
    cpu::set_quant_exact(!o->fast);
    Model m = load_model_arg(o->dir, o->dev, o->weights);
    KVCache kv = m.make_cache(ids.dim(0), ids.dim(1));
    ForwardOptions fo;
    fo.want_router_logits = true;
    ForwardResult r = m.forward(ids, kv, fo);
    std::vector<std::pair<std::string, Tensor>> outs;
    outs.emplace_back("logits", r.logits.to(Device::CPU, MemCategory::Activations));
    for (size_t l = 0; l < r.router_logits.size(); ++l)
      if (r.router_logits[l].defined())
        outs.emplace_back("router_logits." + std::to_string(l), r.router_logits[l].to(Device::CPU, MemCategory::Activations));
    write_safetensors(o->out, outs);
    std::printf("wrote %s: logits %s and %zu router_logits\n", o->out.c_str(), r.logits.shape_str().c_str(),
                outs.size() - 1);
  });
}

void add_generate_command(CLI::App& app) {
  struct Opts {
    std::string dir, ids, prompt, chat, system, weights = "none", adapter, panels = "on";
    int64_t max_new = 32, top_k = 0;
    float temperature = 0.0f, top_p = 1.0f;
    uint64_t seed = 1;
    DeviceFlags dev;
    int ep = 0;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand("generate", "generate tokens with a KV cache");
  cmd->add_option("dir", o->dir, "model directory (HF), or a .gguf file")->required();
  auto* ids_opt = cmd->add_option("--ids", o->ids, "prompt token ids, comma-separated (e.g. 1,2,3)");
  auto* prompt_opt = cmd->add_option("--prompt", o->prompt, "prompt text (needs tokenizer.json in the model directory)");
  auto* chat_opt = cmd->add_option("--chat", o->chat, "a user message, rendered with the model's chat template");
  cmd->add_option("--system", o->system, "with --chat: a system message");
  ids_opt->excludes(prompt_opt)->excludes(chat_opt);
  prompt_opt->excludes(chat_opt);
  cmd->add_option("--max-new-tokens", o->max_new, "tokens to generate")->capture_default_str()->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--temperature", o->temperature, "0 = greedy")->capture_default_str()->check(CLI::Range(0.0, 100.0));
  cmd->add_option("--top-k", o->top_k, "sample from the k most likely (0 = all)")->capture_default_str();
  cmd->add_option("--top-p", o->top_p, "nucleus sampling mass")->capture_default_str()->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--seed", o->seed, "sampling seed")->capture_default_str();
  cmd->add_option("--adapter", o->adapter, "a PEFT LoRA adapter directory, merged into the weights at load (CPU)");
  add_device_flags(cmd, &o->dev);
  add_weights_flag(cmd, &o->weights);
  add_panels_flag(cmd, &o->panels);
  cmd->add_option("--ep", o->ep,
                  "under mpirun: spread the routed experts over this many ranks (default: all of them); every rank "
                  "runs the same tokens, rank 0 prints");
  cmd->callback([o]() {
    MOE_CHECK(!o->ids.empty() || !o->prompt.empty() || !o->chat.empty(), "give one of --ids, --prompt or --chat");
    const std::unique_ptr<dist::Parallel> par = dist::make_parallel(o->ep, 1);
    if (par->rank() != 0 && !std::freopen("/dev/null", "w", stdout)) MOE_FAIL("cannot silence rank %d", par->rank());
    std::unique_ptr<Tokenizer> tok;
    std::vector<int32_t> prompt;
    if (!o->ids.empty()) {
      prompt = parse_ids(o->ids);
      // With a tokenizer in the model directory the generated text is shown too.
      if (std::filesystem::exists(o->dir + "/tokenizer.json") || std::filesystem::exists(o->dir + "/tokenizer.model") ||
          (is_gguf_path(o->dir) && gguf_has_vocab(o->dir)))
        tok = std::make_unique<Tokenizer>(Tokenizer::from_dir(o->dir));
    } else {
      tok = std::make_unique<Tokenizer>(Tokenizer::from_dir(o->dir));
      if (!o->prompt.empty()) {
        prompt = tok->encode(o->prompt);
      } else {
        nlohmann::ordered_json messages = nlohmann::ordered_json::array();
        if (!o->system.empty()) messages.push_back({{"role", "system"}, {"content", o->system}});
        messages.push_back({{"role", "user"}, {"content", o->chat}});
        // As transformers' apply_chat_template: the template writes any BOS itself.
        prompt = tok->encode(ChatTemplate::from_dir(o->dir).apply(messages, true), false);
      }
      MOE_CHECK(!prompt.empty(), "the prompt encodes to no tokens");
    }
    double t_load = now_seconds();
    Model m = load_model_arg(o->dir, o->dev, o->weights);
    if (!o->adapter.empty()) apply_adapter(m, o->adapter);
    if (par->ep > 1) {
      MOE_CHECK(o->dev.device == "cpu" || o->dev.device.empty(), "--ep: expert-parallel generation runs on the CPU");
      shard_experts(m.config(), m.mutable_weights(), *par);
      m.set_expert_parallel(par->ep_group.get());
    }
    apply_panels_flag(m, o->panels, "generate");
    t_load = now_seconds() - t_load;
    const ModelConfig& c = m.config();
    for (int32_t id : prompt)
      MOE_CHECK(id < c.vocab_size, "--ids: token %d out of range (vocab %lld)", id, (long long)c.vocab_size);
    const int64_t n_prompt = static_cast<int64_t>(prompt.size());
    // The serving engine with one sequence: the prompt in one prefill, then decode steps.
    EngineOptions eo;
    eo.max_batch = 1;
    eo.max_context = n_prompt + o->max_new;
    eo.prefill_chunk = n_prompt;
    Engine engine(m, tok.get(), eo);
    GenRequest req;
    req.prompt = prompt;
    req.sampling = SamplingParams{o->temperature, o->top_k, o->top_p};
    req.seed = o->seed;
    req.max_tokens = o->max_new;
    std::vector<int32_t> out;
    out.reserve(static_cast<size_t>(o->max_new));
    double t0 = now_seconds(), t1 = 0;
    GenCallbacks cb;
    cb.on_token = [&](const GenToken& g) {
      if (out.empty()) t1 = now_seconds();
      out.push_back(g.id);
      if (tok) {
        std::printf("%s", g.text.c_str());
        std::fflush(stdout);
      }
    };
    cb.on_finish = [&](FinishReason, const std::string& tail) {
      if (tok) std::printf("%s\n", tail.c_str());
    };
    engine.submit(req, cb);
    engine.run_until_idle();
    const double t_prefill = t1 - t0;
    double t_decode = now_seconds() - t1;
    std::printf("prompt:");
    for (int32_t id : prompt) std::printf(" %d", id);
    std::printf("\ngenerated:");
    for (int32_t id : out) std::printf(" %d", id);
    std::printf("\n");
    int64_t n_dec = static_cast<int64_t>(out.size()) - 1;
    if (o->weights != "none") std::printf("weights %s (kernels %s)\n", o->weights.c_str(), cpu::quant_isa_name(cpu::quant_isa()));
    std::printf("load %.2f s | prefill %lld tokens in %.3f s (%.1f tokens/s) | decode %lld tokens in %.3f s (%.1f tokens/s)\n",
                t_load, (long long)n_prompt, t_prefill, double(n_prompt) / t_prefill, (long long)n_dec, t_decode,
                n_dec > 0 ? double(n_dec) / t_decode : 0.0);
    std::printf("kv cache %lld bytes/token%s\n", (long long)m.kv_bytes_per_token(),
                m.config().is_mla() ? " (MLA latent: kv_lora_rank + qk_rope_head_dim per layer)" : "");
    std::printf("%s", mem_report().c_str());
  });
}

}  // namespace moe

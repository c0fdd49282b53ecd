// trainer.cpp — the training loop (see trainer.h).
#include "train/trainer.h"

#include <chrono>
#include <csignal>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include "core/file_util.h"
#include "core/json_util.h"
#include "core/memory.h"
#include "core/rng.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/arch.h"
#include "model/model_train.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/distributed.h"

namespace moe {
namespace fs = std::filesystem;

namespace {

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

std::string fmt_duration(double s) {
  char buf[32];
  if (!std::isfinite(s) || s < 0) return "?";
  const long t = static_cast<long>(s + 0.5);
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t / 60) % 60);
  else if (t >= 60) std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%lds", t);
  return buf;
}

// Balance figures of one layer's expert loads: coefficient of variation and max/mean.
void balance(const std::vector<double>& load, double* cv, double* max_mean) {
  double mean = 0, mx = 0;
  for (double v : load) {
    mean += v;
    mx = std::max(mx, v);
  }
  mean /= double(load.size());
  double var = 0;
  for (double v : load) var += (v - mean) * (v - mean);
  var /= double(load.size());
  *cv = mean > 0 ? std::sqrt(var) / mean : 0.0;
  *max_mean = mean > 0 ? mx / mean : 0.0;
}

// Model parameters as [name, shape] pairs: a fingerprint stored in checkpoints so that a resume
// with another model is refused. Every expert is listed, also when this rank holds a slice.
nlohmann::json param_fingerprint(const Model& m) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& [name, shape] : all_parameter_shapes(m.config(), m.weights(), true)) out.push_back({name, shape});
  return out;
}

bool has_tokenizer(const std::string& dir) {
  return is_regular_file(dir + "/tokenizer.json") || is_regular_file(dir + "/tokenizer.model");
}

// Mean loss over (up to) max_batches validation batches of B rows, forward only.
// Every rank takes its rows of each batch (lo.batch makes the loss the global mean).
double validation_loss(Model& m, const TokenRows& val, int64_t batch, int64_t max_batches, const LossOptions& lo,
                       const dist::Parallel& par) {
  if (val.n == 0) return NAN;
  set_lora_dropout(m.mutable_weights(), 0.0f, 0);  // evaluation: no dropout (the next step sets it again)
  double sum = 0;
  int64_t n = 0;
  Tensor ids, labels;
  std::vector<int64_t> rows;
  for (int64_t r0 = 0; r0 < val.n && (max_batches == 0 || n < max_batches); r0 += batch, ++n) {
    rows.clear();
    for (int64_t r = r0; r < std::min(val.n, r0 + batch); ++r) rows.push_back(r);
    gather_batch(val, rows, &ids, &labels);
    if (par.distributed()) {
      ids = local_batch(ids, par);
      labels = local_batch(labels, par);
    }
    sum += forward_backward(m, ids, labels, nullptr, lo).loss_ce;
  }
  return sum / double(n);
}

}  // namespace

void apply_train_json(const nlohmann::json& j, const std::string& what, TrainConfig* c) {
  MOE_CHECK(j.is_object(), "%s: expected a JSON object of training options", what.c_str());
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const nlohmann::json& v = it.value();
    auto num = [&]() {
      MOE_CHECK(v.is_number(), "%s: option '%s' must be a number", what.c_str(), k.c_str());
      return v.get<double>();
    };
    auto integer = [&]() {
      MOE_CHECK(v.is_number_integer(), "%s: option '%s' must be an integer", what.c_str(), k.c_str());
      return v.get<int64_t>();
    };
    auto boolean = [&]() {
      MOE_CHECK(v.is_boolean(), "%s: option '%s' must be true or false", what.c_str(), k.c_str());
      return v.get<bool>();
    };
    auto str = [&]() {
      MOE_CHECK(v.is_string(), "%s: option '%s' must be a string", what.c_str(), k.c_str());
      return v.get<std::string>();
    };
    if (k == "data") c->data = str();
    else if (k == "steps") c->steps = integer();
    else if (k == "batch-size") c->batch_size = integer();
    else if (k == "grad-accum") c->grad_accum = integer();
    else if (k == "seq-len") c->seq_len = integer();
    else if (k == "lr") c->lr = num();
    else if (k == "lr-schedule") {
      const std::string s = str();
      MOE_CHECK(s == "constant" || s == "cosine", "%s: lr-schedule must be constant or cosine, got '%s'", what.c_str(),
                s.c_str());
      c->schedule = s == "constant" ? LrSchedule::Constant : LrSchedule::Cosine;
    } else if (k == "warmup") c->warmup = integer();
    else if (k == "beta1") c->adamw.beta1 = num();
    else if (k == "beta2") c->adamw.beta2 = num();
    else if (k == "eps") c->adamw.eps = num();
    else if (k == "weight-decay") c->adamw.weight_decay = num();
    else if (k == "decay-all") c->adamw.decay_all = boolean();
    else if (k == "dense-expert-update") c->adamw.dense_expert_update = boolean();
    else if (k == "clip") c->clip = num();
    else if (k == "aux-coef") c->aux_coef = num();
    else if (k == "z-coef") c->z_coef = num();
    else if (k == "recompute") c->recompute = boolean();
    else if (k == "capacity-factor") c->capacity_factor = num();
    else if (k == "bias-balance") c->bias_rate = num();
    else if (k == "fused-update") c->fused_update = boolean();
    else if (k == "weight-dtype") {
      const std::string s = str();
      MOE_CHECK(s == "f32" || s == "bf16", "%s: weight-dtype must be f32 or bf16, got '%s'", what.c_str(), s.c_str());
      c->weight_dtype = s == "bf16" ? DType::BF16 : DType::F32;
    }
    else if (k == "optimizer-dtype") {
      const std::string s = str();
      MOE_CHECK(s == "f32" || s == "bf16", "%s: optimizer-dtype must be f32 or bf16, got '%s'", what.c_str(), s.c_str());
      c->adamw.state_dtype = s == "bf16" ? DType::BF16 : DType::F32;
    }
    else if (k == "shuffle") c->shuffle = boolean();
    else if (k == "seed") c->seed = static_cast<uint64_t>(integer());
    else if (k == "val-fraction") c->val_fraction = num();
    else if (k == "eval-every") c->eval_every = integer();
    else if (k == "eval-batches") c->eval_batches = integer();
    else if (k == "save-every") c->save_every = integer();
    else if (k == "log-every") c->log_every = integer();
    else if (k == "max-tokens") c->max_tokens = integer();
    else if (k == "stop-after") c->stop_after = integer();
    else MOE_FAIL("%s: unknown training option '%s'", what.c_str(), k.c_str());
  }
}

double run_training(const TrainConfig& cfg) {
  MOE_CHECK(cfg.steps > 0, "--steps must be positive");
  MOE_CHECK(cfg.batch_size > 0 && cfg.grad_accum > 0, "--batch-size and --grad-accum must be positive");
  MOE_CHECK(cfg.lr >= 0 && std::isfinite(cfg.lr), "--lr must be a finite non-negative number");
  MOE_CHECK(!cfg.out.empty(), "--out RUN_DIR is required");
  const std::unique_ptr<dist::Parallel> par = dist::make_parallel(cfg.ep == 0 && cfg.dp == 0 ? 1 : cfg.ep, cfg.dp);
  dist::set_timeout(cfg.dist_timeout);
  const bool lead = par->rank() == 0;  // prints, writes metrics and checkpoints
  const bool talk = !cfg.quiet && lead;
  std::error_code ec;
  fs::create_directories(cfg.out, ec);
  MOE_CHECK(!ec, "%s: cannot create the run directory: %s", cfg.out.c_str(), ec.message().c_str());

  // ---- model (f32, owned: the optimizer writes into it) ----
  std::string resume_dir = cfg.resume ? latest_checkpoint(cfg.out) : "";
  MOE_CHECK(!cfg.resume || !resume_dir.empty(), "--resume: %s holds no checkpoint (step-N/) to resume from",
            cfg.out.c_str());
  const bool ft = cfg.finetune;
  // Fine-tuning reads the base from the model directory (checkpoints hold only the adapter) and
  // keeps it frozen as loaded: the file's dtype by default, mapped zero-copy where it can be.
  const std::string load_dir = resume_dir.empty() || ft ? cfg.model_dir : resume_dir;
  LoadOptions lo;
  lo.keep_dtype = ft && cfg.base_dtype == "keep";
  lo.weight_dtype = ft && cfg.base_dtype == "bf16" ? DType::BF16 : DType::F32;
  MOE_CHECK(!ft || cfg.base_dtype == "keep" || cfg.base_dtype == "f32" || cfg.base_dtype == "bf16",
            "--base-dtype must be keep, f32 or bf16, got '%s'", cfg.base_dtype.c_str());
  load_own_experts(load_hf_config(load_dir + "/config.json"), *par, &lo);  // expert parallel
  Model m = Model::load(load_dir, lo);
  if (!resume_dir.empty() && !ft) {
    const ModelConfig base = load_hf_config(cfg.model_dir + "/config.json");
    MOE_CHECK(base == m.config(), "--resume: the checkpoint %s is of another model than %s (config.json differs)",
              resume_dir.c_str(), cfg.model_dir.c_str());
  }
  LoraConfig lcfg = cfg.lora;
  // Every parameter of the model as one process lists them (each expert once), for checkpoints.
  nlohmann::json fingerprint;
  if (!ft) fingerprint = param_fingerprint(m);
  if (talk && par->distributed()) std::printf("%s\n", describe_parallel(*par, m.config()).c_str());
  if (!ft) {
    m.mutable_weights() = transform_weights(m.config(), m.weights(), [](const Tensor& t) {
      Tensor o = Tensor::empty(t.shape(), DType::F32, MemCategory::Weights);
      o.copy_from(t);
      return o;
    });
  } else {
    ModelWeights& w = m.mutable_weights();
    const DType qdt = qlora_base_dtype(cfg.load_in_4bit, cfg.double_quant, cfg.load_in_8bit);
    if (cfg.load_in_4bit || cfg.load_in_8bit) {
      const std::string q = quantize_frozen_base(m.config(), w, qdt);
      if (talk) std::printf("%s\n", q.c_str());
    }
    const std::string from = !resume_dir.empty() ? resume_dir : cfg.adapter_init;
    if (!from.empty()) {
      lcfg = load_adapter(from, m.config(), w);  // a resumed or continued adapter: its r, alpha, targets
      lcfg.train_router = cfg.lora.train_router;
      lcfg.seed = cfg.lora.seed;
      lcfg.dropout = cfg.lora.dropout;
    } else {
      attach_lora(m.config(), w, lcfg);
    }
    lcfg.base_model = cfg.model_dir;
    w.train_router = lcfg.train_router;
    if (w.train_router)  // trained in full: owned f32 copies (the base may be a read-only mapping)
      for (LayerWeights& lw : w.layers)
        if (lw.router.defined()) lw.router = lw.router.to_dtype(DType::F32, MemCategory::Weights);
    if (par->ep > 1)
      for (const LayerWeights& lw : w.layers)
        MOE_CHECK(!lw.lexp.w1.on() && !lw.lexp.w3.on() && !lw.lexp.w2.on(),
                  "--ep: LoRA adapters on routed experts are not sharded yet; use --dp, or leave the experts out of "
                  "--target-modules");
    fingerprint = param_fingerprint(m);
  }
  const ModelConfig& mc = m.config();
  // Mixed precision: the f32 master weights' matrices are split in place (model_train.h): forward
  // and backward read their bf16 upper halves, the optimizer updates both halves.
  MOE_CHECK(cfg.weight_dtype == DType::F32 || cfg.weight_dtype == DType::BF16, "--weight-dtype must be f32 or bf16");
  MOE_CHECK(!ft || cfg.weight_dtype == DType::F32,
            "fine-tuning keeps the frozen base as loaded (choose it with --base-dtype), not --weight-dtype");
  const bool mixed = cfg.weight_dtype == DType::BF16;
  MasterLowHalves low;
  if (mixed) low = split_master(mc, m.mutable_weights());

  // ---- data ----
  std::unique_ptr<Tokenizer> tok;
  if (has_tokenizer(cfg.model_dir)) tok = std::make_unique<Tokenizer>(Tokenizer::from_dir(cfg.model_dir));
  DataOptions dopt;
  dopt.seq_len = cfg.seq_len;
  const bool pretok = cfg.data.size() > 12 && cfg.data.ends_with(".safetensors");
  if (dopt.seq_len == 0 && !pretok) dopt.seq_len = std::min<int64_t>(256, mc.max_position_embeddings);
  dopt.seed = cfg.seed;
  dopt.val_fraction = cfg.val_fraction;
  dopt.max_tokens = cfg.max_tokens;
  dopt.vocab_size = mc.vocab_size;
  dopt.packing = cfg.packing;
  std::unique_ptr<ChatTemplate> chat;
  if (!cfg.chat_template.empty()) {
    nlohmann::json tcfg = nlohmann::json::object();
    if (is_regular_file(cfg.model_dir + "/tokenizer_config.json"))
      tcfg = parse_json_object(read_file(cfg.model_dir + "/tokenizer_config.json"), cfg.model_dir + "/tokenizer_config.json");
    chat = std::make_unique<ChatTemplate>(read_file(cfg.chat_template), tcfg);
  } else if (ft && tok) {
    try {
      chat = std::make_unique<ChatTemplate>(ChatTemplate::from_dir(cfg.model_dir));
    } catch (const Error&) {
      // No template: chat data is refused by load_dataset with a message naming --chat-template.
    }
  }
  dopt.chat = chat.get();
  const Dataset data = load_dataset(cfg.data, tok.get(), dopt);
  MOE_CHECK(data.train.seq <= mc.max_position_embeddings,
            "%s: sequence length %lld exceeds the model's limit max_position_embeddings = %lld", cfg.data.c_str(),
            (long long)data.train.seq, (long long)mc.max_position_embeddings);
  BatchSampler sampler(data.train.n, cfg.batch_size, cfg.seed, cfg.shuffle);
  int64_t total_steps = cfg.steps;
  if (cfg.epochs > 0)
    total_steps = std::max<int64_t>(
        1, int64_t(std::ceil(cfg.epochs * double(data.train.n) / double(cfg.batch_size * cfg.grad_accum))));
  if (talk && data.sft.examples > 0)
    std::printf("data: %lld examples, %lld of %lld assistant turns labeled, %lld of %lld tokens carry loss\n",
                (long long)data.sft.examples, (long long)data.sft.labeled_turns, (long long)data.sft.assistant_turns,
                (long long)data.sft.labeled_tokens, (long long)data.sft.tokens);
  if (talk && ft) std::printf("%s", lora_audit(mc, m.weights()).c_str());

  // ---- optimizer ----
  MOE_CHECK(!cfg.fused_update || (cfg.clip == 0 && cfg.grad_accum == 1),
            "--fused-update needs --clip 0 and --grad-accum 1 (clipping and accumulation need every gradient "
            "before any update)");
  // The fused update never holds the whole-model gradient: no gradient tensors here.
  ModelWeights grads = cfg.fused_update ? ModelWeights() : zeros_like(mc, m.weights(), MemCategory::Grads);
  const std::vector<NamedParam> gparams = cfg.fused_update ? std::vector<NamedParam>() : named_parameters(mc, grads);
  // ZeRO-1: this rank keeps optimizer state for (and updates) only the parameters it owns.
  MOE_CHECK(cfg.zero == 0 || cfg.zero == 1, "--zero must be 0 or 1, got %d", cfg.zero);
  const bool zero = cfg.zero == 1 && par->distributed();
  MOE_CHECK(!zero || (!cfg.fused_update && !ft), "--zero 1 works with moe train without --fused-update (for now)");
  const std::vector<NamedParam> wparams = named_parameters(mc, m.weights(), true);
  const std::vector<int> owners = zero ? shard_owners(*par, wparams) : std::vector<int>();
  auto owned = [&](const std::vector<NamedParam>& all) {
    if (!zero) return all;
    std::vector<NamedParam> out;
    for (size_t i = 0; i < all.size(); ++i)
      if (owns(*par, wparams[i], owners[i])) out.push_back(all[i]);
    return out;
  };
  AdamW opt(owned(wparams), owned(gparams), cfg.adamw, mixed ? &low : nullptr);
  LossOptions lopt;
  lopt.aux_coef = cfg.aux_coef >= 0 ? cfg.aux_coef : mc.router_aux_loss_coef;
  lopt.z_coef = cfg.z_coef;
  lopt.recompute = cfg.recompute;
  lopt.route.capacity_factor = cfg.capacity_factor;
  lopt.route.ep = par->ep > 1 ? par->ep_group.get() : nullptr;
  lopt.batch = par->distributed() ? par->world : nullptr;
  MOE_CHECK(cfg.capacity_factor >= 0, "--capacity-factor must be >= 0");
  // DeepSeek-V3 trains its selection bias with the aux-loss-free update (rate 0.001 in its report).
  const double bias_rate = cfg.bias_rate >= 0 ? cfg.bias_rate : arch_spec(mc.model_type).router_select_bias ? 0.001 : 0.0;

  int64_t step = 0;
  const std::string metrics_path = cfg.out + "/metrics.jsonl";
  if (!resume_dir.empty()) {
    const nlohmann::json st = read_trainer_state(resume_dir);
    MOE_CHECK(st.contains("params") && st["params"] == fingerprint,
              "--resume: %s was written for a model with other parameters", resume_dir.c_str());
    MOE_CHECK(st.contains("step") && st["step"].is_number_integer() && st.contains("sampler"),
              "%s/trainer_state.json: missing 'step' or 'sampler'", resume_dir.c_str());
    step = st["step"].get<int64_t>();
    sampler.restore(st["sampler"]);
    load_optimizer(resume_dir, opt);
    // Keep the metrics of the steps the checkpoint covers; later lines belong to the lost run.
    std::string kept;
    if (is_regular_file(metrics_path)) {
      std::istringstream in(read_file(metrics_path, size_t(1) << 30));
      std::string line;
      while (std::getline(in, line)) {
        if (line.empty()) continue;
        auto j = nlohmann::json::parse(line, nullptr, false);
        if (!j.is_discarded() && j.contains("step") && j["step"].is_number_integer() && j["step"].get<int64_t>() <= step)
          kept += line + "\n";
      }
    }
    if (lead) write_text_atomic(metrics_path, kept);
    if (talk) std::printf("resuming from %s at step %lld\n", resume_dir.c_str(), (long long)step);
  } else if (lead) {
    write_text_atomic(metrics_path, "");
  }
  MOE_CHECK(step < total_steps || cfg.resume, "nothing to do: step %lld of %lld", (long long)step, (long long)total_steps);

  nlohmann::json run_info = {{"model_dir", cfg.model_dir}, {"data", cfg.data}, {"source", data.source},
                             {"model_type", mc.model_type}, {"n_params", m.n_params_total()},
                             {"train_rows", data.train.n}, {"val_rows", data.val.n}, {"seq_len", data.train.seq},
                             {"batch_size", cfg.batch_size}, {"grad_accum", cfg.grad_accum}, {"steps", total_steps},
                             {"lr", cfg.lr}, {"capacity_factor", cfg.capacity_factor}, {"bias_balance", bias_rate},
                             {"fused_update", cfg.fused_update}, {"optimizer_dtype", dtype_name(cfg.adamw.state_dtype)},
                             {"weight_dtype", dtype_name(cfg.weight_dtype)}, {"ranks", par->size()},
                             {"ep", par->ep}, {"dp", par->dp}, {"zero", zero ? 1 : 0}};
  if (ft) {
    run_info["finetune"] = {{"r", lcfg.r}, {"lora_alpha", lcfg.alpha}, {"use_rslora", lcfg.rslora},
                            {"target_modules", lcfg.target_modules}, {"train_router", lcfg.train_router},
                            {"trainable_params", lora_param_count(mc, m.weights())},
                            {"base_dtype", cfg.load_in_4bit || cfg.load_in_8bit ? dtype_name(qlora_base_dtype(cfg.load_in_4bit, cfg.double_quant, cfg.load_in_8bit)) : cfg.base_dtype.c_str()}, {"packing", cfg.packing}};
    if (data.sft.examples > 0)
      run_info["sft"] = {{"examples", data.sft.examples}, {"assistant_turns", data.sft.assistant_turns},
                         {"labeled_turns", data.sft.labeled_turns}, {"labeled_tokens", data.sft.labeled_tokens},
                         {"tokens", data.sft.tokens}};
  }
  if (data.val.n > 0 && resume_dir.empty()) {
    // The starting point the validation curve is judged against.
    const double v0 = validation_loss(m, data.val, cfg.batch_size, cfg.eval_batches, lopt, *par);
    run_info["initial_val_loss"] = v0;
    if (talk) std::printf("initial validation loss %.4f\n", v0);
  }
  if (lead) write_text_atomic(cfg.out + "/train_config.json", run_info.dump(1));
  if (talk)
    std::printf("%s %s (%s params) on %s: %lld train / %lld val rows of %lld tokens, batch %lld x %lld, %lld steps\n",
                ft ? "fine-tuning" : "training", mc.model_type.c_str(), with_commas(m.n_params_total()).c_str(), data.source.c_str(),
                (long long)data.train.n, (long long)data.val.n, (long long)data.train.seq, (long long)cfg.batch_size,
                (long long)cfg.grad_accum, (long long)total_steps);

  const std::string tok_from = has_tokenizer(cfg.model_dir) ? cfg.model_dir : "";
  std::string last_ckpt = resume_dir;
  std::vector<std::string> full_names;  // the fingerprint's parameter names, in order
  for (const auto& p : fingerprint) full_names.push_back(p[0].get<std::string>());
  auto checkpoint = [&](const std::string& dir) {
    nlohmann::json st = {{"step", step}, {"sampler", sampler.state()}, {"params", fingerprint}};
    // Written once, by rank 0: under expert parallelism its EP group first gathers the experts
    // and their optimizer state (a checkpoint is the whole model, whatever the ranks).
    // Mixed precision writes the split weights' f32 values a tensor at a time; under expert
    // parallelism the experts are joined to f32 as they are gathered (the rest stays split).
    Model whole = m;
    if (par->rank() < par->ep)
      whole.mutable_weights() = gather_experts(mc, whole.weights(), *par, mixed ? &low : nullptr);
    const OptimizerSnapshot snap = gather_optimizer(*par, opt, full_names, zero);
    if (lead) save_checkpoint(dir, whole, snap, st, tok_from, ft ? &lcfg : nullptr, mixed ? &low : nullptr);
    par->world->barrier();
    last_ckpt = dir;
  };
  // Fine-tuning's end-of-run check: which trainable parameters ever had a non-zero gradient,
  // and which routed experts ever received tokens.
  const std::vector<NamedParam> trainable = named_parameters(mc, m.weights(), true);
  std::map<std::string, size_t> trainable_index;
  for (size_t i = 0; i < trainable.size(); ++i) trainable_index[trainable[i].name] = i;
  std::vector<bool> seen_grad(trainable.size(), false);
  std::vector<std::vector<bool>> ever_touched(static_cast<size_t>(mc.n_layer),
                                              std::vector<bool>(static_cast<size_t>(std::max<int64_t>(mc.n_expert, 1))));
  auto observe_grads = [&](const std::vector<NamedParam>& gs) {
    for (const NamedParam& g : gs) {
      if (!cfg.test_drop_grad.empty() && g.name.find(cfg.test_drop_grad) != std::string::npos)
        std::memset(g.value.raw(), 0, g.value.nbytes());  // the injected bug (tests only)
      auto it = trainable_index.find(g.name);
      if (it == trainable_index.end() || seen_grad[it->second]) continue;
      const float* p = g.value.data<float>();
      for (int64_t j = 0; j < g.value.numel(); ++j)
        if (p[j] != 0.0f) {
          seen_grad[it->second] = true;
          break;
        }
    }
  };
  // Router health: steps in a row each expert's share of its layer's tokens stayed below
  // collapse_share / E (a warning when it reaches collapse_steps).
  std::vector<std::vector<int64_t>> low_streak;

  std::ofstream metrics;
  if (lead) {
    metrics.open(metrics_path, std::ios::app);
    MOE_CHECK(metrics.good(), "%s: cannot open for appending", metrics_path.c_str());
  }
  std::vector<std::vector<bool>> touched(static_cast<size_t>(mc.n_layer),
                                         std::vector<bool>(static_cast<size_t>(std::max<int64_t>(mc.n_expert, 1))));
  Tensor ids, labels;
  std::vector<int64_t> rows;
  const double t_start = now_s();
  const int64_t first_step = step;
  double last_loss = NAN;
  while (step < total_steps) {
    if (cfg.test_fail_step == step + 1 && par->rank() == cfg.test_fail_rank) {
      std::fprintf(stderr, "rank %d: injected %s at step %lld (--test-fail-step)\n", par->rank(),
                   cfg.test_fail_hang ? "hang" : "death", (long long)step + 1);
      std::fflush(stderr);
      while (cfg.test_fail_hang) std::this_thread::sleep_for(std::chrono::seconds(1));
      std::raise(SIGKILL);
    }
    const double t0 = now_s();
    for (const NamedParam& g : gparams) {
      // Tied heads share the embedding's gradient: zeroing it twice is harmless.
      std::memset(g.value.raw(), 0, g.value.nbytes());
    }
    for (auto& row : touched) std::fill(row.begin(), row.end(), false);
    double loss = 0, ce = 0, aux = 0, z = 0;
    const double lr = lr_at(cfg.schedule, cfg.lr, step, cfg.warmup, total_steps);
    double fused_ss = 0;  // squared gradient norm, summed by the fused update's groups
    double fused_ss_exp = 0;  // ... its routed experts' part (summed over the EP group at the end)
    const dist::CommStats comm0 = par->stats();
    auto fused_hook = [&](int64_t group, const std::vector<NamedParam>& gg, const StepLosses& fw) {
      if (group == kGroupHead) {  // the first group: the step's losses and routing are known
        if (!std::isfinite(fw.total))
          MOE_FAIL("loss is %s at step %lld; stopping. The last good checkpoint is %s",
                   std::isnan(fw.total) ? "NaN" : "Inf", (long long)step + 1,
                   last_ckpt.empty() ? "(none yet)" : last_ckpt.c_str());
        for (size_t i = 0; i < fw.router.size(); ++i)
          for (size_t e = 0; e < fw.router[i].count.size(); ++e)
            if (fw.router[i].count[e] > 0) touched[static_cast<size_t>(fw.moe_layers[i])][e] = true;
      }
      all_reduce_grads(*par, gg, &touched);
      if (ft) observe_grads(gg);
      if (par->ep > 1) fused_ss_exp += grad_sum_squares(gg, true);
      fused_ss += opt.step_group(lr, touched, gg);
    };
    std::vector<std::vector<double>> load;  // per MoE layer
    std::vector<int64_t> dropped;           // per MoE layer
    std::vector<int64_t> moe_layers;
    for (int64_t micro = 0; micro < cfg.grad_accum; ++micro) {
      sampler.next(&rows);
      gather_batch(data.train, rows, &ids, &labels);
      if (par->distributed()) {
        ids = local_batch(ids, *par);
        labels = local_batch(labels, *par);
      }
      if (ft && lcfg.dropout > 0) {  // a new dropout mask per micro-batch, reproducible on resume
        uint64_t s = cfg.seed ^ (uint64_t(step) * 0x9E3779B97F4A7C15ull) ^ (uint64_t(micro) << 48);
        set_lora_dropout(m.mutable_weights(), float(lcfg.dropout), splitmix64(s));
      }
      StepLosses r = cfg.fused_update ? forward_backward_fused(m, ids, labels, lopt, fused_hook)
                                      : forward_backward(m, ids, labels, &grads, lopt);
      loss += r.total / double(cfg.grad_accum);
      ce += r.loss_ce / double(cfg.grad_accum);
      aux += r.aux_loss / double(cfg.grad_accum);
      z += r.z_loss / double(cfg.grad_accum);
      moe_layers = r.moe_layers;
      load.resize(r.router.size());
      dropped.resize(r.router.size(), 0);
      for (size_t i = 0; i < r.router.size(); ++i) {
        dropped[i] += r.router[i].dropped;
        load[i].resize(r.router[i].count.size(), 0.0);
        for (size_t e = 0; e < r.router[i].count.size(); ++e) {
          load[i][e] += r.router[i].count[e];
          if (r.router[i].count[e] > 0) touched[static_cast<size_t>(r.moe_layers[i])][e] = true;
        }
      }
    }
    if (!cfg.fused_update) {
      if (zero) reduce_grads_to_owners(*par, gparams, owners, &touched);
      else all_reduce_grads(*par, gparams, &touched);
    }
    if (!std::isfinite(loss))
      MOE_FAIL("loss is %s at step %lld; stopping. The last good checkpoint is %s", std::isnan(loss) ? "NaN" : "Inf",
               (long long)step + 1, last_ckpt.empty() ? "(none yet)" : last_ckpt.c_str());
    if (cfg.grad_accum > 1)
      for (const NamedParam& g : gparams) {
        float* p = g.value.data<float>();
        for (int64_t j = 0; j < g.value.numel(); ++j) p[j] /= float(cfg.grad_accum);
      }
    if (ft && !cfg.fused_update) observe_grads(gparams);
    for (size_t l = 0; l < touched.size(); ++l)
      for (size_t e = 0; e < touched[l].size(); ++e)
        if (touched[l][e]) ever_touched[l][e] = true;
    if (cfg.fused_update && par->ep > 1) {  // each expert's squares once: this rank's, then the group's
      fused_ss -= fused_ss_exp;
      par->ep_group->all_reduce_sum(&fused_ss_exp, 1);
      fused_ss += fused_ss_exp;
    }
    const double gnorm = cfg.fused_update ? std::sqrt(fused_ss)
                         : zero            ? clip_grad_norm_owned(*par, gparams, owners, cfg.clip)
                                           : clip_grad_norm_global(*par, gparams, cfg.clip);
    MOE_CHECK(std::isfinite(gnorm), "gradient norm is not finite at step %lld; stopping. The last good checkpoint is %s",
              (long long)step + 1, last_ckpt.empty() ? "(none yet)" : last_ckpt.c_str());
    if (!cfg.fused_update) {
      opt.step(lr, touched);
      if (zero) broadcast_from_owners(*par, wparams, owners, mixed ? &low : nullptr);
    }
    if (bias_rate > 0 && !load.empty()) update_router_bias(mc, m.mutable_weights(), load, bias_rate);
    ++step;
    last_loss = loss;
    const double dt = now_s() - t0;
    const double tokens = double(cfg.batch_size * cfg.grad_accum * data.train.seq);

    nlohmann::json rec = {{"step", step}, {"loss", loss}, {"loss_ce", ce}, {"aux_loss", aux}, {"z_loss", z},
                          {"lr", lr}, {"grad_norm", gnorm}, {"tokens_per_s", tokens / dt},
                          {"elapsed_s", now_s() - t_start}};
    nlohmann::json jl = nlohmann::json::array(), jcv = nlohmann::json::array(), jmm = nlohmann::json::array(),
                   jdrop = nlohmann::json::array();
    double cv_mean = 0, worst_mm = 0;
    int64_t dropped_all = 0;
    for (size_t i = 0; i < load.size(); ++i) {
      const auto& l = load[i];
      double cv, mm;
      balance(l, &cv, &mm);
      jl.push_back(l);
      jcv.push_back(cv);
      jmm.push_back(mm);
      jdrop.push_back(dropped[i]);
      dropped_all += dropped[i];
      cv_mean += cv / double(load.size());
      worst_mm = std::max(worst_mm, mm);
    }
    // Collapse watch: an expert starved of tokens for collapse_steps steps in a row.
    low_streak.resize(load.size());
    nlohmann::json jcollapse = nlohmann::json::array();
    for (size_t i = 0; i < load.size(); ++i) {
      low_streak[i].resize(load[i].size(), 0);
      double tot = 0;
      for (double v : load[i]) tot += v;
      for (size_t e = 0; e < load[i].size(); ++e) {
        const double share = tot > 0 ? load[i][e] / tot : 0.0;
        low_streak[i][e] = share < cfg.collapse_share / double(load[i].size()) ? low_streak[i][e] + 1 : 0;
        if (cfg.collapse_steps > 0 && low_streak[i][e] == cfg.collapse_steps) {
          jcollapse.push_back({{"layer", moe_layers[i]}, {"expert", e}, {"share", share}});
          if (talk)
            std::printf("warning: layer %lld expert %zu got %.2f%% of its layer's tokens (under %.2f%%) for %lld steps "
                        "in a row: the router may be collapsing\n",
                        (long long)moe_layers[i], e, 100.0 * share, 100.0 * cfg.collapse_share / double(load[i].size()),
                        (long long)cfg.collapse_steps);
        }
      }
    }
    if (!jcollapse.empty()) rec["collapse_warnings"] = jcollapse;
    rec["expert_load"] = jl;
    rec["load_cv"] = jcv;
    rec["load_max_mean"] = jmm;
    rec["dropped"] = jdrop;
    rec["moe_layers"] = moe_layers;

    const bool last = step == total_steps;
    const bool stop = !last && cfg.stop_after > 0 && step - first_step >= cfg.stop_after;
    const bool save = last || stop || (cfg.save_every > 0 && step % cfg.save_every == 0);
    const bool eval = data.val.n > 0 && (last || (cfg.eval_every > 0 ? step % cfg.eval_every == 0 : save));
    double vl = NAN;
    if (eval) {
      vl = validation_loss(m, data.val, cfg.batch_size, cfg.eval_batches, lopt, *par);
      rec["val_loss"] = vl;
    }
    // Communication of this step (this rank's; rank 0 reports): bytes sent and time per kind.
    const dist::CommStats comm = par->stats() - comm0;
    if (par->distributed()) {
      nlohmann::json jc = nlohmann::json::object();
      for (int k = 0; k < dist::kNumColl; ++k)
        if (comm.calls[size_t(k)] > 0)
          jc[dist::coll_name(dist::Coll(k))] = {{"bytes", comm.bytes[size_t(k)]}, {"s", comm.seconds[size_t(k)]},
                                                {"calls", comm.calls[size_t(k)]}};
      rec["comm"] = jc;
      rec["comm_bytes"] = comm.total_bytes();
      rec["comm_s"] = comm.total_seconds();
    }
    if (lead) {
      metrics << rec.dump() << "\n";
      metrics.flush();
    }
    if (talk && (step % std::max<int64_t>(1, cfg.log_every) == 0 || last)) {
      const double per_step = (now_s() - t_start) / double(step - first_step);
      std::printf("step %lld/%lld | loss %.4f | aux %.4f | lr %.3g | %.0f tok/s | balance cv %.3f max/mean %.2f | ETA %s",
                  (long long)step, (long long)total_steps, loss, aux, lr, tokens / dt, cv_mean, worst_mm,
                  fmt_duration(per_step * double(total_steps - step)).c_str());
      if (cfg.capacity_factor > 0)
        std::printf(" | dropped %.1f%%", load.empty() ? 0.0
                                                     : 100.0 * double(dropped_all) /
                                                           (tokens * double(mc.n_expert_used) * double(load.size())));
      if (par->distributed())
        std::printf(" | comm %s in %.2fs", human_bytes(double(comm.total_bytes())).c_str(), comm.total_seconds());
      if (eval) std::printf(" | val %.4f", vl);
      std::printf("\n");
      std::fflush(stdout);
    }
    if (save) {
      checkpoint(cfg.out + "/step-" + std::to_string(step));
      if (last) {
        checkpoint(cfg.out + "/final");
        last_ckpt = cfg.out + "/step-" + std::to_string(step);
      }
    }
    if (stop) break;
  }
  if (ft && step - first_step >= 2) {
    // B starts at zero, so A's first gradient is zero: the check needs two steps.
    const std::vector<std::string> bad = untrained_adapters(mc, m.weights(), seen_grad, ever_touched);
    if (!bad.empty()) {
      std::string list;
      for (size_t i = 0; i < bad.size() && i < 8; ++i) list += "\n  " + bad[i];
      if (bad.size() > 8) list += "\n  ... (" + std::to_string(bad.size()) + " in all)";
      MOE_FAIL("%zu targeted adapter parameter(s) never received a non-zero gradient although their modules received "
               "tokens: they were not trained (the adapter in %s is not what was asked for):%s",
               bad.size(), cfg.out.c_str(), list.c_str());
    }
  }
  if (talk) {
    std::printf("done: %lld steps in %s; checkpoints in %s\n", (long long)(step - first_step),
                fmt_duration(now_s() - t_start).c_str(), cfg.out.c_str());
    std::printf("%s", mem_report().c_str());
  }
  if (par->distributed()) print_rank_memory(*par, talk);
  return last_loss;
}

}  // namespace moe

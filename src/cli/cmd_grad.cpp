// cmd_grad.cpp — `moe grad`: losses and the gradient of every parameter for one batch, under
// HF names (the contract of the reference tests against ../shared/fixtures). With --adapter,
// the base is frozen and only the LoRA factors' gradients are written, under PEFT's names.
// Under mpirun (--ep P / --dp Q) the batch's rows and the experts are spread over the ranks and
// rank 0 writes the same file as one process would.
#include <cstdio>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "io/safetensors.h"
#include "model/model_train.h"
#include "train/distributed.h"
#include "train/lora.h"
#include "train/hf_export.h"

namespace moe {

void add_grad_command(CLI::App& app) {
  struct Opts {
    std::string dir, input, out, adapter;
    double aux_coef = -1, z_coef = 0;
    bool recompute = false;
    int ep = 0, dp = 0;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand("grad", "losses and every parameter's gradient for one batch (f32, HF names)");
  cmd->add_option("dir", o->dir, "model directory")->required();
  cmd->add_option("--input", o->input, "safetensors file with input_ids and labels [B,S] (HF labels: unshifted, -100 ignored)")
      ->required();
  cmd->add_option("--out", o->out, "output safetensors: loss_ce, aux_loss, z_loss, total_loss, grad.<param>")->required();
  cmd->add_option("--aux-coef", o->aux_coef, "aux loss weight in total_loss (default: the config's router_aux_loss_coef)");
  cmd->add_option("--z-coef", o->z_coef, "router z-loss weight in total_loss")->capture_default_str();
  cmd->add_flag("--recompute", o->recompute, "recompute each layer's activations in backward (less memory)");
  add_dist_flags(cmd, &o->ep, &o->dp);
  cmd->add_option("--adapter", o->adapter,
                  "PEFT LoRA adapter directory: apply it (base frozen) and write the gradients of its factors only, "
                  "named as in the adapter file with prefix grad.");
  cmd->callback([o]() {
    const std::unique_ptr<dist::Parallel> par = dist::make_parallel(o->ep == 0 && o->dp == 0 ? 1 : o->ep, o->dp);
    auto in = SafetensorsFile::open(o->input);
    for (const char* key : {"input_ids", "labels"})
      MOE_CHECK(in->find(key) != nullptr, "%s: no tensor '%s'", o->input.c_str(), key);
    Tensor ids = in->tensor("input_ids", MemCategory::Activations);
    Tensor labels = in->tensor("labels", MemCategory::Activations);
    Checkpoint ck = Checkpoint::open_dir(o->dir);
    LoadOptions lo;
    lo.keep_dtype = false;
    lo.weight_dtype = DType::F32;
    load_own_experts(load_hf_config(o->dir + "/config.json"), *par, &lo);
    Model m = Model::load(ck, lo);
    if (!o->adapter.empty()) load_adapter(o->adapter, m.config(), m.mutable_weights());
    shard_experts(m.config(), m.mutable_weights(), *par);
    if (par->distributed()) {
      ids = local_batch(ids, *par);
      labels = local_batch(labels, *par);
    }
    LossOptions lopt;
    lopt.batch = par->distributed() ? par->world : nullptr;
    lopt.route.ep = par->ep > 1 ? par->ep_group.get() : nullptr;
    lopt.aux_coef = o->aux_coef >= 0 ? o->aux_coef : m.config().router_aux_loss_coef;
    lopt.z_coef = o->z_coef;
    lopt.recompute = o->recompute;
    ModelWeights grads = zeros_like(m.config(), m.weights(), MemCategory::Grads);
    StepLosses r = forward_backward(m, ids, labels, &grads, lopt);
    all_reduce_grads(*par, named_parameters(m.config(), grads));
    grads = gather_experts(m.config(), grads, *par);
    if (par->rank() != 0) return;
    std::vector<std::pair<std::string, Tensor>> outs;
    auto scalar = [&](const char* name, double v) {
      outs.emplace_back(name, Tensor::from_f32({}, {static_cast<float>(v)}));
    };
    scalar("loss_ce", r.loss_ce);
    scalar("aux_loss", r.aux_loss);
    scalar("z_loss", r.z_loss);
    scalar("total_loss", r.total);
    for (auto& [name, t] : hf_parameters(m.config(), grads)) outs.emplace_back("grad." + name, t);
    write_safetensors(o->out, outs);
    std::printf("loss_ce %.6f  aux_loss %.6f  z_loss %.6f  total_loss %.6f  (%lld targets)\n", r.loss_ce, r.aux_loss,
                r.z_loss, r.total, (long long)r.n_targets);
    std::printf("wrote %s: 4 losses and %zu gradients\n", o->out.c_str(), outs.size() - 4);
  });
}

}  // namespace moe

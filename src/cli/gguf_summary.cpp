// gguf_summary.cpp — see gguf_summary.h.
#include "cli/gguf_summary.h"

#include <cstdio>
#include <map>
#include <optional>

#include "core/memory.h"
#include "io/gguf.h"
#include "io/gguf_model.h"
#include "model/arch.h"
#include "tokenizer/gguf_vocab.h"

namespace moe {

GgufTensorTotals print_gguf_tensor_types(const GgufFile& f) {
  std::map<std::string, std::pair<int, uint64_t>> by_type;
  GgufTensorTotals t;
  for (const GgufTensorInfo& ti : f.tensors()) {
    auto& e = by_type[ggml_type_name(ti.type)];
    e.first += 1;
    e.second += ti.nbytes;
    t.tensors += 1;
    t.bytes += ti.nbytes;
    t.params += ti.numel();
  }
  for (const auto& [name, e] : by_type)
    std::printf("  %-6s %4d tensors %10.2f MiB\n", name.c_str(), e.first, e.second / 1048576.0);
  return t;
}

void inspect_gguf(const std::string& path) {
  const ModelConfig c = load_gguf_config(path);
  const auto f = GgufFile::open(path);
  int64_t moe_layers = 0;
  for (int64_t l = 0; l < c.n_layer; ++l) moe_layers += c.layer_is_moe(l);
  std::printf("model            %s (GGUF v%u, general.architecture %s, name '%s')\n", path.c_str(),
              f->header().version, f->get_string("general.architecture").c_str(),
              f->find("general.name") ? f->get_string("general.name").c_str() : "");
  std::printf("architecture     %s (%s): %lld layers (%lld MoE), hidden %lld, heads %lld (kv %lld, head_dim %lld)\n",
              c.model_type.c_str(), arch_spec(c.model_type).hf_architecture, (long long)c.n_layer,
              (long long)moe_layers, (long long)c.hidden_size, (long long)c.n_head, (long long)c.n_head_kv,
              (long long)c.head_dim);
  std::printf("experts          %lld per MoE layer, top-%lld%s, expert ffn %lld", (long long)c.n_expert,
              (long long)c.n_expert_used, c.norm_topk_prob ? " (renormalised)" : "", (long long)c.moe_intermediate_size);
  if (c.shared_expert_intermediate_size) std::printf(", shared expert %lld", (long long)c.shared_expert_intermediate_size);
  std::printf("\nvocab            %lld%s\n", (long long)c.vocab_size, c.tie_word_embeddings ? " (tied embeddings)" : "");
  const std::optional<GgufVocab> v = read_gguf_vocab(*f);
  if (v) {
    std::printf("tokenizer        %s%s%s, %zu tokens, BOS %s, EOS %s%s\n", v->model.c_str(), v->pre.empty() ? "" : " / ",
                v->pre.c_str(), v->tokens.size(), v->bos >= 0 ? v->tokens[v->bos].c_str() : "none",
                v->eos >= 0 ? v->tokens[v->eos].c_str() : "none", v->chat_template.empty() ? "" : ", chat template");
  } else {
    std::printf("tokenizer        none in the file (give --tokenizer DIR)\n");
  }
  std::printf("tensors by type\n");
  const GgufTensorTotals t = print_gguf_tensor_types(*f);
  std::printf("parameters       %s in %zu tensors, %s of tensor data (%.3f bits/parameter)\n",
              with_commas(t.params).c_str(), t.tensors, human_bytes(double(t.bytes)).c_str(), t.bits_per_param());
}

}  // namespace moe

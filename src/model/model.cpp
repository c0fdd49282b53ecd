// model.cpp — weight loading (HF names -> stacked per-layer tensors) and the forward pass.
#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <tuple>

#include "core/fp8.h"
#include "core/mxfp4.h"
#include "io/bnb_checkpoint.h"
#include "io/safetensors.h"
#include "model/attention_block.h"
#include "model/ffn_block.h"
#include "model/fused_experts.h"
#include "ops/ops.h"

namespace moe {
namespace {

using Source = std::function<Tensor(const std::string&)>;

// The dtype a weight gets in memory. Projections (`proj`: the weights of linear_forward and
// the experts) may be quantized: to LoadOptions::quant_dtype (Q8_0, or float, when their rows
// of `cols` values are not whole blocks of it), or kept as the quantized source holds them.
// Everything else is float: a quantized source (GGUF) is dequantized.
DType weight_dtype_for(DType src, const LoadOptions& opt, bool proj, int64_t cols) {
  const DType flt = opt.keep_dtype ? src : opt.weight_dtype;
  if (proj && dtype_is_quant(opt.quant_dtype)) {
    if (cols % dtype_block_elems(opt.quant_dtype) == 0) return opt.quant_dtype;
    if (cols % dtype_block_elems(DType::Q8_0) == 0) return DType::Q8_0;
  }
  if (dtype_is_block(flt) && !proj) return DType::F32;
  if (dtype_is_block(flt) && proj && dtype_is_quant(opt.quant_dtype)) return DType::F32;  // rows not whole blocks
  return flt;
}

// Checks a weight dtype choice; returns the memory category its bytes count under.
MemCategory check_weight_dtype(DType dt, const std::string& name, const LoadOptions& opt) {
  if (dtype_is_block(dt)) {  // ggml block types, and NF4 from bitsandbytes checkpoints
    MOE_CHECK(opt.device == Device::CPU,
              "tensor '%s': quantized weights (%s) run on the CPU only; load float weights for --device %s",
              name.c_str(), dtype_name(dt), device_name(opt.device));
    return MemCategory::QuantWeights;
  }
  MOE_CHECK(dt == DType::F32 || dt == DType::BF16 || dt == DType::F16, "tensor '%s': unsupported weight dtype %s",
            name.c_str(), dtype_name(dt));
  return MemCategory::Weights;
}

// Checks the shape of a source tensor, converts dtype (on the host: quantizes or dequantizes
// as weight_dtype_for says) and moves it to the device.
Tensor prepare(const Tensor& src, const std::string& name, const Shape& want, const LoadOptions& opt,
               bool proj = false) {
  MOE_CHECK(src.shape() == want, "tensor '%s': expected shape %s, got %s", name.c_str(), shape_str(want).c_str(),
            src.shape_str().c_str());
  const DType dt = weight_dtype_for(src.dtype(), opt, proj, want.empty() ? 1 : want.back());
  const MemCategory cat = check_weight_dtype(dt, name, opt);
  Tensor t = src.to_dtype(dt, cat);
  if (t.raw() != src.raw()) release_mapped(src);
  if (opt.device != Device::CPU) {
    Tensor d = t.to(opt.device, cat);
    release_mapped(src);
    return d;
  }
  // Tensors handed in under another category are copied so that the model's bytes count as weights.
  if (t.category() != cat) return t.to(Device::CPU, cat);
  return t;
}

// Stacks experts [e0, e0+n) of the per-expert [rows,cols] tensors into one [n,rows,cols] tensor
// on the target device.
Tensor stack_experts(const Source& get, const char* tmpl, int64_t layer, int64_t e0, int64_t n, int64_t rows,
                     int64_t cols, const LoadOptions& opt) {
  Tensor out;
  for (int64_t e = e0; e < e0 + n; ++e) {
    std::string name = tensor_name(tmpl, layer, e);
    Tensor src = get(name);
    MOE_CHECK(src.shape() == Shape({rows, cols}), "tensor '%s': expected shape %s, got %s", name.c_str(),
              shape_str({rows, cols}).c_str(), src.shape_str().c_str());
    const DType dt = weight_dtype_for(src.dtype(), opt, /*proj=*/true, cols);
    const MemCategory cat = check_weight_dtype(dt, name, opt);
    Tensor host = src.to_dtype(dt, MemCategory::Workspace);
    if (!out.defined()) out = Tensor::empty({n, rows, cols}, dt, cat, opt.device);
    MOE_CHECK(host.dtype() == out.dtype(), "tensor '%s': dtype %s differs from expert %lld", name.c_str(),
              dtype_name(host.dtype()), (long long)e0);
    mem_copy(out.select(e - e0).raw(), opt.device, host.raw(), Device::CPU, host.nbytes());
    release_mapped(src);
  }
  return out;
}

// Concatenates same-dtype tensors along dimension 0 into one weight on their device.
Tensor stack_rows(const std::vector<Tensor>& parts) {
  Shape shape = parts[0].shape();
  shape[0] = 0;
  for (const Tensor& p : parts) {
    MOE_ASSERT(p.dtype() == parts[0].dtype() && p.ndim() == parts[0].ndim());
    shape[0] += p.dim(0);
  }
  Tensor out = Tensor::empty(shape, parts[0].dtype(), MemCategory::Weights, parts[0].device());
  int64_t r = 0;
  for (const Tensor& p : parts) {
    Tensor dst = out.rows(r, r + p.dim(0));
    dst.copy_from(p);
    release_mapped(p);
    r += p.dim(0);
  }
  return out;
}

// A weight stored as FP8 e4m3 codes with 128×128 block scales (`<name>_scale_inv`, DeepSeek-V3's
// checkpoints), dequantised to f32 on the host; the mapped codes are released once decoded.
Tensor fp8_source(const Tensor& codes, const Tensor& scale_inv, const std::string& name) {
  Tensor t = fp8_block_dequantize(codes, scale_inv, std::string("tensor '").append(name).append("'"));
  release_mapped(codes);
  return t;
}

}  // namespace

std::vector<std::pair<std::string, Shape>> expected_tensors(const ModelConfig& c) {
  const ArchSpec& a = arch_spec(c.model_type);
  const int64_t d = c.hidden_size, dh = c.head_dim, qd = c.n_head * dh, kvd = c.n_head_kv * dh;
  std::vector<std::pair<std::string, Shape>> out;
  out.push_back({tensor_name(a.embed), {c.vocab_size, d}});
  for (int64_t l = 0; l < c.n_layer; ++l) {
    out.push_back({tensor_name(a.attn_norm, l), {d}});
    if (c.is_mla()) {
      for (auto& [name, shape] : mla_tensors(c, l)) out.push_back({name, shape});
    } else {
      out.push_back({tensor_name(a.q_proj, l), {qd, d}});
      out.push_back({tensor_name(a.k_proj, l), {kvd, d}});
      out.push_back({tensor_name(a.v_proj, l), {kvd, d}});
      out.push_back({tensor_name(a.o_proj, l), {d, qd}});
    }
    if (c.attn_qkv_bias) {
      out.push_back({tensor_name(a.q_proj, l, -1, ".bias"), {qd}});
      out.push_back({tensor_name(a.k_proj, l, -1, ".bias"), {kvd}});
      out.push_back({tensor_name(a.v_proj, l, -1, ".bias"), {kvd}});
    }
    if (c.attn_o_bias) out.push_back({tensor_name(a.o_proj, l, -1, ".bias"), {d}});
    if (c.qk_norm != QkNormKind::None) {
      out.push_back({tensor_name(a.q_norm, l), {c.q_norm_dim()}});
      out.push_back({tensor_name(a.k_norm, l), {c.k_norm_dim()}});
    }
    if (c.attn_sinks) out.push_back({tensor_name(a.attn_sinks, l, -1, ""), {c.n_head}});
    out.push_back({tensor_name(a.ffn_norm, l), {d}});
    if (c.layer_is_moe(l)) {
      const int64_t f = c.moe_intermediate_size;
      out.push_back({tensor_name(a.router, l), {c.n_expert, d}});
      if (c.router_bias) out.push_back({tensor_name(a.router, l, -1, ".bias"), {c.n_expert}});
      if (a.router_select_bias) out.push_back({router_bias_name(c, l), {c.n_expert}});
      if (a.experts_gate_up) {  // fused 3-D experts (fused_experts.h)
        out.push_back({tensor_name(a.experts_gate_up, l, -1, ""), {c.n_expert, d, 2 * f}});
        if (c.expert_bias) out.push_back({tensor_name(a.experts_gate_up, l, -1, "_bias"), {c.n_expert, 2 * f}});
        out.push_back({tensor_name(a.experts_down, l, -1, ""), {c.n_expert, f, d}});
        if (c.expert_bias) out.push_back({tensor_name(a.experts_down, l, -1, "_bias"), {c.n_expert, d}});
      }
      for (int64_t e = 0; e < c.n_expert && !a.experts_gate_up; ++e) {
        out.push_back({tensor_name(a.expert_gate, l, e), {f, d}});
        out.push_back({tensor_name(a.expert_up, l, e), {f, d}});
        out.push_back({tensor_name(a.expert_down, l, e), {d, f}});
      }
      if (c.shared_expert_intermediate_size > 0) {
        MOE_CHECK(a.shared_gate != nullptr, "model_type %s has no shared expert", c.model_type.c_str());
        const int64_t fs = c.shared_expert_intermediate_size;
        out.push_back({tensor_name(a.shared_gate, l), {fs, d}});
        out.push_back({tensor_name(a.shared_up, l), {fs, d}});
        out.push_back({tensor_name(a.shared_down, l), {d, fs}});
        if (a.shared_expert_gate) out.push_back({tensor_name(a.shared_expert_gate, l), {1, d}});
      }
    } else {
      const int64_t f = c.intermediate_size;
      out.push_back({tensor_name(a.dense_gate, l), {f, d}});
      out.push_back({tensor_name(a.dense_up, l), {f, d}});
      out.push_back({tensor_name(a.dense_down, l), {d, f}});
    }
  }
  out.push_back({tensor_name(a.final_norm), {d}});
  if (!c.tie_word_embeddings) out.push_back({tensor_name(a.lm_head), {c.vocab_size, d}});
  return out;
}

std::vector<std::pair<std::string, Shape>> mla_tensors(const ModelConfig& c, int64_t l) {
  const ArchSpec& a = arch_spec(c.model_type);
  MOE_CHECK(a.kv_a_proj != nullptr, "model_type %s has no MLA tensor names", c.model_type.c_str());
  const int64_t d = c.hidden_size, h = c.n_head, dq = c.qk_nope_head_dim + c.qk_rope_head_dim;
  const int64_t rq = c.q_lora_rank, rkv = c.kv_lora_rank;
  std::vector<std::pair<std::string, Shape>> out;
  if (rq > 0) {
    out.push_back({tensor_name(a.q_a_proj, l), {rq, d}});
    out.push_back({tensor_name(a.q_a_norm, l), {rq}});
    out.push_back({tensor_name(a.q_b_proj, l), {h * dq, rq}});
  } else {
    out.push_back({tensor_name(a.q_proj, l), {h * dq, d}});
  }
  out.push_back({tensor_name(a.kv_a_proj, l), {rkv + c.qk_rope_head_dim, d}});
  out.push_back({tensor_name(a.kv_a_norm, l), {rkv}});
  out.push_back({tensor_name(a.kv_b_proj, l), {h * (c.qk_nope_head_dim + c.v_head_dim), rkv}});
  out.push_back({tensor_name(a.o_proj, l), {d, h * c.v_head_dim}});
  return out;
}

std::string router_bias_name(const ModelConfig& c, int64_t layer) {
  return tensor_name(arch_spec(c.model_type).router, layer, -1, ".e_score_correction_bias");
}

// A layer's fused 3-D experts (fused_experts.h) in the engine's stacked layout: experts
// [e0, e0+n), converted on the host, then given the dtype and device the options say.
// A fused expert weight in the file's in×out layout [E, in, out]: the tensor itself, or its
// MXFP4 form (`<name>_blocks` / `<name>_scales`, core/mxfp4.h: rows are the output units,
// [E, out, in] once decoded) dequantised and transposed as HF's loader does.
static Tensor fused_source(const Source& get, const std::function<bool(const std::string&)>& has,
                           const std::string& name, int64_t e_n, int64_t in, int64_t out) {
  if (has(name) || !has(name + "_blocks")) return get(name);
  const std::string bn = name + "_blocks", sn = name + "_scales";
  const Tensor blocks = get(bn), scales = get(sn);
  MOE_CHECK(in % 32 == 0 && blocks.shape() == Shape({e_n, out, in / 32, 16}),
            "tensor '%s': expected MXFP4 blocks of shape %s, got %s", bn.c_str(),
            shape_str({e_n, out, in / 32, 16}).c_str(), blocks.shape_str().c_str());
  const Tensor deq = mxfp4_dequantize(blocks, scales, "tensor '" + bn + "'");  // [E, out, in]
  Tensor t = Tensor::empty({e_n, in, out}, DType::F32, MemCategory::Workspace);
  const float* src = deq.data<float>();
  float* dst = t.data<float>();
  for (int64_t e = 0; e < e_n; ++e)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) dst[(e * in + i) * out + o] = src[(e * out + o) * in + i];
  release_mapped(blocks);
  return t;
}

static void load_fused_experts(const ModelConfig& c, const ArchSpec& a, const Source& get,
                               const std::function<bool(const std::string&)>& has, int64_t l, int64_t e0, int64_t n,
                               const LoadOptions& opt, LayerWeights* lw) {
  const int64_t d = c.hidden_size, f = c.moe_intermediate_size, e_n = c.n_expert;
  const std::string gu = tensor_name(a.experts_gate_up, l, -1, ""), dn = tensor_name(a.experts_down, l, -1, "");
  const Tensor gsrc = fused_source(get, has, gu, e_n, d, 2 * f), dsrc = fused_source(get, has, dn, e_n, f, d);
  for (auto [name, t, want] : {std::tuple{&gu, &gsrc, Shape{e_n, d, 2 * f}}, {&dn, &dsrc, Shape{e_n, f, d}}}) {
    MOE_CHECK(t->shape() == want, "tensor '%s': expected shape %s, got %s", name->c_str(), shape_str(want).c_str(),
              t->shape_str().c_str());
    MOE_CHECK(t->dtype() == DType::F32 || t->dtype() == DType::BF16 || t->dtype() == DType::F16,
              "tensor '%s': fused experts must be float (f32, bf16, f16), got %s", name->c_str(),
              dtype_name(t->dtype()));
  }
  // The host f32 result, as weight_dtype_for says for a source of dtype `src`, on the device.
  auto place = [&](Tensor t, DType src, const std::string& name, bool proj) {
    const DType dt = weight_dtype_for(src, opt, proj, t.dim(-1));
    const MemCategory cat = check_weight_dtype(dt, name, opt);
    t = t.to_dtype(dt, cat);
    if (opt.device != Device::CPU || t.category() != cat) t = t.to(opt.device, cat);
    return t;
  };
  Tensor w1, w3, w2;
  unfuse_expert_weights(gsrc, dsrc, e0, n, &w1, &w3, &w2, MemCategory::Workspace);
  lw->w1 = place(w1, gsrc.dtype(), gu, true);
  lw->w3 = place(w3, gsrc.dtype(), gu, true);
  lw->w2 = place(w2, dsrc.dtype(), dn, true);
  release_mapped(gsrc);
  release_mapped(dsrc);
  if (!c.expert_bias) return;
  const std::string gub = gu + "_bias", dnb = dn + "_bias";
  const Tensor gb = get(gub), db = get(dnb);
  MOE_CHECK(gb.shape() == Shape({e_n, 2 * f}), "tensor '%s': expected shape %s, got %s", gub.c_str(),
            shape_str({e_n, 2 * f}).c_str(), gb.shape_str().c_str());
  MOE_CHECK(db.shape() == Shape({e_n, d}), "tensor '%s': expected shape %s, got %s", dnb.c_str(),
            shape_str({e_n, d}).c_str(), db.shape_str().c_str());
  Tensor b1, b3, b2;
  unfuse_expert_biases(gb, db, e0, n, &b1, &b3, &b2, MemCategory::Workspace);
  lw->b1 = place(b1, gb.dtype(), gub, false);
  lw->b3 = place(b3, gb.dtype(), gub, false);
  lw->b2 = place(b2, db.dtype(), dnb, false);
}

bool config_runs_on_cuda(const ModelConfig& c) {
  bool sliding = false;
  for (int64_t l = 0; l < c.n_layer; ++l) sliding = sliding || c.layer_window(l) > 0;
  return !c.attn_sinks && !sliding && c.rope_scaling.kind == RopeScalingKind::None && c.swiglu_limit == 0 &&
         !c.expert_bias && !c.is_mla() && c.routed_scaling_factor == 1 && c.topk_method == RouterTopk::Greedy &&
         !arch_spec(c.model_type).router_sigmoid;
}

// A layer's MLA projections (LayerWeights' MLA fields). The latent norms are small and kv_b_proj
// feeds the absorbed inference products (ops.h mla_absorb_*), which read f32: those stay f32.
static void load_mla(const ModelConfig& c, int64_t l, const Source& get, const LoadOptions& opt, LayerWeights* lw) {
  const ArchSpec& a = arch_spec(c.model_type);
  LoadOptions f32 = opt;
  f32.keep_dtype = false;
  f32.weight_dtype = DType::F32;
  f32.quant_dtype = DType::F32;
  for (auto& [name, shape] : mla_tensors(c, l)) {
    const Tensor src = get(name);
    if (name == tensor_name(a.q_a_proj, l)) lw->wq_a = prepare(src, name, shape, opt, true);
    else if (name == tensor_name(a.q_a_norm, l)) lw->q_a_norm = prepare(src, name, shape, opt);
    else if (name == tensor_name(a.q_b_proj, l) || name == tensor_name(a.q_proj, l)) lw->wq_b = prepare(src, name, shape, opt, true);
    else if (name == tensor_name(a.kv_a_proj, l)) lw->wkv_a = prepare(src, name, shape, opt, true);
    else if (name == tensor_name(a.kv_a_norm, l)) lw->kv_a_norm = prepare(src, name, shape, opt);
    else if (name == tensor_name(a.kv_b_proj, l)) lw->wkv_b = prepare(src, name, shape, f32);
    else if (name == tensor_name(a.o_proj, l)) lw->wo = prepare(src, name, shape, opt, true);
    else MOE_ASSERT(false);
  }
}

static void build(const ModelConfig& c, const Source& get, const std::function<bool(const std::string&)>& has,
                  const LoadOptions& opt, ModelWeights* w) {
  const ArchSpec& a = arch_spec(c.model_type);
  MOE_CHECK(opt.device == Device::CPU || config_runs_on_cuda(c),
            "%s models run on the CPU only for now: their attention sinks, sliding windows, YaRN RoPE, clamped "
            "SwiGLU experts, MLA attention and DeepSeek routing have no CUDA kernels yet (use --device cpu)",
            c.model_type.c_str());
  const int64_t d = c.hidden_size, dh = c.head_dim, qd = c.n_head * dh, kvd = c.n_head_kv * dh;
  MOE_CHECK(opt.device == Device::CPU || device_available(opt.device) || cuda_available(),
            "device %s is not available", device_name(opt.device));
  MOE_CHECK(opt.device != Device::CPU || opt.act_dtype == DType::F32, "CPU activations must be f32");
  MOE_CHECK(opt.quant_dtype == DType::F32 || dtype_is_quant(opt.quant_dtype),
            "LoadOptions::quant_dtype must be F32 (none) or a quantized block dtype, got %s", dtype_name(opt.quant_dtype));
  MOE_CHECK(!dtype_is_quant(opt.quant_dtype) || opt.device == Device::CPU,
            "quantized weights (%s) run on the CPU only (no CUDA kernels yet)", dtype_name(opt.quant_dtype));
  auto load = [&](const std::string& name, const Shape& shape) { return prepare(get(name), name, shape, opt); };
  // Projections: the weights that may be quantized (LoadOptions::quant_dtype).
  auto load_proj = [&](const std::string& name, const Shape& shape) {
    return prepare(get(name), name, shape, opt, /*proj=*/true);
  };
  w->embed = load(tensor_name(a.embed), {c.vocab_size, d});
  w->final_norm = load(tensor_name(a.final_norm), {d});
  w->lm_head = c.tie_word_embeddings ? w->embed : load_proj(tensor_name(a.lm_head), {c.vocab_size, d});
  w->layers.resize(static_cast<size_t>(c.n_layer));
  w->expert_begin = opt.expert_count < 0 ? 0 : opt.expert_begin;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    LayerWeights& lw = w->layers[static_cast<size_t>(l)];
    lw.attn_norm = load(tensor_name(a.attn_norm, l), {d});
    lw.ffn_norm = load(tensor_name(a.ffn_norm, l), {d});
    if (c.is_mla()) {
      load_mla(c, l, get, opt, &lw);
    } else {
    std::vector<Tensor> qkv = {load_proj(tensor_name(a.q_proj, l), {qd, d}), load_proj(tensor_name(a.k_proj, l), {kvd, d}),
                               load_proj(tensor_name(a.v_proj, l), {kvd, d})};
    const bool mixed = qkv[0].dtype() != qkv[1].dtype() || qkv[0].dtype() != qkv[2].dtype();
    if (mixed && dtype_is_quant(qkv[0].dtype()) && dtype_is_quant(qkv[1].dtype()) && dtype_is_quant(qkv[2].dtype())) {
      // Quantized sources of different types (a GGUF mix giving attn_v more bits, Q4_K_M): kept
      // apart in their own types, one product each (inference only). Stacked as f32 they were a
      // third of a medium-preset Q4_K_M decode step's weight bytes.
      lw.wq = qkv[0];
      lw.wk = qkv[1];
      lw.wv = qkv[2];
    } else {
      // Other mixes (float types): the stacked weight is f32, converted exactly.
      if (mixed)
        for (Tensor& t : qkv) t = t.to_dtype(DType::F32, MemCategory::Weights);
      lw.wqkv = stack_rows(qkv);
    }
    lw.wo = load_proj(tensor_name(a.o_proj, l), {d, qd});
    if (c.attn_qkv_bias) {
      lw.bqkv = stack_rows({load(tensor_name(a.q_proj, l, -1, ".bias"), {qd}),
                            load(tensor_name(a.k_proj, l, -1, ".bias"), {kvd}),
                            load(tensor_name(a.v_proj, l, -1, ".bias"), {kvd})});
    }
    set_qkv_views(c, lw);
    if (c.attn_o_bias) lw.bo = load(tensor_name(a.o_proj, l, -1, ".bias"), {d});
    }
    if (c.qk_norm != QkNormKind::None) {
      lw.q_norm = load(tensor_name(a.q_norm, l), {c.q_norm_dim()});
      lw.k_norm = load(tensor_name(a.k_norm, l), {c.k_norm_dim()});
    }
    if (c.attn_sinks) lw.sinks = load(tensor_name(a.attn_sinks, l, -1, ""), {c.n_head});
    lw.attn_window = c.layer_window(l);
    lw.is_moe = c.layer_is_moe(l);
    if (lw.is_moe) {
      const int64_t f = c.moe_intermediate_size, e = c.n_expert;
      lw.router = load(tensor_name(a.router, l), {e, d});
      if (const std::string bn = router_bias_name(c, l); has(bn)) {
        LoadOptions bo = opt;  // a selection bias stays f32 whatever the weights' dtype
        bo.keep_dtype = false;
        bo.weight_dtype = DType::F32;
        lw.router_bias = prepare(get(bn), bn, {e}, bo);
      }
      const int64_t e0 = opt.expert_begin, en = opt.expert_count < 0 ? e : opt.expert_count;
      MOE_CHECK(e0 >= 0 && en > 0 && e0 + en <= e, "LoadOptions: experts [%lld, %lld) of %lld", (long long)e0,
                (long long)(e0 + en), (long long)e);
      if (c.router_bias) lw.brouter = load(tensor_name(a.router, l, -1, ".bias"), {e});
      if (a.experts_gate_up) {
        load_fused_experts(c, a, get, has, l, e0, en, opt, &lw);
      } else {
        lw.w1 = stack_experts(get, a.expert_gate, l, e0, en, f, d, opt);
        lw.w3 = stack_experts(get, a.expert_up, l, e0, en, f, d, opt);
        lw.w2 = stack_experts(get, a.expert_down, l, e0, en, d, f, opt);
      }
      if (lw.w1.dtype() != lw.w3.dtype()) {  // gate and up of different types: both f32 (host)
        lw.w1 = lw.w1.to_dtype(DType::F32, MemCategory::Weights);
        lw.w3 = lw.w3.to_dtype(DType::F32, MemCategory::Weights);
      }
      if (lw.w1.dtype() != lw.w2.dtype() && !dtype_is_quant(lw.w1.dtype()) && !dtype_is_quant(lw.w2.dtype()))
        lw.w2 = lw.w2.to_dtype(lw.w1.dtype(), MemCategory::Weights);  // float experts share one dtype
      if (c.shared_expert_intermediate_size > 0) {
        const int64_t fs = c.shared_expert_intermediate_size;
        lw.shared_w1 = load_proj(tensor_name(a.shared_gate, l), {fs, d});
        lw.shared_w3 = load_proj(tensor_name(a.shared_up, l), {fs, d});
        lw.shared_w2 = load_proj(tensor_name(a.shared_down, l), {d, fs});
        if (a.shared_expert_gate) lw.shared_gate = load(tensor_name(a.shared_expert_gate, l), {1, d});
      }
    } else {
      const int64_t f = c.intermediate_size;
      lw.w1 = load_proj(tensor_name(a.dense_gate, l), {f, d});
      lw.w3 = load_proj(tensor_name(a.dense_up, l), {f, d});
      lw.w2 = load_proj(tensor_name(a.dense_down, l), {d, f});
    }
  }
}

Model Model::load(const std::string& dir, const LoadOptions& opt) { return load(Checkpoint::open_dir(dir), opt); }

Model Model::load(const Checkpoint& ck, const LoadOptions& opt) {
  ModelConfig cfg = load_hf_config(ck.dir() + "/config.json");
  Model m;
  m.cfg_ = cfg;
  m.opt_ = opt;
  // Weights stored in bitsandbytes' 4-bit format are decoded here (NF4 blocks, io/bnb_checkpoint.h),
  // and DeepSeek-V3's FP8 weights with their block scales (core/fp8.h).
  build(
      cfg,
      [&](const std::string& name) {
        if (is_bnb4_weight(ck, name)) return read_bnb4_weight(ck, name);
        if (ck.has(name + "_scale_inv")) return fp8_source(ck.get(name), ck.get(name + "_scale_inv"), name);
        return ck.get(name);
      },
      [&](const std::string& name) { return ck.has(name); }, opt, &m.w_);
  return m;
}

Model Model::from_tensors(const ModelConfig& cfg, const std::vector<std::pair<std::string, Tensor>>& named,
                          const LoadOptions& opt) {
  std::map<std::string, const Tensor*> by_name;
  for (auto& [n, t] : named) by_name[n] = &t;
  Model m;
  m.cfg_ = cfg;
  m.opt_ = opt;
  build(cfg,
        [&](const std::string& name) {
          auto it = by_name.find(name);
          MOE_CHECK(it != by_name.end(), "missing tensor '%s'", name.c_str());
          auto sc = by_name.find(name + "_scale_inv");
          if (sc != by_name.end()) return fp8_source(*it->second, *sc->second, name);
          return *it->second;
        },
        [&](const std::string& name) { return by_name.count(name) > 0; }, opt, &m.w_);
  return m;
}

KVCache Model::make_cache(int64_t batch, int64_t capacity) const {
  KVCache kv;
  kv.batch = batch;
  kv.capacity = capacity;
  kv.pos.assign(static_cast<size_t>(batch), 0);
  add_kv_layers(kv, batch, capacity);
  return kv;
}

// Per layer, k and v caches [rows, positions, Hkv, Dh] (slots x capacity, or blocks x block size).
void Model::add_kv_layers(KVCache& kv, int64_t rows, int64_t positions) const {
  if (cfg_.is_mla()) {
    // One latent row per token: the same tensor serves as keys and values (model.h KVCache).
    for (int64_t l = 0; l < cfg_.n_layer; ++l) {
      Tensor lat = Tensor::zeros({rows, positions, 1, cfg_.kv_lora_rank + cfg_.qk_rope_head_dim}, opt_.act_dtype,
                                 MemCategory::KvCache, opt_.device);
      kv.k.push_back(lat);
      kv.v.push_back(lat);
    }
    return;
  }
  for (int64_t l = 0; l < cfg_.n_layer; ++l)
    for (auto* side : {&kv.k, &kv.v})
      side->push_back(Tensor::zeros({rows, positions, cfg_.n_head_kv, cfg_.head_dim}, opt_.act_dtype,
                                    MemCategory::KvCache, opt_.device));
}

int64_t Model::kv_bytes_per_token() const {
  const ModelConfig& c = cfg_;
  const int64_t per_layer = c.is_mla() ? c.kv_lora_rank + c.qk_rope_head_dim : 2 * c.n_head_kv * c.head_dim;
  return per_layer * c.n_layer * static_cast<int64_t>(dtype_size(opt_.act_dtype));
}

KVCache Model::make_paged_cache(int64_t slots, int64_t n_blocks, int64_t block_size) const {
  MOE_CHECK(opt_.device == Device::CPU, "the paged KV cache is CPU only (got %s)", device_name(opt_.device));
  MOE_CHECK(slots > 0 && n_blocks > 0 && block_size > 0, "paged KV cache: %lld slots, %lld blocks of %lld positions",
            (long long)slots, (long long)n_blocks, (long long)block_size);
  KVCache kv;
  kv.batch = slots;
  kv.capacity = n_blocks * block_size;
  kv.block_size = block_size;
  kv.pos.assign(static_cast<size_t>(slots), 0);
  kv.tables.assign(static_cast<size_t>(slots), {});
  add_kv_layers(kv, n_blocks, block_size);
  return kv;
}

int64_t params_total(const ModelConfig& c) {
  int64_t n = 0;
  for (auto& [name, shape] : expected_tensors(c)) n += shape_numel(shape);
  return n;
}

int64_t params_active(const ModelConfig& c) {
  int64_t n = 0;
  for (auto& [name, shape] : expected_tensors(c)) {
    // Routed experts are added below: K of E per MoE layer.
    if (name.find(".experts.") != std::string::npos) continue;
    n += shape_numel(shape);
  }
  for (int64_t l = 0; l < c.n_layer; ++l)
    if (c.layer_is_moe(l))
      n += c.n_expert_used * (3 * c.moe_intermediate_size * c.hidden_size +
                              (c.expert_bias ? 2 * c.moe_intermediate_size + c.hidden_size : 0));
  return n;
}

bool ModelWeights::has_lora() const {
  for (const LayerWeights& l : layers)
    for (const Lora* p : l.loras())
      if (p->on()) return true;
  return false;
}

void set_qkv_views(const ModelConfig& c, LayerWeights& lw) {
  const int64_t qd = c.n_head * c.head_dim, kvd = c.n_head_kv * c.head_dim;
  if (lw.wqkv.defined()) {
    lw.wq = lw.wqkv.rows(0, qd);
    lw.wk = lw.wqkv.rows(qd, qd + kvd);
    lw.wv = lw.wqkv.rows(qd + kvd, qd + 2 * kvd);
  }
  if (lw.bqkv.defined()) {
    lw.bq = lw.bqkv.rows(0, qd);
    lw.bk = lw.bqkv.rows(qd, qd + kvd);
    lw.bv = lw.bqkv.rows(qd + kvd, qd + 2 * kvd);
  }
}

ForwardResult Model::forward(const Tensor& ids_in, KVCache& cache, const ForwardOptions& fo) const {
  const ModelConfig& c = cfg_;
  MOE_CHECK(ids_in.ndim() == 2, "forward: ids must be [B,S], got %s", ids_in.shape_str().c_str());
  // The inference path reads merged weights: adapters are folded in first (merge_lora,
  // train/lora.h), never silently ignored.
  MOE_CHECK(!w_.has_lora(), "forward: the model carries unmerged LoRA adapters; merge them for inference");
  const int64_t b_n = ids_in.dim(0), s_n = ids_in.dim(1), t_n = b_n * s_n;
  const int64_t d = c.hidden_size;
  // Reused from call to call (their capacity stays): a decode step must not allocate.
  thread_local std::vector<int64_t> slots, past;
  slots.assign(fo.slots.begin(), fo.slots.end());
  if (slots.empty()) {
    MOE_CHECK(b_n == cache.batch, "forward: batch %lld but the KV cache was made for %lld", (long long)b_n,
              (long long)cache.batch);
    for (int64_t b = 0; b < b_n; ++b) slots.push_back(b);
  }
  MOE_CHECK(int64_t(slots.size()) == b_n, "forward: %zu cache slots for a batch of %lld", slots.size(), (long long)b_n);
  MOE_CHECK(int64_t(cache.pos.size()) == cache.batch, "forward: the KV cache has %zu positions for %lld slots",
            cache.pos.size(), (long long)cache.batch);
  past.assign(static_cast<size_t>(b_n), 0);
  for (int64_t b = 0; b < b_n; ++b) {
    const int64_t sl = slots[static_cast<size_t>(b)];
    MOE_CHECK(sl >= 0 && sl < cache.batch, "forward: cache slot %lld out of range [0,%lld)", (long long)sl,
              (long long)cache.batch);
    for (int64_t j = 0; j < b; ++j)
      MOE_CHECK(slots[static_cast<size_t>(j)] != sl, "forward: cache slot %lld given twice", (long long)sl);
    past[static_cast<size_t>(b)] = cache.pos[static_cast<size_t>(sl)];
    const int64_t cap = cache.block_size > 0
                            ? int64_t(cache.tables[static_cast<size_t>(sl)].size()) * cache.block_size
                            : cache.capacity;
    MOE_CHECK(past[static_cast<size_t>(b)] + s_n <= cap,
              "forward: %lld + %lld positions exceed the KV cache capacity %lld", (long long)past[static_cast<size_t>(b)],
              (long long)s_n, (long long)cap);
  }
  // Paged: the rows' block tables and positions as host tensors (ops.h).
  Tensor tables, pos;
  if (cache.block_size > 0) {
    size_t m = 1;
    for (int64_t sl : slots) m = std::max(m, cache.tables[static_cast<size_t>(sl)].size());
    tables = Tensor::zeros({b_n, int64_t(m)}, DType::I32, MemCategory::Activations);
    pos = Tensor::empty({b_n}, DType::I32, MemCategory::Activations);
    for (int64_t b = 0; b < b_n; ++b) {
      const auto& tb = cache.tables[static_cast<size_t>(slots[static_cast<size_t>(b)])];
      std::copy(tb.begin(), tb.end(), tables.data<int32_t>() + b * int64_t(m));
      pos.data<int32_t>()[b] = static_cast<int32_t>(past[static_cast<size_t>(b)]);
    }
  }
  const Device dev = opt_.device;
  const DType adt = opt_.act_dtype;
  const MemCategory act = MemCategory::Activations;

  // Host ids are range-checked here, once, for every backend (the CUDA embedding trusts them).
  Tensor ids = ids_in;
  if (ids_in.device() == Device::CPU) {
    MOE_CHECK(ids_in.dtype() == DType::I32 || ids_in.dtype() == DType::I64, "forward: ids must be i32 or i64, got %s",
              dtype_name(ids_in.dtype()));
    const bool wide = ids_in.dtype() == DType::I64;
    if (wide) ids = Tensor::empty(ids_in.shape(), DType::I32, act);
    for (int64_t i = 0; i < t_n; ++i) {
      const int64_t v = wide ? ids_in.data<int64_t>()[i] : ids_in.data<int32_t>()[i];
      MOE_CHECK(v >= 0 && v < c.vocab_size, "forward: token id %lld out of range [0,%lld)", (long long)v,
                (long long)c.vocab_size);
      if (wide) ids.data<int32_t>()[i] = static_cast<int32_t>(v);
    }
  } else {
    MOE_CHECK(ids_in.dtype() == DType::I32, "forward: device ids must be i32");
  }
  if (ids.device() != dev) ids = ids.to(dev, act);

  ForwardResult res;
  Tensor x = Tensor::empty({t_n, d}, adt, act, dev);
  embedding_forward(x, ids.view({t_n}), w_.embed);
  Tensor h = Tensor::empty({t_n, d}, adt, act, dev);
  Tensor y = Tensor::empty({t_n, d}, adt, act, dev);
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const LayerWeights& lw = w_.layers[static_cast<size_t>(l)];
    attention_block_infer(c, lw, x, h, y, cache.k[static_cast<size_t>(l)], cache.v[static_cast<size_t>(l)], b_n, s_n,
                          slots, past, tables, pos);
    Tensor logits;
    ffn_block_infer(c, lw, x, h, y, fo.want_router_logits ? &logits : nullptr, ep_);
    if (fo.want_router_logits) res.router_logits.push_back(logits);
  }

  // --- head ---
  Tensor xf = x;
  int64_t rows = t_n, s_out = s_n;
  if (fo.last_logits_only && s_n > 1) {
    xf = Tensor::empty({b_n, d}, adt, act, dev);
    for (int64_t b = 0; b < b_n; ++b) {
      Tensor dst = xf.select(b), src = x.select(b * s_n + s_n - 1);
      mem_copy(dst.raw(), dev, src.raw(), dev, src.nbytes());
    }
    rows = b_n;
    s_out = 1;
  }
  Tensor hf = Tensor::empty({rows, d}, adt, act, dev);
  rmsnorm_forward(hf, xf, w_.final_norm, float(c.rms_norm_eps));
  Tensor logits = Tensor::empty({rows, c.vocab_size}, DType::F32, act, dev);
  linear_forward(logits, hf, w_.lm_head, Tensor());
  res.logits = logits.view({b_n, s_out, c.vocab_size});
  for (int64_t sl : slots) cache.pos[static_cast<size_t>(sl)] += s_n;
  return res;
}

}  // namespace moe

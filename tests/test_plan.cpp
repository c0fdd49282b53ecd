// test_plan.cpp — the planner: exact parameter counts of the catalog models, its memory
// prediction against the engine's own measured memory report, hand-derived training / LoRA /
// QLoRA / ZeRO / EP worked examples, and clear errors for bad input.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <tuple>
#include <nlohmann/json.hpp>

#include "core/memory.h"
#include "model/activations.h"
#include "model/model.h"
#include "model/model_train.h"
#include "model/random_init.h"
#include "ops/cpu/cpu_gemm_onednn.h"
#include "train/optimizer.h"
#include "plan/model_catalog.h"
#include "plan/plan_report.h"
#include "plan/planner.h"

namespace moe {
namespace {

// Expects `fn` to throw moe::Error whose message contains `needle`.
template <typename Fn>
void expect_error(Fn fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected an error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

struct Expected {
  const char* name;
  int64_t total, active, active_no_embed;
  double headline_total, headline_active;  // published, in billions
  bool headline_active_without_embedding;  // the paper's convention
};

// Hand-derived counts (D hidden, L layers, E experts, K top-k, F expert width, V vocab):
//
// Mixtral-8x7B  D 4096, L 32, H 32, Hkv 8, Dh 128, E 8, K 2, F 14336, V 32000, untied.
//   attention/layer = q 4096*4096 + k,v 2*1024*4096 + o 4096*4096 = 41,943,040; norms 2*4096 = 8,192;
//   router 8*4096 = 32,768; one expert 3*4096*14336 = 176,160,768; experts 8x = 1,409,286,144.
//   layer = 1,451,270,144; x32 = 46,440,644,608; + embed + head 2*32000*4096 = 262,144,000
//   + final norm 4,096 = 46,702,792,704.  active/layer = 41,943,040 + 8,192 + 32,768 + 2*176,160,768
//   = 394,305,536; x32 = 12,617,777,152 + 262,148,096 = 12,879,925,248.
// Mixtral-8x22B D 6144, L 56, H 48, Hkv 8, E 8, K 2, F 16384, V 32000.
//   attention 2*6144^2 + 2*1024*6144 = 88,080,384; norms 12,288; router 49,152;
//   one expert 3*6144*16384 = 301,989,888 (x8 = 2,415,919,104); layer 2,504,060,928 x56
//   = 140,227,411,968 + 2*32000*6144 (393,216,000) + 6,144 = 140,620,634,112.
//   active: (88,080,384 + 12,288 + 49,152 + 2*301,989,888) x56 = 38,758,809,600 + 393,222,144
//   = 39,152,031,744.
// Qwen1.5-MoE-A2.7B D 2048, L 24, H = Hkv = 16, qkv bias, E 60, K 4, F 1408, shared 5632, V 151936.
//   attention 4*2048^2 + 3*2048 = 16,783,360; norms 4,096; router 60*2048 = 122,880;
//   experts 60*3*2048*1408 = 519,045,120; shared 3*2048*5632 + gate 2048 = 34,605,056;
//   layer 570,560,512 x24 = 13,693,452,288 + 2*151936*2048 (622,329,856) + 2,048 = 14,315,784,192.
//   active: (16,783,360 + 4,096 + 122,880 + 4*8,650,752 + 34,605,056) x24 = 2,066,841,600
//   + 622,331,904 = 2,689,173,504.
// Qwen2-57B-A14B D 3584, L 28, H 28, Hkv 4, Dh 128, qkv bias, E 64, K 8, F 2560, shared 20480.
//   attention 2*3584^2 + 2*512*3584 + 3584 + 2*512 = 29,364,736; norms 7,168; router 229,376;
//   experts 64*27,525,120 = 1,761,607,680; shared 3*3584*20480 + 3584 = 220,204,544;
//   layer 2,011,413,504 x28 = 56,319,578,112 + 2*151936*3584 (1,089,077,248) + 3,584 = 57,408,658,944.
//   active: (29,364,736 + 7,168 + 229,376 + 8*27,525,120 + 220,204,544) x28 = 13,160,189,952
//   + 1,089,080,832 = 14,249,270,784.
// Qwen3-30B-A3B D 2048, L 48, H 32, Hkv 4, Dh 128, q/k norm [128], E 128, K 8, F 768.
//   attention 4096*2048*2 + 512*2048*2 + 256 = 18,874,624; norms 4,096; router 262,144;
//   experts 128*3*2048*768 = 603,979,776; layer 623,120,640 x48 = 29,909,790,720
//   + 622,329,856 + 2,048 = 30,532,122,624.  active: (19,140,864 + 8*4,718,592) x48
//   = 2,730,700,800 + 622,331,904 = 3,353,032,704.
// Qwen3-235B-A22B D 4096, L 94, H 64, Hkv 4, Dh 128, E 128, K 8, F 1536.
//   attention 2*8192*4096 + 2*512*4096 + 256 = 71,303,424; norms 8,192; router 524,288;
//   experts 128*18,874,368 = 2,415,919,104; layer 2,487,755,008 x94 = 233,848,970,752
//   + 2*151936*4096 (1,244,659,712) + 4,096 = 235,093,634,560.
//   active: (71,835,904 + 8*18,874,368) x94 = 20,946,099,712 + 1,244,663,808 = 22,190,763,520.
// OLMoE-1B-7B D 2048, L 16, H = Hkv = 16, q_norm/k_norm [2048], E 64, K 8, F 1024, V 50304.
//   attention 4*2048^2 + 2*2048 = 16,781,312; norms 4,096; router 131,072;
//   experts 64*3*2048*1024 = 402,653,184; layer 419,569,664 x16 = 6,713,114,624
//   + 2*50304*2048 (206,045,184) + 2,048 = 6,919,161,856.
//   active: (16,916,480 + 8*6,291,456) x16 = 1,075,970,048 + 206,047,232 = 1,282,017,280.
// DeepSeek-V2-Lite D 2048, L 27 (first dense, Fd 10944), H 16, MLA q full, kv_lora 512, rope 64,
//   nope 128, v 128, E 64 + 2 shared, K 6, F 1408, V 102400.
//   attention q 3072*2048 (6,291,456) + kv_a 576*2048 (1,179,648) + 512 + kv_b 512*16*256
//   (2,097,152) + o 2048*2048 (4,194,304) = 13,763,072; norms 4,096.
//   dense layer 13,767,168 + 3*2048*10944 (67,239,936) = 81,007,104.
//   MoE layer 13,767,168 + experts 64*8,650,752 (553,648,128) + shared 17,301,504 + router 131,072
//   = 584,847,872 x26 = 15,206,044,672.  total = 81,007,104 + 15,206,044,672 + 419,430,400 + 2,048
//   = 15,706,484,224.  active MoE layer 13,767,168 + 6*8,650,752 + 17,301,504 + 131,072 = 83,104,256
//   x26 = 2,160,710,656; active = 2,160,710,656 + 81,007,104 + 419,432,448 = 2,661,150,208,
//   without the input embedding (209,715,200): 2,451,435,008 (the paper's 2.4B).
// DeepSeek-V2 D 5120, L 60 (first dense, Fd 12288), H 128, q_lora 1536, E 160 + 2 shared, K 6, F 1536.
//   attention q_a 7,864,320 + 1,536 + q_b 37,748,736 + kv_a 2,949,120 + 512 + kv_b 16,777,216
//   + o 83,886,080 = 149,227,520; norms 10,240; expert 3*5120*1536 = 23,592,960.
//   dense layer 149,237,760 + 188,743,680 = 337,981,440; MoE layer 149,237,760 + 160*23,592,960
//   + 2*23,592,960 + 819,200 = 3,972,116,480 x59 = 234,354,872,320.
//   total = 337,981,440 + 234,354,872,320 + 1,048,576,000 + 5,120 = 235,741,434,880.
//   active MoE layer 149,237,760 + 8*23,592,960 + 819,200 = 338,800,640 x59 = 19,989,237,760;
//   active = 21,375,800,320; without embedding (524,288,000) 20,851,512,320 (the paper's 21B).
// DeepSeek-V3 D 7168, L 61 (3 dense, Fd 18432), H 128, q_lora 1536, E 256 + 1 shared, K 8, F 2048.
//   attention q_a 11,010,048 + 1,536 + q_b 37,748,736 + kv_a 4,128,768 + 512 + kv_b 16,777,216
//   + o 117,440,512 = 187,107,328; norms 14,336; expert 3*7168*2048 = 44,040,192.
//   dense layer 187,121,664 + 396,361,728 = 583,483,392 x3 = 1,750,450,176.
//   MoE layer 187,121,664 + 256*44,040,192 + 44,040,192 + router 1,835,008 + score bias 256
//   = 11,507,286,272 x58 = 667,422,603,776.
//   total = 1,750,450,176 + 667,422,603,776 + 2*129280*7168 (1,853,358,080) + 7,168 = 671,026,419,200.
//   active MoE layer 187,121,664 + 9*44,040,192 + 1,835,264 = 585,318,656 x58 = 33,948,482,048;
//   active = 33,948,482,048 + 1,750,450,176 + 1,853,365,248 = 37,552,297,472; without the input
//   embedding (926,679,040) 36,625,618,432 = the release notes' "36.6B incl. the 0.9B head".
// gpt-oss-120b D 2880, L 36, H 64, Hkv 8, Dh 64, biases, sinks, E 128, K 4, F 2880, V 201088.
//   attention q 4096*2880 + 4096, k,v 512*2880 + 512 each, o 2880*4096 + 2880, sinks 64
//   = 26,550,144; norms 5,760; router 128*2880 + 128 = 368,768;
//   one expert gate_up 2880*5760 + 5760 + down 2880*2880 + 2880 = 24,891,840; x128 = 3,186,155,520.
//   layer 3,213,080,192 x36 = 115,670,886,912 + 2*201088*2880 (1,158,266,880) + 2,880
//   = 116,829,156,672.  active layer 26,550,144 + 5,760 + 368,768 + 4*24,891,840 = 126,492,032
//   x36 = 4,553,713,152; + head 579,133,440 + 2,880 = 5,132,849,472 without the input embedding
//   (the model card's 5.13B); with it 5,711,982,912.
// gpt-oss-20b L 24, E 32: router 32*2880 + 32 = 92,192; experts 32*24,891,840 = 796,538,880;
//   layer 823,186,976 x24 = 19,756,487,424 + 1,158,266,880 + 2,880 = 20,914,757,184.
//   active layer 126,215,456 x24 = 3,029,170,944 + 579,136,320 = 3,608,307,264 (no input
//   embedding; the card's 3.61B); with it 4,187,440,704.
// DBRX D 6144, L 40, H 48, Hkv 8, Dh 128, LayerNorm without bias, E 16, K 4, F 10752, V 100352.
//   Wqkv (48+16)*128*6144 = 50,331,648 + out 6144^2 = 37,748,736; norms 12,288; router 98,304;
//   one expert 3*6144*10752 = 198,180,864, x16 = 3,170,893,824; layer 3,259,084,800 x40
//   = 130,363,392,000 + 2*100352*6144 (1,233,125,376) + 6,144 = 131,596,523,520.
//   active (88,080,384 + 12,288 + 98,304 + 4*198,180,864) x40 = 35,236,577,280 + 1,233,131,520
//   = 36,469,708,800.
// Switch-Base-128 D 768, d_ff 3072, 12 heads x 64, 12 encoder + 12 decoder layers, every other
//   FFN sparse (128 ReLU experts of 2*768*3072 = 4,718,592), V 32128 tied.
//   encoder dense layer 4*768^2 + 2*768 + 4,718,592 = 7,079,424 (x6 = 42,476,544); sparse
//   2,359,296 + 1,536 + router 98,304 + 128*4,718,592 = 606,438,912 (x6 = 3,638,633,472);
//   decoder dense 2*2,359,296 + 3*768 + 4,718,592 = 9,439,488 (x6 = 56,636,928); sparse
//   4,718,592 + 2,304 + 98,304 + 603,979,776 = 608,798,976 (x6 = 3,652,793,856); relative bias
//   2*32*12 = 768; final norms 2*768; embedding 32128*768 = 24,674,304.
//   total = 7,415,217,408; active = total - 12*603,979,776 + 12*4,718,592 = 224,083,200.
const Expected kExpected[] = {
    {"Mixtral-8x7B", 46702792704, 12879925248, 12748853248, 46.7, 12.9, false},
    {"Mixtral-8x22B", 140620634112, 39152031744, 38955423744, 141, 39, false},
    {"Qwen1.5-MoE-A2.7B", 14315784192, 2689173504, 2378008576, 14.3, 2.7, false},
    {"Qwen2-57B-A14B", 57408658944, 14249270784, 13704732160, 57.4, 14.2, false},
    {"Qwen3-30B-A3B", 30532122624, 3353032704, 3041867776, 30.5, 3.3, false},
    {"Qwen3-235B-A22B", 235093634560, 22190763520, 21568433664, 235, 22, false},
    {"OLMoE-1B-7B", 6919161856, 1282017280, 1178994688, 6.9, 1.3, false},
    {"DeepSeek-V2-Lite", 15706484224, 2661150208, 2451435008, 15.7, 2.4, true},
    {"DeepSeek-V2", 235741434880, 21375800320, 20851512320, 236, 21, true},
    {"DeepSeek-V3", 671026419200, 37552297472, 36625618432, 671, 37, true},
    {"gpt-oss-20b", 20914757184, 4187440704, 3608307264, 20.9, 3.6, true},
    {"gpt-oss-120b", 116829156672, 5711982912, 5132849472, 116.8, 5.1, true},
    {"DBRX", 131596523520, 36469708800, 35853146112, 132, 36, false},
    {"Switch-Base-128", 7415217408, 224083200, 224083200, 7.4, 0.22, false},
};

TEST(PlanParams, CatalogModelsMatchHandDerivedCounts) {
  ASSERT_EQ(model_catalog().size(), std::size(kExpected));
  for (const Expected& e : kExpected) {
    SCOPED_TRACE(e.name);
    PlanModel m = catalog_model(e.name);
    ParamCounts pc = plan_params(m);
    EXPECT_EQ(pc.total, e.total);
    EXPECT_EQ(pc.active, e.active);
    EXPECT_EQ(pc.active_no_embed, e.active_no_embed);
    // The categories add up to the total.
    EXPECT_EQ(pc.embed + pc.lm_head + pc.attn + pc.norms + pc.dense_ffn + pc.router + pc.experts + pc.shared_experts,
              pc.total);
  }
}

TEST(PlanParams, CatalogModelsMatchPublishedHeadlines) {
  for (const Expected& e : kExpected) {
    SCOPED_TRACE(e.name);
    ParamCounts pc = plan_params(catalog_model(e.name));
    // Headlines are rounded to 2-3 significant digits: within 1.5% (0.05B absolute for small ones).
    const double total = double(pc.total) / 1e9;
    const double active = double(e.headline_active_without_embedding ? pc.active_no_embed : pc.active) / 1e9;
    EXPECT_NEAR(total, e.headline_total, std::max(0.015 * e.headline_total, 0.05));
    EXPECT_NEAR(active, e.headline_active, std::max(0.03 * e.headline_active, 0.05));
  }
}

TEST(PlanParams, DeepSeekV3MtpModuleCountedApart) {
  // MTP: enorm + hnorm + shared_head.norm 3*7168 + eh_proj 7168*14336 (102,760,448) + one MoE block
  // 11,507,286,272 = 11,610,068,224 (the release notes round the unique part to 11.5B).
  ParamCounts pc = plan_params(catalog_model("DeepSeek-V3"));
  EXPECT_EQ(pc.mtp, 11610068224);
}

TEST(PlanParams, EngineFamiliesAgreeWithTheEngine) {
  for (const char* arch : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v2", "deepseek_v3"})
    for (const char* preset : {"tiny", "small", "medium", "8x7b"}) {
      if (std::string(preset) == "8x7b" && std::string(arch) != "mixtral") continue;
      SCOPED_TRACE(std::string(arch) + "/" + preset);
      ModelConfig c = preset_config(arch, preset);
      ParamCounts pc = plan_params(plan_model_from_config(c));
      EXPECT_EQ(pc.total, params_total(c));
      EXPECT_EQ(pc.active, params_active(c));
    }
  // The 8x7b preset is the catalog's Mixtral-8x7B.
  EXPECT_EQ(params_total(preset_config("mixtral", "8x7b")), plan_params(catalog_model("Mixtral-8x7B")).total);
}

// The catalog's DeepSeek entries are engine configs now (the engine's parser accepts them): the
// planner's own count from config.json equals the engine's tensor list, total and active (V3's
// MTP module, which the engine does not run, is counted apart by the planner).
TEST(PlanParams, DeepSeekCatalogEntriesAgreeWithTheEngine) {
  for (const char* name : {"DeepSeek-V2-Lite", "DeepSeek-V2", "DeepSeek-V3"}) {
    SCOPED_TRACE(name);
    const PlanModel m = catalog_model(name);
    ASSERT_TRUE(m.engine.has_value());
    EXPECT_TRUE(m.engine->is_mla());
    const ParamCounts pc = plan_params(m);
    EXPECT_EQ(pc.total, params_total(*m.engine));
    EXPECT_EQ(pc.active, params_active(*m.engine));
    // KV per token: the latent, (kv_lora_rank + qk_rope_head_dim) per layer.
    EXPECT_EQ(kv_cache_bytes(m, 1, 1, 2), 2 * m.engine->n_layer * (m.engine->kv_lora_rank + m.engine->qk_rope_head_dim));
  }
}

TEST(PlanParams, ConfigJsonOfEngineFamilyRoundTrips) {
  ModelConfig c = preset_config("qwen2_moe", "small");
  PlanModel m = plan_model_from_hf_json(hf_config_to_json(c), "test/config.json");
  EXPECT_EQ(plan_params(m).total, params_total(c));
  // RoPE scaling does not change sizes, so the planner accepts it where the engine would not.
  PlanModel q = plan_model_from_hf_json(
      R"({"model_type":"qwen3_moe","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
          "num_attention_heads":4,"num_key_value_heads":2,"num_experts":8,"num_experts_per_tok":2,
          "moe_intermediate_size":32,"vocab_size":100,"rope_scaling":{"rope_type":"yarn","factor":4}})",
      "yarn.json");
  EXPECT_EQ(q.n_moe_layers(), 2);
  // OLMoE goes through the engine's parser too, so the CPU engine plan covers it; clip_qkv does
  // not change any size, so the planner accepts a value the engine refuses.
  PlanModel o = plan_model_from_hf_json(
      R"({"model_type":"olmoe","hidden_size":64,"intermediate_size":32,"num_hidden_layers":2,
          "num_attention_heads":4,"num_key_value_heads":2,"num_experts":8,"num_experts_per_tok":2,
          "vocab_size":100,"clip_qkv":8.0})",
      "clip.json");
  ASSERT_TRUE(o.engine.has_value());
  EXPECT_EQ(o.qk_norm, QkNormKind::Full);
  EXPECT_EQ(o.n_moe_layers(), 2);
  // q_norm [64] + k_norm [32] per layer on top of the projections.
  EXPECT_EQ(plan_params(o).attn, 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 64 + 32));
}

// ---- the planner against the engine's own memory report -------------------------------------

struct Measured {
  int64_t kv, act;
};

constexpr int kCpu = static_cast<int>(Device::CPU);
constexpr int kW = static_cast<int>(MemCategory::Weights), kKv = static_cast<int>(MemCategory::KvCache),
              kAct = static_cast<int>(MemCategory::Activations);

// Makes a KV cache of `ctx` positions and runs one forward of [b, s] tokens, then (when room is
// left) one decode step, returning the peak growth of kv-cache and activations over what the
// process held before the job.
Measured measure(const Model& model, int64_t b, int64_t s, int64_t ctx, bool last_only) {
  const MemStats base = mem_stats();
  mem_reset_peaks();
  {
    KVCache cache = model.make_cache(b, ctx);
    Tensor ids = Tensor::empty({b, s}, DType::I32, MemCategory::Workspace);
    for (int64_t i = 0; i < b * s; ++i)
      ids.data<int32_t>()[i] = static_cast<int32_t>((i * 7 + 3) % model.config().vocab_size);
    ForwardOptions fo;
    fo.last_logits_only = last_only;
    {
      ForwardResult r = model.forward(ids, cache, fo);
      EXPECT_EQ(r.logits.dim(0), b);
    }
    if (cache.pos[0] < ctx) {
      Tensor one = Tensor::empty({b, 1}, DType::I32, MemCategory::Workspace);
      for (int64_t i = 0; i < b; ++i) one.data<int32_t>()[i] = 5;
      ForwardResult r = model.forward(one, cache, fo);
    }
  }
  const MemStats st = mem_stats();
  return {st.peak[kCpu][kKv] - base.current[kCpu][kKv], st.peak[kCpu][kAct] - base.current[kCpu][kAct]};
}

void expect_within(int64_t predicted, int64_t measured, double tol, const char* what) {
  ASSERT_GT(measured, 0) << what;
  const double rel = std::abs(double(predicted) - double(measured)) / double(measured);
  EXPECT_LE(rel, tol) << what << ": predicted " << predicted << ", measured " << measured;
}

TEST(PlanVsEngine, InferencePeakMemoryPerCategory) {
  struct Case {
    int64_t b, s, ctx;
    bool last_only;
  };
  const Case cases[] = {{1, 8, 16, false}, {2, 16, 32, false}, {4, 32, 64, true}, {3, 5, 40, false}, {1, 64, 128, true}};
  for (const char* arch : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v2", "deepseek_v3"})
    for (const char* preset : {"tiny", "small"}) {
      SCOPED_TRACE(std::string(arch) + "/" + preset);
      const ModelConfig cfg = preset_config(arch, preset);
      const PlanModel pm = plan_model_from_config(cfg);
      const int64_t w0 = mem_stats().current[kCpu][kW];
      Model model;
      {
        auto named = random_weights(cfg, 7, DType::F32);
        model = Model::from_tensors(cfg, named);
      }  // the per-expert source tensors are freed; the model holds the stacked ones
      const int64_t weights = mem_stats().current[kCpu][kW] - w0;
      for (const Case& c : cases) {
        SCOPED_TRACE(strformat("b=%lld s=%lld ctx=%lld last_only=%d", (long long)c.b, (long long)c.s,
                               (long long)c.ctx, c.last_only));
        Measured got = measure(model, c.b, c.s, c.ctx, c.last_only);
        // The weights do not grow during the job: their peak is what the model holds.
        EXPECT_EQ(mem_stats().peak[kCpu][kW] - w0, weights);
        JobSpec job;
        job.job = JobKind::Infer;
        job.weights = WeightFormat::F32;  // the CPU engine keeps f32 weights and activations
        job.act_bytes = 4;
        job.batch = c.b;
        job.seq = c.s;
        job.context = c.ctx;
        job.last_logits_only = c.last_only;
        MemoryPlan mp = plan_memory(pm, job, Parallel{});
        expect_within(mp.weights, weights, 0.10, "weights");
        expect_within(mp.kv_cache, got.kv, 0.10, "kv-cache");
        expect_within(mp.activations, got.act, 0.10, "activations");
        // The prediction is in fact exact: the forward's allocations are known tensor by tensor.
        EXPECT_EQ(mp.weights, weights);
        EXPECT_EQ(mp.kv_cache, got.kv);
        EXPECT_EQ(mp.activations, got.act);
      }
    }
}

TEST(PlanVsEngine, MediumPresetInference) {
  // The ~1B-parameter medium preset, bf16 weights as `moe init` writes them. The values do not
  // change what is allocated, so the weights are a constant fill (random init of 1B values would
  // dominate the test's time).
  for (const char* arch : {"mixtral"}) {
    SCOPED_TRACE(arch);
    const ModelConfig cfg = preset_config(arch, "medium");
    const PlanModel pm = plan_model_from_config(cfg);
    const int64_t w0 = mem_stats().current[kCpu][kW];
    Model model;
    {
      std::vector<std::pair<std::string, Tensor>> named;
      for (auto& [name, shape] : expected_tensors(cfg)) {
        Tensor t = Tensor::empty(shape, DType::BF16, MemCategory::Weights);
        std::fill_n(t.data<uint16_t>(), t.numel(), f32_to_bf16(0.01f));
        named.emplace_back(name, std::move(t));
      }
      model = Model::from_tensors(cfg, named);
    }
    const int64_t weights = mem_stats().current[kCpu][kW] - w0;
    for (auto [b, s, ctx] : {std::tuple<int64_t, int64_t, int64_t>{1, 16, 64}, {2, 8, 12}}) {
      SCOPED_TRACE(strformat("b=%lld s=%lld ctx=%lld", (long long)b, (long long)s, (long long)ctx));
      Measured got = measure(model, b, s, ctx, true);
      JobSpec job;
      job.job = JobKind::Infer;
      job.weights = WeightFormat::BF16;
      job.act_bytes = 4;  // the CPU engine computes in f32
      job.batch = b;
      job.seq = s;
      job.context = ctx;
      job.last_logits_only = true;
      MemoryPlan mp = plan_memory(pm, job, Parallel{});
      expect_within(mp.weights, weights, 0.10, "weights");
      expect_within(mp.kv_cache, got.kv, 0.10, "kv-cache");
      expect_within(mp.activations, got.act, 0.10, "activations");
    }
  }
}

TEST(PlanVsEngine, ActivationFormulaTinyMixtralByHand) {
  // tiny mixtral: V 256, D 64, H 4, Hkv 2, Dh 16, E 8, K 2, F 128. f32, B 2, S 16 -> T 32, P 64.
  // persistent: x, h, y 3*32*64*4 = 24,576.
  // attention block: qkv 32*(64+32+32)*4 = 16,384; its split q, k, v 16,384; attn 32*64*4 = 8,192
  //   -> 40,960.
  // MoE layer: logits 32*8*4 = 1,024; topk idx+w 2*32*2*4 = 512; offsets 9*4 = 36;
  //   perm, inv, row_scale 3*64*4 = 768; xp, yp 2*64*64*4 = 32,768 -> 35,108.
  // head (all positions): hf 32*64*4 = 8,192 + logits 32*256*4 = 32,768 -> 40,960.
  // peak = 24,576 + max(40,960, 35,108, 40,960) = 65,536.
  PlanModel m = plan_model_from_config(preset_config("mixtral", "tiny"));
  EXPECT_EQ(engine_forward_activation_bytes(m, 2, 16, 4, false), 65536);
  // last position only: xf 2*64*4 = 512 + hf 512 + logits 2*256*4 = 2,048 -> 3,072; the
  // attention block bounds the peak: 24,576 + 40,960 = 65,536.
  EXPECT_EQ(engine_forward_activation_bytes(m, 2, 16, 4, true), 65536);
  // One token (decode): q, k, v are views of qkv: 3*64*4 + 128*4 + 64*4 = 768 + 512 + 256;
  // MoE: 32 + 16 + 36 + 24 + 1,024 = 1,132 (logits 8*4, topk 16, offsets 36, perm/inv/scale
  // 3*2*4, xp/yp 2*2*64*4); head 256 + 1,024 = 1,280 -> 768 + 1,280 = 2,048.
  EXPECT_EQ(engine_forward_activation_bytes(m, 1, 1, 4, true), 2048);
}

// ---- the CPU engine's training step against the planner ------------------------------------

constexpr int kG = static_cast<int>(MemCategory::Grads), kOpt = static_cast<int>(MemCategory::Optimizer);

// The engine configs of the training comparison: every block kind the step can run.
std::vector<std::pair<std::string, ModelConfig>> training_configs() {
  std::vector<std::pair<std::string, ModelConfig>> out;
  out.emplace_back("mixtral/tiny", preset_config("mixtral", "tiny"));
  // qwen2_moe: shared expert with its sigmoid gate, qkv biases, K 4; layer 0 a dense SwiGLU MLP.
  ModelConfig q2 = preset_config("qwen2_moe", "tiny");
  q2.n_layer = 3;
  q2.mlp_only_layers = {0};
  out.emplace_back("qwen2_moe/tiny+dense layer 0", q2);
  // qwen3_moe: q/k norm, head_dim 32 != D/H; tied embeddings.
  ModelConfig q3 = preset_config("qwen3_moe", "tiny");
  q3.tie_word_embeddings = true;
  out.emplace_back("qwen3_moe/tiny tied", q3);
  // olmoe: q/k norm over the whole projection (q_rstd [T]), k_norm [Hkv*Dh] narrower than q_norm.
  out.emplace_back("olmoe/tiny", preset_config("olmoe", "tiny"));
  // gpt_oss: sinks, q/k/v/o, router and expert biases, the clamped SwiGLU, a sliding layer.
  out.emplace_back("gpt_oss/tiny", preset_config("gpt_oss", "tiny"));
  // deepseek: MLA (V2 one q_proj, V3 q_lora), layer 0 dense, ungated shared experts, V3's
  // sigmoid group routing with its selection bias.
  out.emplace_back("deepseek_v2/tiny", preset_config("deepseek_v2", "tiny"));
  out.emplace_back("deepseek_v3/tiny", preset_config("deepseek_v3", "tiny"));
  // Shapes where each other working-set phase is the largest: wide attention (H*Dh = 8*D),
  // many experts at K 1 (the router's [T,E] gradient), a wide shared expert, a wide dense MLP.
  ModelConfig wide = preset_config("mixtral", "tiny");
  wide.n_head = wide.n_head_kv = 8;
  wide.head_dim = 64;
  wide.n_expert_used = 1;
  wide.moe_intermediate_size = 32;
  out.emplace_back("mixtral/wide attention", wide);
  ModelConfig many = preset_config("mixtral", "tiny");
  many.n_expert = 256;
  many.n_expert_used = 1;
  many.moe_intermediate_size = 16;
  out.emplace_back("mixtral/256 experts K 1", many);
  ModelConfig shared = preset_config("qwen2_moe", "tiny");
  shared.shared_expert_intermediate_size = 1024;
  out.emplace_back("qwen2_moe/wide shared expert", shared);
  ModelConfig dense = preset_config("qwen2_moe", "tiny");
  dense.mlp_only_layers = {1};
  dense.intermediate_size = 1024;
  out.emplace_back("qwen2_moe/wide dense layer 1", dense);
  return out;
}

TEST(PlanVsEngine, TrainingPeakMemoryPerCategory) {
  // The prediction is engine_train_plan (weights, grads, AdamW moments from the planner's
  // parameter count; activations from the layout); the measurement is the tracker's peak per
  // category over one forward_backward + one AdamW step, less what the process held before the
  // model was built. Exact: every allocation of the step is known buffer by buffer.
  struct Shape {
    int64_t b, s;
  };
  // T = 8 (experts left without tokens), 32, 111 (odd), 320 (more rows than one logits chunk).
  const Shape shapes[] = {{1, 8}, {2, 16}, {3, 37}, {2, 160}};
  const bool verbose = std::getenv("MOE_TEST_VERBOSE") != nullptr;
  std::set<std::string> largest;  // the working-set phases that were the largest somewhere
  for (auto& [label, cfg] : training_configs()) {
    SCOPED_TRACE(label);
    const PlanModel pm = plan_model_from_config(cfg);
    const ParamCounts pc = plan_params(pm);
    const MemStats base = mem_stats();
    Model model;
    {
      auto named = random_weights(cfg, 11, DType::F32);
      model = Model::from_tensors(cfg, named);
    }
    ModelWeights grads = zeros_like(cfg, model.weights(), MemCategory::Grads);
    for (const Shape& sh : shapes)
      for (bool recompute : {false, true}) {
        SCOPED_TRACE(strformat("b=%lld s=%lld recompute=%d", (long long)sh.b, (long long)sh.s, recompute));
        Tensor ids = Tensor::empty({sh.b, sh.s}, DType::I32, MemCategory::Workspace);
        for (int64_t i = 0; i < ids.numel(); ++i)
          ids.data<int32_t>()[i] = static_cast<int32_t>((i * 7 + 3) % cfg.vocab_size);
        int64_t untouched = 0;  // (MoE layer, expert) pairs that received no token: no moments
        MemStats st;
        {
          AdamW opt(named_parameters(cfg, model.weights()), named_parameters(cfg, grads), AdamWOptions{});
          mem_reset_peaks();
          LossOptions lo;
          lo.aux_coef = cfg.router_aux_loss_coef;
          lo.z_coef = 1e-3;
          lo.recompute = recompute;
          StepLosses r = forward_backward(model, ids, ids, &grads, lo);
          ASSERT_TRUE(std::isfinite(r.total));
          std::vector<std::vector<bool>> touched(static_cast<size_t>(cfg.n_layer),
                                                 std::vector<bool>(static_cast<size_t>(cfg.n_expert)));
          for (size_t i = 0; i < r.router.size(); ++i)
            for (int64_t e = 0; e < cfg.n_expert; ++e) {
              const bool got = r.router[i].count[static_cast<size_t>(e)] > 0;
              touched[static_cast<size_t>(r.moe_layers[i])][static_cast<size_t>(e)] = got;
              untouched += got ? 0 : 1;
            }
          opt.step(1e-4, touched);
          st = mem_stats();
        }
        auto measured = [&](int cat) { return st.peak[kCpu][cat] - base.current[kCpu][cat]; };
        const EngineTrainPlan plan = engine_train_plan(pm, sh.b, sh.s, recompute);
        largest.insert(plan.working_phase);
        JobSpec job;
        job.job = JobKind::Train;
        job.cpu_engine = true;
        job.batch = sh.b;
        job.seq = sh.s;
        job.checkpointing = recompute;
        const MemoryPlan mp = plan_memory(pm, job, Parallel{});
        EXPECT_EQ(mp.total(), plan.mem.total());
        // Lazily created moments: an expert without tokens in its layer has none yet.
        const int64_t optimizer = mp.optimizer - 8 * pc.one_expert * untouched;
        if (verbose)
          std::printf("%-28s b=%lld s=%-3lld rc=%d  weights %lld/%lld grads %lld/%lld optimizer %lld/%lld "
                      "activations %lld/%lld (measured/predicted; %lld experts untouched; phase %s)\n",
                      label.c_str(), (long long)sh.b, (long long)sh.s, recompute, (long long)measured(kW),
                      (long long)mp.weights, (long long)measured(kG), (long long)mp.grads,
                      (long long)measured(kOpt), (long long)optimizer, (long long)measured(kAct),
                      (long long)mp.activations, (long long)untouched, plan.working_phase.c_str());
        EXPECT_EQ(measured(kW), mp.weights);
        EXPECT_EQ(measured(kG), mp.grads);
        EXPECT_EQ(measured(kOpt), optimizer);
        EXPECT_EQ(measured(kAct), mp.activations);
        EXPECT_EQ(mp.activations, plan.act_saved + plan.act_step + plan.act_working);
      }
  }
  // Every backward phase has been the peak of some step above, so each one is checked exactly.
  for (const char* ph : {"ffn_block_backward.experts", "ffn_block_backward.router", "ffn_block_backward.shared",
                         "ffn_block_backward.dense", "attention_block_backward.qk_norm",
                         "attention_block_backward.projection"})
    EXPECT_TRUE(largest.count(ph)) << ph << " was never the largest phase: its sizes are untested";
}

// The memory options of `moe train` (fused per-group update, bf16 moments, f32 master weights
// split into bf16 upper halves and lower halves): the planner's weights, grads and optimizer lines against the tracker,
// on a step run as the trainer runs it.
TEST(PlanVsEngine, TrainingMemoryOptionsPerCategory) {
  struct Opts {
    bool fused, opt_bf16, w_bf16, matrix;  // matrix: bf16 products on the matrix units (as `moe train`)
  };
  const Opts variants[] = {{true, false, false, false}, {false, true, false, false}, {false, false, true, false},
                           {true, true, true, false},   {false, false, true, true},   {true, true, true, true}};
  auto configs = training_configs();
  configs.resize(3);  // mixtral, qwen2_moe with a dense layer, qwen3_moe with a tied head
  for (auto& labelled : configs)
    for (const Opts& v : variants) {
      const std::string& label = labelled.first;
      const ModelConfig& cfg = labelled.second;  // (not a structured binding: the lambdas below capture it)
      if (v.matrix && !cpu::bf16_matrix_available()) continue;  // (the CPU has no bf16 matrix units)
      SCOPED_TRACE(strformat("%s fused=%d opt_bf16=%d w_bf16=%d matrix=%d", label.c_str(), v.fused, v.opt_bf16,
                             v.w_bf16, v.matrix));
      const PlanModel pm = plan_model_from_config(cfg);
      const ParamCounts pc = plan_params(pm);
      const MemStats base = mem_stats();
      int64_t untouched = 0;
      MemStats st;
      {
        Model compute = Model::from_tensors(cfg, random_weights(cfg, 11, DType::F32));
        MasterLowHalves low;
        if (v.w_bf16) low = split_master(cfg, compute.mutable_weights());
        ModelWeights grads = v.fused ? ModelWeights() : zeros_like(cfg, compute.weights(), MemCategory::Grads);
        AdamWOptions ao;
        ao.state_dtype = v.opt_bf16 ? DType::BF16 : DType::F32;
        AdamW opt(named_parameters(cfg, compute.weights()),
                  v.fused ? std::vector<NamedParam>() : named_parameters(cfg, grads), ao, v.w_bf16 ? &low : nullptr);
        Tensor ids = Tensor::empty({2, 16}, DType::I32, MemCategory::Workspace);
        for (int64_t i = 0; i < ids.numel(); ++i)
          ids.data<int32_t>()[i] = static_cast<int32_t>((i * 7 + 3) % cfg.vocab_size);
        std::vector<std::vector<bool>> touched(static_cast<size_t>(cfg.n_layer),
                                               std::vector<bool>(static_cast<size_t>(cfg.n_expert)));
        auto mark = [&](const StepLosses& r) {
          for (size_t i = 0; i < r.router.size(); ++i)
            for (int64_t e = 0; e < cfg.n_expert; ++e) {
              const bool got = r.router[i].count[static_cast<size_t>(e)] > 0;
              touched[static_cast<size_t>(r.moe_layers[i])][static_cast<size_t>(e)] = got;
              untouched += got ? 0 : 1;
            }
        };
        LossOptions lo;
        lo.aux_coef = cfg.router_aux_loss_coef;
        if (v.matrix) cpu::set_bf16_gemm(cpu::Bf16Gemm::Matrix);
        mem_reset_peaks();
        if (v.fused) {
          forward_backward_fused(compute, ids, ids, lo, [&](int64_t group, const std::vector<NamedParam>& g,
                                                            const StepLosses& fw) {
            if (group == kGroupHead) mark(fw);
            opt.step_group(1e-4, touched, g);
          });
        } else {
          mark(forward_backward(compute, ids, ids, &grads, lo));
          opt.step(1e-4, touched);
        }
        st = mem_stats();
        cpu::set_bf16_gemm(cpu::Bf16Gemm::Widen);
      }
      auto measured = [&](int cat) { return st.peak[kCpu][cat] - base.current[kCpu][cat]; };
      EngineTrainOptions eo;
      eo.fused_update = v.fused;
      eo.optimizer_bf16 = v.opt_bf16;
      eo.weights_bf16 = v.w_bf16;
      eo.bf16_matrix = v.matrix;
      const EngineTrainPlan plan = engine_train_plan(pm, 2, 16, false, eo);
      EXPECT_EQ(measured(kW), plan.mem.weights);
      EXPECT_EQ(measured(kG), plan.mem.grads);
      EXPECT_EQ(measured(kOpt), plan.mem.optimizer - (v.opt_bf16 ? 4 : 8) * pc.one_expert * untouched);
      EXPECT_EQ(measured(kAct), plan.mem.activations);
      if (v.fused) {
        EXPECT_LT(plan.mem.grads, 4 * pc.total) << "the fused update holds one group, not the model";
      }
    }
}

TEST(PlanVsEngine, TrainingLayoutTinyMixtralByHand) {
  // tiny mixtral: V 256, D 64, H 4, Hkv 2, Dh 16, E 8, K 2, F 128, L 2 (both MoE), f32.
  // B 2, S 16 -> T 32, P 64, logits chunk 32.
  // Saved per layer (Training): x_in, attn_h, x_mid, ffn_h 4*32*64*4 = 32,768; attn_rstd,
  //   ffn_rstd 2*32*4 = 256; q, attn_out 2*32*64*4 = 16,384; k, v 2*32*32*4 = 8,192;
  //   lse 2*4*16*4 = 512; router_logits 32*8*4 = 1,024; topk_idx, topk_w 2*32*2*4 = 512;
  //   offsets 9*4 = 36; perm, inv, row_scale 3*64*4 = 768; xp 64*64*4 = 16,384;
  //   eh1, eh3 2*64*128*4 = 65,536 -> 142,372 x2 layers = 284,744.
  // Shared: qkv 32*128*4 = 16,384; final_x, final_h 2*8,192; final_rstd 128 -> 32,896.
  // Step: ids, targets 2*32*4 = 256; row_loss 32*4 = 128; aux_g 8*4 = 32; dx, dx_mid, dx_in
  //   3*8,192 = 24,576 -> 24,992.
  // Working set, the largest phase: ffn_block_backward.experts dh 8,192 + dyp, dxp
  //   2*64*64*4 = 32,768 + drs 256 = 41,216 (attention: dattn, dq 2*8,192 + dk, dv 2*4,096
  //   = 24,576; router: 8,192 + 256 + 256 + 1,024; head.logits 32*256*4 = 32,768).
  // Total 284,744 + 32,896 + 24,992 + 41,216 = 383,848.
  const ModelConfig c = preset_config("mixtral", "tiny");
  ActivationLayout lay = activation_layout(c, 2, 16, ActMode::Training);
  std::string phase;
  EXPECT_EQ(lay.entry_bytes(c), 284744 + 32896);
  EXPECT_EQ(lay.step_bytes(c), 24992);
  EXPECT_EQ(lay.working_bytes(c, &phase), 41216);
  EXPECT_EQ(phase, "ffn_block_backward.experts");
  EXPECT_EQ(lay.total_bytes(c), 383848);
  // Recompute: per layer only x_in 8,192 x2; one shared set of the rest (142,372 - 8,192)
  //   = 134,180; the same shared, step and working bytes: 16,384 + 134,180 + 32,896 + 24,992
  //   + 41,216 = 249,668.
  EXPECT_EQ(activation_layout(c, 2, 16, ActMode::TrainingRecompute).total_bytes(c), 249668);
  EXPECT_EQ(engine_train_plan(plan_model_from_config(c), 2, 16, false).mem.activations, 383848);
}

TEST(PlanCli, CpuEngineTrainingPlan) {
  // `moe plan DIR --device cpu --job train` prints engine_train_plan's figures.
  const std::string d = (std::filesystem::temp_directory_path() / ("moe_plan_cpu_" + std::to_string(getpid()))).string();
  std::filesystem::create_directories(d);
  ModelConfig c = preset_config("qwen2_moe", "small");
  std::ofstream(d + "/config.json") << hf_config_to_json(c);
  auto run = [&](const std::string& args, std::string* out) {
    const std::string cmd = std::string(MOE_BINARY_DIR) + "/moe plan '" + d + "' " + args + " > '" + d +
                            "/out.txt' 2> '" + d + "/err.txt'";
    const int rc = std::system(cmd.c_str());
    std::ifstream f(d + "/out.txt"), e(d + "/err.txt");
    std::stringstream so, se;
    so << f.rdbuf();
    se << e.rdbuf();
    *out = so.str() + se.str();
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  };
  std::string out;
  ASSERT_EQ(run("--job train --device cpu --batch 2 --seq 64 --checkpointing --json", &out), 0) << out;
  const EngineTrainPlan p = engine_train_plan(plan_model_from_config(c), 2, 64, true);
  auto j = nlohmann::json::parse(out);
  EXPECT_EQ(j["device"], "cpu");
  EXPECT_EQ(j["memory"]["weights"].get<int64_t>(), p.mem.weights);
  EXPECT_EQ(j["memory"]["grads"].get<int64_t>(), p.mem.grads);
  EXPECT_EQ(j["memory"]["optimizer"].get<int64_t>(), p.mem.optimizer);
  EXPECT_EQ(j["memory"]["activations"].get<int64_t>(), p.mem.activations);
  EXPECT_EQ(j["memory"]["total"].get<int64_t>(), p.mem.total());
  EXPECT_EQ(j["activations"]["working_phase"], p.working_phase);
  ASSERT_EQ(run("--job train --device cpu --batch 2 --seq 64", &out), 0) << out;
  EXPECT_NE(out.find("activations"), std::string::npos) << out;
  EXPECT_NE(out.find(with_commas(p.mem.weights)), std::string::npos) << out;
  // A family the engine does not run, and GPU-only options, are refused with a clear line.
  EXPECT_EQ(run("--job lora --device cpu", &out), 1);
  EXPECT_NE(out.find("train and infer"), std::string::npos) << out;
  EXPECT_EQ(run("--job train --device cpu --gpus 2", &out), 1);
  EXPECT_NE(out.find("--gpus"), std::string::npos) << out;
  std::filesystem::remove_all(d);
  const std::string cmd = std::string(MOE_BINARY_DIR) + "/moe plan DBRX --job train --device cpu 2>&1";
  FILE* f = popen(cmd.c_str(), "r");
  ASSERT_NE(f, nullptr);
  char buf[512] = {0};
  std::string all;
  while (std::fgets(buf, sizeof buf, f)) all += buf;
  EXPECT_NE(pclose(f), 0);
  EXPECT_NE(all.find("the CPU engine runs mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, deepseek_v2 and deepseek_v3"),
            std::string::npos)
      << all;
}

// ---- hand-derived training / fine-tuning worked examples (Mixtral-8x7B) ---------------------
//
// P = 46,702,792,704 parameters; routed experts X = 32 * 1,409,286,144 = 45,097,156,608;
// non-expert N = P - X = 1,605,636,096.

TEST(PlanTrain, FullAdamWOneGpu) {
  PlanModel m = catalog_model("Mixtral-8x7B");
  JobSpec job;
  job.job = JobKind::Train;
  job.batch = 1;
  job.seq = 4096;
  MemoryPlan mp = plan_memory(m, job, Parallel{});
  EXPECT_EQ(mp.weights, 93405585408);     // 2 B * P
  EXPECT_EQ(mp.grads, 93405585408);       // 2 B * P
  EXPECT_EQ(mp.optimizer, 560433512448);  // 12 B * P (f32 master + m + v)
}

TEST(PlanTrain, ZeroOneWithExpertParallel) {
  // dp 8, ep 8, tp 1, ZeRO-1. Per GPU: N + X/8 = 1,605,636,096 + 5,637,144,576 = 7,242,780,672
  // parameters held; the optimizer is sharded over dp 8 for N (200,704,512) and over dp/ep = 1
  // for the experts (5,637,144,576): 5,837,849,088 parameters' state.
  PlanModel m = catalog_model("Mixtral-8x7B");
  JobSpec job;
  job.job = JobKind::Train;
  MemoryPlan mp = plan_memory(m, job, Parallel{8, 1, 8, 1});
  EXPECT_EQ(mp.weights, 14485561344);    // 2 * 7,242,780,672
  EXPECT_EQ(mp.grads, 14485561344);      // ZeRO-1 leaves grads whole
  EXPECT_EQ(mp.optimizer, 70054189056);  // 12 * 5,837,849,088
}

TEST(PlanTrain, ZeroThreeWithExpertParallel) {
  // dp 16, ep 8: non-expert sharded 16 ways (100,352,256), experts X/8 then over dp/ep = 2 ranks
  // (2,818,572,288): 2,918,924,544 parameters per GPU for weights, grads and optimizer alike.
  PlanModel m = catalog_model("Mixtral-8x7B");
  JobSpec job;
  job.job = JobKind::Train;
  MemoryPlan mp = plan_memory(m, job, Parallel{16, 1, 8, 3});
  EXPECT_EQ(mp.weights, 5837849088);     // 2 * 2,918,924,544
  EXPECT_EQ(mp.grads, 5837849088);
  EXPECT_EQ(mp.optimizer, 35027094528);  // 12 * 2,918,924,544
  // ZeRO-2 keeps the weights whole (N + X/8 = 7,242,780,672) but shards grads.
  MemoryPlan z2 = plan_memory(m, job, Parallel{16, 1, 8, 2});
  EXPECT_EQ(z2.weights, 14485561344);
  EXPECT_EQ(z2.grads, 5837849088);
}

TEST(PlanTrain, TensorParallelSplitsEverything) {
  // tp 2, dp 1: every matrix halves: P/2 = 23,351,396,352 parameters per GPU.
  PlanModel m = catalog_model("Mixtral-8x7B");
  JobSpec job;
  job.job = JobKind::Train;
  MemoryPlan mp = plan_memory(m, job, Parallel{1, 2, 1, 0});
  EXPECT_EQ(mp.weights, 2 * 23351396352);
}

TEST(PlanTrain, ActivationsWithAndWithoutCheckpointing) {
  // Mixtral-8x7B, micro-batch 1 x seq 4096: T = 4096, bf16 (2 B).
  // attention/layer: x, h 2*T*2*D = 67,108,864; lse 4*T*H = 524,288; q, out 2*T*4096*2 and k, v
  //   2*T*1024*2 = 83,886,080 -> 151,519,232.
  // FFN/layer: x, h 67,108,864; router logits 4*T*E = 131,072; ids/weights/perm 16*T*K = 131,072;
  //   expert hiddens h1, h3 2*2*T*K*F = 469,762,048 -> 537,133,056. Layer = 688,652,288.
  // head: 2*T*2*D = 67,108,864 + f32 logits 4*T*V = 524,288,000 -> 591,396,864.
  // no checkpointing: 32 layers 22,036,873,216 + working set 688,652,288 + head = 23,316,922,368.
  // checkpointing: layer inputs 32*2*T*D = 1,073,741,824 + 688,652,288 + 591,396,864 = 2,353,790,976.
  PlanModel m = catalog_model("Mixtral-8x7B");
  TrainActivations a = train_activation_bytes(m, 1, 4096, false, 0, LoraTargets::All, 1);
  EXPECT_EQ(a.per_layer_max, 688652288);
  EXPECT_EQ(a.head, 591396864);
  EXPECT_EQ(a.total, 23316922368);
  TrainActivations c = train_activation_bytes(m, 1, 4096, true, 0, LoraTargets::All, 1);
  EXPECT_EQ(c.total, 2353790976);
}

TEST(PlanTrain, LoraAttentionAndAllTargets) {
  // r 16 on attention: q 16*(4096+4096) = 131,072; k, v 16*(4096+1024) = 81,920 each;
  // o 131,072 -> 425,984 per layer x32 = 13,631,488 adapter parameters.
  // all targets add experts: 8 * 3 * 16 * (4096+14336) = 7,077,888 per layer x32 = 226,492,416
  // -> 240,123,904.
  PlanModel m = catalog_model("Mixtral-8x7B");
  EXPECT_EQ(lora_params(m, 16, LoraTargets::Attention), 13631488);
  EXPECT_EQ(lora_params(m, 16, LoraTargets::All), 240123904);
  JobSpec job;
  job.job = JobKind::Lora;
  job.lora_r = 16;
  job.lora_targets = LoraTargets::Attention;
  MemoryPlan mp = plan_memory(m, job, Parallel{});
  EXPECT_EQ(mp.weights, 93405585408);  // frozen bf16 base, 2 B * P
  EXPECT_EQ(mp.lora, 54525952);        // 4 B * 13,631,488
  EXPECT_EQ(mp.grads, 54525952);       // 4 B
  EXPECT_EQ(mp.optimizer, 109051904);  // 8 B (Adam m, v)
  EXPECT_EQ(mp.quant_weights, 0);
}

TEST(PlanTrain, QloraNf4Base) {
  // Linear weights: attention 32*41,943,040 + routers 32*32,768 + experts 45,097,156,608
  // = 46,440,382,464 -> NF4 at 36 B per 64: 725,630,976 blocks * 36 = 26,122,715,136.
  // The rest (embedding + head 262,144,000, norms 266,240) stays bf16: 2 * 262,410,240 = 524,820,480.
  // Dequantisation buffer: the largest linear, an expert's 4096 x 14336, in bf16 = 117,440,512.
  PlanModel m = catalog_model("Mixtral-8x7B");
  JobSpec job;
  job.job = JobKind::Qlora;
  job.weights = WeightFormat::NF4;
  job.lora_targets = LoraTargets::Attention;
  MemoryPlan mp = plan_memory(m, job, Parallel{});
  EXPECT_EQ(mp.quant_weights, 26122715136);
  EXPECT_EQ(mp.weights, 524820480);
  EXPECT_EQ(mp.lora, 54525952);
  EXPECT_EQ(mp.workspace, 117440512);
  // Double quantisation (core/nf4.h's NF4DQ): 134 bytes per 256 parameters:
  // 181,407,744 super-blocks * 134 = 24,308,637,696.
  job.weights = WeightFormat::NF4DQ;
  EXPECT_EQ(plan_memory(m, job, Parallel{}).quant_weights, 24308637696);
}

TEST(PlanWeights, FormatsIncludeScales) {
  // Mixtral-8x7B linear L = 46,440,382,464, rest R = 262,410,240 (2 B each = 524,820,480).
  const ParamCounts pc = plan_params(catalog_model("Mixtral-8x7B"));
  ASSERT_EQ(pc.linear, 46440382464);
  EXPECT_EQ(model_weight_bytes(pc, WeightFormat::BF16), 2 * pc.total);
  EXPECT_EQ(model_weight_bytes(pc, WeightFormat::F32), 4 * pc.total);
  // fp8: L + L*4/16384 (= 11,337,984) + 524,820,480
  EXPECT_EQ(model_weight_bytes(pc, WeightFormat::FP8), 46440382464 + 11337984 + 524820480);
  // int8 (Q8_0): L * 34/32 = 49,342,906,368 + 524,820,480
  EXPECT_EQ(model_weight_bytes(pc, WeightFormat::INT8), 49342906368 + 524820480);
  // nf4 and q4 are both 0.5625 B/param: 26,122,715,136 + 524,820,480
  EXPECT_EQ(model_weight_bytes(pc, WeightFormat::NF4), 26122715136 + 524820480);
  EXPECT_EQ(model_weight_bytes(pc, WeightFormat::Q4), 26122715136 + 524820480);
}

TEST(PlanKv, PerTokenAndSlidingAndMla) {
  // Mixtral: 32 layers * 2 * Hkv 8 * Dh 128 * 2 B = 131,072 B per token.
  EXPECT_EQ(kv_cache_bytes(catalog_model("Mixtral-8x7B"), 1, 1, 2), 131072);
  // DeepSeek-V3 MLA: 61 * (512 + 64) * 2 B = 70,272 B per token.
  EXPECT_EQ(kv_cache_bytes(catalog_model("DeepSeek-V3"), 1, 1, 2), 70272);
  // gpt-oss-120b at 4096 positions: 18 sliding layers * 128 * 2048 B + 18 full * 4096 * 2048 B
  // = 4,718,592 + 150,994,944 = 155,713,536 per sequence; batch 3 triples it.
  EXPECT_EQ(kv_cache_bytes(catalog_model("gpt-oss-120b"), 3, 4096, 2), 3 * 155713536);
}

TEST(PlanComm, AllToAllBytesPerStep) {
  // Mixtral, micro-batch 1 x 4096, ep 8: per MoE layer 2 (dispatch+combine) * T*K 8192 rows * D 4096
  // * 2 B * 7/8 = 117,440,512; x32 layers = 3,758,096,384; x2 for the backward = 7,516,192,768.
  PlanModel m = catalog_model("Mixtral-8x7B");
  JobSpec job;
  job.job = JobKind::Train;
  job.batch = 1;
  job.seq = 4096;
  EXPECT_DOUBLE_EQ(all_to_all_bytes(m, job, Parallel{8, 1, 8, 1}), 7516192768.0);
  EXPECT_DOUBLE_EQ(all_to_all_bytes(m, job, Parallel{8, 1, 1, 1}), 0.0);
}

TEST(PlanComm, EngineDistributedStepByHand) {
  // tiny mixtral: V 256, D 64, H 4, Hkv 2, Dh 16, E 8, K 2, F 128, L 2 (both MoE), untied.
  //   not routed experts Pd: embed + head 2*256*64 = 32,768; per layer q 4,096 + k, v 2*2,048
  //   + o 4,096 + norms 128 + router 512 = 12,928, x2 = 25,856; final norm 64 -> 58,688.
  //   routed experts Px: 2 layers * 8 * 3*128*64 = 393,216.
  //   statistics: 2 + 2 layers * (2*8 + 2) = 38 doubles = 304 B.
  // An all-reduce of b bytes over g ranks moves 2 (g-1) b in all.
  const PlanModel m = plan_model_from_config(preset_config("mixtral", "tiny"));
  {
    // ep 2, dp 1 (N 2), batch 8 x seq 64: T 512.
    //   all-reduce: stats 2*304 = 608; CE 2*8 = 16; dense 2*4*58,688 = 469,504; experts 0 (dp 1);
    //   clip 1 EP group * 2*1*8 = 16 -> 470,144.
    //   all-to-all: counts 2 layers * 2 ranks * 1 peer * El 4 * 8 B = 128; R_off = 2*512*2*1/2 =
    //   1,024 rows of 16*64 + 8 = 1,032 B = 1,056,768 -> 1,056,896.
    const EngineDistComm c = engine_dist_comm(m, 8, 64, 2, 1, false);
    EXPECT_EQ(c.ranks, 2);
    EXPECT_EQ(c.stats, 608);
    EXPECT_EQ(c.ce, 16);
    EXPECT_EQ(c.dense_grads, 469504);
    EXPECT_EQ(c.expert_grads, 0);
    EXPECT_EQ(c.clip, 16);
    EXPECT_EQ(c.all_reduce(), 470144);
    EXPECT_EQ(c.counts, 128);
    EXPECT_EQ(c.rows_off, 1024);
    EXPECT_EQ(c.rows, 1056768);
    EXPECT_EQ(c.all_to_all(), 1056896);
    EXPECT_EQ(c.total(), 1527040);
    // A measured R_off replaces the uniform one: 1,040 rows * 1,032 B.
    EXPECT_EQ(engine_dist_comm(m, 8, 64, 2, 1, false, 1040).rows, 1073280);
  }
  {
    // ep 2, dp 2 (N 4), recompute: world all-reduces x 2*3: stats 1,824, CE 48, dense
    //   6*234,752 = 1,408,512; experts over 2 groups of 2: 2*1*4*393,216 = 3,145,728; clip 2 EP
    //   groups * 2*1*8 = 32 -> 4,556,144. The forward's exchanges twice: counts 2*2*4*1*4*8 = 512;
    //   rows 1,024 * (8*64 + 4 = 516) * 3 (forward twice, backward once) = 1,585,152.
    const EngineDistComm c = engine_dist_comm(m, 8, 64, 2, 2, true);
    EXPECT_EQ(c.stats, 1824);
    EXPECT_EQ(c.ce, 48);
    EXPECT_EQ(c.dense_grads, 1408512);
    EXPECT_EQ(c.expert_grads, 3145728);
    EXPECT_EQ(c.clip, 32);
    EXPECT_EQ(c.all_reduce(), 4556144);
    EXPECT_EQ(c.counts, 512);
    EXPECT_EQ(c.rows, 1585152);
    EXPECT_EQ(c.total(), 6141808);
  }
  {
    // Data parallel only (ep 1, dp 2): every gradient over the world, no exchange, no clip
    //   exchange: 608 + 16 + 469,504 + 2*4*393,216 = 3,615,856.
    const EngineDistComm c = engine_dist_comm(m, 8, 64, 1, 2, false);
    EXPECT_EQ(c.expert_grads, 3145728);
    EXPECT_EQ(c.all_to_all(), 0);
    EXPECT_EQ(c.clip, 0);
    EXPECT_EQ(c.total(), 3615856);
  }
  {
    // ep 8 (El 1), batch 1 x seq 3: R_off = 2*3*2*7/8 = 10.5 -> 10 rows (rounded down) = 10,320;
    //   counts 2*8*7*1*8 = 896; stats 14*304 = 4,256; CE 112; dense 14*234,752 = 3,286,528;
    //   clip 2*7*8 = 112.
    const EngineDistComm c = engine_dist_comm(m, 1, 3, 8, 1, false);
    EXPECT_EQ(c.rows_off, 10);
    EXPECT_EQ(c.rows, 10320);
    EXPECT_EQ(c.counts, 896);
    EXPECT_EQ(c.all_reduce(), 4256 + 112 + 3286528 + 112);
  }
  // One process: nothing moves.
  EXPECT_EQ(engine_dist_comm(m, 8, 64, 1, 1, true).total(), 0);
  {
    // tiny qwen2_moe: E 8, K 4, F 64, qkv biases, a gated shared expert of width 128.
    //   Pd: 32,768 + 64 + 2 * (attention 12,288 + biases 128 + norms 128 + router 512 + shared
    //   3*128*64 + gate 64 = 37,696) = 108,224. ep 4, dp 1, batch 2 x seq 16 (T 32):
    //   all-reduce: stats 6*304 = 1,824, CE 48, dense 6*4*108,224 = 2,597,376, clip 2*3*8 = 48;
    //   counts 2*4*3*El 2*8 = 384; R_off 2*32*4*3/4 = 192 rows * 1,032 = 198,144.
    const EngineDistComm c = engine_dist_comm(plan_model_from_config(preset_config("qwen2_moe", "tiny")), 2, 16, 4, 1,
                                              false);
    EXPECT_EQ(c.dense_grads, 2597376);
    EXPECT_EQ(c.all_reduce(), 1824 + 48 + 2597376 + 48);
    EXPECT_EQ(c.counts, 384);
    EXPECT_EQ(c.rows_off, 192);
    EXPECT_EQ(c.rows, 198144);
  }
  expect_error([&] { engine_dist_comm(m, 8, 64, 3, 1, false); }, "do not divide");
  expect_error([&] { engine_dist_comm(m, 8, 64, 0, 1, false); }, "--ep and --dp");
  expect_error([&] { engine_dist_comm(m, 8, 64, 2, 1, false, 5000); }, "exceed");
  expect_error([&] { engine_dist_comm(catalog_model("DBRX"), 1, 64, 2, 1, false); }, "the CPU engine runs");
}

TEST(PlanCli, CpuEngineDistributedComm) {
  // `moe plan DIR --device cpu --job train --ep P --dp Q` prints engine_dist_comm's bytes.
  const std::string d = (std::filesystem::temp_directory_path() / ("moe_plan_dist_" + std::to_string(getpid()))).string();
  std::filesystem::create_directories(d);
  const ModelConfig c = preset_config("qwen2_moe", "tiny");
  std::ofstream(d + "/config.json") << hf_config_to_json(c);
  auto run = [&](const std::string& args) {
    const std::string cmd = std::string(MOE_BINARY_DIR) + "/moe plan '" + d + "' " + args + " 2>&1";
    FILE* f = popen(cmd.c_str(), "r");
    std::string all;
    char buf[512];
    while (f && std::fgets(buf, sizeof buf, f)) all += buf;
    const int rc = f ? pclose(f) : -1;
    return std::make_pair(WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, all);
  };
  auto [rc, out] = run("--job train --device cpu --batch 4 --seq 32 --ep 2 --dp 2 --checkpointing --json");
  ASSERT_EQ(rc, 0) << out;
  const EngineDistComm p = engine_dist_comm(plan_model_from_config(c), 4, 32, 2, 2, true);
  auto j = nlohmann::json::parse(out);
  EXPECT_EQ(j["comm_bytes_per_step"]["ranks"].get<int64_t>(), 4);
  EXPECT_EQ(j["comm_bytes_per_step"]["all_reduce"].get<int64_t>(), p.all_reduce());
  EXPECT_EQ(j["comm_bytes_per_step"]["all_to_all"].get<int64_t>(), p.all_to_all());
  EXPECT_EQ(j["comm_bytes_per_step"]["total"].get<int64_t>(), p.total());
  std::tie(rc, out) = run("--job train --device cpu --batch 4 --seq 32 --ep 2");
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find(with_commas(engine_dist_comm(plan_model_from_config(c), 4, 32, 2, 1, false).total())),
            std::string::npos)
      << out;
  // One process prints no communication; --ep is for the training step.
  std::tie(rc, out) = run("--job train --device cpu --batch 4 --seq 32");
  EXPECT_EQ(out.find("all-to-all"), std::string::npos) << out;
  std::tie(rc, out) = run("--job infer --device cpu --ep 2");
  EXPECT_EQ(rc, 1);
  EXPECT_NE(out.find("--job train"), std::string::npos) << out;
  std::tie(rc, out) = run("--job train --device cpu --ep 3");
  EXPECT_EQ(rc, 1);
  EXPECT_NE(out.find("do not divide"), std::string::npos) << out;
  std::filesystem::remove_all(d);
}

TEST(PlanTime, TrainingFlopsAndTime) {
  // active without embedding 12,748,853,248; attention at seq 4096 (keys 2048): 2 * 2048 * 32 heads
  // * (128 + 128) = 33,554,432 per layer x32 = 1,073,741,824. Forward 2*12,748,853,248 + 1,073,741,824
  // = 26,571,448,320; training 3x = 79,714,344,960 FLOPs per token.
  PlanModel m = catalog_model("Mixtral-8x7B");
  JobSpec job;
  job.job = JobKind::Train;
  job.seq = 4096;
  EXPECT_DOUBLE_EQ(flops_per_token(m, job), 79714344960.0);
  // 16 B/param * 46.7e9 = 747 GB of model state needs 16 H100s. 1e9 tokens at mfu 0.4: 7.9714e19 / (16 * 989e12 * 0.4) = 12,593.0 s,
  // 55.97 GPU-hours; at a user price of 2.0 per GPU-hour: 111.9.
  PlanRequest req;
  req.job = job;
  req.job.batch = 1;
  req.gpu = "H100-80GB";
  req.gpus = 16;
  req.tokens = 1000000000;
  req.prices = parse_prices(R"({"currency":"EUR","gpu_hour":{"H100-80GB":2.0}})", "test");
  PlanReport r = make_plan(m, req);
  ASSERT_EQ(r.options.size(), 1u);
  const GpuPlan& g = r.options[0];
  EXPECT_TRUE(g.fits);
  EXPECT_EQ(g.par.gpus(), 16);
  // The least-communication layout that fits 16 GPUs (lowest ZeRO, then tp, then ep): ZeRO-0 with
  // tp 2 x dp 8 and the experts over ep 8: (N/2 + X/16) * 16 B = 57.9 GB + 11.7 GB activations.
  EXPECT_EQ(g.par.zero, 0);
  EXPECT_EQ(g.par.tp, 2);
  EXPECT_EQ(g.par.ep, 8);
  EXPECT_NEAR(g.train_seconds, 7.971434496e19 / (16 * 989e12 * 0.4), 1e-6);
  EXPECT_NEAR(g.gpu_hours, 55.97, 0.01);
  EXPECT_NEAR(g.gpu_hours, 16 * g.train_seconds / 3600, 1e-9);
  ASSERT_TRUE(g.cost.has_value());
  EXPECT_NEAR(*g.cost, 2.0 * g.gpu_hours, 1e-9);
}

TEST(PlanSearch, FewestGpusAndLayout) {
  // Mixtral-8x7B bf16 inference: 93.4 GB of weights do not fit one 80 GiB H100; on two GPUs the
  // first layout that fits (tp 1) is expert-parallel: N + X/2 parameters = 24.1e9 * 2 B.
  PlanModel m = catalog_model("Mixtral-8x7B");
  PlanRequest req;
  req.gpu = "H100-80GB";
  PlanReport r = make_plan(m, req);
  const GpuPlan& g = r.options[0];
  EXPECT_TRUE(g.fits);
  EXPECT_EQ(g.par.gpus(), 2);
  EXPECT_EQ(g.par.ep, 2);
  EXPECT_EQ(g.mem.weights, 2 * (1605636096 + 45097156608 / 2));
  EXPECT_GT(g.decode_tok_s, 0);
  // NF4 fits on one GPU.
  req.job.weights = WeightFormat::NF4;
  EXPECT_EQ(make_plan(m, req).options[0].par.gpus(), 1);
  // Every GPU in the catalog is considered without --gpu; a 24 GiB card needs more of them.
  req.gpu.clear();
  req.job.weights = WeightFormat::BF16;
  PlanReport all = make_plan(m, req);
  EXPECT_EQ(all.options.size(), gpu_catalog().size());
  for (auto& o : all.options)
    if (std::string(o.gpu->name) == "RTX4090-24GB") {
      EXPECT_GE(o.par.gpus(), 4);
    }
}

TEST(PlanOutput, JsonHasIntegerTotals) {
  PlanRequest req;
  req.gpu = "H200";
  PlanReport r = make_plan(catalog_model("qwen3-30b-a3b"), req);
  auto j = nlohmann::json::parse(report_json(r));
  ASSERT_TRUE(j["total_params"].is_number_integer());
  ASSERT_TRUE(j["active_params"].is_number_integer());
  EXPECT_EQ(j["total_params"].get<int64_t>(), 30532122624);
  EXPECT_EQ(j["active_params"].get<int64_t>(), 3353032704);
  EXPECT_EQ(j["options"][0]["gpu"], "H200-141GB");
  const std::string text = report_text(r, true);
  EXPECT_NE(text.find("30,532,122,624"), std::string::npos);
  EXPECT_NE(text.find("how each number is computed"), std::string::npos);
  EXPECT_NE(text.find("--prices"), std::string::npos);  // no built-in price is shown
}

// ---- bad input ------------------------------------------------------------------------------

TEST(PlanErrors, UnknownModelSuggestsCloseNames) {
  expect_error([] { catalog_model("mixtral-8x7"); }, "Did you mean Mixtral-8x7B");
  expect_error([] { catalog_model("deepsek-v3"); }, "DeepSeek-V3");
  expect_error([] { catalog_model("gpt-os-20b"); }, "gpt-oss-20b");
  expect_error([] { resolve_plan_model("/no/such/dir/qwen3-30b"); }, "unknown model");
  EXPECT_EQ(edit_distance("kitten", "sitting"), 3);
  // The HF repo id and its last part also resolve.
  EXPECT_EQ(catalog_model("deepseek-ai/DeepSeek-V2-Lite").name, "DeepSeek-V2-Lite");
  EXPECT_EQ(catalog_model("mixtral-8x7b-v0.1").name, "Mixtral-8x7B");
}

TEST(PlanErrors, ImpossibleConfigurations) {
  PlanModel m = catalog_model("Mixtral-8x7B");
  JobSpec job;
  expect_error([&] { plan_memory(m, job, Parallel{16, 1, 16, 0}); }, "more expert-parallel ranks than experts");
  expect_error([&] { plan_memory(m, job, Parallel{6, 1, 3, 0}); }, "does not divide the 8 experts");
  expect_error([&] { plan_memory(m, job, Parallel{2, 1, 4, 0}); }, "must divide --dp");
  expect_error([&] { plan_memory(m, job, Parallel{1, 3, 1, 0}); }, "attention heads");
  job.batch = 0;
  expect_error([&] { plan_memory(m, job, Parallel{}); }, "batch must be >= 1");
  PlanRequest req;
  req.job.batch = 0;
  expect_error([&] { make_plan(m, req); }, "--batch must be >= 1");
  PlanRequest r2;
  r2.layout_given = true;
  r2.par = Parallel{16, 1, 16, 0};
  expect_error([&] { make_plan(m, r2); }, "more expert-parallel ranks than experts");
  PlanRequest r3;
  r3.gpu = "H1000";
  expect_error([&] { make_plan(m, r3); }, "unknown GPU 'H1000'");
  expect_error([] { parse_weight_format("int3"); }, "unknown --dtype 'int3'");
  expect_error([] { parse_job("pretrain"); }, "unknown --job");
  expect_error([] { parse_prices(R"({"gpu_hour":{"H100-80GB":-1}})", "p.json"); }, "non-negative");
  expect_error([] { plan_model_from_hf_json(R"({"model_type":"llama"})", "c.json"); }, "does not know model_type 'llama'");
  expect_error([] { plan_model_from_hf_json(R"({"model_type":"olmoe"})", "c.json"); }, "missing field");
  JobSpec q;
  q.job = JobKind::Qlora;
  q.weights = WeightFormat::BF16;
  expect_error([&] { plan_memory(m, q, Parallel{}); }, "qlora needs a quantised base");
}

TEST(PlanPrices, ExampleFileParses) {
  // The repository root is two levels above this file (tests/test_plan.cpp).
  std::string root = __FILE__;
  root = root.substr(0, root.rfind('/'));
  root = root.substr(0, root.rfind('/'));
  PriceTable p = load_prices(root + "/data/prices.example.json");
  EXPECT_EQ(p.currency, "USD");
  EXPECT_TRUE(p.gpu_hour.count("H100-80GB"));
  EXPECT_NE(p.note.find("EXAMPLE"), std::string::npos);
}

}  // namespace
}  // namespace moe

// distributed.h — what training and `moe grad` do differently over several ranks
// (dist/parallel.h has the layout): keep only this rank's experts, take this rank's batch rows,
// sum gradients over the ranks that share each parameter, gather the experts back for writing.
#pragma once
#include <string>
#include <vector>

#include "dist/parallel.h"
#include "model/model_train.h"
#include "train/checkpoint.h"
#include "train/optimizer.h"

namespace moe {

// Expert parallel: replaces every MoE layer's stacked routed experts by this rank's slice
// (owned copies) and sets expert_begin. A no-op when par.ep == 1. Expert LoRA adapters are not
// sharded (yet): an error names the option to drop.
void shard_experts(const ModelConfig& c, ModelWeights& w, const dist::Parallel& par);

// Expert parallel: LoadOptions that load only this rank's experts (shard_experts then has nothing
// left to do). A no-op when par.ep == 1.
void load_own_experts(const ModelConfig& c, const dist::Parallel& par, LoadOptions* lo);

// Every parameter's HF name and shape as one process lists them (named_parameters order), also
// when this rank holds a slice of the routed experts: their entries stand for all E.
std::vector<std::pair<std::string, Shape>> all_parameter_shapes(const ModelConfig& c, const ModelWeights& w,
                                                                bool trainable_only);

// Rows [b0, b1) of a [B,S] batch tensor for this rank (par.batch_rows), as an owned copy.
Tensor local_batch(const Tensor& t, const dist::Parallel& par);

// Sums each gradient over the ranks holding its parameter: routed experts over par.expert_dp,
// everything else over par.world; packed into buckets so a step makes few collectives.
// touched[layer][expert] (the step's global routing, the same on every rank): routed experts
// that received no token are skipped — their gradient is zero on every rank.
void all_reduce_grads(const dist::Parallel& par, const std::vector<NamedParam>& grads,
                      const std::vector<std::vector<bool>>* touched = nullptr);

// The model's whole expert stacks from the EP group's slices, on rank 0 of the EP group
// (collective; the other ranks get w back): a ModelWeights sharing every other tensor with w,
// with expert_begin 0. w itself when ep == 1. low: w's matrices are split master weights
// (mixed precision, model_train.h): each rank joins its expert slices to f32 as it sends them,
// so the gathered stacks are f32 and every other tensor stays split (a checkpoint writes those
// a tensor at a time).
ModelWeights gather_experts(const ModelConfig& c, const ModelWeights& w, const dist::Parallel& par,
                            const MasterLowHalves* low = nullptr);

// The gradient norm over every rank's parameters (each expert counted once: expert gradients'
// squares are summed over the EP group), and, with max_norm > 0, the gradients scaled as
// clip_grad_norm scales them. Call after all_reduce_grads.
double clip_grad_norm_global(const dist::Parallel& par, const std::vector<NamedParam>& grads, double max_norm);

// Sum of squares of the expert (experts = true) or other gradients of a list (for the fused
// update's logged norm).
double grad_sum_squares(const std::vector<NamedParam>& grads, bool experts);

// The optimizer state of the whole model, in full_names order (trainer_state's "params"), on
// world rank 0 (collective over the world; other ranks get an empty snapshot): its own, plus
// what the other ranks send — with `sharded` (ZeRO-1) every rank its shard, else EP group 0's
// other ranks their experts (replicas hold the same state).
OptimizerSnapshot gather_optimizer(const dist::Parallel& par, const AdamW& opt,
                                   const std::vector<std::string>& full_names, bool sharded = false);

// ZeRO-1 (moe train --zero 1): the optimizer state is sharded by parameter. owner[i] says which
// rank updates params[i] (a named_parameters list of the trainable weights, the same on every
// rank of the parameter's communicator): dense parameters spread over the world's ranks, routed
// experts over their expert-DP group, greedily by size. A step then reduces each gradient to its
// owner only (reduce_grads_to_owners), the owners clip (clip_grad_norm_owned: the norm over
// all owners) and update, and broadcast the new weights (broadcast_from_owners).
std::vector<int> shard_owners(const dist::Parallel& par, const std::vector<NamedParam>& params);
bool owns(const dist::Parallel& par, const NamedParam& p, int owner);
void reduce_grads_to_owners(const dist::Parallel& par, const std::vector<NamedParam>& grads,
                            const std::vector<int>& owners, const std::vector<std::vector<bool>>* touched = nullptr);
// low: the lower halves of split master weights (mixed precision): a bf16 parameter among
// params is sent with its lower halves, the f32 value the owner updated.
void broadcast_from_owners(const dist::Parallel& par, const std::vector<NamedParam>& params,
                           const std::vector<int>& owners, const MasterLowHalves* low = nullptr);
double clip_grad_norm_owned(const dist::Parallel& par, const std::vector<NamedParam>& grads,
                            const std::vector<int>& owners, double max_norm);

// The per-rank memory report: every rank's host peak per category, printed by rank 0 when
// `print` (collective over the world).
void print_rank_memory(const dist::Parallel& par, bool print);

// "rank R: ..." prefix-free one-line summary of the layout, for logs.
std::string describe_parallel(const dist::Parallel& par, const ModelConfig& c);

}  // namespace moe

// test_chat_data.cpp — supervised fine-tuning data: only assistant tokens carry loss.
// A masked probe: the user and system messages carry a marker string; the labeled tokens must
// decode to exactly the assistant replies (with the template's end-of-turn marker) and never
// contain the marker. Through encode_chat and through load_dataset (packing on and off).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"
#include "train/chat_data.h"
#include "train/data.h"

namespace moe {
namespace {

const char* kChatML =
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

nlohmann::ordered_json conversation() {
  return nlohmann::ordered_json::parse(R"([
    {"role":"system","content":"PROBE-SYS be brief"},
    {"role":"user","content":"PROBE-USER capital of France?"},
    {"role":"assistant","content":"Paris."},
    {"role":"user","content":"PROBE-USER and of Italy?"},
    {"role":"assistant","content":"Rome."}])");
}

// The text of the labeled tokens, each maximal labeled run joined with '|'.
std::string labeled_text(const Tokenizer& tok, const std::vector<int32_t>& ids, const std::vector<int32_t>& labels) {
  std::string out;
  std::vector<int32_t> run;
  for (size_t i = 0; i <= ids.size(); ++i) {
    if (i < ids.size() && labels[i] != kIgnoreLabel) {
      EXPECT_EQ(labels[i], ids[i]) << "a label must be its own token id";
      run.push_back(ids[i]);
    } else if (!run.empty()) {
      if (!out.empty()) out += '|';
      out += tok.decode(run);
      run.clear();
    }
  }
  return out;
}

TEST(ChatData, OnlyAssistantTokensCarryLoss) {
  const Tokenizer tok = Tokenizer::byte_level({});
  const ChatTemplate tmpl(kChatML, nlohmann::json::object());
  ChatStats st;
  const LabeledTokens lt = encode_chat(conversation(), tmpl, tok, "probe", &st);
  ASSERT_EQ(lt.ids.size(), lt.labels.size());
  EXPECT_EQ(labeled_text(tok, lt.ids, lt.labels), "Paris.<|im_end|>\n|Rome.<|im_end|>\n");
  EXPECT_EQ(tok.decode(lt.ids), tmpl.apply(conversation(), false)) << "the tokens are the whole rendering";
  EXPECT_EQ(st.assistant_turns, 2);
  EXPECT_EQ(st.labeled_turns, 2);
}

TEST(ChatData, PromptCompletionLabelsTheCompletion) {
  const Tokenizer tok = Tokenizer::byte_level({});
  const LabeledTokens lt = encode_prompt_completion("PROBE question: ", "answer", tok, nullptr);
  EXPECT_EQ(labeled_text(tok, lt.ids, lt.labels), "answer");
}

TEST(ChatData, DatasetRowsKeepTheMask) {
  const Tokenizer tok = Tokenizer::byte_level({});
  const ChatTemplate tmpl(kChatML, nlohmann::json::object());
  const std::string path = std::string(MOE_BINARY_DIR) + "/chat-data-test.jsonl";
  {
    std::ofstream f(path);
    for (int i = 0; i < 6; ++i) f << nlohmann::json({{"messages", conversation()}}).dump() << "\n";
  }
  for (bool packing : {true, false}) {
    DataOptions o;
    o.seq_len = packing ? 64 : 256;
    o.val_fraction = 0;
    o.chat = &tmpl;
    o.packing = packing;
    const Dataset ds = load_dataset(path, &tok, o);
    EXPECT_EQ(ds.sft.examples, 6);
    std::string all;
    for (int64_t r = 0; r < ds.train.n; ++r) {
      const auto b = ds.train.input_ids.begin() + r * ds.train.seq, lb = ds.train.labels.begin() + r * ds.train.seq;
      std::vector<int32_t> ids(b, b + ds.train.seq), labels(lb, lb + ds.train.seq);
      const std::string t = labeled_text(tok, ids, labels);
      EXPECT_EQ(t.find("PROBE"), std::string::npos) << "a user/system token carries loss: " << t;
      if (!packing) {
        EXPECT_EQ(t, "Paris.<|im_end|>\n|Rome.<|im_end|>\n") << "row " << r;
      }
      all += t;
    }
    EXPECT_NE(all.find("Paris."), std::string::npos);
    EXPECT_NE(all.find("Rome."), std::string::npos);
    if (!packing) {
      EXPECT_EQ(ds.train.n, 6);
    }
  }
  std::filesystem::remove(path);
}

TEST(ChatData, NoAssistantTokensIsAnError) {
  const Tokenizer tok = Tokenizer::byte_level({});
  const ChatTemplate tmpl(kChatML, nlohmann::json::object());
  const std::string path = std::string(MOE_BINARY_DIR) + "/chat-data-noasst.jsonl";
  {
    std::ofstream f(path);
    f << R"({"prompt":"a","completion":""})" << "\n";
  }
  DataOptions o;
  o.seq_len = 8;
  o.chat = &tmpl;
  try {
    load_dataset(path, &tok, o);
    ADD_FAILURE() << "a dataset without scored tokens was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no token carries loss"), std::string::npos) << e.what();
  }
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace moe

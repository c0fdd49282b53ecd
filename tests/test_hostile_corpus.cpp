// test_hostile_corpus.cpp — replays the fuzz regression corpus: every file in
// tests/fuzz_corpus/<target>/ goes through the same entry point as the libFuzzer target
// fuzz/fuzz_<target>.cpp (fuzz/fuzz_targets.h). An input must be accepted or rejected with a
// moe::Error; anything else (a crash, another exception, a sanitizer report in the ASan build, an
// abort on a broken invariant) fails the test. Inputs a fuzzer found go into that folder.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "../fuzz/fuzz_targets.h"

namespace moe {
namespace {

namespace fs = std::filesystem;
using Entry = void (*)(const uint8_t*, size_t);

std::string corpus_dir(const std::string& target) {
  std::string f = __FILE__;  // <root>/tests/test_hostile_corpus.cpp
  return f.substr(0, f.rfind('/')) + "/fuzz_corpus/" + target;
}

void replay(const std::string& target, Entry entry) {
  const std::string dir = corpus_dir(target);
  ASSERT_TRUE(fs::is_directory(dir)) << dir;
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file()) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  ASSERT_FALSE(files.empty()) << "no inputs in " << dir;
  for (const fs::path& p : files) {
    SCOPED_TRACE(p.string());
    std::ifstream f(p, std::ios::binary);
    const std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    // A moe::Error is caught inside the entry point; anything escaping it fails here.
    EXPECT_NO_THROW(entry(reinterpret_cast<const uint8_t*>(data.data()), data.size()));
  }
}

TEST(HostileCorpus, SafetensorsHeader) { replay("safetensors_header", fuzz::safetensors_header); }
TEST(HostileCorpus, SafetensorsIndex) { replay("safetensors_index", fuzz::safetensors_index); }
TEST(HostileCorpus, ConfigJson) { replay("config_json", fuzz::config_json); }
TEST(HostileCorpus, TokenizerJson) { replay("tokenizer_json", fuzz::tokenizer_json); }
TEST(HostileCorpus, Jinja) { replay("jinja", fuzz::jinja); }
TEST(HostileCorpus, Regex) { replay("regex", fuzz::regex); }
TEST(HostileCorpus, ApiRequest) { replay("api_request", fuzz::api_request); }

}  // namespace
}  // namespace moe

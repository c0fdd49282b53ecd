// fuzz_api_request.cpp — libFuzzer target: `moe serve` request bodies (serve/api.h): parsing,
// validation and the response objects built from an accepted request.
//
// The entry point lives in fuzz_targets.h (shared with the ctest replay of
// tests/fuzz_corpus/api_request/): any body is accepted within the limits or refused with an
// ApiError (400/413); a crash, sanitizer report, leak, hang or any other exception is a bug.
//
// Build and run: as fuzz_config_json.cpp (scripts/test.sh's fuzz stage runs it).
#include "fuzz_targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moe::fuzz::api_request(data, size);
  return 0;
}

// sanitizer.h — MOE_ASAN: 1 in AddressSanitizer builds (gcc or clang), else 0.
//
// Sanitizer builds give up the allocator's reuse (kept host blocks, pooled Storage records) so
// that ASan sees every use after free, and tests that count allocations skip there.
#pragma once

#if defined(__SANITIZE_ADDRESS__)
#define MOE_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MOE_ASAN 1
#endif
#endif
#ifndef MOE_ASAN
#define MOE_ASAN 0
#endif

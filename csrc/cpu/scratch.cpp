#include "scratch.h"

#include <cstdlib>

namespace bitswitch {
namespace cpu {
namespace {

struct ScratchSet {
  void* ptr[kScratchSlots] = {};
  size_t size[kScratchSlots] = {};
  ~ScratchSet() {
    for (void* p : ptr) std::free(p);
  }
};

thread_local ScratchSet tl_scratch;

}  // namespace

void* thread_scratch(int slot, size_t bytes) {
  if (slot < 0 || slot >= kScratchSlots) return nullptr;
  ScratchSet& s = tl_scratch;
  if (s.size[slot] < bytes) {
    std::free(s.ptr[slot]);
    s.ptr[slot] = nullptr;
    s.size[slot] = 0;
    // Round up so small growth steps do not reallocate every call.
    size_t want = ((bytes + (bytes >> 2)) + 4095) & ~size_t(4095);
    void* p = std::aligned_alloc(64, want);
    if (!p) return nullptr;
    s.ptr[slot] = p;
    s.size[slot] = want;
  }
  return s.ptr[slot];
}

}  // namespace cpu
}  // namespace bitswitch

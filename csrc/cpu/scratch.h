// Per-thread scratch memory for kernels: grow-only, 64-byte aligned, reused across calls
// so a kernel call allocates nothing in the steady state.
#pragma once

#include <cstddef>

namespace bitswitch {
namespace cpu {

// Slots let one kernel hold several buffers at once.
enum ScratchSlot : int { kScratchX = 0, kScratchPanel = 1, kScratchAcc = 2, kScratchSlots = 3 };

// A buffer of at least `bytes` bytes owned by the calling thread; valid until the same
// thread asks for the same slot again. Returns nullptr if memory is exhausted.
void* thread_scratch(int slot, size_t bytes);

}  // namespace cpu
}  // namespace bitswitch

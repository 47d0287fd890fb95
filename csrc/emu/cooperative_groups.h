#pragma once
#include "emu.h"

namespace cooperative_groups {
struct grid_group {
  void sync() { emu::g_grid->grid_bar.arrive_and_wait(); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

// Layer-profile JSON (ProfileStore::ParseJson: protobuf's JSON reader, then the store's checks),
// as read from --profile_dir and PutProfile: an accepted profile must also give layer budgets for
// its own geometry at any budget without failing a check later in the engine.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "core/session_config.h"
#include "server/profile_store.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > (1 << 16)) return 0;
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto profile = reasonalloc::ProfileStore::ParseJson(text, "fuzz");
  if (!profile.ok()) return 0;
  const auto& pm = profile->model();
  reasonalloc::SessionConfig config;
  config.model.name = "fuzz";
  config.model.num_layers = pm.num_layers();
  config.model.num_q_heads = pm.num_q_heads();
  config.model.num_kv_heads = pm.num_kv_heads();
  config.model.head_dim = pm.head_dim();
  config.model.max_context = 4096;
  config.allocator.kind = reasonalloc::AllocatorKind::kReasonAlloc;
  config.allocator.profile = profile->name();
  if (!reasonalloc::ValidateSessionConfig(config).ok()) return 0;
  if (!reasonalloc::ProfileStore::CheckGeometry(*profile, config.model).ok()) std::abort();
  const std::vector<double> demand(profile->demand().begin(), profile->demand().end());
  if (static_cast<int>(demand.size()) != config.model.num_layers) std::abort();
  for (int budget : {config.budget.window + 1, 64, 512}) {
    config.budget.budget = budget;
    if (!reasonalloc::ValidateSessionConfig(config).ok()) continue;
    auto budgets = reasonalloc::LayerBudgets(config, demand);
    if (!budgets.ok()) continue;  // a budget the wave cannot spread is refused with a status
    int64_t above_window = 0;
    for (int32_t b : *budgets) above_window += b - config.budget.window;
    if (above_window != int64_t{config.model.num_layers} * (budget - config.budget.window)) {
      std::abort();  // the layer budgets must spend exactly L * (B - window)
    }
  }
  return 0;
}

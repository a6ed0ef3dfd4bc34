// Layer-profile JSON (ProfileStore::ParseJson: protobuf's JSON reader, then the store's checks),
// as read from --profile_dir and PutProfile: an accepted profile must also give layer budgets for
// its own geometry at any budget without failing a check later in the engine, and one with a head
// demand must give the static mode's head budgets, spending exactly L * Hkv * (B - window) when
// every head holds more than it could get.
#include <cmath>
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
    if (profile->head_demand_size() == 0) continue;
    reasonalloc::SessionConfig static_config = config;
    static_config.allocator.reasonalloc_mode = reasonalloc::ReasonAllocMode::kStatic;
    const reasonalloc::ProfileDemand both(
        demand, std::vector<double>(profile->head_demand().begin(), profile->head_demand().end()));
    if (!reasonalloc::CheckProfileDemand(static_config, both).ok()) std::abort();
    const int64_t heads = static_config.model.num_heads_total();
    // Every head longer than any budget it could get (a whole layer's, at the clip's top): nothing
    // is capped.
    const int64_t longest = config.budget.window + 1 +
                            int64_t{static_config.model.num_kv_heads} *
                                (budget - config.budget.window) *
                                static_cast<int64_t>(std::ceil(static_config.allocator.clip_high));
    const std::vector<int32_t> lengths(static_cast<size_t>(heads), static_cast<int32_t>(longest));
    std::vector<int32_t> head_budgets(static_cast<size_t>(heads));
    if (!reasonalloc::HeadBudgetsFromProfile(static_config, lengths, both.layers, both.heads,
                                             head_budgets)
             .ok()) {
      std::abort();
    }
    int64_t spent = 0;
    for (int32_t b : head_budgets) {
      if (b < config.budget.window + 1) std::abort();  // the selectable floor
      spent += b - config.budget.window;
    }
    if (spent != heads * (budget - config.budget.window)) std::abort();
  }
  return 0;
}

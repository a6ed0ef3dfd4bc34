#include "client/cli/watch.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <deque>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"

ABSL_DECLARE_FLAG(std::string, model);
ABSL_DECLARE_FLAG(std::string, session);
ABSL_FLAG(double, pool_interval, 1.0, "watch: seconds between pool gauges (0 = none)");
ABSL_FLAG(int64_t, count, 0,
          "watch: exit after this many compression events (0 = run until the "
          "stream ends or Ctrl-C)");
ABSL_FLAG(bool, plain, false,
          "watch: one line per record instead of the live screen (the "
          "default when stdout is not a terminal)");

namespace reasonalloc {
namespace {

using Clock = std::chrono::steady_clock;

std::string Bar(double fraction, int width) {
  const int full = std::clamp(static_cast<int>(fraction * width + 0.5), 0, width);
  return std::string(static_cast<size_t>(full), '#') +
         std::string(static_cast<size_t>(width - full), '.');
}

std::string PlainLine(const v1::CompressEvent& e, uint64_t dropped) {
  std::string layers;
  for (int i = 0; i < e.layer_budgets_size(); ++i) {
    absl::StrAppend(&layers, i == 0 ? "" : ",", e.layer_budgets(i));
  }
  return absl::StrFormat(
      "event unix_ms=%d session=%s model=%s step=%d epoch=%d evicted=%d total_ms=%.3f "
      "spread=%.2f dropped_before=%d layer_budgets=[%s]",
      e.unix_ms(), e.session_id(), e.model_name(), e.step(), e.epoch(), e.evicted_tokens(),
      e.timings().total_seconds() * 1e3, e.head_budget_spread(), dropped, layers);
}

}  // namespace

int WatchCommand(Client& client) {
  v1::WatchMetricsRequest request;
  const std::string sessions = absl::GetFlag(FLAGS_session);
  for (absl::string_view id : absl::StrSplit(sessions, ',', absl::SkipEmpty())) {
    request.add_session_ids(std::string(id));
  }
  request.set_model_name(absl::GetFlag(FLAGS_model));
  request.set_pool_interval_seconds(absl::GetFlag(FLAGS_pool_interval));
  const int64_t count = absl::GetFlag(FLAGS_count);
  const bool plain = absl::GetFlag(FLAGS_plain) || isatty(STDOUT_FILENO) == 0;

  grpc::ClientContext ctx;
  auto stream = client.stub().WatchMetrics(&ctx, request);
  v1::MetricsEvent m;
  int64_t events = 0;
  uint64_t dropped_total = 0;
  std::deque<Clock::time_point> recent;  // event arrival times over the last 5 s
  v1::CompressEvent last;
  v1::PoolGauges pool;
  Clock::time_point last_draw;
  while (stream->Read(&m)) {
    const auto now = Clock::now();
    dropped_total += m.dropped_before();
    if (m.has_pool()) {
      pool = m.pool();
      if (plain) {
        std::cout << absl::StrFormat(
                         "pool unix_ms=%d sessions=%d arena_reserved_bytes=%d "
                         "arena_capacity_bytes=%d\n",
                         pool.unix_ms(), pool.sessions(), pool.arena_reserved_bytes(),
                         pool.arena_capacity_bytes())
                  << std::flush;
      }
    }
    if (m.has_compress()) {
      ++events;
      last = m.compress();
      recent.push_back(now);
      if (plain) std::cout << PlainLine(last, m.dropped_before()) << "\n" << std::flush;
    }
    while (!recent.empty() && now - recent.front() > std::chrono::seconds(5)) recent.pop_front();
    if (!plain &&
        (now - last_draw > std::chrono::milliseconds(100) || (count > 0 && events >= count))) {
      last_draw = now;
      std::string screen = "\x1b[H\x1b[2J";
      absl::StrAppendFormat(&screen,
                            "reasonalloc watch   events %d   %.1f events/s   dropped %d\n"
                            "sessions %d   arena %.1f / %.1f MiB reserved\n\n",
                            events, recent.size() / 5.0, dropped_total, pool.sessions(),
                            pool.arena_reserved_bytes() / 1048576.0,
                            pool.arena_capacity_bytes() / 1048576.0);
      if (events > 0) {
        absl::StrAppendFormat(&screen,
                              "latest: session %s  model %s  step %d  evicted %d  %.3f ms  "
                              "head spread %.2f\n\nper-layer budget (tokens per KV head, the "
                              "mean over the layer's heads):\n",
                              last.session_id(), last.model_name(), last.step(),
                              last.evicted_tokens(), last.timings().total_seconds() * 1e3,
                              last.head_budget_spread());
        int32_t max_layer = 1;
        for (int32_t b : last.layer_budgets()) max_layer = std::max(max_layer, b);
        for (int l = 0; l < last.layer_budgets_size(); ++l) {
          absl::StrAppendFormat(&screen, "  L%-3d %s %d\n", l,
                                Bar(static_cast<double>(last.layer_budgets(l)) / max_layer, 50),
                                last.layer_budgets(l));
        }
      }
      std::cout << screen << std::flush;
    }
    if (count > 0 && events >= count) {
      ctx.TryCancel();
      while (stream->Read(&m)) {
      }
      stream->Finish();
      return 0;
    }
  }
  const grpc::Status s = stream->Finish();
  if (!s.ok()) {
    std::cerr << "reasonalloc: watch: " << s.error_code() << ": " << s.error_message() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace reasonalloc

// Pins every exported metric name, type and label set: a rename or a new label is a conscious
// change here, in the Grafana dashboard and in the alert rules (deploy/), which the Prometheus
// integration test checks against a running server.
#include "server/metrics.h"

#include <gtest/gtest.h>

#include <map>
#include <set>
#include <string>

namespace reasonalloc {
namespace {

std::string TypeName(prometheus::MetricType t) {
  switch (t) {
    case prometheus::MetricType::Counter:
      return "counter";
    case prometheus::MetricType::Gauge:
      return "gauge";
    case prometheus::MetricType::Histogram:
      return "histogram";
    default:
      return "other";
  }
}

TEST(Metrics, NamesTypesAndLabelSetsArePinned) {
  Metrics m("cpu");
  // Touch every family so that each has at least one child.
  m.CountRequest("Compress", 0);
  StageSeconds s;
  m.ObserveCompress(s);
  Decision d;
  d.num_layers = 2;
  d.num_kv_heads = 1;
  d.budgets = {8, 16};
  d.kept_lengths = {8, 16};
  m.ObserveEvent("rkv", "reasonalloc", "m", d);
  m.SetPool(1, 100, 10, 48);
  m.CountSessionEnd("closed");
  m.CountWatchDropped(1);
  m.SetWatchers(1);
  m.CountIpcImportFailure("bad_handle");
  m.ObserveDeviceBatch(3);

  std::map<std::string, std::pair<std::string, std::set<std::string>>> got;
  for (const auto& family : m.registry().Collect()) {
    std::set<std::string> labels;
    for (const auto& metric : family.metric) {
      for (const auto& l : metric.label) labels.insert(l.name);
    }
    got[family.name] = {TypeName(family.type), labels};
  }
  const std::map<std::string, std::pair<std::string, std::set<std::string>>> want = {
      {"reasonalloc_requests_total", {"counter", {"method", "code"}}},
      {"reasonalloc_compress_duration_seconds", {"histogram", {"stage"}}},
      {"reasonalloc_tokens_evicted_total", {"counter", {"scorer", "allocator", "model"}}},
      {"reasonalloc_tokens_kept_total", {"counter", {"scorer", "allocator", "model"}}},
      {"reasonalloc_head_budget_spread_ratio", {"histogram", {"allocator"}}},
      {"reasonalloc_device_batch_events", {"histogram", {}}},
      {"reasonalloc_layer_budget_share", {"gauge", {"model", "layer"}}},
      {"reasonalloc_watch_events_dropped_total", {"counter", {}}},
      {"reasonalloc_watchers", {"gauge", {}}},
      {"reasonalloc_ipc_import_failures_total", {"counter", {"reason"}}},
      {"reasonalloc_sessions_ended_total", {"counter", {"reason"}}},
      {"reasonalloc_sessions", {"gauge", {}}},
      {"reasonalloc_arena_bytes", {"gauge", {"state"}}},
      {"reasonalloc_kv_tokens", {"gauge", {"state"}}},
      {"reasonalloc_build_info", {"gauge", {"version", "revision", "backend", "device", "driver"}}},
  };
  EXPECT_EQ(got, want);
}

TEST(Metrics, ModelLabelsAreBounded) {
  Metrics m("cpu");
  for (int i = 0; i < Metrics::kMaxModelLabels; ++i) {
    EXPECT_EQ(m.ModelLabel("model-" + std::to_string(i)), "model-" + std::to_string(i));
  }
  EXPECT_EQ(m.ModelLabel("one-too-many"), "other");
  EXPECT_EQ(m.ModelLabel("model-3"), "model-3");
}

TEST(Metrics, LayerShareSumsToOne) {
  Metrics m("cpu");
  Decision d;
  d.num_layers = 2;
  d.num_kv_heads = 2;
  d.budgets = {10, 30, 20, 40};
  d.kept_lengths = d.budgets;
  m.ObserveEvent("snapkv", "adakv", "m", d);
  for (const auto& family : m.registry().Collect()) {
    if (family.name != "reasonalloc_layer_budget_share") continue;
    std::map<std::string, double> share;
    for (const auto& metric : family.metric) {
      for (const auto& l : metric.label) {
        if (l.name == "layer") share[l.value] = metric.gauge.value;
      }
    }
    EXPECT_DOUBLE_EQ(share["0"], 0.4);
    EXPECT_DOUBLE_EQ(share["1"], 0.6);
  }
}

}  // namespace
}  // namespace reasonalloc

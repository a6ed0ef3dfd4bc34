#include "server/gpu_engine_pool.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>

#include "absl/strings/str_cat.h"
#include "reasonalloc/v1/sidecar.pb.h"
#include "server/proto_convert.h"

namespace reasonalloc {

std::string GpuEnginePool::Key(int device, const SessionConfig& config,
                               const ProfileDemand& demand) {
  // The configuration as the API spells it (every field, defaults resolved), serialized
  // deterministically, then the profile's values bit for bit.
  v1::CreateSessionRequest r;
  SessionConfigToProto(config, r.mutable_model(), r.mutable_budget(), r.mutable_scorer(),
                       r.mutable_allocator());
  std::string bytes;
  {
    google::protobuf::io::StringOutputStream out(&bytes);
    google::protobuf::io::CodedOutputStream coded(&out);
    coded.SetSerializationDeterministic(true);
    r.SerializeToCodedStream(&coded);
  }
  std::string key = absl::StrCat(device, "/", config.managed ? "m" : "a", "/", bytes.size(), "/");
  key += bytes;
  absl::StrAppend(&key, "/", demand.layers.size(), "/", demand.heads.size(), "/");
  key.append(reinterpret_cast<const char*>(demand.layers.data()),
             demand.layers.size() * sizeof(double));
  key.append(reinterpret_cast<const char*>(demand.heads.data()),
             demand.heads.size() * sizeof(double));
  return key;
}

absl::StatusOr<std::shared_ptr<gpu::GpuEngine>> GpuEnginePool::Get(int device,
                                                                   const SessionConfig& config,
                                                                   const ProfileDemand& demand) {
  const std::string key = Key(device, config, demand);
  MutexLock lock(&mu_);
  // Engines whose sessions are all gone leave an expired entry; drop them as we pass.
  for (auto it = engines_.begin(); it != engines_.end();) {
    it = it->second.expired() && it->first != key ? engines_.erase(it) : std::next(it);
  }
  if (auto it = engines_.find(key); it != engines_.end()) {
    if (std::shared_ptr<gpu::GpuEngine> engine = it->second.lock()) return engine;
  }
  auto created = gpu::GpuEngine::Create(device, config, demand);
  if (!created.ok()) return created.status();
  std::shared_ptr<gpu::GpuEngine> engine = std::move(created).value();
  engines_[key] = engine;
  return engine;
}

int GpuEnginePool::size() const {
  MutexLock lock(&mu_);
  int live = 0;
  for (const auto& [key, engine] : engines_) live += engine.expired() ? 0 : 1;
  return live;
}

}  // namespace reasonalloc

#include "server/profile_store.h"

#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "core/layer_profile.h"
#include "proto/json.h"

namespace reasonalloc {
bool ProfileStore::ValidName(const std::string& name) {
  if (name.empty() || name.size() > 128 || name[0] == '.') return false;
  for (char c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.')
      return false;
  }
  return true;
}

std::string ProfileStore::OwnerOf(const PeerIdentity* caller) {
  if (caller == nullptr) return "server";
  if (!caller->local) return "tcp";
  if (caller->uid == 0 || caller->uid == ::geteuid()) return "server";
  return absl::StrCat("uid ", caller->uid);
}

absl::StatusOr<v1::LayerProfile> ProfileStore::Validate(v1::LayerProfile p,
                                                        absl::string_view field) {
  // Fields this server does not know would be kept and stored (and bypass the size bounds).
  p.DiscardUnknownFields();
  if (!ValidName(p.name())) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".name \"", p.name().substr(0, 64),
                     "\" must be 1-128 characters of letters, digits, '-', '_' and '.' (not "
                     "starting with '.')"));
  }
  const auto& m = p.model();
  if (m.num_layers() < 1 || m.num_layers() > kMaxLayers) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".model.num_layers = ", m.num_layers(), " is out of range"));
  }
  if (m.num_q_heads() < 1 || m.num_kv_heads() < 1 || m.head_dim() < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        field,
        ".model needs num_q_heads, num_kv_heads and head_dim (the geometry it was measured on)"));
  }
  // No session can have more heads or a wider head, and a head demand stays small (at most
  // kMaxHeadDemand entries, 512 KiB).
  if (m.num_q_heads() > kMaxHeads || m.num_kv_heads() > kMaxHeads || m.head_dim() > kMaxHeadDim) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".model: num_q_heads, num_kv_heads at most ", kMaxHeads,
                     " and head_dim at most ", kMaxHeadDim));
  }
  if (p.head_demand_size() > kMaxHeadDemand) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".head_demand has ", p.head_demand_size(),
                                                   " entries; at most ", kMaxHeadDemand,
                                                   " allowed"));
  }
  if (p.provenance().size() > 4096) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".provenance is ", p.provenance().size(),
                                                   " bytes long; at most 4096 allowed"));
  }
  if (p.model().name().size() > 256) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".model.name is ", p.model().name().size(), " bytes long; at most 256 allowed"));
  }
  if (!(p.rho() > 0 && p.rho() <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".rho = ", p.rho(), " is outside (0, 1]"));
  }
  auto demand = NormaliseDemand(std::vector<double>(p.demand().begin(), p.demand().end()),
                                m.num_layers(), absl::StrCat(field, ".demand"));
  if (!demand.ok()) return demand.status();
  p.mutable_demand()->Assign(demand->begin(), demand->end());
  if (p.head_demand_size() != 0) {
    auto heads =
        NormaliseHeadDemand(std::vector<double>(p.head_demand().begin(), p.head_demand().end()),
                            m.num_layers(), m.num_kv_heads(), absl::StrCat(field, ".head_demand"));
    if (!heads.ok()) return heads.status();
    p.mutable_head_demand()->Assign(heads->begin(), heads->end());
  }
  if (p.samples_size() != 0 && p.samples_size() != m.num_layers()) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".samples has ", p.samples_size(),
                     " entries; expected none or model.num_layers = ", m.num_layers()));
  }
  for (int l = 0; l < p.samples_size(); ++l) {
    if (p.samples(l) < 0) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".samples[", l, "] is negative"));
    }
  }
  return p;
}

absl::StatusOr<v1::LayerProfile> ProfileStore::ParseJson(const std::string& text,
                                                         absl::string_view what) {
  v1::LayerProfile p;
  const auto status = google::protobuf::util::JsonStringToMessage(text, &p);
  if (!status.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": not a LayerProfile JSON document: ", std::string(status.message())));
  }
  return Validate(std::move(p), what);
}

absl::Status ProfileStore::CheckGeometry(const v1::LayerProfile& p, const ModelGeometry& model) {
  const auto& m = p.model();
  const std::pair<const char*, std::pair<int, int>> fields[] = {
      {"num_layers", {m.num_layers(), model.num_layers}},
      {"num_q_heads", {m.num_q_heads(), model.num_q_heads}},
      {"num_kv_heads", {m.num_kv_heads(), model.num_kv_heads}},
      {"head_dim", {m.head_dim(), model.head_dim}}};
  for (const auto& [name, values] : fields) {
    if (values.first != values.second) {
      return absl::FailedPreconditionError(
          absl::StrCat("layer profile \"", p.name(), "\" was measured with model.", name, " = ",
                       values.first, "; the session's model.", name, " is ", values.second));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ProfileStore>> ProfileStore::Open(const std::string& dir,
                                                                 Limits limits) {
  std::unique_ptr<ProfileStore> store(new ProfileStore(dir, limits));
  if (dir.empty()) return store;
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    return absl::InvalidArgumentError(absl::StrCat("profile_dir \"", dir, "\" is not a directory"));
  }
  MutexLock lock(&store->mu_);
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    if (entry.path().extension() != ".json") continue;
    std::ifstream in(entry.path());
    std::stringstream text;
    text << in.rdbuf();
    auto p = ParseJson(text.str(), entry.path().string());
    if (!p.ok()) return p.status();
    if (store->profiles_.count(p->name()) != 0) {
      return absl::InvalidArgumentError(absl::StrCat(entry.path().string(), ": profile name \"",
                                                     p->name(), "\" is used by another file"));
    }
    p->set_owner("server");
    store->profiles_[p->name()] = *std::move(p);
  }
  if (static_cast<int>(store->profiles_.size()) > limits.max_profiles) {
    return absl::InvalidArgumentError(
        absl::StrCat("profile_dir \"", dir, "\" holds ", store->profiles_.size(),
                     " profiles; --max_profiles is ", limits.max_profiles));
  }
  if (ec) return absl::InternalError(absl::StrCat("profile_dir \"", dir, "\": ", ec.message()));
  return store;
}

absl::StatusOr<v1::LayerProfile> ProfileStore::Get(const std::string& name) const {
  MutexLock lock(&mu_);
  auto it = profiles_.find(name);
  if (it == profiles_.end()) {
    return absl::NotFoundError(
        absl::StrCat("no layer profile named \"", name.substr(0, 128), "\""));
  }
  return it->second;
}

std::vector<v1::LayerProfile> ProfileStore::List() const {
  MutexLock lock(&mu_);
  std::vector<v1::LayerProfile> out;
  for (const auto& [name, p] : profiles_) out.push_back(p);
  return out;
}

absl::Status ProfileStore::Put(v1::LayerProfile profile, bool overwrite, bool save,
                               const PeerIdentity* caller) {
  auto p = Validate(std::move(profile), "profile");
  if (!p.ok()) return p.status();
  if (save && dir_.empty()) {
    return absl::FailedPreconditionError("save: the server has no --profile-dir to save into");
  }
  const std::string owner = OwnerOf(caller);
  if (save && owner != "server") {
    // A saved file loads as the server's own at the next start.
    return absl::PermissionDeniedError(absl::StrCat(
        "save: only the server's uid or root (over the Unix socket) may write into --profile-dir; "
        "this call comes from ",
        caller->Describe()));
  }
  p->set_owner(owner);
  MutexLock lock(&mu_);
  auto existing = profiles_.find(p->name());
  if (existing != profiles_.end()) {
    if (!overwrite) {
      return absl::AlreadyExistsError(
          absl::StrCat("profile.name \"", p->name(), "\" exists; set overwrite to replace it"));
    }
    const std::string& held = existing->second.owner();
    if (owner != "server" && held != owner) {
      return absl::PermissionDeniedError(absl::StrCat(
          "profile.name \"", p->name(), "\" belongs to ", held,
          "; only its owner, the server's uid or root may replace it (this call comes from ",
          caller != nullptr ? caller->Describe() : std::string("the server"),
          "); put it under another name"));
    }
  } else if (static_cast<int>(profiles_.size()) >= limits_.max_profiles) {
    return absl::ResourceExhaustedError(
        absl::StrCat("profile.name \"", p->name(), "\": the server holds its maximum of ",
                     limits_.max_profiles, " profiles (--max_profiles)"));
  }
  if (save) {
    // Write beside the target and rename, so that a reader never sees half a file.
    const std::string path = (std::filesystem::path(dir_) / (p->name() + ".json")).string();
    const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
    {
      std::ofstream out(tmp, std::ios::trunc);
      out << reasonalloc::ToJson(*p);
      if (!out.good()) return absl::InternalError(absl::StrCat("cannot write ", tmp));
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) return absl::InternalError(absl::StrCat("cannot rename to ", path, ": ", ec.message()));
  }
  profiles_[p->name()] = *std::move(p);
  return absl::OkStatus();
}

}  // namespace reasonalloc

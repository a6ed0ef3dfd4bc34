// Layer profiles by name: loaded from --profile-dir at start (one `<name>.json` per profile, the
// JSON mapping of reasonalloc.v1.LayerProfile), added by PutProfile or FinishCalibration,
// optionally saved back. Every profile held has been validated and its demand normalised to mean 1.
#ifndef REASONALLOC_SERVER_PROFILE_STORE_H_
#define REASONALLOC_SERVER_PROFILE_STORE_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/session_config.h"
#include "core/sync.h"
#include "reasonalloc/v1/sidecar.pb.h"
#include "server/peer.h"

namespace reasonalloc {

// Entries of a profile's head_demand (num_layers * num_kv_heads): far above real models (80
// layers x 8 KV heads is 640) while 1024 profiles of it stay within 512 MiB.
inline constexpr int kMaxHeadDemand = 1 << 16;

struct ProfileLimits {
  int max_profiles = 1024;  // most profiles held (those loaded at start included)
};

// Ownership: every profile has an owner (LayerProfile.owner). Profiles loaded from --profile_dir,
// and those put by the server's own uid or root, belong to "server"; others to the Unix-socket uid
// that put them ("uid N") or to the TCP listener's peers ("tcp"). Only the owner, the server's uid
// and root may replace a profile, so a neighbour on a shared sidecar cannot change the wave
// another uid's sessions are created with; sessions copy the wave when they are created and keep
// it whatever happens to the profile later.
class ProfileStore {
 public:
  using Limits = ProfileLimits;
  // Empty `dir`: profiles live in memory only (PutProfile with save is then FAILED_PRECONDITION).
  // A file that does not parse or validate is an error naming the file and the field.
  static absl::StatusOr<std::unique_ptr<ProfileStore>> Open(const std::string& dir,
                                                            Limits limits = Limits());

  absl::StatusOr<v1::LayerProfile> Get(const std::string& name) const ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<v1::LayerProfile> List() const ABSL_LOCKS_EXCLUDED(mu_);
  // ALREADY_EXISTS when the name is taken and !overwrite; PERMISSION_DENIED when it is taken by a
  // profile `caller` may not replace (see above), or when `save` comes from a Unix-socket peer
  // other than the server's uid or root; RESOURCE_EXHAUSTED when a new name would exceed
  // max_profiles. `caller` defaults to the server itself.
  absl::Status Put(v1::LayerProfile profile, bool overwrite, bool save,
                   const PeerIdentity* caller = nullptr) ABSL_LOCKS_EXCLUDED(mu_);

  // The owner string a profile put by `caller` gets (null: the server).
  static std::string OwnerOf(const PeerIdentity* caller);
  // Whether `name` is a valid profile name (1-128 of [A-Za-z0-9._-], not starting with '.').
  static bool ValidName(const std::string& name);

  // Checks name, geometry, ρ, demand, head demand and sample counts; returns the profile with
  // demand (and head demand, per layer) normalised.
  // Errors are InvalidArgument naming `field` + the profile's field (e.g. "profile.demand[3]").
  static absl::StatusOr<v1::LayerProfile> Validate(v1::LayerProfile profile,
                                                   absl::string_view field);
  static absl::StatusOr<v1::LayerProfile> ParseJson(const std::string& text,
                                                    absl::string_view what);

  // FailedPrecondition naming the field when the profile was measured on another geometry.
  static absl::Status CheckGeometry(const v1::LayerProfile& profile, const ModelGeometry& model);

 private:
  ProfileStore(std::string dir, Limits limits) : dir_(std::move(dir)), limits_(limits) {}

  const std::string dir_;
  const Limits limits_;
  mutable Mutex mu_;
  std::map<std::string, v1::LayerProfile> profiles_ ABSL_GUARDED_BY(mu_);
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_PROFILE_STORE_H_

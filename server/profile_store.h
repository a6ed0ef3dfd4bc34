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
#include "absl/synchronization/mutex.h"
#include "core/session_config.h"
#include "reasonalloc/v1/sidecar.pb.h"

namespace reasonalloc {

class ProfileStore {
 public:
  // Empty `dir`: profiles live in memory only (PutProfile with save is then FAILED_PRECONDITION).
  // A file that does not parse or validate is an error naming the file and the field.
  static absl::StatusOr<std::unique_ptr<ProfileStore>> Open(const std::string& dir);

  absl::StatusOr<v1::LayerProfile> Get(const std::string& name) const ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<v1::LayerProfile> List() const ABSL_LOCKS_EXCLUDED(mu_);
  // ALREADY_EXISTS when the name is taken and !overwrite.
  absl::Status Put(v1::LayerProfile profile, bool overwrite, bool save) ABSL_LOCKS_EXCLUDED(mu_);

  // Checks name, geometry, ρ, demand and sample counts; returns the profile with demand normalised.
  // Errors are InvalidArgument naming `field` + the profile's field (e.g. "profile.demand[3]").
  static absl::StatusOr<v1::LayerProfile> Validate(v1::LayerProfile profile,
                                                   absl::string_view field);
  static absl::StatusOr<v1::LayerProfile> ParseJson(const std::string& text,
                                                    absl::string_view what);

  // FailedPrecondition naming the field when the profile was measured on another geometry.
  static absl::Status CheckGeometry(const v1::LayerProfile& profile, const ModelGeometry& model);

 private:
  explicit ProfileStore(std::string dir) : dir_(std::move(dir)) {}

  const std::string dir_;
  mutable absl::Mutex mu_;
  std::map<std::string, v1::LayerProfile> profiles_ ABSL_GUARDED_BY(mu_);
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_PROFILE_STORE_H_

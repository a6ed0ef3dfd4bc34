// The one place where a policy enum of the engine (core/policy.h) becomes its wire enum: the
// server's answers, the CLI's and the worker's CreateSession requests all spell a reasonalloc
// mode through here.
#ifndef REASONALLOC_PROTO_POLICY_ENUMS_H_
#define REASONALLOC_PROTO_POLICY_ENUMS_H_

#include "core/policy.h"
#include "reasonalloc/v1/types.pb.h"

namespace reasonalloc {

inline v1::AllocatorConfig::ReasonAllocMode ReasonAllocModeToProto(ReasonAllocMode mode) {
  switch (mode) {
    case ReasonAllocMode::kFull:
      return v1::AllocatorConfig::REASONALLOC_MODE_FULL;
    case ReasonAllocMode::kLayer:
      return v1::AllocatorConfig::REASONALLOC_MODE_LAYER;
    case ReasonAllocMode::kHead:
      return v1::AllocatorConfig::REASONALLOC_MODE_HEAD;
    case ReasonAllocMode::kOff:
      return v1::AllocatorConfig::REASONALLOC_MODE_OFF;
    case ReasonAllocMode::kStatic:
      return v1::AllocatorConfig::REASONALLOC_MODE_STATIC;
  }
  return v1::AllocatorConfig::REASONALLOC_MODE_UNSPECIFIED;
}

}  // namespace reasonalloc

#endif  // REASONALLOC_PROTO_POLICY_ENUMS_H_

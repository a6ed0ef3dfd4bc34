// The one JSON form the project writes for API messages: proto3 JSON with the .proto field names
// (snake_case) and indentation, as the CLI prints and as layer-profile files are stored.
#ifndef REASONALLOC_PROTO_JSON_H_
#define REASONALLOC_PROTO_JSON_H_

#include <google/protobuf/message.h>
#include <google/protobuf/util/json_util.h>

#include <string>

namespace reasonalloc {

inline std::string ToJson(const google::protobuf::Message& message) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(message, &out, options);
  return out;
}

}  // namespace reasonalloc

#endif  // REASONALLOC_PROTO_JSON_H_

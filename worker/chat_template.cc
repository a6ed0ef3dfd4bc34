#include "worker/chat_template.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"

namespace reasonalloc::worker {
namespace {

// The default system message of a ChatML template: a system turn written as a literal, with a real
// or an escaped newline ('<|im_start|>system\nYou are ...<|im_end|>'). Turns built from the
// messages (quotes, braces, '+') are skipped; the first literal one wins.
std::string DefaultSystemMessage(const std::string& source) {
  for (const std::string open : {"<|im_start|>system\n", "<|im_start|>system\\n"}) {
    for (size_t at = source.find(open); at != std::string::npos; at = source.find(open, at + 1)) {
      const size_t from = at + open.size();
      const size_t close = source.find("<|im_end|>", from);
      if (close == std::string::npos) break;
      const std::string literal = source.substr(from, close - from);
      if (!literal.empty() && literal.find_first_of("'\"{}+") == std::string::npos) {
        return absl::StrReplaceAll(literal, {{"\\n", "\n"}});
      }
    }
  }
  return "";
}

}  // namespace

std::string ChatTemplate::Render(const std::string& user) const {
  if (family == "chatml") {
    std::string out;
    if (!system_message.empty()) {
      absl::StrAppend(&out, "<|im_start|>system\n", system_message, "<|im_end|>\n");
    }
    absl::StrAppend(&out, "<|im_start|>user\n", user, "<|im_end|>\n<|im_start|>assistant\n");
    return out;
  }
  if (family == "llama3") {
    std::string out;
    if (!system_message.empty()) {
      absl::StrAppend(&out, "<|start_header_id|>system<|end_header_id|>\n\n", system_message,
                      "<|eot_id|>");
    }
    absl::StrAppend(&out, "<|start_header_id|>user<|end_header_id|>\n\n", user,
                    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    return out;
  }
  if (family == "gemma") {
    return absl::StrCat("<start_of_turn>user\n", user, "<end_of_turn>\n<start_of_turn>model\n");
  }
  return absl::StrCat("[INST] ", user, " [/INST]");  // "inst"
}

absl::StatusOr<ChatTemplate> ParseChatTemplate(const std::string& source) {
  ChatTemplate t;
  if (absl::StrContains(source, "<|im_start|>")) {
    if (!absl::StrContains(source, "<|im_start|>assistant")) {
      return absl::UnimplementedError(
          "tokenizer.chat_template uses <|im_start|> but never opens an assistant turn; use "
          "--raw");
    }
    t.family = "chatml";
    t.system_message = DefaultSystemMessage(source);
    return t;
  }
  if (absl::StrContains(source, "<|start_header_id|>")) {
    t.family = "llama3";
    return t;
  }
  if (absl::StrContains(source, "<start_of_turn>")) {
    t.family = "gemma";
    return t;
  }
  if (absl::StrContains(source, "[INST]")) {
    t.family = "inst";
    return t;
  }
  return absl::UnimplementedError(
      "tokenizer.chat_template is of no family this worker renders (ChatML, Llama 3, Gemma, "
      "[INST]); use --raw to prompt the model with the text as it is");
}

absl::StatusOr<ChatTemplate> ChatTemplateOf(const GgufFile& file) {
  auto source = file.GetString("tokenizer.chat_template");
  if (!source.ok()) {
    return absl::NotFoundError(
        "the model file has no tokenizer.chat_template (a base model?); use --raw to prompt it "
        "with the text as it is");
  }
  return ParseChatTemplate(*source);
}

absl::StatusOr<std::string> PromptText(const GgufFile& file, const std::string& user, bool raw) {
  if (raw) return user;
  auto chat = ChatTemplateOf(file);
  if (!chat.ok()) return chat.status();
  return chat->Render(user);
}

}  // namespace reasonalloc::worker

// The one-turn chat prompt of a model, from its GGUF file's own `tokenizer.chat_template`.
//
// The template is a Jinja program; rather than interpret Jinja, the worker recognises the families
// of templates that Llama-family models ship, by the markers they write, and renders a single user
// turn (with the template's default system message where it has one) the way the template would:
//   ChatML (<|im_start|>): SmolLM2, Qwen2 / Qwen2.5, many fine-tunes;
//   Llama 3 (<|start_header_id|>);
//   Gemma (<start_of_turn>);
//   Llama 2 / Mistral ([INST]).
// A file without a template, or with one of no known family, is an error that suggests --raw.
#ifndef REASONALLOC_WORKER_CHAT_TEMPLATE_H_
#define REASONALLOC_WORKER_CHAT_TEMPLATE_H_

#include <string>

#include "absl/status/statusor.h"
#include "worker/gguf.h"

namespace reasonalloc::worker {

struct ChatTemplate {
  std::string family;          // "chatml", "llama3", "gemma", "inst"
  std::string system_message;  // the template's default system message ("" when none)

  // The text of a one-turn chat ending where the assistant's answer begins. Special tokens appear
  // as their text ("<|im_start|>"), which the tokenizer maps to their ids. A BOS token is not
  // written: the tokenizer adds it when the file asks for one.
  std::string Render(const std::string& user) const;
};

// Recognises the family of `source` (a tokenizer.chat_template).
absl::StatusOr<ChatTemplate> ParseChatTemplate(const std::string& source);

// The chat template of a GGUF file.
absl::StatusOr<ChatTemplate> ChatTemplateOf(const GgufFile& file);

// The text a user's message is prompted with: as it is when `raw`, else the file's own chat
// template around it.
absl::StatusOr<std::string> PromptText(const GgufFile& file, const std::string& user, bool raw);

}  // namespace reasonalloc::worker

#endif  // REASONALLOC_WORKER_CHAT_TEMPLATE_H_

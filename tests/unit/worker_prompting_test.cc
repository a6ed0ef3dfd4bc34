// The worker's prompting and naming: chat-template families, the default system message, model
// names from file names and general.name, and the order in which a model file is found.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "worker/chat_template.h"
#include "worker/model_files.h"

namespace reasonalloc::worker {
namespace {

using ::testing::HasSubstr;

// SmolLM2's template writes its default system turn with real newlines; Qwen2.5's with escaped
// ones, after a tools branch whose system turn is built from the messages.
constexpr char kSmolLm[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|im_start|>assistant\n' }}{% endif %}";
constexpr char kQwen[] =
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == "
    "'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are "
    "Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n{%- "
    "else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' "
    "+ messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- "
    "'<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- if add_generation_prompt "
    "%}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

TEST(ChatTemplate, ChatMlWithTheDefaultSystemMessage) {
  auto smol = ParseChatTemplate(kSmolLm);
  ASSERT_TRUE(smol.ok()) << smol.status();
  EXPECT_EQ(smol->family, "chatml");
  EXPECT_EQ(smol->Render("hi"),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
  auto qwen = ParseChatTemplate(kQwen);
  ASSERT_TRUE(qwen.ok()) << qwen.status();
  EXPECT_EQ(qwen->system_message,
            "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.");
}

TEST(ChatTemplate, OtherFamiliesAndUnknownOnes) {
  auto gemma = ParseChatTemplate("{{ '<start_of_turn>' + role + '\n' }}");
  ASSERT_TRUE(gemma.ok());
  EXPECT_EQ(gemma->Render("hi"), "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n");
  auto inst = ParseChatTemplate("{{ bos_token + '[INST] ' + content + ' [/INST]' }}");
  ASSERT_TRUE(inst.ok());
  EXPECT_EQ(inst->Render("hi"), "[INST] hi [/INST]");
  auto llama3 = ParseChatTemplate("{{ '<|start_header_id|>' + role + '<|end_header_id|>' }}");
  ASSERT_TRUE(llama3.ok());
  EXPECT_EQ(llama3->Render("hi"),
            "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant"
            "<|end_header_id|>\n\n");
  auto unknown = ParseChatTemplate("{{ messages | tojson }}");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(unknown.status().message()), HasSubstr("--raw"));
}

TEST(ModelName, FromTheFileName) {
  EXPECT_EQ(ModelNameFromPath("/m/SmolLM2-135M-Instruct.Q4_1.gguf"), "smollm2-135m-instruct");
  EXPECT_EQ(ModelNameFromPath("Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"),
            "qwen2.5-coder-1.5b-instruct");
  EXPECT_EQ(ModelNameFromPath("mistral-7b-instruct-v0.2.IQ4_XS.gguf"), "mistral-7b-instruct-v0.2");
  EXPECT_EQ(ModelNameFromPath("tiny-f16.gguf"), "tiny");
  EXPECT_EQ(ModelNameFromPath("model.gguf"), "model");
  // Whatever the file is called, the name is one the sidecar accepts as a profile name.
  EXPECT_EQ(ModelNameFromPath("/tmp/My Model v2.gguf"), "my-model-v2");
  EXPECT_EQ(ModelNameFromPath(".q8_0.gguf"), "q8_0");  // a valid name, if an odd one
  EXPECT_EQ(ModelNameFromPath("x+y-Q4_0.gguf"), "x-y");
  for (const char* f : {"/tmp/My Model v2.gguf", "x+y-Q4_0.gguf", "ünïcode-Q4_0.gguf"}) {
    const std::string name = ModelNameFromPath(f);
    EXPECT_TRUE(name.empty() || IsValidModelName(name)) << f << " -> " << name;
  }
  EXPECT_EQ(ModelNameFromGeneralName("Qwen2.5 Coder 1.5B Instruct"), "qwen2.5-coder-1.5b-instruct");
  EXPECT_FALSE(IsValidModelName(".hidden"));
  EXPECT_FALSE(IsValidModelName("a b"));
  EXPECT_TRUE(IsValidModelName("smollm2-135m-instruct"));
}

class Location : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("reasonalloc-location-" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_ / "models");
    for (const char* v : {"REASONALLOC_MODEL", "REASONALLOC_MODEL_DIR", "XDG_CACHE_HOME"}) {
      if (const char* old = std::getenv(v)) saved_.emplace_back(v, old);
      ::unsetenv(v);
    }
  }
  void TearDown() override {
    for (const char* v : {"REASONALLOC_MODEL", "REASONALLOC_MODEL_DIR", "XDG_CACHE_HOME"}) {
      ::unsetenv(v);
    }
    for (const auto& [k, v] : saved_) ::setenv(k.c_str(), v.c_str(), 1);
    std::filesystem::remove_all(dir_);
  }
  void Touch(const std::filesystem::path& p) {
    std::filesystem::create_directories(p.parent_path());
    std::ofstream(p) << "x";
  }
  std::filesystem::path dir_;
  std::vector<std::pair<std::string, std::string>> saved_;
};

TEST_F(Location, FlagThenEnvironmentThenTheReferenceModelInTheModelFolder) {
  const std::string models = (dir_ / "models").string();
  ::setenv("REASONALLOC_MODEL_DIR", models.c_str(), 1);
  Touch(dir_ / "models" / kReferenceModelFile);
  Touch(dir_ / "models" / "other.gguf");
  EXPECT_EQ(*ResolveModelPath(""), models + "/" + kReferenceModelFile);
  ::setenv("REASONALLOC_MODEL", "other.gguf", 1);  // a file name: in the model folder
  EXPECT_EQ(*ResolveModelPath(""), models + "/other.gguf");
  EXPECT_EQ(*ResolveModelPath(models + "/" + kReferenceModelFile),  // the flag wins
            models + "/" + kReferenceModelFile);
  // XDG_CACHE_HOME is the folder when REASONALLOC_MODEL_DIR is not set.
  ::unsetenv("REASONALLOC_MODEL_DIR");
  ::unsetenv("REASONALLOC_MODEL");
  const std::string xdg = (dir_ / "xdg").string();
  ::setenv("XDG_CACHE_HOME", xdg.c_str(), 1);
  Touch(dir_ / "xdg" / "reasonalloc" / "models" / kReferenceModelFile);
  EXPECT_EQ(*ResolveModelPath(""), xdg + "/reasonalloc/models/" + kReferenceModelFile);
}

TEST_F(Location, NotFoundNamesWhereItLooked) {
  const std::string models = (dir_ / "models").string();
  ::setenv("REASONALLOC_MODEL_DIR", models.c_str(), 1);
  auto missing = ResolveModelPath("nope.gguf");
  ASSERT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr(models + "/nope.gguf (--model"));
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("REASONALLOC_MODEL_DIR"));
  // A folder is not a model file.
  EXPECT_FALSE(ResolveModelPath(models).ok());
}

}  // namespace
}  // namespace reasonalloc::worker

// Recall tasks as the worker reads them, and which generated tokens carry a task's answer.
#include "worker/recall_tasks.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

namespace reasonalloc::worker {
namespace {

using ::testing::HasSubstr;

// Token i is pieces[i]; ids are indices into it.
struct Pieces {
  std::vector<std::string> pieces;
  std::vector<int32_t> Ids() const {
    std::vector<int32_t> ids;
    for (size_t i = 0; i < pieces.size(); ++i) ids.push_back(static_cast<int32_t>(i));
    return ids;
  }
  std::string operator()(const std::vector<int32_t>& ids) const {
    std::string s;
    for (int32_t id : ids) s += pieces[static_cast<size_t>(id)];
    return s;
  }
};

int Count(const std::string& answer, const std::vector<std::string>& pieces) {
  const Pieces p{pieces};
  return AnswerTokenCount(answer, p.Ids(), p);
}

TEST(AnswerTokenCount, CountsThroughTheTokenThatEndsTheAnswersWord) {
  // A passkey split over two tokens: the last digit and the "." after it both count, so a model
  // that would write a sixth digit is not taken for one that answers.
  EXPECT_EQ(Count("12345", {"The", " passkey", " is", " 123", "45", ".", " Done"}), 6);
  // A word that only starts with the answer is not the answer; the later whole word is.
  EXPECT_EQ(Count("Paris", {"Par", "is", "ian", ",", " Paris", "!", " Yes"}), 6);
  // Case-insensitive, like the benchmark's rule.
  EXPECT_EQ(Count("marisol", {"MARI", "SOL", " is", " here"}), 3);
  // The answer ends the text: every token.
  EXPECT_EQ(Count("12345", {"It", " is", " 12345"}), 3);
}

TEST(AnswerTokenCount, IsZeroWhenTheTextDoesNotHoldTheAnswer) {
  EXPECT_EQ(Count("12345", {"It", " is", " 123456"}), 0);
  EXPECT_EQ(Count("Paris", {"Par", "isian"}), 0);
  EXPECT_EQ(Count("12345", {}), 0);
  EXPECT_EQ(Count("", {"anything"}), 0);
}

TEST(ReadRecallTasks, ReadsWhatTasksPyWritesAndNamesTheFlagInErrors) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("recall_tasks_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string good = (dir / "good.tsv").string(), bad = (dir / "bad.tsv").string();
  std::ofstream(good) << "# id\tkind\tanswer\thead\ttail (seed 2, 480 filler words)\n\n"
                      << "passkey-000\tpasskey\t12345\tThe passkey is 12345.\t\\n\\nWhat?\n";
  int seed = 0;
  auto tasks = ReadRecallTasks(good, "--recall_tasks", &seed);
  ASSERT_TRUE(tasks.ok()) << tasks.status();
  EXPECT_EQ(seed, 2);
  ASSERT_EQ(tasks->size(), 1u);
  EXPECT_EQ((*tasks)[0].answer, "12345");
  EXPECT_EQ((*tasks)[0].tail, "\n\nWhat?");
  std::ofstream(bad) << "t\tname\tx\thead\ttail\n";  // no header: no seed
  ASSERT_TRUE(ReadRecallTasks(bad, "--tasks", &seed).ok());
  EXPECT_EQ(seed, -1);
  std::ofstream(bad) << "a\tb\tc\n";
  EXPECT_THAT(ReadRecallTasks(bad, "--recall_tasks").status().message(),
              HasSubstr("--recall_tasks " + bad + " line 1: 3 columns, want 5"));
  std::ofstream(bad) << "a\tb\t\td\te\n";
  EXPECT_THAT(ReadRecallTasks(bad, "--tasks").status().message(), HasSubstr("empty answer"));
  std::ofstream(bad) << "# only a comment\n";
  EXPECT_THAT(ReadRecallTasks(bad, "--tasks").status().message(), HasSubstr("no tasks"));
  EXPECT_EQ(ReadRecallTasks((dir / "missing.tsv").string(), "--tasks").status().code(),
            absl::StatusCode::kNotFound);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace reasonalloc::worker

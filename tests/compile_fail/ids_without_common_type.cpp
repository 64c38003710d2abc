// Must not compile: the job's ID is an int, the result's a std::string.
#include <microbatch/microbatch.hpp>
#include <string>
struct Job {
  int id;
};
struct Result {
  std::string id;
};
std::vector<Result> process(std::span<Job> jobs) {
  return {{std::to_string(jobs.front().id)}};
}
int main() {
  microbatch::Batcher batcher(process, &Job::id, &Result::id);
}

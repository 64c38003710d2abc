// Must not compile: the processor returns one Result instead of std::vector<Result>.
#include <microbatch/microbatch.hpp>
struct Job {
  int id;
};
struct Result {
  int id;
};
Result process(std::span<Job> jobs) {
  return {jobs.front().id};
}
int main() {
  microbatch::Batcher batcher(process, &Job::id, &Result::id);
}

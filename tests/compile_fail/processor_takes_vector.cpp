// Must not compile: the processor takes std::vector<Job> instead of std::span<Job>.
#include <microbatch/microbatch.hpp>
struct Job {
  int id;
};
struct Result {
  int id;
};
std::vector<Result> process(std::vector<Job> jobs) {
  return {{jobs.front().id}};
}
int main() {
  microbatch::Batcher batcher(process, &Job::id, &Result::id);
}

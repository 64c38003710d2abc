// Quickstart: five callers on their own threads each need one answer from a remote service that
// prefers to be asked in batches. The batcher groups their jobs (3 per batch, or whatever arrived
// within 10 ms), sends each group in one call, and hands every caller its own answer by ID.
#include <microbatch/microbatch.hpp>

#include <chrono>
#include <cstdio>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

struct Job {
  std::string id;
  std::string request;
};

struct JobResult {
  std::string id;
  std::string response;
};

// Stands in for one network round trip carrying a whole batch; answers arrive in any order.
class RemoteProcessor {
public:
  std::vector<JobResult> operator()(std::span<Job> jobs) {
    std::vector<JobResult> results;
    std::string ids;
    for (auto it = jobs.rbegin(); it != jobs.rend(); ++it) {
      results.push_back({it->id, "processed " + it->request});
      ids += (ids.empty() ? "" : ", ") + it->id;
    }
    std::printf("remote call with %zu job(s): %s\n", jobs.size(), ids.c_str());
    return results;
  }
};

int main() {
  using namespace std::chrono_literals;
  microbatch::Batcher batcher(RemoteProcessor{}, &Job::id, &JobResult::id,
                              microbatch::Options{.max_batch_size = 3, .max_batch_delay = 10ms});

  std::mutex print_mutex;
  std::vector<std::thread> callers;
  for (int i = 1; i <= 5; ++i) {
    callers.emplace_back([&, i] {
      const std::string id = std::to_string(i);
      JobResult result = batcher.execute_job({id, "job " + id}); // blocks until its batch is back
      std::lock_guard lock(print_mutex);
      std::printf("caller %s got: %s\n", id.c_str(), result.response.c_str());
    });
  }
  for (auto& caller : callers)
    caller.join();
  batcher.shutdown();

  const microbatch::Stats stats = batcher.stats();
  std::printf("%llu jobs in %llu batches (%llu full, %llu timed out)\n",
              static_cast<unsigned long long>(stats.jobs_completed), static_cast<unsigned long long>(stats.batches),
              static_cast<unsigned long long>(stats.batches_full),
              static_cast<unsigned long long>(stats.batches_timed_out));
  return stats.jobs_completed == 5 ? 0 : 1;
}

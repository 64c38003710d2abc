// Coroutines: a few thousand concurrent "requests", started from two threads, each awaiting a lookup
// that the batcher groups with the others. No thread per request: a request is a coroutine frame, and
// while it waits for its batch it occupies no thread at all.
#include <microbatch/microbatch.hpp>

#include <atomic>
#include <chrono>
#include <coroutine>
#include <cstdio>
#include <exception>
#include <latch>
#include <span>
#include <thread>
#include <vector>

// A minimal fire-and-forget task: starts at once, frees its frame when it finishes.
struct task {
  struct promise_type {
    task get_return_object() noexcept { return {}; }
    std::suspend_never initial_suspend() noexcept { return {}; }
    std::suspend_never final_suspend() noexcept { return {}; }
    void return_void() noexcept {}
    void unhandled_exception() noexcept { std::terminate(); }
  };
};

struct Lookup {
  int user_id;
};
struct Profile {
  int user_id;
  int score;
};

std::atomic<int> batches{0};

std::vector<Profile> load_profiles(std::span<Lookup> lookups) { // one round trip for the whole batch
  batches.fetch_add(1);
  std::vector<Profile> profiles;
  for (const Lookup& lookup : lookups)
    profiles.push_back({lookup.user_id, lookup.user_id % 97});
  return profiles;
}

using ProfileBatcher = microbatch::Batcher<Lookup, Profile, decltype(&load_profiles)>;

// One request: two dependent lookups. Each co_await suspends the coroutine until its batch is back;
// it then continues on the batcher's worker thread.
task handle_request(ProfileBatcher& profiles, int user_id, std::atomic<long>& total, std::latch& done) {
  const Profile user = co_await profiles.async_execute_job({user_id});
  const Profile friend_of_user = co_await profiles.async_execute_job({user_id + 100000});
  total.fetch_add(user.score + friend_of_user.score);
  done.count_down();
}

int main() {
  using namespace std::chrono_literals;
  ProfileBatcher profiles(&load_profiles, &Lookup::user_id, &Profile::user_id,
                          microbatch::Options{.max_batch_size = 128, .max_batch_delay = 500us});
  constexpr int requests = 4000;
  std::atomic<long> total{0};
  std::latch done(requests);
  std::thread first([&] {
    for (int id = 0; id < requests; id += 2)
      handle_request(profiles, id, total, done);
  });
  std::thread second([&] {
    for (int id = 1; id < requests; id += 2)
      handle_request(profiles, id, total, done);
  });
  first.join();
  second.join();
  done.wait();
  profiles.shutdown();
  std::printf("%d requests, %llu lookups in %d batches, total score %ld\n", requests,
              static_cast<unsigned long long>(profiles.stats().jobs_completed), batches.load(), total.load());
  return profiles.stats().jobs_completed == 2 * requests ? 0 : 1;
}
